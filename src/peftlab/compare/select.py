"""Choose a setting on validation folds by the one-standard-error rule: ``peftlab compare DIR --select``.

For sweeps of ``eval.split=kfold`` runs (each run: one setting scored on ``eval.folds`` folds of the training
rows, repeated ``eval.fold_repeats`` times). Per run, from its predictions.csv (one row per held-out
prediction, ``fold`` numbered over all repeats, so repeat = fold // eval.folds):

* ``accuracy``: pooled over every prediction of every repeat (the run's own ``final.accuracy``);
* ``repeat_se``: the standard error of the repeats' accuracies, sd / sqrt(repeats) (NaN for one repeat);
* ``trainable_params``: from metrics.json.

The rule (Breiman et al. 1984, "Classification and Regression Trees", section 3.4.3; Hastie, Tibshirani and
Friedman, "The Elements of Statistical Learning", 2nd ed., section 7.10): the best accuracy wins, every
setting within one of *its* standard errors (bound included) ties with it, and of the tied settings the simplest, here the
fewest trainable parameters, is chosen (then the higher accuracy, then the run's order). Only finished runs
take part; with one repeat the standard error is unknown and only exact ties tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

SELECT_COLUMNS = ["repeat_se", "trainable_params", "tie", "chosen"]


def repeat_accuracies(run_dir: Path, folds: int) -> list[float]:
    """Accuracy of each repeat of a kfold run's predictions.csv (repeat r: folds r*folds .. r*folds+folds-1),
    in repeat order. Raises FileNotFoundError without predictions.csv, ValueError without ``fold``/``correct``."""
    rows = pd.read_csv(run_dir / "predictions.csv", usecols=["fold", "correct"])
    return [float(g["correct"].mean()) for _, g in rows.groupby(rows["fold"] // folds, sort=True)]


def standard_error(values: Sequence[float]) -> float:
    """sd / sqrt(n) of ``values`` (sample sd, n - 1); NaN for fewer than two."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def select(table: pd.DataFrame, runs: Sequence[dict], metric: str = "accuracy") -> pd.DataFrame:
    """``table`` (``compare.runs_table`` of ``runs``, any order, index = position in ``runs``) with the columns
    of :data:`SELECT_COLUMNS` added, sorted best ``metric`` first: ``tie`` marks the finished runs within one
    standard error of the best, ``chosen`` the one the rule picks (module docstring). Runs that are not
    finished kfold runs get blanks. Raises ValueError when ``table`` holds no finished kfold run."""
    out = table.assign(repeat_se=math.nan, trainable_params=math.nan, tie="", chosen="")
    scored = []
    for i in out.index:
        run = runs[i]
        folds = (run["config"] or {}).get("eval", {})
        if run["status"] != "finished" or folds.get("split") != "kfold" or pd.isna(out.loc[i, metric]):
            continue
        out.loc[i, "repeat_se"] = standard_error(repeat_accuracies(run["path"], int(folds["folds"])))
        out.loc[i, "trainable_params"] = (run["metrics"] or {}).get("trainable_params", math.nan)
        scored.append(i)
    if not scored:
        raise ValueError("no finished eval.split=kfold run to select from")
    best = out.loc[scored].sort_values(metric, ascending=False, kind="stable").iloc[0]
    margin = 0.0 if math.isnan(best["repeat_se"]) else best["repeat_se"]
    # inclusive; 1e-6 because metrics.json rounds accuracy to 6 decimals (0.606667 - 0.006667 must reach 0.6)
    tied = out.loc[scored][out.loc[scored, metric] >= best[metric] - margin - 1e-6]
    simplest = tied.assign(_p=tied["trainable_params"].fillna(math.inf), _m=-tied[metric])
    out.loc[tied.index, "tie"] = "tie"
    out.loc[simplest.sort_values(["_p", "_m"], kind="stable").index[0], "chosen"] = "chosen"
    return out.sort_values(metric, ascending=False, kind="stable")


def selected_line(table: pd.DataFrame, runs: Sequence[dict], metric: str) -> str:
    """The chosen run of a :func:`select` table in a line: ``selected: RUN  accuracy 0.7470 +- 0.0120, 3 within
    one standard error, 296,450 trainable | overrides: a=1 b=2`` (its overrides, Hydra's own left out)."""
    row = table[table["chosen"] == "chosen"].iloc[0]
    ties = int((table["tie"] == "tie").sum())
    overrides = " ".join(o for o in runs[row.name]["overrides"] if not o.startswith("hydra"))
    if math.isnan(row["repeat_se"]):  # one repeat: no standard error, only equal figures tie
        spread = f"(one fold repeat: no standard error), {ties} with the same {metric}"
    else:
        spread = f"+- {row['repeat_se']:.4f}, {ties} within one standard error"
    return (
        f"selected: {row['run']}  {metric} {row[metric]:.4f} {spread}, "
        f"{row['trainable_params']:,.0f} trainable | overrides: {overrides}"
    )
