"""Reload a finished run and predict again, without DeepSpeed: ``peftlab predict RUN_DIR [--input FILE]``.

The base model comes from the run's config (pretrained, or its cached random weights), the
adapter from ``RUN_DIR/adapter`` via ``PeftModel.from_pretrained``. Printing the agreement with
the run's own ``predictions.csv`` shows that the saved adapter is the trained one. With ``--input``,
the rows of a csv, jsonl or parquet file with the dataset's text column are classified instead:
id, text, predicted label and each label's probability.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from peftlab.config import ConfigError
from peftlab.rundir import read_json


def predict_run(
    run_dir: str | Path,
    rows: list[dict] | None = None,
    batch_size: int = 64,
    device: str | None = None,
    mode: str | None = None,
) -> tuple[list[dict], dict, list[str]]:
    """(rows, predictions, label names) for ``rows`` (default: the run's own evaluation rows) from the
    saved adapter, on ``device`` ("cpu" or "cuda"; default: the GPU if there is one). ``mode``: score or
    generate (generative models; default: the run's eval.mode, score for eval.mode=both)."""
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
    if task == "seq_cls" or mode is None:
        mode = "generate" if cfg.eval.mode == "generate" else "score"  # eval.mode=both: score is the result
    feats = data.encode(rows, tok, task, cfg.dataset.prompt, names, cfg.train.max_length)
    loader = data.loader(
        feats, data.Collator(task, mode, tok.pad_token_id, targets), batch_size, False, cfg.seed
    )
    reset_state()
    with world_of_one():
        accelerator = Accelerator(cpu=device == "cpu")
    loader = accelerator.prepare_data_loader(loader)  # batches to the model's device
    out = engine.predict(
        accelerator,
        model,
        loader,
        task,
        mode,
        len(names),
        tokenizer=tok,
        label_names=names,
        max_new_tokens=cfg.eval.max_new_tokens,
        bf16=cfg.eval.get("mixed_precision") == "bf16",
    )  # runs before the key: fp32
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
        missing = " and ".join(
            n
            for n, ok in (
                ("metrics.json", metrics is not None),
                ("config.yaml", (run_dir / "config.yaml").is_file()),
            )
            if not ok
        )
        raise ConfigError(
            f"{run_dir} is not a run directory (no readable {missing}); give one that python run.py wrote, "
            "e.g. outputs/<date>/<time>"
        )
    status = metrics.get("status")
    if status != "finished":
        error = f": {metrics['error']}" if metrics.get("error") else ""
        raise ConfigError(
            f"{run_dir} holds a run that did not finish (status {status}{error}); "
            "predict needs a finished run: run it again, or choose another"
        )
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(
            f"{run_dir / 'config.yaml'} cannot be read ({str(e).splitlines()[0]}); "
            "it must be the config.yaml the run wrote"
        ) from None
    if not isinstance(saved, dict) or not all(
        isinstance(saved.get(k), dict) for k in ("model", "dataset", "peft")
    ):
        raise ConfigError(
            f"{run_dir / 'config.yaml'} is not a run's resolved config (model, dataset, peft); "
            "give a run directory that python run.py wrote"
        )
    weights = "model" if not (saved["peft"] or {}).get("_target_") else "adapter"
    if not (run_dir / weights).is_dir():
        raise ConfigError(
            f"{run_dir} has no {weights}/ to reload (was it run with save_adapter=false?); "
            "run it again with save_adapter=true"
        )


INPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def read_input(path: Path, dataset: dict, text_column: str | None = None) -> list[dict]:
    """Rows to classify, ``{"id", "text", "label": -1}``, from a csv, jsonl or parquet file (told by its suffix),
    read by the dataset's own reader (every cell as text). The text is the run's ``dataset.text_column``
    (or ``text_column``); the id its ``dataset.id_column`` where the file has that column, else the row's
    number (1-based, header not counted). A label column is not needed, and not read."""
    from peftlab import data

    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"--input {path}: cannot tell its format from '{path.suffix or 'no suffix'}'; "
            "give a .csv, .jsonl or .parquet file"
        )
    if not path.is_file():
        raise ConfigError(
            f"--input {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}; "
            "give a .csv, .jsonl or .parquet file with the rows to classify"
        )
    try:
        frame = data._read_table(path, fmt)
    except ConfigError as e:
        raise ConfigError(f"--input {e}") from None
    except OSError as e:  # unreadable (permissions)
        raise ConfigError(f"--input {path}: cannot be read ({e.strerror or e})") from None
    column = text_column or dataset["text_column"]
    if column not in frame.columns:
        given = "--text-column" if text_column else "the run's dataset.text_column"
        raise ConfigError(
            f"--input {path}: no column '{column}' ({given}); its columns are: "
            f"{', '.join(map(str, frame.columns)) or 'none'}; rename the text column, or give --text-column NAME"
        )
    texts = [str(t) for t in frame[column].tolist()]
    if not texts:
        raise ConfigError(f"--input {path}: no rows to classify")
    id_column = dataset.get("id_column")
    ids = (
        [str(v) for v in frame[id_column].tolist()]
        if id_column and id_column in frame.columns
        else [str(n) for n in range(1, len(texts) + 1)]
    )
    return [{"id": i, "text": t, "label": -1, "number": n} for n, (i, t) in enumerate(zip(ids, texts), 1)]


def probabilities(scores: list[float]) -> list[float]:
    """Each label's probability from its log-likelihood: normalized over the labels (a softmax)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


def _saved_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="peftlab predict",
        description=__doc__.splitlines()[0],
        epilog="With --input: classify the rows of a csv, jsonl or parquet file that has the run's text column "
        "(dataset.text_column; no labels needed) and write id (the dataset's id column, else the row number), "
        "text, prediction and p_<label> for each label (CSV, to --out or standard output). Generative models "
        "rank the labels by likelihood (score mode). Without --input: the run's own evaluation rows again, "
        "compared with its predictions.csv.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--input", type=Path, help="csv, jsonl or parquet file of rows to classify")
    parser.add_argument(
        "--out", type=Path, help="write the predictions CSV here (with --input: default standard output)"
    )
    parser.add_argument(
        "--text-column", help="the input's text column (default: the run's dataset.text_column)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="rows per forward pass (default: the run's eval.batch_size)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="where to predict (default: cuda if there is a GPU)"
    )
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be >= 1")
    try:
        check_run_dir(args.run_dir)  # before torch and the model load: a wrong folder is reported at once
        saved = _saved_config(args.run_dir)
        from peftlab.logs import quiet_libraries

        quiet_libraries()
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; errors still show
        batch_size = args.batch_size or (saved.get("eval") or {}).get("batch_size") or 64
        if args.input is not None:
            rows = read_input(args.input, saved["dataset"], args.text_column)  # before the model loads
            rows, out, names = predict_run(
                args.run_dir, rows=rows, batch_size=batch_size, device=args.device, mode="score"
            )
        else:
            rows, out, names = predict_run(args.run_dir, batch_size=batch_size, device=args.device)
    except ConfigError as e:
        print(f"peftlab predict: {e}", file=sys.stderr)
        return 2
    preds = [names[p] for p in out["pred"]]
    if args.input is not None:
        header = ["id", "text", "prediction", *[f"p_{n}" for n in names]]
        table = [
            [r["id"], r["text"], p, *[f"{q:.6f}" for q in probabilities(s)]]
            for r, p, s in zip(rows, preds, out["scores"])
        ]
        if args.out:
            with args.out.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([header, *table])
        else:
            csv.writer(sys.stdout).writerows([header, *table])
        counts = ", ".join(f"{preds.count(n)} {n}" for n in names)
        print(
            f"{len(rows)} rows of {args.input} classified ({counts})"
            + (f"; wrote {args.out}" if args.out else ""),
            file=sys.stderr,
        )
        return 0
    saved_predictions = args.run_dir / "predictions.csv"
    if saved_predictions.is_file():
        before = {r["id"]: r["prediction"] for r in csv.DictReader(saved_predictions.open())}
        same = sum(before.get(r["id"]) == p for r, p in zip(rows, preds))
        print(f"{same}/{len(rows)} predictions equal the run's predictions.csv")
    if args.out:
        with args.out.open("w", newline="") as f:
            csv.writer(f).writerows([["id", "prediction"], *[[r["id"], p] for r, p in zip(rows, preds)]])
    return 0
