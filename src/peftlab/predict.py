"""Reload a finished run and predict again, without DeepSpeed: ``peftlab predict RUN_DIR``.

The base model comes from the run's config (pretrained, or its cached random weights), the
adapter from ``RUN_DIR/adapter`` via ``PeftModel.from_pretrained``. Printing the agreement with
the run's own ``predictions.csv`` shows that the saved adapter is the trained one.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from peftlab.config import ConfigError
from peftlab.rundir import read_json


def predict_run(run_dir: str | Path, rows: list[dict] | None = None, batch_size: int = 64,
                device: str | None = None) -> tuple[list[dict], dict, list[str]]:  # device: "cpu" or "cuda"
    """(rows, predictions, label names) for ``rows`` (default: the run's own evaluation rows) from the
    saved adapter, on ``device`` (default: the GPU if there is one)."""
    import torch
    from accelerate import Accelerator

    from peftlab import data, engine, modeling
    from peftlab.distributed import reset_state, world_of_one

    check_run_dir(Path(run_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no GPU visible; use --device cpu")
    model, tok, cfg = modeling.load_trained(run_dir, device=device)
    names = data.label_names(cfg.dataset)
    if rows is None:
        rows = data.eval_plan(cfg, data.load_splits(cfg.dataset, cfg.paths.data_dir))[1][-1][1]
    task = cfg.model.task
    targets = data.class_targets(tok, task, names) if task != "seq_cls" else None
    mode = "generate" if cfg.eval.mode == "generate" else "score"  # eval.mode=both: score is the result
    feats = data.encode(rows, tok, task, cfg.dataset.prompt, names, cfg.train.max_length)
    loader = data.loader(feats, data.Collator(task, mode, tok.pad_token_id, targets), batch_size, False, cfg.seed)
    reset_state()
    with world_of_one():
        accelerator = Accelerator(cpu=device == "cpu")
    loader = accelerator.prepare_data_loader(loader)  # batches to the model's device
    out = engine.predict(accelerator, model, loader, task, mode, len(names), tokenizer=tok, label_names=names,
                         max_new_tokens=cfg.eval.max_new_tokens)
    reset_state()
    return rows, out, names


def check_run_dir(run_dir: Path) -> None:
    """One line unless ``run_dir`` is a run directory whose run finished and saved what predict reloads
    (a run that failed, was interrupted or still runs has no adapter; a folder without metrics.json and
    config.yaml is not a run directory). Reads JSON and YAML only, with safe loaders; imports nothing heavy."""
    import yaml

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such folder; give a run directory (outputs/<date>/<time>)")
    metrics = read_json(run_dir / "metrics.json")
    if metrics is None or not (run_dir / "config.yaml").is_file():
        missing = " and ".join(n for n, ok in (("metrics.json", metrics is not None),
                                                ("config.yaml", (run_dir / "config.yaml").is_file())) if not ok)
        raise ConfigError(f"{run_dir} is not a run directory (no readable {missing}); give one that python run.py wrote, "
                          "e.g. outputs/<date>/<time>")
    status = metrics.get("status")
    if status != "finished":
        error = f": {metrics['error']}" if metrics.get("error") else ""
        raise ConfigError(f"{run_dir} holds a run that did not finish (status {status}{error}); "
                          "predict needs a finished run: run it again, or choose another")
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{run_dir / 'config.yaml'} cannot be read ({str(e).splitlines()[0]}); "
                          "it must be the config.yaml the run wrote") from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("model", "dataset", "peft")):
        raise ConfigError(f"{run_dir / 'config.yaml'} is not a run's resolved config (model, dataset, peft); "
                          "give a run directory that python run.py wrote")
    weights = "model" if not (saved["peft"] or {}).get("_target_") else "adapter"
    if not (run_dir / weights).is_dir():
        raise ConfigError(f"{run_dir} has no {weights}/ to reload (was it run with save_adapter=false?); "
                          "run it again with save_adapter=true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftlab predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write id,prediction CSV here")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where to predict (default: cuda if there is a GPU)")
    args = parser.parse_args(argv)
    try:
        check_run_dir(args.run_dir)  # before torch and the model load: a wrong folder is reported at once
        rows, out, names = predict_run(args.run_dir, device=args.device)
    except ConfigError as e:
        print(f"peftlab predict: {e}", file=sys.stderr)
        return 2
    preds = [names[p] for p in out["pred"]]
    saved = args.run_dir / "predictions.csv"
    if saved.is_file():
        before = {r["id"]: r["prediction"] for r in csv.DictReader(saved.open())}
        same = sum(before.get(r["id"]) == p for r, p in zip(rows, preds))
        print(f"{same}/{len(rows)} predictions equal the run's predictions.csv")
    if args.out:
        with args.out.open("w", newline="") as f:
            csv.writer(f).writerows([["id", "prediction"], *[[r["id"], p] for r, p in zip(rows, preds)]])
    return 0
