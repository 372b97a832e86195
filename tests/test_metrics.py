"""eval.metrics: evaluate modules combined with evaluate.combine, offline (conftest: HF_HUB_OFFLINE=1).

The defaults are modules shipped in peftlab.metrics.modules; matthews_correlation is a local module in the
hub's layout (tests/metric_modules), as an offline machine without the hub's copy needs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftlab import metrics
from peftlab.config import ConfigError, validate
from peftlab.metrics import classification_figures

from .conftest import ROOT, make_cfg

MCC = ROOT / "tests" / "metric_modules" / "matthews_correlation"
BINARY_F1 = MCC.parent / "binary_f1"  # f1 for label 5 only: it cannot score 2 or 3 labels
GOLD = [0, 0, 0, 1, 1, 1, 1, 1]
PRED = [0, 0, 1, 1, 1, 1, 0, 1]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """No module fetched before: evaluate's module cache is an empty folder."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metrics._load.cache_clear()
    yield
    metrics._load.cache_clear()


def test_figures_match_a_hand_computation():
    f = classification_figures(GOLD, PRED, ["a", "b"])
    assert f["accuracy"] == 0.75
    assert f["confusion_matrix"] == [[2, 1], [1, 4]]
    # F1(a) = 2*2/(3+3) = 0.6667, F1(b) = 2*4/(5+5) = 0.8
    assert abs(f["macro_f1"] - (2 / 3 + 0.8) / 2) < 1e-6
    assert f["n_eval"] == 8 and f["labels"] == ["a", "b"]
    assert list(f) == ["accuracy", "macro_f1", "n_eval", "labels", "confusion_matrix"]


def test_a_label_never_predicted_scores_zero_f1():
    f = classification_figures([0, 1, 1], [1, 1, 1], ["a", "b"])
    assert f["macro_f1"] == round((0 + 0.8) / 2, 6)


def test_the_matrix_has_every_label_even_one_absent_from_the_rows():
    f = classification_figures([0, 0], [0, 0], ["a", "b", "c"])
    assert f["confusion_matrix"] == [[2, 0, 0], [0, 0, 0], [0, 0, 0]] and f["accuracy"] == 1.0


def test_no_rows_give_no_figures():
    f = classification_figures([], [], ["a", "b"])
    assert f["accuracy"] is None and f["macro_f1"] is None and f["n_eval"] == 0


@pytest.mark.parametrize("path", [MCC, MCC / "matthews_correlation.py"])
def test_a_local_module_is_recorded_under_its_name_beside_the_defaults(path, fresh_cache):
    f = classification_figures(GOLD, PRED, ["a", "b"], [str(path)])
    # label 1 positive: tp 4, tn 2, fp 1, fn 1: (4*2 - 1*1) / sqrt(5*5*3*3) = 7/15
    assert f["matthews_correlation"] == round(7 / 15, 6)
    assert list(f)[:3] == ["accuracy", "macro_f1", "matthews_correlation"]


def test_the_defaults_load_on_a_fresh_machine_with_the_hub_off(tmp_path):
    """A new process, HF_HOME and the module cache empty folders: the shipped modules still load."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_MODULES_CACHE=str(tmp_path / "hf" / "modules"),
    )
    code = "import json; from peftlab.metrics import classification_figures as f; print(json.dumps(f([0, 1, 1], [0, 1, 0], ['a', 'b'])))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["accuracy"] == round(2 / 3, 6) and figures["macro_f1"] == round((2 / 3 + 2 / 3) / 2, 6)


def test_a_hub_metric_offline_and_not_cached_is_one_line_in_config_validation(tmp_path, fresh_cache):
    cfg = make_cfg(tmp_path, "eval.metrics=[matthews_correlation]")
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    message = str(caught.value)
    assert message.startswith(
        "eval.metrics: matthews_correlation is an evaluate hub metric, not in the local cache"
    )
    assert (
        "the hub is off (HF_HUB_OFFLINE=1)" in message
        and "local module path" in message
        and "\n" not in message
    )


def test_a_hub_metric_in_evaluates_cache_passes_offline(tmp_path, fresh_cache):
    cached = (
        tmp_path
        / "modules"
        / "evaluate_modules"
        / "metrics"
        / "evaluate-metric--matthews_correlation"
        / ("0" * 64)
    )
    cached.mkdir(parents=True)
    (cached / "matthews_correlation.py").write_text((MCC / "matthews_correlation.py").read_text())
    metrics.check_names(["matthews_correlation"])


@pytest.mark.parametrize(
    "name,fragment",
    [
        (
            "./no/such_metric.py",
            "eval.metrics: ./no/such_metric.py is not an evaluate module script (no such file)",
        ),
        (
            "/no/such/folder",
            "eval.metrics: /no/such/folder is not an evaluate module script (a .py file, or a folder holding folder.py)",
        ),
    ],
)
def test_a_path_with_no_module_is_one_line(name, fragment):
    with pytest.raises(
        ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        metrics.check_names([name])


def test_eval_metrics_must_be_a_list_of_names(tmp_path):
    with pytest.raises(
        ConfigError, match=r"eval.metrics=matthews_correlation must be a list of metric names"
    ):
        validate(make_cfg(tmp_path, "eval.metrics=matthews_correlation"))


def test_a_metric_that_cannot_score_the_task_fails_when_loaded_not_after_training(tmp_path, fresh_cache):
    """f1's binary default on three labels: found by trying the metrics on one row per label."""
    with pytest.raises(
        ConfigError, match=r"eval.metrics: one of accuracy, macro_f1, .*binary_f1 cannot score 3 labels"
    ):
        metrics.load_metrics((str(BINARY_F1),), 3)
