"""Classification data: read splits (local folder or hub), choose held-out rows, tokenize, batch.

Local csv/jsonl/parquet files and the hub copy are read by one call, ``datasets.load_dataset``; held-out
rows and folds are scikit-learn's StratifiedKFold folds. torch is imported only to batch (validation
reads and checks the data without it).

A row is ``{"id": str, "text": str, "label": int, ...}`` with ``label`` the index into the dataset's
label names, or -1 for an unlabeled row. ``id`` is the file's ``dataset.id_column`` value, or, for a
dataset without one, the row's number in its file named by its split (``test:17``, the 17th data row);
``split``, ``number`` (1-based, header not counted) and ``source`` (the file) say where the row came
from, ``key`` is its identity (``source`` with the ID, or with the number). What a model sees depends
on the task type:

* ``seq_cls``: the text; the target is the label index.
* ``seq2seq``: the prompt (``dataset.prompt``) as encoder input; the target is the label name.
* ``causal_lm``: prompt followed by the label name and EOS, left-padded; loss on the label tokens only.

An input longer than ``train.max_length`` loses the end of its text, never the prompt's tail.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from peftlab.config import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
IGNORE = -100


# ----------------------------------------------------------------------------- reading


def label_names(ds: DictConfig) -> list[str]:
    return [str(v) for v in ds.labels.values()]


# YAML 1.1 reads unquoted yes/no/on/off/true/false as booleans, 1.0 and +1 as 1, 010 as 8 (octal):
# a label value of dataset.labels or dataset.unlabeled and a file's cell match when YAML reads them as
# the same value (booleans also in any letter case), so `yes: complaint` matches the file's "yes" or
# "Yes", `1: complaint` its "1" or "1.0", and `unlabeled: ~` (null) its empty cells.
_BOOLEANS = {"yes": True, "true": True, "on": True, "no": False, "false": False, "off": False}
_NULLS = ("", "~", "null")


@functools.cache
def _yaml_scalars():
    import yaml
    from omegaconf._utils import get_yaml_loader  # the loader Hydra's config files go through

    return yaml, get_yaml_loader()("")


def label_value(value) -> tuple:
    """The value YAML would read from ``value`` (a config value, or a file's cell as text), comparable."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    text = str(value).strip()
    if text.lower() in _BOOLEANS:
        return ("bool", _BOOLEANS[text.lower()])
    if text.lower() in _NULLS:
        return ("null",)
    yaml, loader = _yaml_scalars()
    if loader.resolve(yaml.ScalarNode, text, (True, False)) in (
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
    ):
        return ("number", yaml.load(text, Loader=type(loader)))
    return ("text", text)


def _spelling(value) -> str:
    """A label value as a user would write it in the YAML."""
    if value is None:
        return "~ (an empty cell)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _label_lookup(ds: DictConfig) -> dict[tuple, int]:
    """label_value(key) -> label index, with dataset.unlabeled -> -1; ConfigError on names or keys YAML mangled."""
    lookup: dict[tuple, int] = {}
    for i, (key, name) in enumerate(ds.labels.items()):
        if isinstance(name, bool) or name is None:
            what = f"the YAML boolean {str(name).lower()}" if name is not None else "null"
            raise ConfigError(
                f"dataset.labels.{_spelling(key)} is {what}: quote it to name the label "
                f'(e.g. {_spelling(key)}: "{_spelling(name) if name is not None else "other"}"), '
                "unquoted yes/no/on/off/true/false/~ are not text in YAML"
            )
        value = label_value(key)
        if value in lookup:
            other = list(ds.labels)[lookup[value]]
            raise ConfigError(
                f"dataset.labels has {_spelling(other)} and {_spelling(key)}, which YAML reads as the same "
                "value; quote the keys (e.g. '01': ...) to keep them apart"
            )
        lookup[value] = i
    unlabeled = label_value(ds.unlabeled)
    if unlabeled in lookup:
        raise ConfigError(
            f"dataset.unlabeled={_spelling(ds.unlabeled)} is also a key of dataset.labels; "
            "give rows without a label a value of their own"
        )
    lookup[unlabeled] = -1
    return lookup


def resolve_data_dir(ds: DictConfig, data_root: str | None) -> Path | None:
    """dataset.data_dir if given (must exist), else <paths.data_dir>/<name> if it exists, else None (hub)."""
    if ds.data_dir:
        path = Path(ds.data_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"dataset.data_dir={ds.data_dir}: no such folder; point it at a folder holding {', '.join(ds.files.values())}"
            )
        return path
    if data_root:
        candidate = Path(data_root).expanduser() / ds.name
        if candidate.is_dir():
            return candidate
    return None


BUILDERS = {
    "csv": "csv",
    "jsonl": "json",
    "parquet": "parquet",
}  # dataset.format -> datasets' packaged builder


def _load_dataset(path: str, *args, **kwargs):
    """The one reader of local files and hub copies alike: ``datasets.load_dataset`` (Arrow, cached on disk)."""
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars for each file of each job
    logger = logging.getLogger(
        "datasets"
    )  # a file it cannot parse is logged, then raised: the raise is our one line
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(path, *args, **kwargs)
    finally:
        logger.setLevel(level)


def read_columns(path: Path, fmt: str) -> dict[str, list[str]]:
    """{column: its cells as text} of a csv, jsonl or parquet file, read by ``datasets.load_dataset``;
    every cell is text (a number as the file writes it in a csv, as ``str`` makes it elsewhere), a
    missing one (empty csv cell, JSON or Parquet null) the empty text. The lists are shared by every
    call for the same unchanged file (a sweep's jobs read it once): do not change them.
    ConfigError, naming the file and the fix, on a missing, undecodable or malformed file."""
    if fmt not in BUILDERS:
        raise ConfigError(f"dataset.format={fmt} must be csv, jsonl or parquet")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; check dataset.data_dir and dataset.files")
    stat = path.stat()
    return _read_cached(path.resolve(), fmt, stat.st_mtime_ns, stat.st_size)


def _read_table(path: Path, fmt: str):
    """``read_columns`` as a pandas DataFrame (``peftlab predict`` reads its --input with it)."""
    import pandas as pd

    return pd.DataFrame(read_columns(path, fmt))


@functools.lru_cache(maxsize=16)  # jobs of a sweep read the same files: once, unless they change
def _read_cached(path: Path, fmt: str, mtime_ns: int, size: int) -> dict[str, list[str]]:
    try:
        options = {}
        if fmt == "csv":  # every column as text, as the file writes it: "01" stays 01, an ID keeps its zeros
            import datasets
            import pandas as pd

            header = pd.read_csv(path, nrows=1, encoding="utf-8", dtype=str)
            if header.empty:  # a header alone: no split to load (datasets refuses one), and _rows says so
                return {str(c): [] for c in header.columns}
            options = {
                "features": datasets.Features({str(c): datasets.Value("string") for c in header.columns}),
                "keep_default_na": False,
                "encoding": "utf-8",
            }
        table = _load_dataset(BUILDERS[fmt], data_files={"rows": str(path)}, split="rows", **options)
    except Exception as e:  # datasets wraps the parser's error: the cause says what is wrong
        cause = _cause(e)
        if isinstance(cause, UnicodeDecodeError):
            raise ConfigError(
                f"{path}: not valid UTF-8 ({cause.reason} at byte {cause.start}); re-encode the file as UTF-8"
            ) from None
        raise ConfigError(
            f"{path}: cannot be read as {fmt} ({_first_line(cause)}); fix the file or dataset.format"
        ) from None
    return _as_text(table)


def _cause(error: BaseException) -> BaseException:
    """The innermost exception a library's wrapper (datasets' DatasetGenerationError) was raised from."""
    seen = set()
    while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _as_text(table) -> dict[str, list[str]]:
    """A datasets.Dataset as {column: cells as text}, a missing cell (null, NaN) as the empty text a csv has there."""
    return {
        name: ["" if v is None or v != v else str(v) for v in table.data.column(name).to_pylist()]
        for name in table.column_names
    }


def _read_hub(ds: DictConfig) -> dict:
    try:
        loaded = _load_dataset(ds.hub.path, ds.hub.name, revision=ds.hub.revision)
    except Exception as e:  # offline, missing repo, ...: the fix is the same
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"dataset {ds.name}: no local folder and the hub copy {ds.hub.path}/{ds.hub.name} could not be loaded ({first[:160]}); "
            f"set dataset.data_dir=PATH (or PEFTLAB_DATA_DIR) to a local copy"
        ) from None
    return {split: _as_text(loaded[split]) for split in ds.files if split in loaded}


def _rows(
    table: dict[str, list[str]], source: str, ds: DictConfig, split: str, lookup: dict[tuple, int]
) -> list[dict]:
    for key in ("text_column", "label_column"):
        column = ds[key]
        if column not in table:
            raise ConfigError(
                f"{source}: no column '{column}' (dataset.{key}); columns are: {', '.join(map(str, table))}"
            )
    id_column = ds.get("id_column")
    has_ids = bool(id_column) and id_column in table
    by_name = {name: i for i, name in enumerate(label_names(ds))}
    texts, raws = table[ds.text_column], table[ds.label_column]
    ids = table[id_column] if has_ids else [f"{split}:{n}" for n in range(1, len(texts) + 1)]
    if has_ids:
        _check_ids(ids, source, id_column)
    labels: dict[str, int] = {}  # a file has few distinct label cells: each is read once
    rows = []
    for i, (text, raw, row_id) in enumerate(zip(texts, raws, ids)):
        label = labels.get(raw)
        if label is None:
            value = lookup.get(label_value(raw))
            label = labels[raw] = value if value is not None else by_name.get(str(raw).strip())
        if label is None:
            allowed = ", ".join(_spelling(k) for k in ds.labels)
            raise ConfigError(
                f"{source}: row {i + 1} has label '{str(raw).strip()[:40]}', not one of dataset.labels ({allowed}) "
                f"or dataset.unlabeled ({_spelling(ds.unlabeled)}); fix the file or dataset.labels"
            )
        rows.append(
            {
                "id": row_id,
                "text": str(text),
                "label": label,
                "split": split,
                "number": i + 1,
                "source": source,
                "key": (source, row_id if has_ids else i + 1),
            }
        )
    if not rows:
        raise ConfigError(f"{source}: the split is empty; give a file with rows")
    return rows


def _check_ids(ids: list[str], source: str, column: str) -> None:
    """Predictions are keyed by ID: each row of a file needs its own."""
    empty = [n for n, i in enumerate(ids, 1) if not i.strip()]
    if empty:
        raise ConfigError(
            f"{source}: rows {_numbers(empty)} have no {column} (dataset.id_column); fill them in, "
            "or set dataset.id_column=null to identify rows by their number"
        )
    if len(set(ids)) == len(ids):
        return
    where: dict[str, list[int]] = {}
    for n, i in enumerate(ids, 1):
        where.setdefault(i, []).append(n)
    repeated = {i: ns for i, ns in where.items() if len(ns) > 1}
    first, rows = next(iter(repeated.items()))
    more = (
        f" (and {len(repeated) - 1} more repeated ids: {', '.join(list(repeated)[1:4])})"
        if len(repeated) > 1
        else ""
    )
    raise ConfigError(
        f"{source}: id {first} is on rows {_numbers(rows)}{more}; each row needs its own {column} "
        "(dataset.id_column): fix the file, or set dataset.id_column=null to identify rows by their number"
    )


def _numbers(values: list[int], shown: int = 5) -> str:
    return ", ".join(map(str, values[:shown])) + (
        f" and {len(values) - shown} more" if len(values) > shown else ""
    )


SPLITS = ("train", "test", "validation")


def load_splits(ds: DictConfig, data_root: str | None = None) -> dict[str, list[dict]]:
    """{'train': rows, 'test': rows, 'validation': rows} (those dataset.files names) read from the local
    folder, else the hub; validated."""
    unknown = [split for split in ds.files if split not in SPLITS]
    if unknown:  # it would be read and checked, then used by nothing
        raise ConfigError(
            f"dataset.files.{unknown[0]}: a run reads {', '.join(SPLITS)} files only; "
            f"rename the key (a held-out file is dataset.files.validation) or remove it"
        )
    folder = resolve_data_dir(ds, data_root)
    if folder is not None:
        tables = {
            split: (read_columns(folder / name, ds.format), str(folder / name))
            for split, name in ds.files.items()
        }
    else:
        tables = {
            split: (table, f"{ds.hub.path}/{ds.hub.name}[{split}]") for split, table in _read_hub(ds).items()
        }
    if "train" not in tables:
        raise ConfigError(
            "dataset.files has no 'train' entry; name the training file, e.g. dataset.files.train=train.csv"
        )
    lookup = _label_lookup(ds)
    splits = {split: _rows(table, source, ds, split, lookup) for split, (table, source) in tables.items()}
    if not any(r["label"] >= 0 for r in splits["train"]):
        raise ConfigError(
            f"{tables['train'][1]}: no labelled rows to train on; check dataset.label_column and dataset.labels"
        )
    return splits


# ----------------------------------------------------------------------------- held-out rows


def _stratified(rows: list[dict], k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """scikit-learn's StratifiedKFold over the rows' labels: k (train, held-out) index lists, each in
    file order; deterministic for a seed. ``k`` at most ``len(rows)``."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    with (
        warnings.catch_warnings()
    ):  # a label with fewer rows than k folds: doubts() names what that leaves out
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return [
            (train.tolist(), held.tolist())
            for train, held in splitter.split(np.zeros(len(rows)), [r["label"] for r in rows])
        ]


def stratified_folds(rows: list[dict], k: int, seed: int) -> list[list[dict]]:
    """k folds with each label spread evenly (StratifiedKFold); deterministic for a seed."""
    return [[rows[i] for i in held] for _, held in _stratified(rows, k, seed)]


def eval_plan(
    cfg: DictConfig, splits: dict[str, list[dict]]
) -> tuple[str, list[tuple[list[dict], list[dict]]]]:
    """(name, [(train_rows, eval_rows), ...]): one pair, or one per fold. Eval rows are never train rows.

    ``eval.split=validation`` evaluates on the dataset's validation file (``dataset.files.validation``)
    when it has labelled rows, with all of train to train on; else on rows carved from train.
    """
    train = [r for r in splits["train"] if r["label"] >= 0]
    split = cfg.eval.split
    test = [r for r in splits.get("test", []) if r["label"] >= 0]
    if split == "test" and not test:
        log.warning(
            "the test split has no labels: evaluating on the validation split (eval.split=validation)"
        )
        split = "validation"
    if split == "test":
        return "test", [(train, test)]
    if split == "validation":
        given = [r for r in splits.get("validation", []) if r["label"] >= 0]
        if given:
            log.info(
                "evaluating on the validation file %s (%d rows, dataset.files.validation); training on all %d train rows",
                given[0].get("source", "validation"),
                len(given),
                len(train),
            )
            return "validation", [(train, given)]
        if "validation" in splits:
            log.warning(
                "the validation file %s has no labelled rows: carving validation rows from train instead",
                splits["validation"][0].get("source", "validation"),
            )
        k = max(2, round(1 / cfg.eval.val_fraction))  # the first of k stratified folds: 1/k of each label
        if len(train) < k:
            raise ConfigError(
                f"eval.split=validation: {len(train)} labelled training rows are too few to hold out "
                f"eval.val_fraction={cfg.eval.val_fraction} of them; add rows, or use eval.split=test"
            )
        kept, held = ([train[i] for i in idx] for idx in _stratified(train, k, cfg.seed)[0])
        log.info(
            "evaluating on a validation split carved from train (eval.val_fraction=%s: %d of %d rows; "
            "a dataset.files.validation file would be used instead)",
            cfg.eval.val_fraction,
            len(held),
            len(train),
        )
        return "validation", [(kept, held)]
    return "kfold", kfold_plan(train, cfg.eval.folds, cfg.seed, cfg.eval.fold_repeats)


def kfold_plan(train: list[dict], k: int, seed: int, repeats: int = 1) -> list[tuple[list[dict], list[dict]]]:
    """k x ``repeats`` (train, held-out) pairs, stratified (StratifiedKFold); within each repeat every row is
    held out exactly once, and repeat r shuffles with ``seed + r`` (repeat 0 is the unrepeated plan). Repeats
    let a selection on a few dozen rows average over how the folds happened to fall (``eval.fold_repeats``)."""
    if k > len(train):
        raise ConfigError(
            f"eval.folds={k} is more than the {len(train)} labelled training rows allow; lower eval.folds"
        )
    return [
        ([train[i] for i in kept], [train[i] for i in held])
        for r in range(repeats)
        for kept, held in _stratified(train, k, seed + r)
    ]


def _where(row: dict) -> str:
    """'test row 12 (id 5301...)': the split and the row's number in its file (1-based, header not counted)."""
    if "number" not in row:
        return f"the row with id {row['id']}"
    return f"{row['split']} row {row['number']} (id {row['id']})"


def check_disjoint(train: list[dict], held_out: list[dict]) -> None:
    """Evaluation must never see a training row: the same row of the same file (same ID, or same row
    number where there are no IDs), or the same text. The message names the first pair."""
    rows = {r.get("key", r["id"]): r for r in train}
    texts: dict[str, dict] = {}
    for r in train:
        texts.setdefault(r["text"], r)
    leaks = []
    for r in held_out:
        if r.get("key", r["id"]) in rows:
            leaks.append(f"{_where(r)} is both trained on and evaluated")
        elif r["text"] in texts:
            leaks.append(f"{_where(r)} has the text of {_where(texts[r['text']])}")
    if leaks:
        more = f" ({len(leaks)} evaluation rows are also training rows)" if len(leaks) > 1 else ""
        raise ConfigError(
            f"{leaks[0]}{more}; the evaluation rows must be disjoint from the training rows: "
            "remove the duplicates from one of the files"
        )


def doubts(
    ds: DictConfig,
    splits: dict[str, list[dict]],
    plan_name: str,
    plan: list[tuple[list[dict], list[dict]]],
    speak: bool = True,
) -> list[str]:
    """Data that a run can take but probably should not: each a warning (logged where ``speak``, and kept in metrics.json)."""
    found = []
    names = label_names(ds)
    for split, rows in splits.items():
        source = rows[0].get("source", split)
        if ds.get("id_column") and isinstance(rows[0].get("key", ("", ""))[1], int):
            found.append(
                f"{source}: no column '{ds.id_column}' (dataset.id_column): rows are identified by their number "
                f"({rows[0]['id']}, ...); set dataset.id_column=null if the file has no IDs"
            )
        empty = [r["number"] for r in rows if not r["text"].strip() and "number" in r]
        if empty:
            found.append(
                f"{source}: {len(empty)} rows have no text (dataset.text_column): rows {_numbers(empty)}"
            )
    train = splits["train"]
    source = train[0].get("source", "train")
    labelled = [r for r in train if r["label"] >= 0]
    if len(labelled) < len(train):
        found.append(
            f"{source}: {len(train) - len(labelled)} of {len(train)} rows have no label "
            f"(dataset.unlabeled={_spelling(ds.unlabeled)}) and are not trained on"
        )
    if len(labelled) < 2 * len(names):
        found.append(
            f"{source}: only {len(labelled)} labelled training row{'s' if len(labelled) != 1 else ''} "
            f"for {len(names)} labels"
        )
    first: dict[str, dict] = {}
    clashes = [
        (first[r["text"]], r) for r in labelled if first.setdefault(r["text"], r)["label"] != r["label"]
    ]
    if clashes:
        a, b = clashes[0]
        found.append(
            f"{source}: {len(clashes)} training row{'s' if len(clashes) > 1 else ''} repeat{'' if len(clashes) > 1 else 's'} "
            f"a text with another label (e.g. {_where(b)} and {_where(a)})"
        )
    missing = [names[i] for i in range(len(names)) if i not in {r["label"] for r in labelled}]
    for name in missing:
        found.append(f"{source}: no training row has label '{name}'; the model cannot learn it")
    for fold, (train_rows, _) in enumerate(plan):
        trained = {r["label"] for r in train_rows}
        for i, name in enumerate(names):
            if i not in trained and name not in missing:
                which = f"fold {fold + 1}" if plan_name == "kfold" else "this split"
                found.append(
                    f"eval.split={plan_name}: the training rows of {which} have no row labelled '{name}'"
                )
    for message in found if speak else ():
        log.warning(message)
    return found


# ----------------------------------------------------------------------------- tokens

_CACHE: dict[str, list[dict]] = {}  # content of a list of rows -> its features
_TOKENS: dict[
    tuple, dict[str, tuple[list[int], bool]]
] = {}  # tokenizer and settings -> text -> (input ids, cut)


def eos_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def class_targets(tokenizer, task: str, names: list[str]) -> list[list[int]]:
    """Token ids of each label name as the model must produce it (generative tasks)."""
    if task == "seq2seq":
        return [tokenizer(n)["input_ids"] for n in names]
    return [tokenizer(n, add_special_tokens=False)["input_ids"] + [eos_id(tokenizer)] for n in names]


def encode(
    rows: list[dict], tokenizer, task: str, prompt: str, names: list[str], max_length: int
) -> list[dict]:
    """Tokenized features, one per row, cached by content (a sweep tokenizes once).

    A feature's ``cut`` says the row's text was shortened to fit ``max_length`` (the prompt around it
    never is); ConfigError where the prompt alone leaves no room for any text.
    """
    key = hashlib.sha1(
        repr(
            (
                tokenizer.name_or_path,
                len(tokenizer),
                task,
                prompt,
                names,
                max_length,
                [(r["id"], r["text"], r["label"]) for r in rows],
            )
        ).encode()
    ).hexdigest()
    if key not in _CACHE:
        _CACHE[key] = _encode(rows, tokenizer, task, prompt, names, max_length)
    return _CACHE[key]


def truncated_rows(
    splits: dict[str, list[dict]],
    tokenizer,
    task: str,
    prompt: str,
    names: list[str],
    max_length: int,
    speak: bool = True,
) -> dict[str, int]:
    """{split: rows whose text was cut to fit train.max_length}, logged where not 0 and ``speak``
    (encodes every split, so the training and evaluation lists made of them hit the cache)."""
    counts = {}
    for split, rows in splits.items():
        counts[split] = sum(f["cut"] for f in encode(rows, tokenizer, task, prompt, names, max_length))
        if counts[split] and speak:
            kept = "" if task == "seq_cls" else ", dataset.prompt kept whole"
            log.info(
                "train.max_length=%d cut the text of %s of %s %s rows (the end of the text%s)",
                max_length,
                f"{counts[split]:,}",
                f"{len(rows):,}",
                split,
                kept,
            )
    return counts


def _encode(rows, tokenizer, task, prompt, names, max_length) -> list[dict]:
    setting = (tokenizer.name_or_path, len(tokenizer), task, prompt, tuple(names), max_length)
    if setting not in _TOKENS:
        _room(tokenizer, task, prompt, names, max_length)  # checks the prompt fits, before anything is cached
    known = _TOKENS.setdefault(
        setting, {}
    )  # texts tokenized for earlier lists (a split, then its folds) once
    todo = list(dict.fromkeys(r["text"] for r in rows if r["text"] not in known))
    if todo:
        known.update(zip(todo, _tokenize(todo, tokenizer, task, prompt, names, max_length)))
    if task == "seq_cls":
        return [
            {"row": i, "input_ids": known[r["text"]][0], "label": r["label"], "cut": known[r["text"]][1]}
            for i, r in enumerate(rows)
        ]
    targets = class_targets(tokenizer, task, names)
    return [
        {
            "row": i,
            "input_ids": known[r["text"]][0],
            "label": r["label"],
            "cut": known[r["text"]][1],
            "target": targets[r["label"]] if r["label"] >= 0 else None,
        }
        for i, r in enumerate(rows)
    ]


def _bos(tokenizer, task: str) -> list[int]:
    if (
        task != "causal_lm"
        or not getattr(tokenizer, "add_bos_token", False)
        or tokenizer.bos_token_id is None
    ):
        return []
    return [tokenizer.bos_token_id]


def _room(tokenizer, task, prompt, names, max_length) -> tuple[int, int]:
    """(budget, fixed): tokens the input may have (causal: besides BOS and the longest label), and what
    the prompt with an empty text takes of them. ConfigError where no text would fit."""
    if task == "seq_cls":
        fixed = len(tokenizer("")["input_ids"])
        if fixed >= max_length:
            raise ConfigError(
                f"train.max_length={max_length} leaves no room for the text: the special tokens alone take {fixed}; "
                f"raise train.max_length"
            )
        return max_length, fixed
    try:
        empty = prompt.format(text="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"dataset.prompt={prompt!r} cannot be filled in ({type(e).__name__}: {e}); "
            "write the text's place as {text} and double other braces ({{ }})"
        ) from None
    if empty == prompt.format(text="x"):
        raise ConfigError(
            f"dataset.prompt={prompt!r} has no {{text}}: every input would be the same; put {{text}} where the text goes"
        )
    longest = max(len(t) for t in class_targets(tokenizer, task, names)) if task == "causal_lm" else 0
    budget = max_length - longest - len(_bos(tokenizer, task))
    fixed = len(tokenizer(empty, add_special_tokens=task == "seq2seq")["input_ids"])
    if fixed >= budget:
        label = f" plus the longest label ({longest})" if longest else ""
        raise ConfigError(
            f"train.max_length={max_length} leaves no room for the text: dataset.prompt alone takes {fixed} tokens{label}; "
            f"raise train.max_length above {max_length - budget + fixed} or shorten dataset.prompt"
        )
    return budget, fixed


def _tokenize(texts, tokenizer, task, prompt, names, max_length) -> list[tuple[list[int], bool]]:
    """(input ids, cut) per text: tokenized whole where it fits, else with its text cut at a token boundary."""
    budget, fixed = _room(tokenizer, task, prompt, names, max_length)
    if task == "seq_cls":  # the text alone: the tokenizer's own truncation, counted
        ids = tokenizer(texts, truncation=True, max_length=budget + 1)["input_ids"]
        over = {i for i, x in enumerate(ids) if len(x) > budget}
        tail = _special_tail(tokenizer)
        for i in over:  # truncated to budget + 1: one token of the text less is the truncation to budget
            if (
                tail is None
            ):  # left-side truncation: the tokenizer's own, again (tokenizes the whole text again)
                ids[i] = tokenizer(texts[i], truncation=True, max_length=budget)["input_ids"]
            else:
                ids[i] = ids[i][: len(ids[i]) - tail - 1] + ids[i][len(ids[i]) - tail :]
        return [(x, i in over) for i, x in enumerate(ids)]
    specials = task == "seq2seq"
    bos = _bos(tokenizer, task)
    ids = tokenizer(
        [prompt.format(text=t) for t in texts],
        add_special_tokens=specials,
        truncation=True,
        max_length=budget + 1,
    )["input_ids"]  # +1: a row that fits is tokenized exactly as it is
    over = [i for i, x in enumerate(ids) if len(x) > budget]
    if over:
        for i, x in zip(
            over, _cut([texts[i] for i in over], tokenizer, prompt, specials, budget, budget - fixed)
        ):
            ids[i] = x
    over = set(over)
    return [(bos + x, i in over) for i, x in enumerate(ids)]


def _special_tail(tokenizer) -> int | None:
    """How many special tokens follow the text ([SEP]: 1), or None where truncation cuts the text's start."""
    if getattr(tokenizer, "truncation_side", "right") != "right":
        return None
    text, full = tokenizer("x", add_special_tokens=False)["input_ids"], tokenizer("x")["input_ids"]
    starts = [i for i in range(len(full) - len(text) + 1) if full[i : i + len(text)] == text]
    return len(full) - starts[-1] - len(text) if text and starts else None


def _cut(texts: list[str], tokenizer, prompt: str, specials: bool, budget: int, room: int) -> list[list[int]]:
    """For each text, the prompt filled with the longest start of it (whole tokens) that fits ``budget``.

    Batched (the tokenizer's per-call overhead is most of the cost for a few dozen rows): the text's
    first ``room`` tokens from a window of its start (never all of a huge text; grown until the tokens
    before its last space, which the window's edge cannot change, are enough), the text cut after them,
    the prompt tokenized around that; a row that still does not fit (a merge across the cut) drops
    tokens one by one.
    """
    windows = [16 * (room + 1)] * len(texts)
    pieces: list[list] = [
        [] for _ in texts
    ]  # per text: its tokens' end offsets (fast tokenizers) or its token ids
    todo = list(range(len(texts)))
    while todo:
        parts = [texts[i][: windows[i]] for i in todo]
        if tokenizer.is_fast:
            enc = tokenizer(parts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            found = [[end for _, end in offsets] for offsets in enc]
        else:
            found = tokenizer(parts, add_special_tokens=False)["input_ids"]
        again = []
        for i, part, got in zip(todo, parts, found):
            pieces[i] = got
            whole = windows[i] >= len(texts[i])
            settled = (
                len(got)
                if whole or not tokenizer.is_fast
                else sum(end <= part.rstrip().rfind(" ") for end in got)
            )
            if settled < room and not whole:
                windows[i] *= 4
                again.append(i)
        todo = again
    keep = [min(room, len(p)) for p in pieces]

    def start(i: int) -> str:
        if keep[i] <= 0:
            return ""
        return (
            texts[i][: pieces[i][keep[i] - 1]]
            if tokenizer.is_fast
            else tokenizer.decode(pieces[i][: keep[i]])
        )

    out = tokenizer([prompt.format(text=start(i)) for i in range(len(texts))], add_special_tokens=specials)[
        "input_ids"
    ]
    for i, ids in enumerate(out):
        while len(ids) > budget and keep[i] > 0:
            keep[i] -= max(1, len(ids) - budget)
            ids = out[i] = tokenizer(prompt.format(text=start(i)), add_special_tokens=specials)["input_ids"]
    return out


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    import torch

    width = max(len(s) for s in seqs)
    return torch.tensor(
        [[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs]
    )


class Collator:
    """Pads a batch for one of three purposes: ``train``, ``score`` (every row x every label) or ``generate``."""

    def __init__(self, task: str, purpose: str, pad_id: int, targets: list[list[int]] | None = None):
        self.task, self.purpose, self.pad_id, self.targets = task, purpose, pad_id, targets

    def __call__(self, feats: list[dict]) -> dict:
        import torch

        batch = {"row": torch.tensor([f["row"] for f in feats])}
        if self.task == "seq_cls":
            batch.update(self._inputs([f["input_ids"] for f in feats]))
            if self.purpose == "train":
                batch["labels"] = torch.tensor([f["label"] for f in feats])
            return batch
        if self.purpose == "generate":
            batch.update(self._inputs([f["input_ids"] for f in feats], left=self.task == "causal_lm"))
            return batch
        if (
            self.purpose == "score" and self.task == "seq2seq"
        ):  # each row once: the model pairs it with every label
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


def loader(
    feats: list[dict], collator: Collator, batch_size: int, shuffle: bool, seed: int
) -> torch.utils.data.DataLoader:
    """Batches of ``batch_size`` rows. Unshuffled (evaluation) the rows go longest first: each batch pads to
    rows of about its own length instead of the longest of a mix (twitter_complaints' 3,399 test rows, the
    guide's prompt, batch 64: 125,211 token positions instead of 218,655, of which 122,159 real), and the batch that needs the most
    memory comes first, so a batch size too large fails at once. Each row keeps its ``row`` index;
    ``engine.predict`` returns predictions in row order."""
    import torch

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if not shuffle:
        feats = sorted(feats, key=lambda f: -len(f["input_ids"]))  # stable: equal lengths keep row order
    return torch.utils.data.DataLoader(
        feats, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collator
    )
