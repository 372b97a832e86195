"""Tokenizer, base model (pretrained or random weights) and the PEFT wrapper, from the config.

Under ZeRO-3 with ``zero.zero3_init`` the Accelerator must exist before :func:`build_model`:
transformers then builds the model inside ``deepspeed.zero.Init``, so each parameter is
partitioned as it is created and the whole model never sits on one device.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    set_seed,
)

from peftlab.config import PEFT_TASK_TYPES, ConfigError, check_model_files, peft_method

log = logging.getLogger(__name__)
AUTO_CLASSES = {"seq_cls": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM, "causal_lm": AutoModelForCausalLM}
_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(m: DictConfig):
    """The model's tokenizer (cached per process), with a pad token guaranteed."""
    key = str(m.tokenizer)
    if key not in _TOKENIZERS:
        if m.trust_remote_code:
            log.warning("model.trust_remote_code=true: running code from %s", m.tokenizer)
        with _one_line(m, "model.tokenizer"):
            tok = AutoTokenizer.from_pretrained(m.tokenizer, trust_remote_code=m.trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def build_model(cfg: DictConfig, num_labels: int, total_steps: int):
    """Base model with the PEFT adapter applied (or all weights trainable for peft=none)."""
    m = cfg.model
    set_seed(cfg.seed)  # classification heads and random-weight models start the same for a seed
    auto = AUTO_CLASSES[m.task]
    extra = {"num_labels": num_labels} if m.task == "seq_cls" else {}
    source = m.pretrained or (random_weights(cfg, num_labels) if m.get("materialize", True) else None)
    if source:
        if m.trust_remote_code:
            log.warning("model.trust_remote_code=true: running the model code of %s", source)
        with _one_line(m):
            model = auto.from_pretrained(source, trust_remote_code=m.trust_remote_code, use_safetensors=True, **extra)
    else:  # straight from the config: under zero.Init the init differs from a plain one, so reloads can't rebuild it
        model = auto.from_config(instantiate(m.config, **extra))
    tok = load_tokenizer(m)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if wants_mean_pooling(m):
        use_mean_pooling(model)
    if cfg.train.get("gradient_checkpointing"):  # non-reentrant: works with frozen inputs and ZeRO-3's hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_peft(model, cfg, total_steps)


class MeanPooler(torch.nn.Module):
    """In place of a BERT pooler (dense + tanh on the first token): the mean of the token states,
    padding left out, which is how sentence-transformers pools all-MiniLM-L6-v2. The encoder's
    attention mask reaches it through a pre-hook (``use_mean_pooling``)."""

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        mask = (self.mask if self.mask is not None else states.new_ones(states.shape[:2])).unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def wants_mean_pooling(m: DictConfig) -> bool:
    return m.task == "seq_cls" and m.get("pooling", "cls") == "mean"


def check_pooling(m: DictConfig) -> None:
    """Before any weights load: the model's files are at hand (local folder, or the Hugging Face
    cache: :func:`peftlab.config.check_model_files`), and ``model.pooling=mean``, which replaces the
    encoder's pooler, has one to replace. That is checked on a weightless (meta-device) build."""
    check_model_files(m)
    if not wants_mean_pooling(m):
        return
    with _one_line(m):
        config = (AutoConfig.from_pretrained(m.pretrained, trust_remote_code=m.trust_remote_code) if m.pretrained
                  else instantiate(m.config))
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config, trust_remote_code=m.trust_remote_code)
    if not isinstance(getattr(skeleton.base_model, "pooler", None), torch.nn.Module):
        raise ConfigError(f"model.pooling=mean needs an encoder with a pooler (BERT family); model={m.name} "
                          f"({type(skeleton).__name__}) has none: use model.pooling=cls")


def use_mean_pooling(model) -> None:
    """``model.pooling=mean``: the classifier reads the masked mean of the token states."""
    encoder = model.base_model
    pooler = encoder.pooler = MeanPooler()

    def keep_mask(module, args, kwargs):
        pooler.mask = kwargs["attention_mask"] if kwargs.get("attention_mask") is not None else (args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)


def random_weights(cfg: DictConfig, num_labels: int) -> Path:
    """A folder with the model's random weights for this seed, made once and cached.

    Building random weights inside ``zero.Init`` draws them differently from a plain build, so a
    ZeRO-3 run could not be reloaded onto the same base. Materializing them on the CPU first and
    loading them like a pretrained model makes the base identical in every setting and reload.
    """
    m = cfg.model
    key = hashlib.sha1(f"{OmegaConf.to_yaml(m.config)}|{cfg.seed}|{num_labels}|{m.task}".encode()).hexdigest()[:12]
    folder = Path(cfg.paths.cache_dir).expanduser() / "random_weights" / f"{m.name}-{key}"
    if not (folder / "config.json").is_file():
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise RuntimeError("random weights must be materialized before the ZeRO-3 Accelerator exists (zero.Init would partition them)")
        set_seed(cfg.seed)
        extra = {"num_labels": num_labels} if m.task == "seq_cls" else {}
        model = AUTO_CLASSES[m.task].from_config(instantiate(m.config, **extra))
        tmp = Path(tempfile.mkdtemp(dir=folder.parent.mkdir(parents=True, exist_ok=True) or folder.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def set_zero3_leaves(model, cfg: DictConfig) -> list[str]:
    """Under ZeRO-3 with ``zero.leaf_layers``, fetch each transformer layer's parameters in one go.

    ZeRO-3 otherwise gathers and releases every submodule's parameters through its own hooks
    (hundreds per step for bart-large, each a small copy plus Python overhead); marking the layer
    classes named in ``model.layer_classes`` as leaves makes it one gather per layer.
    """
    names = set(cfg.model.get("layer_classes") or [])
    if cfg.zero.stage != 3 or not cfg.zero.get("leaf_layers") or not names:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    classes = list({type(m) for m in model.modules() if type(m).__name__ in names})
    set_z3_leaf_modules(model, classes)
    # A leaf's backward hook fires through its inputs' gradients; with frozen embeddings the first
    # layer's input needs none, and its parameters would never be fetched for backward.
    model.enable_input_require_grads()
    return sorted(c.__name__ for c in classes)


def peft_config(cfg: DictConfig, total_steps: int):
    """The PEFT config instantiated from ``cfg.peft`` (``_target_``), or None for full fine-tuning."""
    method = peft_method(cfg)
    if method == "none":
        return None
    extra = {"task_type": PEFT_TASK_TYPES[cfg.model.task]}
    if method == "adalora":
        extra["total_step"] = total_steps
        extra["tinit"], extra["tfinal"] = adalora_schedule(cfg, total_steps)
    return instantiate(cfg.peft, _convert_="all", **extra)


def apply_peft(model, cfg: DictConfig, total_steps: int):
    from peft import get_peft_model

    config = peft_config(cfg, total_steps)
    return model if config is None else get_peft_model(model, config)


def optimizer_steps(n_rows: int, cfg: DictConfig, num_processes: int) -> int:
    """Optimizer steps of the whole run as one process sees them (checked against AdaLoRA's schedule)."""
    batches = math.ceil(math.ceil(n_rows / cfg.train.batch_size) / num_processes)
    total = math.ceil(batches / cfg.train.grad_accum) * cfg.train.epochs
    check_adalora_schedule(cfg, total, f"{n_rows} training rows, train.batch_size={cfg.train.batch_size}, "
                                       f"train.grad_accum={cfg.train.grad_accum}, {num_processes} process(es)")
    return total


def adalora_schedule(cfg: DictConfig, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) as AdaLoRA gets them: the configured ones, or 10% and 20% of the run's steps."""
    p = cfg.peft
    return (p.tinit if p.tinit is not None else int(0.1 * total_steps),
            p.tfinal if p.tfinal is not None else int(0.2 * total_steps))


def check_adalora_schedule(cfg: DictConfig, total_steps: int, how: str = "") -> None:
    """AdaLoRA re-allocates ranks between step ``tinit`` and ``total_step - tfinal``: PEFT refuses a
    schedule that leaves no step for it, but only once the model is built, naming its own ``total_step``.
    Checked here, when the training rows are counted and before any model loads, in the run's keys."""
    if peft_method(cfg) != "adalora":
        return
    tinit, tfinal = adalora_schedule(cfg, total_steps)
    if tinit + tfinal < total_steps:
        return
    per_epoch = total_steps // cfg.train.epochs
    given = lambda key, value: f"peft.{key}={value}" if cfg.peft[key] is not None else f"peft.{key}=null ({value})"  # noqa: E731
    raise ConfigError(f"{given('tinit', tinit)} + {given('tfinal', tfinal)} = {tinit + tfinal} leave AdaLoRA no steps to "
                      f"re-allocate ranks in: the run has {total_steps} optimizer steps (train.epochs={cfg.train.epochs} x "
                      f"{per_epoch} per epoch{f': {how}' if how else ''}); make peft.tinit + peft.tfinal < {total_steps}, "
                      "or raise train.epochs")


class _one_line(contextlib.AbstractContextManager):
    """A model or tokenizer that cannot be loaded (files missing, hub unreachable): one line naming the key."""

    def __init__(self, m: DictConfig, key: str = "model.pretrained"):
        self.m, self.key = m, key

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError):  # transformers' "couldn't find / couldn't connect" errors
            source = self.m.get(self.key.split(".")[1])
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise ConfigError(f"{self.key}={source} cannot be loaded ({reason}); give a model folder ({self.key}=/path/to/folder) "
                              "or a hub id that is in the local cache (`huggingface-cli download ID` on a machine with internet)") from None
        return False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters by their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_trained(run_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, cfg) rebuilt from a finished run directory, without DeepSpeed.

    The base model comes from ``model.pretrained`` or, for random weights, is rebuilt from the
    config with the run's seed; the adapter (or the full model for peft=none) from the run dir.
    """
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    num_labels = len(cfg.dataset.labels)
    if peft_method(cfg) == "none":
        model = AUTO_CLASSES[cfg.model.task].from_pretrained(run_dir / "model", use_safetensors=True)
    else:
        base_cfg = cfg.copy()
        base_cfg.peft = {}
        base = build_model(base_cfg, num_labels, total_steps=1)
        model = PeftModel.from_pretrained(base, run_dir / "adapter")
    return model.to(device).eval(), load_tokenizer(cfg.model), cfg


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


HEAD_NAMES = ("classifier", "score")  # a sequence classifier's head (PEFT's modules_to_save for SEQ_CLS)


def parameter_groups(model) -> list[dict]:
    """Two optimizer groups, the classification head's trainable parameters first, then the rest."""
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if any(part in HEAD_NAMES for part in name.split(".")) else rest).append(p)
    return [{"params": head}, {"params": rest}]


def head_first_schedule(optimizer, warmup: int, total: int, head_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.head_only_epochs`` (linear probing, then fine-tuning): the head (group 0) follows the usual
    linear warm-up and decay over all ``total`` steps; the adapter (group 1) stays at learning rate 0 for
    the first ``head_steps``, then warms up and decays over the steps that remain."""

    def linear(start: int):
        span, ramp = max(1, total - start), max(1, warmup)

        def factor(step: int) -> float:
            if step < start:
                return 0.0
            step -= start
            return step / ramp if step < warmup else max(0.0, (span - step) / max(1, span - warmup))

        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [linear(0), linear(head_steps)])
