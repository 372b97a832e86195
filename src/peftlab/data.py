"""Classification data: read splits (local folder or hub), choose held-out rows, tokenize, batch.

A row is ``{"id": str, "text": str, "label": int}`` with ``label`` the index into the dataset's
label names, or -1 for an unlabeled row. What a model sees depends on the task type:

* ``seq_cls``: the text; the target is the label index.
* ``seq2seq``: the prompt (``dataset.prompt``) as encoder input; the target is the label name.
* ``causal_lm``: prompt followed by the label name and EOS, left-padded; loss on the label tokens only.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from pathlib import Path

import torch
from omegaconf import DictConfig

from peftlab.config import ConfigError

log = logging.getLogger(__name__)
IGNORE = -100


# ----------------------------------------------------------------------------- reading


def label_names(ds: DictConfig) -> list[str]:
    return [str(v) for v in ds.labels.values()]


def resolve_data_dir(ds: DictConfig, data_root: str | None) -> Path | None:
    """dataset.data_dir if given (must exist), else <paths.data_dir>/<name> if it exists, else None (hub)."""
    if ds.data_dir:
        path = Path(ds.data_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"dataset.data_dir={ds.data_dir}: no such folder; point it at a folder holding {', '.join(ds.files.values())}")
        return path
    if data_root:
        candidate = Path(data_root).expanduser() / ds.name
        if candidate.is_dir():
            return candidate
    return None


def _read_table(path: Path, fmt: str):
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; check dataset.data_dir and dataset.files")
    stat = path.stat()
    return _read_table_cached(path.resolve(), fmt, stat.st_mtime_ns, stat.st_size).copy()


@functools.lru_cache(maxsize=16)  # jobs of a sweep read the same files: once, unless they change
def _read_table_cached(path: Path, fmt: str, mtime_ns: int, size: int):
    import pandas as pd

    try:
        if fmt == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False).astype(str)
        if fmt == "parquet":
            return pd.read_parquet(path).astype(str)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    except ValueError as e:  # pandas' parser errors and empty files are ValueErrors
        raise ConfigError(f"{path}: cannot be read as {fmt} ({str(e).splitlines()[0]}); fix the file or dataset.format") from None
    raise ConfigError(f"dataset.format={fmt} must be csv, jsonl or parquet")


def _read_hub(ds: DictConfig) -> dict:
    try:
        import datasets

        loaded = datasets.load_dataset(ds.hub.path, ds.hub.name, revision=ds.hub.revision)
    except Exception as e:  # offline, missing repo, ...: the fix is the same
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"dataset {ds.name}: no local folder and the hub copy {ds.hub.path}/{ds.hub.name} could not be loaded ({first[:160]}); "
            f"set dataset.data_dir=PATH (or PEFTLAB_DATA_DIR) to a local copy"
        ) from None
    return {split: loaded[split].to_pandas().astype(str) for split in ds.files if split in loaded}


def _rows(frame, source: str, ds: DictConfig) -> list[dict]:
    for key in ("text_column", "label_column"):
        column = ds[key]
        if column not in frame.columns:
            raise ConfigError(f"{source}: no column '{column}' (dataset.{key}); columns are: {', '.join(map(str, frame.columns))}")
    id_column = ds.get("id_column")
    by_value = {str(k): i for i, k in enumerate(ds.labels)}
    by_name = {name: i for i, name in enumerate(label_names(ds))}
    unlabeled = None if ds.unlabeled is None else str(ds.unlabeled)
    texts, raws = frame[ds.text_column].tolist(), frame[ds.label_column].tolist()  # columns once: .iloc per row costs ~25 us
    ids = frame[id_column].tolist() if id_column and id_column in frame.columns else range(len(texts))
    rows = []
    for i, (text, raw, row_id) in enumerate(zip(texts, raws, ids)):
        raw = str(raw).strip()
        label = by_value.get(raw, by_name.get(raw))
        if label is None and raw == unlabeled:
            label = -1
        if label is None:
            allowed = ", ".join(list(by_value) + ([unlabeled] if unlabeled is not None else []))
            raise ConfigError(f"{source}: row {i + 1} has label '{raw[:40]}', not one of dataset.labels ({allowed}); fix the file or dataset.labels")
        rows.append({"id": str(row_id), "text": str(text), "label": label})
    if not rows:
        raise ConfigError(f"{source}: the split is empty; give a file with rows")
    return rows


def load_splits(ds: DictConfig, data_root: str | None = None) -> dict[str, list[dict]]:
    """{'train': rows, 'test': rows} read from the local folder, else the hub; validated."""
    folder = resolve_data_dir(ds, data_root)
    if folder is not None:
        tables = {split: (_read_table(folder / name, ds.format), str(folder / name)) for split, name in ds.files.items()}
    else:
        tables = {split: (frame, f"{ds.hub.path}/{ds.hub.name}[{split}]") for split, frame in _read_hub(ds).items()}
    if "train" not in tables:
        raise ConfigError("dataset.files has no 'train' entry; name the training file, e.g. dataset.files.train=train.csv")
    splits = {split: _rows(frame, source, ds) for split, (frame, source) in tables.items()}
    if not any(r["label"] >= 0 for r in splits["train"]):
        raise ConfigError(f"{tables['train'][1]}: no labelled rows to train on; check dataset.label_column and dataset.labels")
    return splits


# ----------------------------------------------------------------------------- held-out rows


def stratified_folds(rows: list[dict], k: int, seed: int) -> list[list[dict]]:
    """k folds with each label spread evenly; deterministic for a seed."""
    rng = random.Random(seed)
    folds: list[list[dict]] = [[] for _ in range(k)]
    start = 0
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        for i, row in enumerate(group):
            folds[(start + i) % k].append(row)
        start += len(group)
    return folds


def eval_plan(cfg: DictConfig, splits: dict[str, list[dict]]) -> tuple[str, list[tuple[list[dict], list[dict]]]]:
    """(name, [(train_rows, eval_rows), ...]): one pair, or one per fold. Eval rows are never train rows."""
    train = [r for r in splits["train"] if r["label"] >= 0]
    split = cfg.eval.split
    test = [r for r in splits.get("test", []) if r["label"] >= 0]
    if split == "test" and not test:
        log.warning("the test split has no labels: evaluating on a validation split carved from train (eval.split=validation)")
        split = "validation"
    if split == "test":
        return "test", [(train, test)]
    if split == "validation":
        k = max(2, round(1 / cfg.eval.val_fraction))
        folds = stratified_folds(train, k, cfg.seed)
        held = folds[0]
        return "validation", [([r for r in train if r not in held], held)]
    return "kfold", kfold_plan(train, cfg.eval.folds, cfg.seed)


def kfold_plan(train: list[dict], k: int, seed: int) -> list[tuple[list[dict], list[dict]]]:
    """k (train, held-out) pairs; every row is held out exactly once."""
    folds = stratified_folds(train, k, seed)
    if min(len(f) for f in folds) == 0:
        raise ConfigError(f"eval.folds={k} is more than the {len(train)} labelled training rows allow; lower eval.folds")
    return [([r for j, f in enumerate(folds) if j != i for r in f], fold) for i, fold in enumerate(folds)]


def check_disjoint(train: list[dict], held_out: list[dict]) -> None:
    """Evaluation must never see a training row (same id or same text)."""
    ids = {r["id"] for r in train}
    texts = {r["text"] for r in train}
    leaked = [r["id"] for r in held_out if r["id"] in ids or r["text"] in texts]
    if leaked:
        raise ConfigError(f"{len(leaked)} evaluation rows are also training rows (ids {', '.join(leaked[:3])}); the eval split must be disjoint")


# ----------------------------------------------------------------------------- tokens

_CACHE: dict[str, list[dict]] = {}


def eos_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def class_targets(tokenizer, task: str, names: list[str]) -> list[list[int]]:
    """Token ids of each label name as the model must produce it (generative tasks)."""
    if task == "seq2seq":
        return [tokenizer(n)["input_ids"] for n in names]
    return [tokenizer(n, add_special_tokens=False)["input_ids"] + [eos_id(tokenizer)] for n in names]


def encode(rows: list[dict], tokenizer, task: str, prompt: str, names: list[str], max_length: int) -> list[dict]:
    """Tokenized features, one per row, cached by content (a sweep tokenizes once)."""
    key = hashlib.sha1(repr((tokenizer.name_or_path, len(tokenizer), task, prompt, names, max_length,
                             [(r["id"], r["text"], r["label"]) for r in rows])).encode()).hexdigest()
    if key not in _CACHE:
        _CACHE[key] = _encode(rows, tokenizer, task, prompt, names, max_length)
    return _CACHE[key]


def _encode(rows, tokenizer, task, prompt, names, max_length) -> list[dict]:
    if task == "seq_cls":
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
        return [{"row": i, "input_ids": ids, "label": r["label"]} for i, (r, ids) in enumerate(zip(rows, enc["input_ids"]))]
    prompts = [prompt.format(text=r["text"]) for r in rows]
    targets = class_targets(tokenizer, task, names)
    if task == "seq2seq":
        enc = tokenizer(prompts, truncation=True, max_length=max_length)
        return [{"row": i, "input_ids": ids, "label": r["label"], "target": targets[r["label"]] if r["label"] >= 0 else None}
                for i, (r, ids) in enumerate(zip(rows, enc["input_ids"]))]
    longest = max(len(t) for t in targets)
    enc = tokenizer(prompts, add_special_tokens=False, truncation=True, max_length=max_length - longest)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    return [{"row": i, "input_ids": bos + ids, "label": r["label"], "target": targets[r["label"]] if r["label"] >= 0 else None}
            for i, (r, ids) in enumerate(zip(rows, enc["input_ids"]))]


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs])


class Collator:
    """Pads a batch for one of three purposes: ``train``, ``score`` (every row x every label) or ``generate``."""

    def __init__(self, task: str, purpose: str, pad_id: int, targets: list[list[int]] | None = None):
        self.task, self.purpose, self.pad_id, self.targets = task, purpose, pad_id, targets

    def __call__(self, feats: list[dict]) -> dict:
        batch = {"row": torch.tensor([f["row"] for f in feats])}
        if self.task == "seq_cls":
            batch.update(self._inputs([f["input_ids"] for f in feats]))
            if self.purpose == "train":
                batch["labels"] = torch.tensor([f["label"] for f in feats])
            return batch
        if self.purpose == "generate":
            batch.update(self._inputs([f["input_ids"] for f in feats], left=self.task == "causal_lm"))
            return batch
        if self.purpose == "score" and self.task == "seq2seq":  # each row once: the model pairs it with every label
            batch.update(self._inputs([f["input_ids"] for f in feats]))
            batch["labels"] = _pad([t for _ in feats for t in self.targets], IGNORE)
            return batch
        if self.purpose == "train":
            pairs = [(f["input_ids"], f["target"]) for f in feats]
        else:  # score: each row paired with each label, row-major: (row0,label0), (row0,label1), ...
            pairs = [(f["input_ids"], t) for f in feats for t in self.targets]
        if self.task == "seq2seq":
            batch.update(self._inputs([p for p, _ in pairs]))
            batch["labels"] = _pad([t for _, t in pairs], IGNORE)
        else:  # causal: left-padded so every row ends with its label, and only the label positions' logits
            # are computed, in training too (engine.causal_logits): not vocabulary x every position
            batch.update(self._inputs([p + t for p, t in pairs], left=True))
            batch["labels"] = _pad([t for _, t in pairs], IGNORE, left=True)
        return batch

    def _inputs(self, seqs: list[list[int]], left: bool = False) -> dict:
        ids = _pad(seqs, self.pad_id, left)
        mask = _pad([[1] * len(s) for s in seqs], 0, left)
        return {"input_ids": ids, "attention_mask": mask, "num_tokens": sum(map(len, seqs))}


def loader(feats: list[dict], collator: Collator, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(feats, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collator)
