"""Compare finished, failed and running runs side by side: ``peftlab compare``.

Usage::

    peftlab compare multirun/2025-01-01/12-00-00          # one Hydra sweep
    peftlab compare SWEEP_A SWEEP_B outputs/some/run       # several sweeps and single runs
    peftlab compare outputs/2025-01-01/12-00-00            # one run: its plots go into its directory
    peftlab compare SWEEP --sort accuracy                  # best first (lower-is-better metrics: ascending)
    peftlab compare SWEEP --sort=-wall_s                   # a leading '-' sorts descending; --asc ascending
    peftlab compare SWEEP --status finished,failed         # keep only these statuses
    peftlab compare SWEEP --metric val_accuracy            # metric of the plots and of "best run"
    peftlab compare SWEEP --mean-over seed                 # one row per setting: means over its seeds
    peftlab compare SWEEP --select                         # kfold runs: the one-standard-error choice
    peftlab compare SWEEP --out reports/r_x_alpha          # also compare.csv, compare.md and the plots there
    peftlab compare SWEEP --no-plots

Every directory below the given paths that holds ``metrics.json`` or ``.hydra/`` is a run
(:func:`peftlab.rundir.find_runs`: found recursively, sorted numeric-aware, ``2`` before ``10``). The table
(:mod:`peftlab.compare.table`) has one row per run: its path relative to the runs' common parent, the config
keys whose values differ between the runs (dotted, e.g. ``peft.r``; a swept config group as its option,
``peft``: lora or ia3), then the results -- blank unless the run finished -- and its status (``missing``: no
metrics.json, ``corrupt``: unreadable metrics.json).

Plots (:mod:`peftlab.compare.plots`, PNG) go into ``--out``, else the directory given when it is one sweep
(holds ``multirun.yaml``) or one run, else ``./compare``.

Run directories are only read, never executed: YAML goes through ``yaml.safe_load`` (``_target_``
and ``${...}`` interpolations stay plain strings), JSON through ``json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from peftlab.compare.plots import make_plots
from peftlab.compare.select import select, selected_line
from peftlab.compare.table import (
    ERROR_WIDTH,
    METRIC_COLUMNS,
    config_columns,
    filter_status,
    mean_over,
    print_table,
    run_metrics,
    runs_table,
    sort_table,
    summary_line,
    sweep_keys,
    to_markdown,
    write_tables,
)
from peftlab.rundir import find_runs, is_run_dir, load_run

__all__ = [
    "ERROR_WIDTH",
    "METRIC_COLUMNS",
    "config_columns",
    "filter_status",
    "find_runs",
    "load_run",
    "main",
    "make_plots",
    "mean_over",
    "output_dir",
    "print_table",
    "run_metrics",
    "select",
    "selected_line",
    "runs_table",
    "sort_table",
    "summary_line",
    "sweep_keys",
    "to_markdown",
    "write_tables",
]
PROG = "peftlab compare"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tabulate and plot the runs of one or more Hydra sweeps or run directories.",
        epilog="Columns: run, the config keys that differ, " + ", ".join(METRIC_COLUMNS) + ", status. "
        "Plots go into --out, else the one sweep or run directory given, else ./compare.",
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
        help="average the runs that differ only in these config keys, "
        "e.g. seed: one row per setting, with n and the spread of --metric",
    )
    parser.add_argument(
        "--select",
        action="store_true",
        help="eval.split=kfold runs: add each run's standard error over its fold repeats and trainable "
        "parameters, and choose by the one-standard-error rule: of the runs within one standard error of the "
        "best --metric (bound included; with one repeat there is none, and only equal figures tie), the fewest "
        "trainable parameters, then the better --metric, then the earlier run; prints the chosen run's overrides",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots")
    return parser


def output_dir(paths: Sequence[str]) -> Path:
    """Where the plots go without ``--out``: the one directory given when it is a sweep (holds
    ``multirun.yaml``) or a run directory, else ``./compare``."""
    if len(paths) == 1:
        path = Path(paths[0])
        if (path / "multirun.yaml").is_file() or is_run_dir(path):
            return path
    return Path.cwd() / "compare"


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """``peftlab compare DIR... [options]``; 0, 2 for bad arguments (one line on stderr), 1 when an output
    cannot be written."""
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
            return _fail(
                f"--mean-over: the runs do not differ in {', '.join(missing)}; "
                f"config columns: {', '.join(config_columns(table)) or 'none'}"
            )
        table, keys = mean_over(table, over, args.metric), [k for k in keys if k not in over]
    if args.select:
        if args.mean_over:
            return _fail("--select compares single runs: leave out --mean-over")
        try:
            table = select(table, runs, args.metric)
        except ValueError as exc:
            return _fail(f"--select: {exc}")
    if args.sort:
        try:
            table = sort_table(table, args.sort, ascending=True if args.asc else None)
        except KeyError:
            return _fail(f"--sort: no column {args.sort!r}; columns: {', '.join(table.columns)}")
    if len(table):
        print_table(table)
    else:
        print(f"no runs with status {args.status}")
    print(summary_line(table, args.metric, keys))
    if args.select:
        print(selected_line(table, runs, args.metric))
    written = []
    try:
        if args.out:
            written += write_tables(table, args.out)
        if not args.no_plots and len(table):
            written += make_plots(
                table,
                runs,
                keys,
                args.metric,
                args.out or output_dir(args.paths),
                loss_curves=not args.mean_over,
            )
    except OSError as exc:
        return _fail(f"could not write output: {exc}", code=1)
    for path in written:
        print(f"wrote {path}")
    return 0
