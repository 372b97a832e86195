"""The plots of ``peftlab compare`` (PNG, matplotlib without pyplot: no global state, Agg canvas on save).

``heatmap_<metric>.png`` when exactly two numeric keys were swept, ``<metric>_by_<key>.png`` (line for a
numeric key, bars otherwise) when one was, and ``loss_curves.png`` whenever a run logged its loss curve:
each curve raw (faded) under its smoothed line; past PANELS_AFTER runs, one panel per run.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from peftlab.compare.table import (
    METRIC_LABELS,
    blank,
    config_columns,
    format_value,
    is_numeric_column,
    run_label,
)
from peftlab.rundir import natural_key

DPI = 120
PANELS_AFTER = 6  # more runs with a loss curve than this: one panel per run instead of one crowded axes
SMOOTH_FROM = 8  # a curve of fewer points is drawn raw only
RAW_ALPHA = 0.3


def _finished_mean(group: pd.DataFrame, metric: str) -> float:
    values = group.loc[group["status"] == "finished", metric].dropna()
    return float(values.mean()) if len(values) else math.nan


def _status_text(group: pd.DataFrame) -> str:
    return "/".join(sorted(set(group["status"]) - {"finished"})) or "n/a"


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

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

    ys = sorted({float(v) for v in table[y_key] if not blank(v)})
    xs = sorted({float(v) for v in table[x_key] if not blank(v)})
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
    """(steps, losses) from a record's ``loss_curve`` ([[step, loss], ...]), skipping malformed points."""
    steps, losses = [], []
    points = metrics.get("loss_curve") if metrics else None
    for point in points if isinstance(points, list) else []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            step, loss = point
            if all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point
            ):
                steps.append(float(step))
                losses.append(float(loss))
    return steps, losses


def smooth(values: Sequence[float]) -> list[float]:
    """Exponential moving average (pandas ``ewm``, bias-corrected as TensorBoard's smoothing) over a span of a
    sixth of the points (at least 3: a step-to-step zig-zag shrinks about 6-fold, the line lags ~1/12 of the
    run); ``values`` unchanged when fewer than SMOOTH_FROM."""
    if len(values) < SMOOTH_FROM:
        return list(values)
    return pd.Series(values, dtype=float).ewm(span=max(3, len(values) // 6)).mean().tolist()


def legend_labels(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """One label per row from ``keys``; from all config columns, then with the run name, until unique."""
    for columns in (keys, config_columns(table)):
        labels = [run_label(row, columns) for _, row in table.iterrows()]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{row['run']}: {label}" for (_, row), label in zip(table.iterrows(), labels, strict=True)]


def _draw_curve(ax, steps, losses, color, finished: bool, label: str | None = None) -> None:
    """The raw curve faded and its smoothed line over it (the raw one alone when too short to smooth)."""
    smoothed = len(losses) >= SMOOTH_FROM
    style = "-" if finished else "--"
    if smoothed:
        ax.plot(steps, losses, color=color, linewidth=0.8, alpha=RAW_ALPHA)
    ax.plot(steps, smooth(losses), color=color, linewidth=1.4, linestyle=style, label=label)


def loss_curves_figure(table: pd.DataFrame, runs: Sequence[dict], keys: Sequence[str]):
    """Training loss vs optimizer step of every run in ``table`` (rows index ``runs``) that logged one, as a
    matplotlib Figure; None when none did. Up to PANELS_AFTER curves share one axes with a legend; more get
    one panel each (shared axes, titled with the run's keys, the other runs' smoothed curves in light grey)."""
    import matplotlib
    from matplotlib.figure import Figure

    curves = []
    for (index, row), label in zip(table.iterrows(), legend_labels(table, keys), strict=True):
        steps, losses = loss_curve(runs[index]["metrics"])
        if steps:
            status = "" if row["status"] == "finished" else f" [{row['status']}]"
            curves.append((label + status, row["status"] == "finished", steps, losses))
    if not curves:
        return None
    note = "faded: raw, solid: smoothed" if any(len(c[3]) >= SMOOTH_FROM for c in curves) else ""
    if len(curves) <= PANELS_AFTER:
        fig, ax = _new_figure(6.8, 4.4)
        palette = matplotlib.colormaps["tab10"]
        for n, (label, finished, steps, losses) in enumerate(curves):
            _draw_curve(ax, steps, losses, palette(n), finished, label)
        ax.set(
            xlabel="optimizer step",
            ylabel="training loss",
            title="Training loss" + (f" ({note})" if note else ""),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig
    cols = min(6, math.ceil(math.sqrt(len(curves))))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(2.8 * cols, 2.2 * rows + 0.5))
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for n, (label, finished, steps, losses) in enumerate(curves):
        ax = axes[n]
        for other, (_, _, other_steps, other_losses) in enumerate(curves):
            if other != n:
                ax.plot(other_steps, smooth(other_losses), color="0.85", linewidth=0.7)
        _draw_curve(ax, steps, losses, "tab:blue" if finished else "tab:red", finished)
        ax.set_title(label, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(curves) :]:
        ax.set_axis_off()
    for ax in axes[: len(curves)]:
        ax.label_outer()
    fig.supxlabel("optimizer step", fontsize=9)
    fig.supylabel("training loss", fontsize=9)
    fig.suptitle(
        f"Training loss, one panel per run ({note + ', ' if note else ''}grey: the other runs)", fontsize=10
    )
    return fig


def plot_loss_curves(
    table: pd.DataFrame, runs: Sequence[dict], keys: Sequence[str], path: Path
) -> Path | None:
    """:func:`loss_curves_figure` saved as PNG at ``path``; None (nothing written) when no run logged a curve."""
    fig = loss_curves_figure(table, runs, keys)
    return None if fig is None else _save(fig, path)


def make_plots(
    table: pd.DataFrame,
    runs: Sequence[dict],
    keys: Sequence[str],
    metric: str,
    out_dir: Path,
    loss_curves: bool = True,
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
