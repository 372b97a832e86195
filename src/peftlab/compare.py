"""Compare finished, failed and running runs side by side: ``peftlab compare``.

Usage::

    peftlab compare multirun/2025-01-01/12-00-00          # one Hydra sweep
    peftlab compare SWEEP_A SWEEP_B outputs/some/run       # several sweeps and single runs
    peftlab compare SWEEP --sort accuracy                  # best first (lower-is-better metrics: ascending)
    peftlab compare SWEEP --sort=-wall_s                   # a leading '-' sorts descending; --asc ascending
    peftlab compare SWEEP --status finished,failed         # keep only these statuses
    peftlab compare SWEEP --metric val_accuracy            # metric of the plots and of "best run"
    peftlab compare SWEEP --mean-over seed                 # one row per setting: means over its seeds
    peftlab compare SWEEP --out reports/r_x_alpha          # also compare.csv, compare.md and the plots there
    peftlab compare SWEEP --no-plots

Every directory below the given paths that holds ``metrics.json`` or ``.hydra/`` is a run
(found recursively, sorted numeric-aware: ``2`` before ``10``). The table has one row per run:
its path relative to the runs' common parent, the config keys whose values differ between the
runs (dotted, e.g. ``peft.r``; a swept config group as its option, ``peft``: lora or ia3), then
the results -- blank unless the run finished -- and its status (``missing``: no metrics.json,
``corrupt``: unreadable metrics.json).

Plots (PNG; into ``--out``, else the sweep directory when one sweep is given, else ``./compare``):
``heatmap_<metric>.png`` when exactly two numeric keys were swept, ``<metric>_by_<key>.png`` when
one key was, and ``loss_curves.png`` whenever a run logged its loss curve.

Run directories are only read, never executed: YAML goes through ``yaml.safe_load`` (``_target_``
and ``${...}`` interpolations stay plain strings), JSON through ``json``.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from peftlab.rundir import headline

PROG = "peftlab compare"
METRIC_COLUMNS = [
    "accuracy",
    "macro_f1",
    "val_accuracy",
    "gpu_peak_mb",
    "cpu_peak_mb",
    "s_per_step",
    "tokens_per_s",
    "wall_s",
]
HIGHER_IS_BETTER = {"accuracy", "macro_f1", "val_accuracy", "tokens_per_s"}
METRIC_LABELS = {
    "accuracy": "accuracy (test split)",
    "macro_f1": "macro F1 (test split)",
    "val_accuracy": "accuracy (validation split)",
    "gpu_peak_mb": "peak GPU memory allocated (MB)",
    "cpu_peak_mb": "peak CPU RSS (MB)",
    "s_per_step": "time per training step (s)",
    "tokens_per_s": "training throughput (tokens/s)",
    "wall_s": "wall time (s)",
}
FORMATS = {
    "accuracy": "{:.3f}",
    "macro_f1": "{:.3f}",
    "val_accuracy": "{:.3f}",
    "gpu_peak_mb": "{:.0f}",
    "cpu_peak_mb": "{:.0f}",
    "s_per_step": "{:.4g}",
    "tokens_per_s": "{:.0f}",
    "wall_s": "{:.1f}",
}
RESERVED_COLUMNS = {"run", "status", "error", *METRIC_COLUMNS}
# Keys that differ between runs of one sweep without being part of the experiment.
NOISE_GROUPS = {"hydra", "paths"}
NOISE_LEAVES = {
    "output_dir",
    "out_dir",
    "run_dir",
    "log_dir",
    "logging_dir",
    "save_dir",
    "checkpoint_dir",
    "cache_dir",
    "output_path",
    "job_id",
    "job_num",
    "run_id",
    "timestamp",
}
ERROR_WIDTH = 60
LEGEND_OUTSIDE_AFTER = 6
DPI = 120
_ABSENT = object()


# --------------------------------------------------------------------------- discovery


def natural_key(text: str) -> list[tuple[int, int, str]]:
    """Sort key that orders embedded numbers numerically: 'job2' < 'job10'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text) if t]


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def _subdirs(path: Path) -> list[Path]:
    """Visible, non-symlinked child directories, numeric-aware sorted."""
    try:
        children = [
            p for p in path.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        ]
    except OSError:
        return []
    return sorted(children, key=lambda p: natural_key(p.name))


def _walk_runs(path: Path) -> Iterator[Path]:
    if is_run_dir(path):
        yield path
        return
    for child in _subdirs(path):
        yield from _walk_runs(child)


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories under ``paths``, in argument order, each sorted numeric-aware.

    Raises FileNotFoundError (message: the path) for a path that does not exist.
    """
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(str(raw))
        path = path.resolve()
        for run in _walk_runs(path.parent if path.is_file() else path):
            if run not in runs:
                runs.append(run)
    return runs


# --------------------------------------------------------------------------- loading


def read_yaml(path: Path) -> Any:
    """Parsed YAML, or None when missing/unreadable. Safe loader: never builds Python objects."""
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def read_metrics(run_dir: Path) -> tuple[dict | None, str]:
    """(metrics, status); status is 'missing', 'corrupt', 'unknown' or the file's own status."""
    file = run_dir / "metrics.json"
    if not file.is_file():
        return None, "missing"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None, "corrupt"
    if not isinstance(data, dict):
        return None, "corrupt"
    status = data.get("status")
    return data, status if isinstance(status, str) and status else "unknown"


def load_config(run_dir: Path) -> dict:
    """The run's resolved config.yaml, else the (unresolved) .hydra/config.yaml, else {}."""
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        data = read_yaml(candidate)
        if isinstance(data, dict):
            return data
    return {}


def load_choices(run_dir: Path) -> dict[str, str]:
    """The option chosen in each config group (``peft: lora``), from Hydra's record of the run
    (.hydra/hydra.yaml); Hydra's own groups (``hydra/...``) and nested groups left out."""
    hydra = read_yaml(run_dir / ".hydra" / "hydra.yaml")
    choices = _dict(_dict(_dict(hydra).get("hydra")).get("runtime")).get("choices")
    return {str(k): v for k, v in _dict(choices).items() if "/" not in str(k) and not str(k).startswith("hydra")}


def load_run(path: str | os.PathLike) -> dict:
    """Everything compare needs from one run directory, read without executing anything.

    Keys: path, config (nested dict), choices (config group -> option), overrides (list of str),
    metrics (dict or None), status (str), error (str or None).
    """
    path = Path(path)
    overrides = read_yaml(path / ".hydra" / "overrides.yaml")
    metrics, status = read_metrics(path)
    error = metrics.get("error") if metrics else None
    return {
        "path": path,
        "config": load_config(path),
        "choices": load_choices(path),
        "overrides": [str(o) for o in overrides] if isinstance(overrides, list) else [],
        "metrics": metrics,
        "status": status,
        "error": error if isinstance(error, str) and error.strip() else None,
    }


# --------------------------------------------------------------------------- config keys


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'peft': {'r': 4}} -> {'peft.r': 4}; lists and empty dicts become compact strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, dict)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = value
    return flat


def _override_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """['peft.r=4', '+x=1', 'zero=stage3'] -> {'peft.r': 4, 'x': 1, 'zero': 'stage3'} (deletions skipped)."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not key.startswith("~"):
            parsed[key.lstrip("+").split("@")[0]] = _override_value(value)
    return parsed


def config_values(run: dict) -> dict[str, Any]:
    """Flattened config of a run, each config group's chosen option (``peft: lora``) just before
    the group's keys; its overrides when no config file could be read."""
    if not run["config"]:
        return parse_overrides(run["overrides"])
    flat, choices = flatten(run["config"]), run["choices"]
    values: dict[str, Any] = {}
    for key, value in flat.items():
        group = key.split(".", 1)[0]
        if group in choices and group not in values and group not in flat:
            values[group] = choices[group]
        values[key] = value
    return values


def is_noise_key(key: str) -> bool:
    parts = key.split(".")
    return parts[0] in NOISE_GROUPS or parts[-1] in NOISE_LEAVES


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Non-noise keys whose value (or presence) differs between the runs that have a config.

    A key that only echoes an earlier one (same last name, same value in every run: ``optimizer.lr``
    interpolated from ``train.lr`` in a resolved config) is left out, so a swept value shows once.
    So is a key that a differing parent key settles: with ``peft`` swept over lora and ia3, each
    method's own settings (``peft.r``, ``peft.target_modules``, ...) take one value per method and
    are left out; ``peft.r`` swept within lora stays.
    """
    present = [c for c in configs if c]
    keys = dict.fromkeys(k for c in present for k in c if not is_noise_key(k))
    kept: dict[str, tuple] = {}
    for key in keys:
        values = tuple(repr(c.get(key, _ABSENT)) for c in present)
        if len(set(values)) < 2:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if any(k.rsplit(".", 1)[-1] == leaf and v == values for k, v in kept.items()):
            continue
        if any(key.startswith(k + ".") and _settled_by(v, values) for k, v in kept.items()):
            continue
        kept[key] = values
    return list(kept)


def _settled_by(parent: tuple, child: tuple) -> bool:
    """Whether the child key takes a single value for each value of the parent key."""
    seen: dict[str, str] = {}
    return all(seen.setdefault(p, c) == c for p, c in zip(parent, child, strict=True))


def _column_name(key: str) -> str:
    return f"config.{key}" if key in RESERVED_COLUMNS else key


def config_columns(table: pd.DataFrame) -> list[str]:
    """The config columns of a runs_table: those between 'run' and the first metric."""
    return list(table.columns[1 : table.columns.get_loc(METRIC_COLUMNS[0])])


# --------------------------------------------------------------------------- metrics


def _num(value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _max(values: Iterable[Any]) -> float:
    found = [v for v in map(_num, values) if not math.isnan(v)]
    return max(found) if found else math.nan


def run_metrics(metrics: dict | None) -> dict[str, float]:
    """The metric columns of a finished run; all NaN for any other status."""
    row = dict.fromkeys(METRIC_COLUMNS, math.nan)
    if not metrics or metrics.get("status") != "finished":
        return row
    figures = headline(metrics)  # the figures the run's last line and the benchmark show
    row.update({column: _num(figures[column]) for column in METRIC_COLUMNS})
    return row


def short_error(text: str | None, width: int = ERROR_WIDTH) -> str:
    """One line, at most ``width`` characters."""
    line = " ".join((text or "").split())
    return line if len(line) <= width else line[: width - 1] + "…"


# --------------------------------------------------------------------------- table


def run_names(paths: Sequence[Path]) -> list[str]:
    """Paths relative to their common parent ('0', '1', ... for one sweep)."""
    if len(paths) == 1:
        return [paths[0].name]
    base = Path(os.path.commonpath([str(p) for p in paths]))
    if base in paths:
        base = base.parent
    return [p.relative_to(base).as_posix() for p in paths]


def runs_table(runs: Sequence[dict]) -> pd.DataFrame:
    """One row per run: run, differing config keys, metrics, status (and error if any).

    The index is each run's position in ``runs`` and survives filtering and sorting.
    """
    configs = [config_values(r) for r in runs]
    keys = differing_keys(configs)
    has_errors = any(r["error"] and r["status"] != "finished" for r in runs)
    rows = []
    for run, name, values in zip(runs, run_names([r["path"] for r in runs]), configs, strict=True):
        row = {"run": name, **{_column_name(k): values.get(k) for k in keys}}
        row.update(run_metrics(run["metrics"] if run["status"] == "finished" else None))
        row["status"] = run["status"]
        if has_errors:
            row["error"] = short_error(run["error"]) if run["status"] != "finished" else ""
        rows.append(row)
    columns = ["run", *map(_column_name, keys), *METRIC_COLUMNS, "status", *(["error"] if has_errors else [])]
    return pd.DataFrame(rows, columns=columns)


def mean_over(table: pd.DataFrame, keys: Sequence[str], metric: str) -> pd.DataFrame:
    """One row per setting of the other config columns, the metrics averaged over its finished runs
    (e.g. ``keys=["seed"]``: the mean over seeds); ``n`` counts them and ``<metric>_sd`` is their
    standard deviation. A setting is 'finished' only when all of its runs are."""
    group_cols = [c for c in config_columns(table) if c not in keys]
    groups: dict[tuple, list[int]] = {}
    columns = {c: list(table[c]) for c in group_cols}
    for i in range(len(table)):
        groups.setdefault(tuple(repr(columns[c][i]) for c in group_cols), []).append(i)
    rows = []
    for members in groups.values():
        group = table.iloc[members]
        done = group[group["status"] == "finished"]
        row = {"run": ",".join(map(str, group["run"])), **{c: group[c].iloc[0] for c in group_cols}}
        row.update({m: done[m].mean() if len(done) else math.nan for m in METRIC_COLUMNS})
        row.update({"n": len(done), f"{metric}_sd": done[metric].std() if len(done) > 1 else math.nan})
        row["status"] = "finished" if len(done) == len(group) else f"{len(done)}/{len(group)} finished"
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", *group_cols, *METRIC_COLUMNS, "n", f"{metric}_sd", "status"])


def filter_status(table: pd.DataFrame, statuses: Iterable[str]) -> pd.DataFrame:
    wanted = {s.strip() for s in statuses if s.strip()}
    return table[table["status"].isin(wanted)]


def _blank(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _sort_key(value: Any) -> tuple:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (0, float(value), [])
    return (1, 0.0, natural_key(str(value)))


def sort_table(table: pd.DataFrame, column: str, ascending: bool | None = None) -> pd.DataFrame:
    """Sort by ``column`` with blanks last. Default direction: descending for metrics where
    higher is better, ascending otherwise; a leading '-' (``-wall_s``) means descending.
    Raises KeyError for an unknown column."""
    if column.startswith("-") and column not in table.columns:
        column, ascending = column[1:], False if ascending is None else ascending
    if column not in table.columns:
        raise KeyError(column)
    if ascending is None:
        ascending = column not in HIGHER_IS_BETTER
    values = list(table[column])
    filled = [i for i, v in enumerate(values) if not _blank(v)]
    filled.sort(key=lambda i: _sort_key(values[i]), reverse=not ascending)
    return table.iloc[filled + [i for i, v in enumerate(values) if _blank(v)]]


# --------------------------------------------------------------------------- text output


def format_value(value: Any, column: str = "") -> str:
    if _blank(value):
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if column in FORMATS:
            return FORMATS[column].format(value)
        if isinstance(value, float):
            return f"{value:g}"
    return str(value)


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """All cells as display strings (rounded numbers, blanks for missing values)."""
    return pd.DataFrame(
        {col: [format_value(v, col) for v in table[col]] for col in table.columns}, index=table.index
    )


def to_markdown(table: pd.DataFrame) -> str:
    cells = format_table(table)
    header = "| " + " | ".join(cells.columns) + " |"
    rule = "|" + "|".join("---:" if c in FORMATS else "---" for c in cells.columns) + "|"
    rows = [
        "| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows]) + "\n"


def _short_key(key: str) -> str:
    """'peft.lora_alpha' -> 'lora_alpha'; a swapped group's 'peft._target_'/'peft.name' -> 'peft'."""
    parts = key.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("_target_", "name") else parts[-1]


def run_label(row: pd.Series, keys: Sequence[str]) -> str:
    """'r=4, lora_alpha=8' (short key names when unambiguous), else the run name."""
    short = [_short_key(k) for k in keys]
    names = short if len(set(short)) == len(short) else list(keys)
    parts = [f"{n}={format_value(row[k])}" for n, k in zip(names, keys, strict=True) if not _blank(row[k])]
    return (", ".join(parts) or str(row["run"])).lstrip("_")  # matplotlib hides labels starting with '_'


def best_run(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The finished run with the best ``metric`` (max, or min for lower-is-better), or None."""
    done = table[(table["status"] == "finished") & table[metric].notna()]
    if done.empty:
        return None
    best = done[metric].idxmax() if metric in HIGHER_IS_BETTER else done[metric].idxmin()
    return done.loc[best]


def summary_line(table: pd.DataFrame, metric: str, keys: Sequence[str] = ()) -> str:
    counts = table["status"].value_counts()
    finished = int(counts.get("finished", 0))
    text = f"{len(table)} runs, {finished} finished, {len(table) - finished} failed/other"
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "finished")
    text += f" ({others})" if others else ""
    best = best_run(table, metric)
    if best is None:
        return text + f"; no finished run has {metric}"
    label = run_label(best, keys)
    where = best["run"] if label == best["run"] else f"{best['run']} ({label})"
    text += f"; best {metric}: {format_value(best[metric], metric)} by {where}"
    if metric != "accuracy" and pd.notna(best.get("accuracy")):  # chosen without the test split: report it now
        text += f", whose accuracy is {format_value(best['accuracy'], 'accuracy')}"
    return text


def write_tables(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / "compare.csv", out_dir / "compare.md"
    table.to_csv(csv, index=False)
    md.write_text(to_markdown(table), encoding="utf-8")
    return [csv, md]


# --------------------------------------------------------------------------- plots


def sweep_keys(runs: Sequence[dict], table: pd.DataFrame) -> list[str]:
    """Config columns set by the runs' command-line overrides (a swapped group maps to its
    name/_target_ column); all config columns when the overrides name none of them."""
    columns = config_columns(table)
    swept = set()
    for run in runs:
        for key in parse_overrides(run["overrides"]):
            candidates = [_column_name(k) for k in (key, f"{key}.name", f"{key}._target_")]
            swept.update([c for c in candidates if c in columns][:1])
    return [c for c in columns if c in swept] or columns


def is_numeric_column(values: pd.Series) -> bool:
    filled = [v for v in values if not _blank(v)]
    return bool(filled) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in filled)


def _finished_mean(group: pd.DataFrame, metric: str) -> float:
    values = group.loc[group["status"] == "finished", metric].dropna()
    return float(values.mean()) if len(values) else math.nan


def _status_text(group: pd.DataFrame) -> str:
    return "/".join(sorted(set(group["status"]) - {"finished"})) or "n/a"


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def plot_heatmap(table: pd.DataFrame, y_key: str, x_key: str, metric: str, path: Path) -> Path:
    """``metric`` over two numeric keys; cells without a finished run are grey with their status."""
    import matplotlib
    import numpy as np

    ys = sorted({float(v) for v in table[y_key] if not _blank(v)})
    xs = sorted({float(v) for v in table[x_key] if not _blank(v)})
    grid = np.full((len(ys), len(xs)), np.nan)
    text = [[""] * len(xs) for _ in ys]
    for (y, x), group in table.groupby([y_key, x_key]):
        i, j = ys.index(float(y)), xs.index(float(x))
        grid[i, j] = _finished_mean(group, metric)
        text[i][j] = _status_text(group) if math.isnan(grid[i, j]) else format_value(grid[i, j], metric)
    fig, ax = _new_figure(2.4 + 1.1 * len(xs), 1.6 + 0.7 * len(ys))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    finite = grid[~np.isnan(grid)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=low, vmax=high, aspect="auto")
    for i, j in np.ndindex(grid.shape):
        dark = not math.isnan(grid[i, j]) and image.norm(grid[i, j]) < 0.5
        ax.text(j, i, text[i][j], ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(xs)), labels=[f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), labels=[f"{v:g}" for v in ys])
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(f"{metric} by {y_key} and {x_key}")
    fig.colorbar(image, ax=ax, label=METRIC_LABELS.get(metric, metric))
    return _save(fig, path)


def _mark_missing(ax, positions: Sequence[float], labels: Sequence[str]) -> None:
    """Grey status text at the bottom of the axes for x positions without a result."""
    for x, label in zip(positions, labels, strict=True):
        ax.text(
            x,
            0.03,
            label,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="dimgrey",
            rotation=90,
        )


def plot_line(table: pd.DataFrame, key: str, metric: str, path: Path) -> Path:
    """``metric`` against one numeric key (mean of finished runs per value)."""
    from matplotlib.ticker import NullLocator

    groups = [(float(x), g) for x, g in table.groupby(key)]
    points = [(x, _finished_mean(g, metric)) for x, g in groups]
    done = [(x, y) for x, y in points if not math.isnan(y)]
    fig, ax = _new_figure(6.4, 4.2)
    ax.plot([x for x, _ in done], [y for _, y in done], marker="o")
    for x, y in done:
        ax.annotate(
            format_value(y, metric),
            (x, y),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    missing = [(x, _status_text(g)) for (x, g), (_, y) in zip(groups, points, strict=True) if math.isnan(y)]
    _mark_missing(ax, [x for x, _ in missing], [s for _, s in missing])
    xs = [x for x, _ in groups]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    if len(xs) <= 12:
        ax.set_xticks(xs, labels=[f"{x:g}" for x in xs])
    ax.set_xlabel(key)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{metric} by {key}")
    ax.grid(alpha=0.3)
    ax.margins(y=0.12)
    return _save(fig, path)


def plot_bars(table: pd.DataFrame, key: str, metric: str, path: Path) -> Path:
    """``metric`` per value of one categorical key (mean of finished runs per value)."""
    groups = sorted(((str(v), g) for v, g in table.groupby(key)), key=lambda item: natural_key(item[0]))
    heights = [_finished_mean(g, metric) for _, g in groups]
    fig, ax = _new_figure(max(4.8, 1.0 + 1.0 * len(groups)), 4.2)
    bars = ax.bar(range(len(groups)), [0.0 if math.isnan(h) else h for h in heights], color="tab:blue")
    ax.bar_label(
        bars,
        labels=["" if math.isnan(h) else format_value(h, metric) for h in heights],
        padding=2,
        fontsize=8,
    )
    missing = [i for i, h in enumerate(heights) if math.isnan(h)]
    _mark_missing(ax, missing, [_status_text(groups[i][1]) for i in missing])
    names = [name for name, _ in groups]
    long_names = max(map(len, names), default=0) > 10
    ax.set_xticks(
        range(len(names)),
        labels=names,
        rotation=30 if long_names else 0,
        ha="right" if long_names else "center",
    )
    ax.set_xlabel(key)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{metric} by {key}")
    ax.margins(y=0.12)
    return _save(fig, path)


def loss_curve(metrics: dict | None) -> tuple[list[float], list[float]]:
    """(steps, losses) from metrics['loss_curve'], skipping malformed points."""
    steps, losses = [], []
    points = metrics.get("loss_curve") if metrics else None
    for point in points if isinstance(points, list) else []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            step, loss = _num(point[0]), _num(point[1])
            if not (math.isnan(step) or math.isnan(loss)):
                steps.append(step)
                losses.append(loss)
    return steps, losses


def legend_labels(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """One label per row from ``keys``; from all config columns, then with the run name, until unique."""
    for columns in (keys, config_columns(table)):
        labels = [run_label(row, columns) for _, row in table.iterrows()]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{row['run']}: {label}" for (_, row), label in zip(table.iterrows(), labels, strict=True)]


def plot_loss_curves(
    table: pd.DataFrame, runs: Sequence[dict], keys: Sequence[str], path: Path
) -> Path | None:
    """Training loss vs step of every run in ``table`` that logged one; None when none did."""
    curves = []
    for (index, row), label in zip(table.iterrows(), legend_labels(table, keys), strict=True):
        steps, losses = loss_curve(runs[index]["metrics"])
        if steps:
            status = "" if row["status"] == "finished" else f" [{row['status']}]"
            curves.append((label + status, row["status"] == "finished", steps, losses))
    if not curves:
        return None
    outside = len(curves) > LEGEND_OUTSIDE_AFTER
    fig, ax = _new_figure(9.0 if outside else 6.8, 4.4)
    import matplotlib

    palette = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"]
    for n, (label, finished, steps, losses) in enumerate(curves):
        ax.plot(
            steps,
            losses,
            label=label,
            linewidth=1.2,
            linestyle="-" if finished else "--",
            color=palette(n % palette.N),
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    if outside:
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, ncol=1 if len(curves) <= 20 else 2
        )
    else:
        ax.legend(fontsize=8)
    return _save(fig, path)


def make_plots(
    table: pd.DataFrame, runs: Sequence[dict], keys: Sequence[str], metric: str, out_dir: Path, loss_curves: bool = True
) -> list[Path]:
    """Heatmap (two numeric keys) or line/bar chart (one key), plus loss curves (a row per run only)."""
    written = []
    numeric = [k for k in keys if is_numeric_column(table[k])]
    if len(keys) == 2 and len(numeric) == 2:
        written.append(plot_heatmap(table, keys[0], keys[1], metric, out_dir / f"heatmap_{metric}.png"))
    elif len(keys) == 1 and table[keys[0]].notna().any():
        plot = plot_line if numeric else plot_bars
        written.append(plot(table, keys[0], metric, out_dir / f"{metric}_by_{_safe_name(keys[0])}.png"))
    curves = plot_loss_curves(table, runs, keys, out_dir / "loss_curves.png") if loss_curves else None
    return written + ([curves] if curves else [])


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tabulate and plot the runs of one or more Hydra sweeps or run directories.",
        epilog="Columns: run, the config keys that differ, " + ", ".join(METRIC_COLUMNS) + ", status.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="sweep directories or run directories")
    parser.add_argument(
        "--sort",
        metavar="COL",
        help="sort by this column; higher-is-better metrics "
        "sort descending, others ascending; --sort=-COL sorts descending",
    )
    parser.add_argument("--asc", action="store_true", help="with --sort: always ascending")
    parser.add_argument("--status", metavar="LIST", help="keep only these statuses, e.g. finished,failed")
    parser.add_argument(
        "--metric",
        default="accuracy",
        choices=METRIC_COLUMNS,
        help="metric of the plots and of the best run (default: accuracy)",
    )
    parser.add_argument(
        "--out", metavar="DIR", type=Path, help="write compare.csv, compare.md and the plots into DIR"
    )
    parser.add_argument(
        "--mean-over",
        metavar="KEYS",
        help="average the runs that differ only in these config keys, e.g. seed: one row per setting, "
        "with n and the spread of --metric",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots")
    return parser


def default_plot_dir(paths: Sequence[str]) -> Path:
    """The sweep directory when exactly one sweep was given, else ./compare."""
    if len(paths) == 1 and (Path(paths[0]) / "multirun.yaml").is_file():
        return Path(paths[0])
    return Path.cwd() / "compare"


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        run_dirs = find_runs(args.paths)
    except FileNotFoundError as exc:
        return _fail(f"no such directory: {exc}")
    if not run_dirs:
        return _fail(f"no run directories under {' '.join(args.paths)}")
    runs = [load_run(d) for d in run_dirs]
    table = runs_table(runs)
    keys = sweep_keys(runs, table)
    if args.status:
        table = filter_status(table, args.status.split(","))
    if args.mean_over:
        over = [k.strip() for k in args.mean_over.split(",") if k.strip()]
        missing = [k for k in over if k not in config_columns(table)]
        if missing:
            return _fail(f"--mean-over: the runs do not differ in {', '.join(missing)}; "
                         f"config columns: {', '.join(config_columns(table)) or 'none'}")
        table, keys = mean_over(table, over, args.metric), [k for k in keys if k not in over]
    if args.sort:
        try:
            table = sort_table(table, args.sort, ascending=True if args.asc else None)
        except KeyError:
            return _fail(f"--sort: no column {args.sort!r}; columns: {', '.join(table.columns)}")
    print(format_table(table).to_string(index=False) if len(table) else f"no runs with status {args.status}")
    print(summary_line(table, args.metric, keys))
    written = []
    try:
        if args.out:
            written += write_tables(table, args.out)
        if not args.no_plots and len(table):
            written += make_plots(table, runs, keys, args.metric, args.out or default_plot_dir(args.paths),
                                  loss_curves=not args.mean_over)
    except OSError as exc:
        return _fail(f"could not write output: {exc}", code=1)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
