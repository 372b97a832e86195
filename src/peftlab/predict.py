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

import torch
from accelerate import Accelerator

from peftlab import data, engine, modeling
from peftlab.config import ConfigError
from peftlab.distributed import reset_state, world_of_one


def predict_run(run_dir: str | Path, rows: list[dict] | None = None, batch_size: int = 64,
                device: str | None = None) -> tuple[list[dict], dict, list[str]]:  # device: "cpu" or "cuda"
    """(rows, predictions, label names) for ``rows`` (default: the run's own evaluation rows) from the
    saved adapter, on ``device`` (default: the GPU if there is one)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftlab predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write id,prediction CSV here")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where to predict (default: cuda if there is a GPU)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file():
        print(f"peftlab predict: {args.run_dir} has no config.yaml; give a finished run directory", file=sys.stderr)
        return 2
    try:
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
