"""eval.metrics end to end: a real tiny run (real Hydra, DeepSpeed-free tiny_bert on the CPU) records a metric
beyond the defaults in metrics.json; a metric that cannot load fails before training."""

from __future__ import annotations

import csv
import json

import pytest
from sklearn.metrics import matthews_corrcoef

from peftlab.config import ConfigError
from peftlab.experiment import run

from .conftest import ROOT, make_cfg

MCC = ROOT / "tests" / "metric_modules" / "matthews_correlation"
BINARY_F1 = MCC.parent / "binary_f1"  # f1 for label 5 only: it cannot score 2 or 3 labels


@pytest.mark.slow
def test_a_metric_beyond_the_defaults_is_recorded_in_metrics_json(tmp_path, tiny_data):
    cfg = make_cfg(
        tmp_path / "run",
        "model=tiny_bert",
        f"eval.metrics=[{MCC}]",
        "logger=null",
        data_dir=tiny_data,
        epochs=1,
    )
    metrics = run(cfg)
    assert metrics["status"] == "finished"
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    names = final["labels"]
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gold, pred = [names.index(r["label"]) for r in rows], [names.index(r["prediction"]) for r in rows]
    assert final["matthews_correlation"] == round(
        matthews_corrcoef(gold, pred), 6
    )  # the run's own predictions
    assert final["n_eval"] == len(rows) == 24 and {"accuracy", "macro_f1", "confusion_matrix"} <= set(final)


def test_a_hub_metric_offline_fails_before_training(tmp_path, tiny_data, no_model_loading):
    cfg = make_cfg(tmp_path / "run", "eval.metrics=[peftlab_no_such_metric]", data_dir=tiny_data)
    with pytest.raises(
        ConfigError,
        match=r"^eval.metrics: peftlab_no_such_metric is an evaluate hub metric, not in the local cache",
    ):
        run(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_a_metric_that_cannot_score_the_task_fails_before_training(tmp_path, tiny_data, no_model_loading):
    """The run loads its metrics before any model loads (experiment._run)."""
    cfg = make_cfg(tmp_path / "run", f"eval.metrics=[{BINARY_F1}]", data_dir=tiny_data)
    with pytest.raises(
        ConfigError, match=r"eval.metrics: one of accuracy, macro_f1, .*binary_f1 cannot score 2 labels"
    ):
        run(cfg)
