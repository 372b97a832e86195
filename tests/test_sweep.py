"""Real Hydra multiruns on the CPU: failures recorded and survived, jobs reproducible alone,
compare over the result, and the Optuna sweeper."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from peftlab import compare

from .conftest import ROOT

pytestmark = pytest.mark.slow


def run_py(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def predictions(run_dir):
    with open(run_dir / "predictions.csv", newline="") as f:
        return [
            (r["id"], r["prediction"], r["logp_complaint"], r["logp_no complaint"]) for r in csv.DictReader(f)
        ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_data):
    """peft.r x peft.lora_alpha on the tiny model, where r=0 is made to fail (an invalid value)."""
    out = tmp_path_factory.mktemp("sweep")
    result = run_py(
        "-m",
        "model=tiny_bert",
        "peft.r=0,4,8",
        "peft.lora_alpha=16,32",
        "train.epochs=2",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={out}",
    )
    return out, result


def test_failed_jobs_are_recorded_and_the_sweep_goes_on(sweep):
    out, result = sweep
    assert result.returncode == 1, result.stderr[-2000:]  # some jobs failed: the sweep says so
    assert (out / "multirun.yaml").is_file()
    statuses = {
        int(d.name): json.loads((d / "metrics.json").read_text())["status"]
        for d in out.iterdir()
        if d.name.isdigit()
    }
    assert statuses == {0: "failed", 1: "failed", 2: "finished", 3: "finished", 4: "finished", 5: "finished"}
    summary = json.loads((out / "sweep.json").read_text())
    assert (
        summary["jobs"] == 6
        and summary["finished"] == 4
        and summary["statuses"] == {"failed": 2, "finished": 4}
    )
    assert "job 6/6: " in result.stderr + result.stdout
    assert (
        "peft.r=0 must be a whole number >= 1"
        in json.loads((out / "0" / "metrics.json").read_text())["error"]
    )


def test_compare_shows_every_job_with_its_status_and_a_heatmap(sweep, tmp_path, capsys):
    out, _ = sweep
    assert compare.main([str(out), "--out", str(tmp_path)]) == 0
    table = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert len(table) == 6
    assert sorted(r["status"] for r in table) == ["failed"] * 2 + ["finished"] * 4
    config_columns = [
        c for c in table[0] if c.startswith(("peft.", "model.", "train.", "zero.", "dataset.", "eval."))
    ]
    assert config_columns == ["peft.r", "peft.lora_alpha"]
    assert all(r["accuracy"] == "" for r in table if r["status"] == "failed")
    assert (tmp_path / "heatmap_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_a_sweep_job_equals_the_same_job_run_alone(sweep, tmp_path, tiny_data):
    out, _ = sweep
    job = next(
        d
        for d in out.iterdir()
        if d.name.isdigit()
        and json.loads((d / "metrics.json").read_text()).get("status") == "finished"
        and "peft.r=8" in (d / ".hydra" / "overrides.yaml").read_text()
        and "peft.lora_alpha=32" in (d / ".hydra" / "overrides.yaml").read_text()
    )
    result = run_py(
        "model=tiny_bert",
        "peft.r=8",
        "peft.lora_alpha=32",
        "train.epochs=2",
        f"dataset.data_dir={tiny_data}",
        f"hydra.run.dir={tmp_path / 'alone'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert predictions(tmp_path / "alone") == predictions(job)
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert alone["loss_curve"] == json.loads((job / "metrics.json").read_text())["loss_curve"]


def test_tensorboard_logs_land_in_each_run_directory(sweep):
    out, _ = sweep
    assert list((out / "2" / "tensorboard").rglob("events.out.tfevents.*"))


def test_optuna_sweeper_maximizes_validation_accuracy(tmp_path, tiny_data):
    result = run_py(
        "-m",
        "experiment=optuna_lora",
        "model=tiny_bert",
        "hydra.sweeper.n_trials=3",
        "eval.folds=2",
        "train.epochs=1",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = [json.loads((tmp_path / str(i) / "metrics.json").read_text()) for i in range(3)]
    assert all(j["status"] == "finished" and 0 <= j["final"]["val_accuracy"] <= 1 for j in jobs)
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_params" in best and "train.lr" in best
    assert f"best_value: {max(j['final']['val_accuracy'] for j in jobs)}" in best


def test_a_failed_optuna_trial_is_recorded_and_the_study_goes_on(tmp_path, tiny_data):
    """r=0 is invalid: with this sampler seed one of six trials draws it and fails."""
    result = run_py(
        "-m",
        "experiment=optuna_lora",
        "model=tiny_bert",
        "peft.r=choice(0,4)",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.sampler.seed=3",
        "eval.folds=2",
        "train.epochs=1",
        "logger=null",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 1, result.stderr[-2000:]  # the sweep reports its failure
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["jobs"] == 6 and summary["statuses"].get("failed", 0) >= 1 and summary["finished"] >= 1
    assert "best_value" in (tmp_path / "optimization_results.yaml").read_text()


def test_summary_of_a_resumed_sweep_counts_only_the_jobs_this_invocation_ran(tmp_path):
    """Job 0 finished in an earlier invocation (its phases took 100 s then); this invocation, 20 s
    ending at `now`, resumed job 1 (12 s of train/eval) and ran job 2 (failed at once)."""
    from peftlab.rundir import write_json
    from peftlab.sweep import read_jobs, summarize

    now = time.time()
    at = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
    jobs = {
        0: {
            "status": "finished",
            "started": at(now - 500),
            "ended": at(now - 400),
            "phases": {"train": {"wall_s": 90.0}, "eval": {"wall_s": 10.0}},
        },
        1: {
            "status": "finished",
            "started": at(now - 19.6),
            "ended": at(now - 2),
            "resumed_at_step": 3,
            "phases": {"train": {"wall_s": 10.0}, "eval": {"wall_s": 2.0}},
        },
        2: {"status": "failed", "error": "peft.r=0", "started": at(now - 1), "ended": at(now - 1)},
    }
    for n, job in jobs.items():
        write_json(tmp_path / str(n) / "metrics.json", {"run_dir": str(tmp_path / str(n)), **job})
    summary = summarize(read_jobs(tmp_path), 20.0)  # ends now
    assert summary["train_eval_s"] == 12.0
    assert (
        summary["outside_train_eval"] == 0.4
    )  # 8 of this invocation's 20 s; the old sum said 1 - 112/20 = -4.6
    assert (summary["jobs"], summary["ran"], summary["skipped_finished"], summary["finished"]) == (3, 2, 1, 2)


def test_a_sweep_run_again_times_only_the_jobs_it_ran(tmp_path, tiny_data):
    """A two-job sweep killed once its second job has started; run again, it skips job 0 (finished) and runs job 1."""
    command = [
        sys.executable,
        "run.py",
        "-m",
        "model=tiny_bert",
        "peft.r=4,8",
        "train.epochs=2",
        "logger=null",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={tmp_path}",
    ]
    with open(tmp_path.parent / f"{tmp_path.name}.log", "wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 300
        while not (tmp_path / "1" / "metrics.json").exists():
            assert proc.poll() is None and time.time() < deadline, (
                tmp_path.parent / f"{tmp_path.name}.log"
            ).read_text()[-2000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads((tmp_path / "0" / "metrics.json").read_text())["status"] == "finished"
    job0 = (tmp_path / "0" / "metrics.json").read_bytes()
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "0" / "metrics.json").read_bytes() == job0  # skipped, not redone
    summary = json.loads((tmp_path / "sweep.json").read_text())
    job1 = json.loads((tmp_path / "1" / "metrics.json").read_text())
    assert summary["train_eval_s"] == round(sum(job1["phases"][p]["wall_s"] for p in ("train", "eval")), 2)
    assert 0 <= summary["outside_train_eval"] <= 1
    assert summary["outside_train_eval"] == round(1 - summary["train_eval_s"] / summary["wall_s"], 4)
    assert (summary["jobs"], summary["ran"], summary["skipped_finished"], summary["finished"]) == (2, 1, 1, 2)
