"""The figures a run records for its held-out rows, computed by `evaluate` modules and scikit-learn.

``eval.metrics`` names them: ``accuracy`` and ``macro_f1`` (always recorded: compare, sweeps and a
sweep's objective read them) are modules shipped here (``modules/``, scikit-learn inside), loaded by
path, so they work offline with no hub cache; any other entry is what ``evaluate.load`` takes: a hub
metric (``matthews_correlation``, ``evaluate-metric/f1``, ``user/metric``), a local module script
(``path/to/my_metric.py``) or a folder holding ``<folder name>.py``. They are combined with
``evaluate.combine``; each result is recorded under the key its module returns.

Importing this package imports nothing heavy: `evaluate` (which imports transformers and torch,
~6 s) loads in ``load_metrics`` only, so ``check_names`` can run in config validation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

from peftlab.errors import ConfigError

DEFAULTS = ("accuracy", "macro_f1")
MODULES = Path(__file__).with_name("modules")
SHIPPED = {path.stem: path for path in sorted(MODULES.glob("*.py"))}  # name -> module script


def wanted(metrics: Iterable[str] | None) -> tuple[str, ...]:
    """The defaults, then ``metrics`` (e.g. ``cfg.eval.metrics``) in their order, each once."""
    return tuple(dict.fromkeys([*DEFAULTS, *(str(m) for m in metrics or ())]))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_EVALUATE_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def _modules_cache() -> Path:
    """Where ``evaluate`` keeps the module scripts it fetched (its config.HF_MODULES_CACHE), read without importing it."""
    home = os.environ.get(
        "HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    )
    return (
        Path(os.environ.get("HF_MODULES_CACHE", os.path.join(home, "modules"))).expanduser()
        / "evaluate_modules"
        / "metrics"
    )


def _local_script(name: str) -> Path | None:
    """The module script ``evaluate.load(name)`` would take from disk: the .py file, or <folder>/<folder name>.py."""
    path = Path(name).expanduser()
    if path.suffix == ".py":
        return path if path.is_file() else None
    script = path / f"{path.name}.py"
    return script if script.is_file() else None


def _cached(name: str) -> bool:
    """A hub module (``accuracy``, ``owner/metric``) fetched before, which ``evaluate.load`` uses when the hub is off."""
    folders = (
        [f"evaluate-{kind}--{name}" for kind in ("metric", "comparison", "measurement")]
        if "/" not in name
        else [name.replace("/", "--")]
    )
    script = name.rsplit("/", 1)[-1] + ".py"
    return any(
        (folder / script).is_file()
        for f in folders
        if (_modules_cache() / f).is_dir()
        for folder in (_modules_cache() / f).iterdir()
        if len(folder.name) == 64
    )


def check_names(metrics: Iterable[str] | None) -> None:
    """ConfigError, in one line naming ``eval.metrics`` and the fix, for an entry that cannot load: a
    path with no module script, or (hub off: HF_HUB_OFFLINE=1) a hub metric not in evaluate's cache.
    Light (no `evaluate` import): config validation calls it. A hub metric with the hub on is fetched
    by ``load_metrics``."""
    offline = None
    for name in wanted(metrics):
        if name in SHIPPED or _local_script(name):
            continue
        path_like = (
            name.endswith(".py")
            or name.startswith((".", "/", "~"))
            or name.count("/") > 1
            or Path(name).expanduser().exists()
        )
        if path_like:
            what = (
                "no such file"
                if name.endswith(".py")
                else f"a .py file, or a folder holding {Path(name).name}.py"
            )
            raise ConfigError(
                f"eval.metrics: {name} is not an evaluate module script ({what}); fix the path, or give an "
                "evaluate hub metric name"
            )
        offline = _hub_offline() if offline is None else offline
        if offline and not _cached(name):
            raise ConfigError(
                f"eval.metrics: {name} is an evaluate hub metric, not in the local cache ({_modules_cache()}), and the "
                f"hub is off (HF_HUB_OFFLINE=1): run `python -c \"import evaluate; evaluate.load('{name}')\"` "
                f"once with internet, give a local module path (my_metric.py), or drop it "
                f"({', '.join(SHIPPED)} work offline)"
            )


def load_metrics(metrics: Iterable[str] | None, num_labels: int):
    """``evaluate.combine`` of ``wanted(metrics)``, loaded and tried on ``num_labels`` labels (one row
    each), so that a metric which cannot load or cannot score this task (``f1``'s binary default on
    three labels) raises ConfigError now, before training, not after. Cached per process, by the
    metrics ``wanted`` makes of ``metrics`` (the run's early load and each evaluation share one)."""
    return _load(wanted(metrics), num_labels)


@functools.lru_cache(maxsize=8)
def _load(names: tuple[str, ...], num_labels: int):
    check_names(names)
    import evaluate

    modules = []
    for name in names:
        source = str(SHIPPED[name]) if name in SHIPPED else str(_local_script(name) or name)
        try:
            modules.append(evaluate.load(source, keep_in_memory=True))
        except Exception as e:  # offline, no such metric, a broken script: the fix is in eval.metrics
            raise ConfigError(
                f"eval.metrics: {name} could not be loaded ({_first_line(e)}); give an evaluate hub metric "
                "name or a local module path, or drop it"
            ) from None
    combined = evaluate.combine(modules)
    labels = list(range(max(num_labels, 2)))
    try:
        combined.result_keys = list(combined.compute(predictions=labels, references=labels))
    except Exception as e:
        raise ConfigError(
            f"eval.metrics: one of {', '.join(names)} cannot score {num_labels} labels "
            f"({_first_line(e)}); drop it or give a module that takes label indices"
        ) from None
    return combined


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _plain(value):
    """A module's result as JSON takes it: floats rounded to 6 digits, arrays as lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def classification_figures(
    gold: list[int], pred: list[int], names: list[str], metrics: Iterable[str] | None = None
) -> dict:
    """The record of one evaluation: each metric of ``wanted(metrics)`` under its result key
    (``accuracy``, ``macro_f1``, then e.g. ``matthews_correlation``), ``n_eval``, ``labels`` (the
    names) and ``confusion_matrix`` (rows the true labels, columns the predictions, both indexed as
    ``names``; scikit-learn's). ``gold`` and ``pred`` are label indices, as many; with none, each
    metric is None. ConfigError as ``load_metrics``."""
    from sklearn.metrics import confusion_matrix

    combined = load_metrics(metrics, len(names))
    if gold:
        scores = {
            key: _plain(value) for key, value in combined.compute(predictions=pred, references=gold).items()
        }
        matrix = confusion_matrix(gold, pred, labels=list(range(len(names)))).tolist()
    else:
        scores = dict.fromkeys(combined.result_keys)
        matrix = [[0] * len(names) for _ in names]
    return {**scores, "n_eval": len(gold), "labels": list(names), "confusion_matrix": matrix}
