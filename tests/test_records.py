"""Every JSON record peftlab writes is standard JSON: no NaN or Infinity, which strict parsers
(JSON.parse, jq, Go, Rust's serde_json) reject."""

from __future__ import annotations

import json
import math

import pytest

from peftlab.experiment import run
from peftlab.rundir import write_json

from .conftest import make_cfg


def strict(text: str):
    """json.loads as a strict parser reads it: NaN, Infinity and -Infinity are errors."""

    def refuse(name):
        raise ValueError(f"not standard JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    write_json(
        tmp_path / "r.json",
        {
            "loss_curve": [[1, 0.5], [2, float("nan")]],
            "steps_per_print": float("inf"),
            "nested": {"low": -math.inf, "ok": 1e308},
            "t": (float("inf"),),
        },
    )
    assert strict((tmp_path / "r.json").read_text()) == {
        "loss_curve": [[1, 0.5], [2, None]],
        "steps_per_print": None,
        "nested": {"low": None, "ok": 1e308},
        "t": [None],
    }


@pytest.mark.slow
def test_a_deepspeed_run_writes_standard_json(tmp_path, tiny_data):
    """Accelerate sets DeepSpeed's steps_per_print to float('inf'); json.dumps wrote it as Infinity."""
    run(
        make_cfg(
            tmp_path / "run", "model=tiny_bert", "zero=stage2", "logger=null", data_dir=tiny_data, epochs=1
        )
    )
    metrics = strict((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished", metrics["error"]
    ds = strict((tmp_path / "run" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert (
        ds["steps_per_print"] is None or ds["steps_per_print"] >= 10**9
    )  # never: DeepSpeed takes None as no printing
