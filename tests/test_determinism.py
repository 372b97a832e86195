"""The same config and seed on the CPU gives the same run: byte-identical predictions.csv and
metrics.json equal in everything but timing and host fields."""

from __future__ import annotations

import json

import pytest

from peftlab.experiment import run

from .conftest import make_cfg

pytestmark = pytest.mark.slow

TIMING = {
    "started",
    "ended",
    "wall_s",
    "run_dir",
    "device",
    "phases",
    "time_to_first_step_s",
    "versions",
    "resumed_from",
    "resumed_at_step",
    "processes",
}
EPOCH_TIMING = {"wall_s", "s_per_step", "samples_per_s", "tokens_per_s"}


def comparable(metrics: dict) -> dict:
    """metrics.json without what legitimately differs between two runs of one config (clocks, host, paths)."""
    out = {k: v for k, v in metrics.items() if k not in TIMING}
    out["final"] = {k: v for k, v in metrics["final"].items() if not k.startswith("eval_s_")}
    out["epochs"] = [{k: v for k, v in e.items() if k not in EPOCH_TIMING} for e in metrics["epochs"]]
    return out


def test_same_config_and_seed_give_identical_results(tmp_path, tiny_data):
    overrides = ["model=tiny_bert", "peft=lora", "peft.lora_dropout=0.1", "train.batch_size=4", "logger=null"]
    for name in ("a", "b"):
        metrics = run(make_cfg(tmp_path / name, *overrides, data_dir=tiny_data, epochs=3))
        assert metrics["status"] == "finished", metrics["error"]
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert comparable(a) == comparable(b)
    assert len(a["loss_curve"]) == 12
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (
        tmp_path / "b" / "predictions.csv"
    ).read_bytes()
    assert (tmp_path / "a" / "submission.csv").read_bytes() == (
        tmp_path / "b" / "submission.csv"
    ).read_bytes()
    assert not (tmp_path / "a" / "checkpoints").exists()  # removed once the run finished
