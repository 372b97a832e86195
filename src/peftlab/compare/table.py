"""The runs table of ``peftlab compare``: one row per run, the config keys that differ, the headline figures.

Rows come from :func:`peftlab.rundir.load_run` dicts; the figures from :func:`peftlab.rundir.headline`,
as the run's last line and the benchmark show them. Output: a terminal table (``rich``), CSV and Markdown.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from peftlab.rundir import headline, natural_key

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
STATUS_STYLES = {"finished": "green", "running": "yellow", "missing": "dim", "corrupt": "dim"}  # others: red
_ABSENT = object()


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
        if key == group and group in choices and value == "{}":  # an empty option (peft=none): its name
            values[group] = choices[group]
            continue
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


# --------------------------------------------------------------------------- rows


def _num(value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return math.nan


def run_metrics(metrics: dict | None) -> dict[str, float]:
    """The metric columns of a finished run (rundir.headline's figures); all NaN for any other status."""
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


def run_names(paths: Sequence[Path]) -> list[str]:
    """Paths relative to their common parent ('0', '1', ... for one sweep)."""
    if len(paths) == 1:
        return [paths[0].name]
    base = Path(os.path.commonpath([str(p) for p in paths]))
    if base in paths:
        base = base.parent
    return [p.relative_to(base).as_posix() for p in paths]


def runs_table(runs: Sequence[dict]) -> pd.DataFrame:
    """One row per run (``rundir.load_run`` dicts): run, differing config keys, metrics, status (and
    error if any run has one). The index is each run's position in ``runs`` and survives filtering and sorting."""
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


def blank(value: Any) -> bool:
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
    filled = [i for i, v in enumerate(values) if not blank(v)]
    filled.sort(key=lambda i: _sort_key(values[i]), reverse=not ascending)
    return table.iloc[filled + [i for i, v in enumerate(values) if blank(v)]]


def is_numeric_column(values: pd.Series) -> bool:
    filled = [v for v in values if not blank(v)]
    return bool(filled) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in filled)


# --------------------------------------------------------------------------- text output


def format_value(value: Any, column: str = "") -> str:
    if blank(value):
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
    """A GitHub Markdown table of every column (numbers right-aligned), for files (``--out``)."""
    cells = format_table(table)
    header = "| " + " | ".join(cells.columns) + " |"
    rule = "|" + "|".join("---:" if c in FORMATS else "---" for c in cells.columns) + "|"
    rows = [
        "| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows]) + "\n"


def print_table(table: pd.DataFrame, file=None) -> None:
    """The table on ``file`` (default stdout) through ``rich``: numbers right-aligned, one line per run however
    wide (for grep and head, and no number folded in two); on a terminal a bold header, coloured statuses and the
    rows of unfinished runs dimmed, piped or redirected plain text. Metric columns blank in every row are left out
    (CSV and Markdown keep them)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    shown = [c for c in table.columns if c not in METRIC_COLUMNS or table[c].notna().any()]
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in shown:
        right = column in FORMATS or column == "n" or is_numeric_column(table[column])
        grid.add_column(column, justify="right" if right else "left", no_wrap=True)
    for (_, row), cells in zip(
        table.iterrows(), format_table(table[shown]).itertuples(index=False), strict=True
    ):
        status = row["status"]
        texts = [
            Text(v, style=STATUS_STYLES.get(status, "red") if c == "status" else "")
            for c, v in zip(shown, cells)
        ]
        grid.add_row(*texts, style=None if status == "finished" else "dim")
    console = Console(file=file, width=100_000, highlight=False)
    with (
        console.capture() as captured
    ):  # then print: a closed pipe raises BrokenPipeError (rich would exit 1)
        console.print(grid)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()), file=file)


def _short_key(key: str) -> str:
    """'peft.lora_alpha' -> 'lora_alpha'; a swapped group's 'peft._target_'/'peft.name' -> 'peft'."""
    parts = key.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("_target_", "name") else parts[-1]


def run_label(row: pd.Series, keys: Sequence[str]) -> str:
    """'r=4, lora_alpha=8' (short key names when unambiguous), else the run name."""
    short = [_short_key(k) for k in keys]
    names = short if len(set(short)) == len(short) else list(keys)
    parts = [f"{n}={format_value(row[k])}" for n, k in zip(names, keys, strict=True) if not blank(row[k])]
    return (", ".join(parts) or str(row["run"])).lstrip("_")  # matplotlib hides labels starting with '_'


def best_run(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The finished run with the best ``metric`` (max, or min for lower-is-better), or None."""
    done = table[(table["status"] == "finished") & table[metric].notna()]
    if done.empty:
        return None
    best = done[metric].idxmax() if metric in HIGHER_IS_BETTER else done[metric].idxmin()
    return done.loc[best]


def summary_line(table: pd.DataFrame, metric: str, keys: Sequence[str] = ()) -> str:
    """'6 runs, 2 finished, 4 failed/other (...); best <metric>: <value> by <run> (<its keys>)'."""
    counts = table["status"].value_counts()
    finished = int(counts.get("finished", 0))
    text = f"{len(table)} run{'' if len(table) == 1 else 's'}, {finished} finished, {len(table) - finished} failed/other"
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "finished")
    text += f" ({others})" if others else ""
    best = best_run(table, metric)
    if best is None:
        return text + f"; no finished run has {metric}"
    label = run_label(best, keys)
    where = best["run"] if label == best["run"] else f"{best['run']} ({label})"
    text += f"; best {metric}: {format_value(best[metric], metric)} by {where}"
    if metric != "accuracy" and pd.notna(
        best.get("accuracy")
    ):  # chosen without the test split: report it now
        text += f", whose accuracy is {format_value(best['accuracy'], 'accuracy')}"
    return text


def write_tables(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """compare.csv (raw numbers) and compare.md (:func:`to_markdown`) in ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / "compare.csv", out_dir / "compare.md"
    table.to_csv(csv, index=False)
    md.write_text(to_markdown(table), encoding="utf-8")
    return [csv, md]
