"""Checks a composed run config before any data or model is loaded.

Every problem is a :class:`ConfigError` whose message is one line naming the config key (or file)
and the fix; ``run.py`` prints it and exits non-zero.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peftlab.errors import ConfigError  # raised here; its home is below config and metrics

TASKS = ("seq_cls", "seq2seq", "causal_lm")
GENERATIVE = ("seq2seq", "causal_lm")
PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal_lm": "CAUSAL_LM"}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
PRECISIONS = ("no", "bf16", "fp16")


def peft_method(cfg: DictConfig) -> str:
    """'lora', 'ia3', ... from the PEFT config's ``_target_``; 'none' for full fine-tuning."""
    target = cfg.peft.get("_target_") if cfg.peft else None
    if not target:
        return "none"
    name = target.rsplit(".", 1)[-1].removesuffix("Config").lower()
    return {
        "promptencoder": "p_tuning",
        "prefixtuning": "prefix_tuning",
        "prompttuning": "prompt_tuning",
    }.get(name, name)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# What each scalar key of the run config must hold: int (a whole number), number, bool, str; "?" also
# allows null; "any" is not checked (lists, mappings). A key outside its section's table (added with
# `+` on the command line) is refused as unknown: nothing would read it. peft.* and the optimizer's
# keys are checked against the fields of their ``_target_`` class instead (see target_fields).
ANY = "any"
SCHEMA: dict[str, dict[str, str]] = {
    "": {
        "seed": "int",
        "resume": "str",
        "save_adapter": "bool",
        "logger": "str?",
        "model": ANY,
        "peft": ANY,
        "zero": ANY,
        "dataset": ANY,
        "train": ANY,
        "optimizer": ANY,
        "eval": ANY,
        "paths": ANY,
        "launcher": ANY,
        "checkpoint": ANY,
        "objective": ANY,
    },
    "objective": {
        "name": "str",
        "num_iterations": "int",
        "epochs": "int",
        "batch_size": "int?",
        "body_lr": "number?",
        "label_init": "bool",
    },
    "train": {
        "epochs": "int",
        "lr": "number",
        "batch_size": "int",
        "grad_accum": "int",
        "max_grad_norm": "number?",
        "mixed_precision": "str",
        "weight_decay": "number",
        "warmup_ratio": "number",
        "head_only_epochs": "int",
        "max_length": "int",
        "gradient_checkpointing": "bool",
        "tf32": "bool",
        "profile_steps": "int",
    },
    "eval": {
        "mode": "str",
        "split": "str",
        "val_fraction": "number",
        "folds": "int",
        "fold_repeats": "int",
        "select_on": "str",
        "batch_size": "int",
        "max_new_tokens": "int",
        "mixed_precision": "str",
        "metrics": ANY,
    },
    "paths": {"data_dir": "str?", "output_dir": "str", "cache_dir": "str"},
    "launcher": {
        "num_processes": "int",
        "num_machines": "int",
        "machine_rank": "int",
        "main_process_ip": "str?",
        "main_process_port": "int?",
    },
    "checkpoint": {"every_steps": "int", "every_epochs": "int", "keep_last": "int"},
    "model": {
        "name": "str",
        "task": "str",
        "pretrained": "str?",
        "tokenizer": "str?",
        "config": ANY,
        "pooling": "str",
        "trust_remote_code": "bool",
        "materialize": "bool",
        "unsupported_peft": ANY,
        "layer_classes": ANY,
        "target_modules": ANY,
        "ia3_target_modules": ANY,
        "ia3_feedforward_modules": ANY,
    },
    "zero": {
        "name": "str",
        "stage": "int",
        "offload_optimizer_device": "str",
        "offload_param_device": "str",
        "offload_optimizer_nvme_path": "str?",
        "offload_param_nvme_path": "str?",
        "zero3_init": "bool",
        "leaf_layers": "bool",
        "optimizer": "str",
        "settings": ANY,
    },
    "dataset": {
        "name": "str",
        "data_dir": "str?",
        "format": "str",
        "files": ANY,
        "hub": ANY,
        "text_column": "str",
        "label_column": "str",
        "id_column": "str?",
        "labels": ANY,
        "unlabeled": ANY,
        "prompt": "str",
    },
}
KINDS = {"int": "a whole number", "number": "a number", "bool": "true or false", "str": "text"}
# Names people type for a PEFT field under another name (difflib cannot see that rank means r)
ALIASES = {
    "rank": ("r", "init_r"),
    "alpha": ("lora_alpha", "alpha"),
    "dropout": ("lora_dropout", "module_dropout"),
    "target": ("target_modules",),
    "modules": ("target_modules",),
    "lr": ("lr",),
    "learning_rate": ("lr",),
}
REAL_VALUED_INTS = ("lora_alpha", "alpha")  # annotated int by PEFT, used as a scale: floats work


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _is_kind(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"bool": bool, "str": str}[kind])


def _check_kind(key: str, value, kind: str) -> None:
    nullable, kind = kind.endswith("?"), kind.rstrip("?")
    if kind == ANY or (value is None and nullable):
        return
    if kind.startswith("one of "):
        choices = kind.removeprefix("one of ").split("|")
        _check(value in choices, f"{key}={_show(value)} must be one of {', '.join(choices)}")
        return
    if _is_kind(value, kind):
        return
    hint = (
        f": quote it, {key}=\"'{_show(value)}'\"" if kind == "str" and isinstance(value, (int, float)) else ""
    )
    raise ConfigError(f"{key}={_show(value)} must be {KINDS[kind]}{', or null' if nullable else ''}{hint}")


def _unknown(key: str, known, where: str) -> ConfigError:
    *section, name = key.split(".")
    prefix = ".".join(section) + "." if section else ""
    guesses = [a for a in ALIASES.get(name, ()) if a in known] or difflib.get_close_matches(
        name, list(known), n=1, cutoff=0.6
    )
    fix = (
        f"did you mean {prefix}{guesses[0]}?"
        if guesses
        else f"remove it (keys: {', '.join(sorted(known)[:12])})"
    )
    return ConfigError(f"{key} is not a key of {where}; {fix}")


def _values(node: DictConfig, section: str):
    """(key, value) of a config section, each value resolved; a broken interpolation is one line."""
    for name in node:
        key = f"{section}.{name}" if section else str(name)
        if OmegaConf.is_missing(node, name):
            continue  # ??? : the check of that key names what to give
        try:
            yield key, name, node[name]
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key} cannot be resolved ({str(e).splitlines()[0]}); fix its value") from None


def _validate_keys(cfg: DictConfig) -> None:
    """Every key is one the run reads, and every scalar has the type its default has."""
    for section, schema in SCHEMA.items():
        node = cfg if not section else cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        where = (
            "the run config"
            if not section
            else section
            if section not in ("model", "zero", "dataset")
            else f"{section}={node.get('name')}"
        )
        for key, name, value in _values(node, section):
            if name not in schema:
                raise _unknown(key, schema, where)
            _check_kind(key, value, schema[name])
    for section in ("peft", "optimizer"):
        node = cfg.get(section)
        if not isinstance(node, DictConfig) or not node.get("_target_"):
            continue
        target = str(node._target_)
        extra = [
            k for k in node if k != "_target_" and (section == "peft" or k not in ("lr", "weight_decay"))
        ]
        fields = target_fields(target, load=section != "peft" and bool(extra))
        if fields is None:
            continue
        where = f"peft={peft_method(cfg)}" if section == "peft" else f"optimizer ({target})"
        for key, name, value in _values(node, section):
            if name == "_target_" or (section == "optimizer" and name not in extra):
                continue
            if name not in fields:
                raise _unknown(key, fields, where)
            kind = _annotation_kind(fields[name])
            if (
                value is not None
            ):  # null: the field's default, or (peft.tinit, peft.tfinal) computed by peftlab
                _check_kind(key, value, "number" if kind == "int" and name in REAL_VALUED_INTS else kind)


def _annotation_kind(annotation: str | None) -> str:
    """int | number | bool | str | 'one of a|b' | any, from a field's annotation (source text)."""
    if not annotation:
        return ANY
    text = annotation.replace(" ", "")
    inner = (
        re.fullmatch(r"(?:typing\.)?Optional\[(.*)\]", text)
        or re.fullmatch(r"(.*)\|None", text)
        or re.fullmatch(r"None\|(.*)", text)
    )
    text = inner.group(1) if inner else text
    simple = {"int": "int", "float": "number", "bool": "bool", "str": "str"}
    if text in simple:
        return simple[text]
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text)
    if literal:
        try:
            choices = ast.literal_eval(f"({literal.group(1)},)")
        except (ValueError, SyntaxError):
            return ANY
        if all(isinstance(c, str) for c in choices):
            return "one of " + "|".join(choices)
    return ANY


@functools.cache
def target_fields(target: str, load: bool = False) -> dict[str, str | None] | None:
    """The keyword arguments class ``target`` accepts, each with its annotation (source text, or None).

    Read from the package's source with ``ast``, without importing it: ``import peft`` takes seconds
    (torch, transformers), and a config error must not wait for that. Dataclass fields are collected
    through the base classes found in the same package; an ``__init__`` gives its parameters. None
    when that cannot be told (a class that takes ``**kwargs``, or one not found), unless ``load``:
    then the class is imported and its signature read."""
    package, _, rest = target.partition(".")
    name = rest.rsplit(".", 1)[-1]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    found = None
    if spec is not None and spec.submodule_search_locations:
        found = _source_fields(Path(next(iter(spec.submodule_search_locations))), name, rest)
    if found is not None or not load:
        return found
    return _loaded_fields(target)


def _loaded_fields(target: str) -> dict[str, str | None] | None:
    import inspect

    from hydra.utils import get_class

    try:
        params = inspect.signature(get_class(target)).parameters.values()
    except Exception:  # not importable / no signature: instantiate will say so
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name: None for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@functools.cache
def _class_index(root: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for match in re.finditer(r"^class (\w+)\b", text, re.M):
            index.setdefault(match.group(1), []).append(path)
    return index


@functools.cache
def _parsed(path: Path) -> dict[str, ast.ClassDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _source_fields(root: Path, name: str, dotted: str) -> dict[str, str | None] | None:
    index = _class_index(root)

    def find(cls: str, hint: str = "") -> ast.ClassDef | None:
        paths = index.get(cls, [])
        module = hint.rsplit(".", 1)[0].replace(".", "/")
        paths = sorted(paths, key=lambda p: module not in str(p.with_suffix("")))  # the named module first
        return _parsed(paths[0]).get(cls) if paths else None

    fields: dict[str, str | None] = {}

    def collect(node: ast.ClassDef, depth: int = 0) -> bool:
        if depth > 10:
            return False
        for base in node.bases:
            base_name = (
                base.id
                if isinstance(base, ast.Name)
                else base.attr
                if isinstance(base, ast.Attribute)
                else None
            )
            parent = find(base_name) if base_name else None
            if parent is not None and not collect(parent, depth + 1):
                return False
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                if item.args.kwarg is not None:
                    return False  # takes **kwargs: anything goes
                fields.clear()  # an explicit __init__ replaces what the bases took
                args = (
                    item.args.posonlyargs[1:] + item.args.args[1:]
                    if item.args.posonlyargs
                    else item.args.args[1:]
                )
                for arg in (*args, *item.args.kwonlyargs):
                    fields[arg.arg] = ast.unparse(arg.annotation) if arg.annotation else None
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                annotation = ast.unparse(item.annotation)
                no_init = isinstance(item.value, ast.Call) and any(
                    k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in item.value.keywords
                )
                if not annotation.startswith(("ClassVar", "typing.ClassVar")) and not no_init:
                    fields[item.target.id] = annotation
        return True

    node = find(name, dotted)
    if node is None or not collect(node):
        return None
    return fields


def _folder(key: str, value, must_exist: bool = True, needs: str = "") -> Path | None:
    """``value`` as a local folder for ``key``: one line when it is a file, or missing (``must_exist``)."""
    if value is None or value == "":
        return None
    path = Path(str(value)).expanduser()
    _check(not path.is_file(), f"{key}={value} is a file, not a folder; {needs or 'point it at a folder'}")
    _check(
        path.is_dir() or not must_exist,
        f"{key}={value}: no such folder; {needs or 'point it at an existing folder'}",
    )
    return path


def _validate_paths(cfg: DictConfig) -> None:
    ds = cfg.dataset
    _folder(
        "dataset.data_dir",
        ds.get("data_dir"),
        needs=f"point it at a folder holding {', '.join(str(v) for v in (ds.get('files') or {}).values())}",
    )
    data_root = cfg.paths.get("data_dir")
    if data_root and not ds.get("data_dir"):
        candidate = Path(str(data_root)).expanduser() / str(ds.name)
        _check(
            not candidate.is_file(),
            f"paths.data_dir={data_root} holds a file {ds.name}, where the dataset's folder "
            "would be; point paths.data_dir (PEFTLAB_DATA_DIR) elsewhere, or give dataset.data_dir",
        )
    _folder(
        "paths.cache_dir",
        cfg.paths.get("cache_dir"),
        must_exist=False,
        needs="point it at a folder (or nowhere yet)",
    )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first impossible or out-of-range setting.

    Light on purpose: no torch, transformers or PEFT import (``run.py`` calls it before those load),
    except torch for the device checks of fp16 and of a rank's LOCAL_RANK."""
    _validate_keys(cfg)
    _validate_paths(cfg)
    _validate_model(cfg)
    _validate_train(cfg)
    _validate_objective(cfg)
    _validate_zero(cfg)
    _validate_peft(cfg)
    _validate_eval(cfg)
    _validate_devices(cfg)


def _validate_model(cfg: DictConfig) -> None:
    m = cfg.model
    _check(
        m.task in TASKS,
        f"model.task={m.task} is not one of {', '.join(TASKS)}: fix the model file conf/model/{m.name}.yaml",
    )
    _check(
        bool(m.pretrained) or bool(m.config),
        f"model.pretrained and model.config are both empty: give a hub id or folder (model.pretrained=...) or a config for random weights in conf/model/{m.name}.yaml",
    )
    _check(m.pooling in ("cls", "mean"), f"model.pooling={m.pooling} must be cls or mean")
    for key in ("pretrained", "tokenizer"):
        if is_local(m.get(key)):
            _folder(f"model.{key}", m.get(key), needs="give an existing model folder or a hub id")


def is_local(source) -> bool:
    """Whether model.pretrained / model.tokenizer names a local folder (else a hub id, or nothing)."""
    return bool(source) and (
        str(source).startswith((".", "/", "~")) or Path(str(source)).expanduser().exists()
    )


# A model loads with use_safetensors=True: config.json plus one of these must be at hand
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def check_model_files(m: DictConfig) -> None:
    """A hub model's files are in the local Hugging Face cache, or can be fetched: one line otherwise.

    Under HF_HUB_OFFLINE=1 only the cache is looked at; online, a missing config.json is downloaded
    now (transformers would fetch it anyway), so an unreachable hub or a wrong id shows here, before
    data and weights load. Light: huggingface_hub only."""
    sources = {m.get("pretrained"): "model.pretrained"}
    sources.setdefault(m.get("tokenizer"), "model.tokenizer")
    for source, key in sources.items():
        if not source or is_local(source):
            continue
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

        repo = str(source)
        revision = m.get("revision")
        wanted = ("config.json",) if key == "model.tokenizer" else ("config.json", WEIGHTS)
        cached = lambda name: isinstance(try_to_load_from_cache(repo, name, revision=revision), str)  # noqa: E731
        missing = [w for w in wanted if not any(cached(n) for n in ((w,) if isinstance(w, str) else w))]
        if not missing:
            continue
        fix = (
            f"run `huggingface-cli download {repo}` on a machine with internet (into HF_HOME, {constants.HF_HUB_CACHE}), "
            f"or download it to a folder and give {key}=/path/to/folder"
        )
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{key}={repo} is not in the local Hugging Face cache and the hub is off (HF_HUB_OFFLINE=1): {fix}"
            )
        try:
            hf_hub_download(repo, "config.json", revision=revision)
        except (
            Exception
        ) as e:  # RepositoryNotFoundError, LocalEntryNotFoundError (hub unreachable), HTTP errors
            reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise ConfigError(
                f"{key}={repo} is not in the local Hugging Face cache and could not be fetched ({type(e).__name__}: "
                f"{reason}): {fix}"
            ) from None


def _positive_int(value, key: str, or_null: str | None = None) -> None:
    """``key``'s ``value`` is a whole number >= 1; with ``or_null`` (what null stands for), null too."""
    if or_null is not None and value is None:
        return
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{key}={value} must be a whole number >= 1" + (f", or null for {or_null}" if or_null else ""),
    )


def _validate_train(cfg: DictConfig) -> None:
    t = cfg.train
    _positive_int(t.epochs, "train.epochs")
    _positive_int(t.batch_size, "train.batch_size")
    _positive_int(t.grad_accum, "train.grad_accum")
    _check(
        isinstance(t.lr, (int, float)) and t.lr > 0,
        f"train.lr={t.lr} must be a number > 0, e.g. train.lr=1e-3",
    )
    _check(
        t.max_grad_norm is None or (isinstance(t.max_grad_norm, (int, float)) and t.max_grad_norm > 0),
        f"train.max_grad_norm={t.max_grad_norm} must be > 0, or null for no clipping",
    )
    _check(
        t.mixed_precision in PRECISIONS,
        f"train.mixed_precision={t.mixed_precision} must be one of {', '.join(PRECISIONS)}",
    )
    _check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _positive_int(t.max_length, "train.max_length")
    head = t.head_only_epochs
    _check(
        isinstance(head, int) and not isinstance(head, bool) and 0 <= head < t.epochs,
        f"train.head_only_epochs={head} must be a whole number from 0 to train.epochs-1 ({t.epochs - 1})",
    )
    if head:
        _check(
            cfg.model.task == "seq_cls",
            f"train.head_only_epochs={head} needs a classification head (model.task=seq_cls); "
            f"model={cfg.model.name} is {cfg.model.task}: use train.head_only_epochs=0",
        )
    for key in ("gradient_checkpointing", "tf32"):
        _check(isinstance(t.get(key, False), bool), f"train.{key}={t.get(key)} must be true or false")


OBJECTIVES = ("cross_entropy", "contrastive")


def objective_name(cfg: DictConfig) -> str:
    """The run's ``objective.name``; cross_entropy for a config from before conf/objective/ existed."""
    o = cfg.get("objective")
    return o.name if isinstance(o, DictConfig) else "cross_entropy"


def check_objective(objective: str, task: str, pooling: str) -> None:
    """``objective`` is known and the contrastive one (SetFit, arXiv:2209.11055) has what it needs: a
    classification head (``model.task=seq_cls``) reading mean-pooled embeddings (``model.pooling=mean``).
    Raises ConfigError naming the key and the fix."""
    _check(objective in OBJECTIVES, f"objective={objective} must be one of {', '.join(OBJECTIVES)}")
    if objective != "contrastive":
        return
    _check(
        task == "seq_cls",
        f"objective=contrastive trains sentence embeddings and a classification head: it needs "
        f"model.task=seq_cls, this model is {task}; use objective=cross_entropy",
    )
    _check(
        pooling == "mean",
        "objective=contrastive trains mean-pooled embeddings, which the head must read: "
        f"model.pooling={pooling} feeds it the first token; use model.pooling=mean",
    )


def _validate_objective(cfg: DictConfig) -> None:
    name = objective_name(cfg)
    check_objective(name, cfg.model.task, cfg.model.pooling)
    if name != "contrastive":
        return
    o = cfg.objective
    _positive_int(o.num_iterations, "objective.num_iterations")
    _positive_int(o.epochs, "objective.epochs")
    _positive_int(o.get("batch_size"), "objective.batch_size", or_null="train.batch_size")
    _check(
        o.body_lr is None or o.body_lr > 0,
        f"objective.body_lr={o.body_lr} must be a number > 0, or null for train.lr",
    )
    _check(
        cfg.train.head_only_epochs == 0,
        f"train.head_only_epochs={cfg.train.head_only_epochs} does not apply to objective=contrastive, whose "
        f"head phase is train.epochs={cfg.train.epochs} after objective.epochs of pairs: use train.head_only_epochs=0",
    )


def _validate_devices(cfg: DictConfig) -> None:
    """What this machine must have for the settings (checked in each process, after any launcher)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Tried on the CPU (tiny_bert, 1 epoch): ZeRO-3 in bf16 fails in the first step when PEFT wraps a
    # classifier's head (modules_to_save), float32 head against bf16 activations (stage3_cpu: a dtype
    # RuntimeError; stage3: an assertion in DeepSpeed's defragment). seq2seq and causal_lm, peft=none,
    # zero=stage2_cpu and zero=none train in bf16 there. Not tried on a GPU, so refused on the CPU only.
    bf16_zero3_head = (
        cfg.train.mixed_precision == "bf16"
        and cfg.zero.stage == 3
        and cfg.model.task == "seq_cls"
        and peft_method(cfg) != "none"
    )
    if cfg.train.mixed_precision != "fp16" and local_rank == 0 and not bf16_zero3_head:
        return  # nothing to ask torch (whose import takes seconds)
    import torch

    gpus = torch.cuda.device_count()  # the visible ones (CUDA_VISIBLE_DEVICES)
    if cfg.train.mixed_precision == "fp16":
        _check(
            gpus > 0,
            "train.mixed_precision=fp16 needs a GPU; use train.mixed_precision=bf16 or no on the CPU",
        )
    if bf16_zero3_head:
        _check(
            gpus > 0,
            f"train.mixed_precision=bf16 with zero={cfg.zero.name} (stage 3) fails on the CPU for a classifier "
            f"with an adapter (model={cfg.model.name} is seq_cls, peft={peft_method(cfg)}: DeepSpeed meets the "
            "float32 head with bf16 inputs); use train.mixed_precision=no, or zero=stage2_cpu with bf16",
        )
    _check(
        gpus == 0 or local_rank < gpus,
        f"this is process {local_rank} on its machine (LOCAL_RANK={local_rank}) but the machine has {gpus} GPU(s) visible: "
        f"start at most {gpus} process(es) per machine (launcher.num_processes), or set CUDA_VISIBLE_DEVICES= to run on the CPU",
    )


def _validate_zero(cfg: DictConfig) -> None:
    z = cfg.zero
    _check(z.stage in (0, 1, 2, 3), f"zero.stage={z.stage} must be 0 (no DeepSpeed), 1, 2 or 3")
    for key in ("offload_optimizer_device", "offload_param_device"):
        _check(z[key] in OFFLOAD_DEVICES, f"zero.{key}={z[key]} must be one of {', '.join(OFFLOAD_DEVICES)}")
    if z.offload_param_device != "none":
        _check(
            z.stage == 3,
            f"zero.offload_param_device={z.offload_param_device} needs zero.stage=3; use zero=stage3_cpu",
        )
    if z.offload_optimizer_device != "none":
        _check(
            z.stage >= 1,
            f"zero.offload_optimizer_device={z.offload_optimizer_device} needs DeepSpeed; use zero=stage2_cpu or zero=stage3_cpu",
        )
    if z.zero3_init:
        _check(z.stage == 3, f"zero.zero3_init=true needs zero.stage=3 (zero={z.name} is stage {z.stage})")
    for kind in ("param", "optimizer"):
        if z[f"offload_{kind}_device"] == "nvme":
            key = f"offload_{kind}_nvme_path"
            _check(
                not OmegaConf.is_missing(z, key) and bool(z[key]),
                f"zero.{key} is required for NVMe offload: add zero.{key}=/path/on/a/local/nvme/disk",
            )
            path = Path(z[key])
            _check(
                path.is_dir() and os.access(path, os.W_OK),
                f"zero.{key}={path} is not a writable directory: create it or point to one",
            )


def _validate_peft(cfg: DictConfig) -> None:
    method = peft_method(cfg)
    p = cfg.peft
    for key in ("r", "init_r", "target_r", "num_virtual_tokens", "encoder_hidden_size"):
        if key in p:
            _positive_int(p[key], f"peft.{key}")
    for key in ("lora_alpha", "alpha"):
        if key in p:
            _check(isinstance(p[key], (int, float)) and p[key] > 0, f"peft.{key}={p[key]} must be > 0")
    for key in ("lora_dropout", "rank_dropout", "module_dropout"):
        if key in p:
            _check(0 <= p[key] < 1, f"peft.{key}={p[key]} must be in [0, 1)")
    if method in ("lora", "adalora", "loha", "lokr", "ia3"):
        _check(
            bool(p.target_modules),
            f"peft.target_modules is empty: list the model's module names in conf/model/{cfg.model.name}.yaml",
        )
    if method in cfg.model.unsupported_peft:
        raise ConfigError(
            f"peft={method} does not work with model={cfg.model.name} (see unsupported_peft in conf/model/{cfg.model.name}.yaml): "
            "choose another method, e.g. peft=lora or peft=prompt_tuning"
        )
    if method == "adalora":
        _check(
            cfg.zero.stage == 0,
            f"peft=adalora re-allocates ranks from gradients that DeepSpeed has already consumed in its step (zero={cfg.zero.name}); use zero=none",
        )
        _check(p.target_r <= p.init_r, f"peft.target_r={p.target_r} must be <= peft.init_r={p.init_r}")
        for key in ("tinit", "tfinal"):
            _check(
                p.get(key) is None or p[key] >= 0,
                f"peft.{key}={p.get(key)} must be a whole number >= 0, or null for the default",
            )
    if cfg.model.task == "seq_cls" and cfg.model.pooling == "mean":
        _check(
            method not in ("prefix_tuning", "prompt_tuning", "p_tuning"),
            f"peft={method} adds virtual tokens, which model.pooling=mean would average in; use model.pooling=cls",
        )


def _validate_eval(cfg: DictConfig) -> None:
    e = cfg.eval
    _check(e.mode in ("score", "generate", "both"), f"eval.mode={e.mode} must be score, generate or both")
    if e.mode != "score":
        _check(
            cfg.model.task in GENERATIVE,
            f"eval.mode={e.mode} needs a generative model (seq2seq or causal_lm); model={cfg.model.name} is {cfg.model.task}: use eval.mode=score",
        )
    _check(
        e.split in ("test", "validation", "kfold"), f"eval.split={e.split} must be test, validation or kfold"
    )
    _check(e.select_on in ("test", "validation"), f"eval.select_on={e.select_on} must be test or validation")
    _check(
        cfg.logger in (None, "tensorboard", "wandb", "mlflow"),
        f"logger={cfg.logger} must be tensorboard, wandb, mlflow or null",
    )
    if cfg.logger:
        import importlib.util

        _check(
            importlib.util.find_spec(cfg.logger) is not None,
            f"logger={cfg.logger} needs `pip install {cfg.logger}`; or use logger=null",
        )
    _check(0 < e.val_fraction < 1, f"eval.val_fraction={e.val_fraction} must be in (0, 1)")
    _check(isinstance(e.folds, int) and e.folds >= 2, f"eval.folds={e.folds} must be a whole number >= 2")
    _positive_int(e.fold_repeats, "eval.fold_repeats")
    _positive_int(e.batch_size, "eval.batch_size")
    _positive_int(e.max_new_tokens, "eval.max_new_tokens")
    _check(
        e.mixed_precision in ("no", "bf16"), f"eval.mixed_precision={e.mixed_precision} must be no or bf16"
    )
    names = e.get("metrics")
    _check(
        isinstance(names, ListConfig) and all(isinstance(n, str) and n for n in names),
        f"eval.metrics={_show(names)} must be a list of metric names, e.g. eval.metrics=[accuracy,macro_f1,matthews_correlation]",
    )
    from peftlab.metrics import check_names

    check_names(names)
