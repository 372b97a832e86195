"""Nothing lost: a run killed (SIGKILL) or stopped (SIGTERM) mid-epoch and resumed with resume=auto
ends exactly as the uninterrupted run; a finished run is never redone. Real `python run.py`
subprocesses on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .conftest import ROOT
from .test_determinism import comparable

pytestmark = pytest.mark.slow

# 16 training rows in batches of 2: 8 optimizer steps per epoch; a checkpoint every 3 steps lands mid-epoch
ARGS = [
    "model=tiny_bert",
    "peft.lora_dropout=0.1",
    "train.batch_size=2",
    "train.epochs=4",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=2",
    "logger=null",
]


def start(run_dir, data, *extra) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "run.py", *ARGS, f"dataset.data_dir={data}", f"hydra.run.dir={run_dir}", *extra],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def finish(run_dir, data, *extra) -> subprocess.CompletedProcess:
    proc = start(run_dir, data, *extra)
    assert proc.wait(timeout=300) == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
    return proc


def wait_for_checkpoint(run_dir, proc, timeout=240) -> None:
    deadline = time.time() + timeout
    while not any((run_dir / "checkpoints").glob("step_*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(run_dir, tiny_data)
    return run_dir


def assert_same_run(resumed, reference):
    a, b = metrics(resumed), metrics(reference)
    assert a["status"] == "finished", a["error"]
    assert comparable(a) == comparable(b)  # accuracy, confusion matrix, per-epoch losses, loss curve
    assert len(a["loss_curve"]) == 32
    assert (resumed / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()
    assert (resumed / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()
    assert not (resumed / "checkpoints").exists()


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, tiny_data, reference):
    run_dir = tmp_path / "run"
    proc = start(run_dir, tiny_data)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert metrics(run_dir)["status"] == "running"  # killed mid-training: nothing could record it
    state = json.loads(
        max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
        .joinpath("trainer_state.json")
        .read_text()
    )
    assert state["batch"] > 0  # mid-epoch: the resumed run must skip the batches already seen
    finish(run_dir, tiny_data, "resume=auto")
    assert metrics(run_dir)["resumed_at_step"] == state["step"]
    assert_same_run(run_dir, reference)


def test_sigterm_saves_a_checkpoint_marks_interrupted_and_resumes(tmp_path, tiny_data, reference):
    run_dir = tmp_path / "run"
    proc = start(run_dir, tiny_data)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stopped = metrics(run_dir)
    assert stopped["status"] == "interrupted" and "SIGTERM" in stopped["error"]
    step = stopped["interrupted_at_step"]
    assert (run_dir / "checkpoints" / f"step_{step}" / "trainer_state.json").is_file()
    finish(run_dir, tiny_data)  # resume=auto is the default
    assert metrics(run_dir)["resumed_at_step"] == step
    assert_same_run(run_dir, reference)


def test_finished_run_is_not_redone(tmp_path, reference, tiny_data):
    before = (reference / "metrics.json").read_bytes()
    started = time.time()
    proc = start(reference, tiny_data)
    assert proc.wait(timeout=300) == 0
    assert (reference / "metrics.json").read_bytes() == before
    assert "already holds a finished run" in (reference.parent / "run.log").read_text()
    assert time.time() - started < 120


def test_a_sweep_killed_midway_reruns_only_its_unfinished_jobs(tmp_path, tiny_data):
    """Kill a two-job sweep while its second job trains; the same command again skips the first job
    (its records untouched) and resumes the second from its checkpoint."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "run.py",
        "-m",
        *ARGS,
        "peft.r=4,8",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log = open(tmp_path / "sweep.log", "ab")
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_for_checkpoint(sweep / "1", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert metrics(sweep / "0")["status"] == "finished" and metrics(sweep / "1")["status"] == "running"
    first = (sweep / "0" / "metrics.json").read_bytes()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").read_bytes() == first  # not redone
    assert metrics(sweep / "1")["status"] == "finished" and metrics(sweep / "1").get("resumed_at_step")
    assert "already holds a finished run" in again.stderr + again.stdout


@pytest.mark.parametrize("zero", ["none", "stage2"])
def test_a_two_process_checkpoint_resumes_with_two_processes_only(tmp_path, tiny_data, zero):
    """Killed after a checkpoint of launcher.num_processes=2, then started again with 1 process: one
    line naming launcher.num_processes and both sizes, and nothing in the run directory rewritten
    (its batches are counted per process and ZeRO partitions are per rank: once a loss curve matching
    neither run under zero=none, a DeepSpeed traceback under stage2). With 2 processes it resumes."""
    args = [a for a in ARGS if not a.startswith("train.epochs=")] + [
        "train.epochs=12",
        f"zero={zero}",
        f"dataset.data_dir={tiny_data}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    run_dir = tmp_path / "run"
    with open(tmp_path / "two.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "run.py", "launcher.num_processes=2", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_checkpoint(run_dir, proc)
    finally:  # the parent, accelerate launch and the ranks (torchelastic starts each in a session of its own)
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert metrics(run_dir)["status"] == "running"
    kept = lambda: {
        p: p.read_bytes()
        for p in [run_dir / "metrics.json", run_dir / "config.yaml", *(run_dir / "checkpoints").rglob("*")]
        if p.is_file()
    }
    before = kept()
    newest = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    one = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 2, one.stderr[-3000:]
    errors = [line for line in one.stderr.splitlines() if line.startswith("error: ")]
    assert (
        len(errors) == 1
        and "written by 2 processes and this run has 1 (launcher.num_processes=1)" in errors[0]
    ), one.stderr[-3000:]
    assert "resume with launcher.num_processes=2, or resume=never" in errors[0]
    assert kept() == before
    two = subprocess.run(
        [sys.executable, "run.py", "launcher.num_processes=2", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert metrics(run_dir)["status"] == "finished" and metrics(run_dir)["resumed_at_step"] == state["step"]
    assert len(metrics(run_dir)["loss_curve"]) == 48
