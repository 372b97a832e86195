"""Under ZeRO-3 with optimizer and parameter offload (zero=stage3_cpu, torch's AdamW stepping the
offloaded partitions), a run stopped with SIGTERM mid-epoch and resumed ends as the uninterrupted run."""

from __future__ import annotations

import signal

import pytest

from .test_resume import assert_same_run, finish, metrics, start, wait_for_checkpoint

pytestmark = pytest.mark.slow


def test_sigterm_then_resume_under_zero3_offload_equals_uninterrupted_run(tmp_path, tiny_data):
    reference = tmp_path / "reference"
    finish(reference, tiny_data, "zero=stage3_cpu")
    run_dir = tmp_path / "run"
    proc = start(run_dir, tiny_data, "zero=stage3_cpu")
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    step = metrics(run_dir)["interrupted_at_step"]
    finish(run_dir, tiny_data, "zero=stage3_cpu")
    assert metrics(run_dir)["resumed_at_step"] == step
    assert_same_run(run_dir, reference)
