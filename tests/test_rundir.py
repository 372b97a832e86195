"""A run owns its directory: runs started together never share one, a directory in use or holding
another run's records is refused in one line and left untouched, under every way of starting a run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftlab import rundir

from .conftest import CONF, ROOT

TINY = ["model=tiny_bert", "train.epochs=1", "logger=null"]


def run_py(*args, cwd=ROOT, timeout=600, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "PEFTLAB_PG_OWNER"):
        env.pop(
            name, None
        )  # what an earlier in-process DeepSpeed run of the suite left: a plain command has none
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def finish(process) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its content's hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != rundir.LOCK
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_the_shipped_defaults_claim_their_directories():
    hydra = yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]
    assert hydra["run"]["dir"].startswith("${claim_dir:outputs/${launch_time:")
    assert hydra["sweep"]["dir"].startswith("${claim_dir:multirun/${launch_time:")


def test_claims_made_at_once_are_distinct_and_ranks_of_one_launch_share_theirs(tmp_path):
    claim = f"import peftlab.rundir as r; print(r.claim_dir({str(tmp_path / 'run')!r}))"
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    plain = [
        subprocess.Popen([sys.executable, "-c", claim], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    names = sorted(p.communicate()[0].strip() for p in plain)
    assert names == sorted([str(tmp_path / "run")] + [str(tmp_path / f"run-{i}") for i in range(1, 6)])
    # two launches of two ranks each (WORLD_SIZE=2: the ranks' parent is their launcher): one directory per launch
    launcher = (
        "import os, subprocess, sys\n"
        f"ps = [subprocess.Popen([sys.executable, '-c', {claim!r}], env=dict(os.environ, WORLD_SIZE='2')) for _ in range(2)]\n"
        "[p.wait() for p in ps]\n"
    )
    launches = [
        subprocess.Popen([sys.executable, "-c", launcher], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    per_launch = [p.communicate()[0].split() for p in launches]
    assert all(len(ranks) == 2 and ranks[0] == ranks[1] for ranks in per_launch), per_launch
    assert per_launch[0][0] != per_launch[1][0]
    assert {per_launch[0][0], per_launch[1][0]} == {str(tmp_path / "run-6"), str(tmp_path / "run-7")}


@pytest.mark.slow
def test_four_runs_started_in_the_same_second_keep_their_own_records(tmp_path, tiny_data):
    """The default's clock names one directory for all four; each must end in its own, whole."""
    template = "hydra.run.dir=${claim_dir:" + str(tmp_path / "outputs" / "same-second") + "}"
    runs = [run_py(*TINY, f"seed={seed}", f"dataset.data_dir={tiny_data}", template) for seed in range(4)]
    results = [finish(p) for p in runs]
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr[-1500:] for r in results]
    dirs = sorted((tmp_path / "outputs").iterdir())
    assert [d.name for d in dirs] == ["same-second", "same-second-1", "same-second-2", "same-second-3"]
    seeds = set()
    for d in dirs:
        config, metrics = (
            yaml.safe_load((d / "config.yaml").read_text()),
            json.loads((d / "metrics.json").read_text()),
        )
        hydra_config = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        assert metrics["status"] == "finished" and metrics["run_dir"] == str(d)
        assert config["seed"] == hydra_config["seed"]  # one run's config beside the same run's records
        assert (d / "adapter" / "adapter_model.safetensors").is_file()
        seeds.add(config["seed"])
    assert seeds == {0, 1, 2, 3}
    last = [[line for line in r.stdout.splitlines() if "accuracy" in line][-1] for r in results]
    named = {line.rsplit("| ", 1)[-1] for line in last}  # each run's last line names its own directory
    assert named == {str(d) for d in dirs}


def test_a_directory_in_use_is_refused_in_one_line_and_left_untouched(tmp_path, tiny_data):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "run.log").write_text("another run's log\n")
    before = snapshot(run_dir)
    rundir.hold(run_dir)  # this test process stands for a run still going
    try:
        result = finish(run_py(*TINY, f"dataset.data_dir={tiny_data}", f"hydra.run.dir={run_dir}"))
    finally:
        rundir.release(run_dir)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: hydra.run.dir={run_dir} is in use by another run (pid {os.getpid()} on "
        f"{os.uname().nodename} since {error_lines(result.stderr)[0].split(' since ')[1]}"
    ]
    assert snapshot(run_dir) == before


def test_an_unwritable_run_directory_is_one_line_before_hydra_writes(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = finish(run_py(*TINY, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"))
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: cannot write hydra.run.dir={tmp_path / 'a_file' / 'run'} (Not a directory); "
        "choose a writable hydra.run.dir"
    ]


@pytest.mark.slow
def test_a_run_again_with_other_settings_is_refused_and_the_first_kept_whole(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    first = finish(run_py(*TINY, f"dataset.data_dir={tiny_data}", f"hydra.run.dir={run_dir}"))
    assert first.returncode == 0, first.stderr[-2000:]
    before, lock = snapshot(run_dir), (run_dir / rundir.LOCK).read_text()
    again = finish(
        run_py(
            *TINY, "peft.r=16", "train.lr=0.05", f"dataset.data_dir={tiny_data}", f"hydra.run.dir={run_dir}"
        )
    )
    assert again.returncode == 2
    assert error_lines(again.stderr) == [
        f"error: hydra.run.dir={run_dir} holds a run with other settings "
        "(optimizer.lr, peft.r, train.lr); choose another hydra.run.dir, or resume=never to start it over"
    ]
    assert (
        snapshot(run_dir) == before
    )  # .hydra/overrides.yaml, run.log and the records as the first run left them
    assert (run_dir / rundir.LOCK).read_text() == lock  # not even the lock file names the refused run
    same = finish(run_py(*TINY, f"dataset.data_dir={tiny_data}", f"hydra.run.dir={run_dir}"))
    assert same.returncode == 0 and "already holds a finished run" in same.stderr + same.stdout
    assert {k: v for k, v in snapshot(run_dir).items() if not k.startswith((".hydra", "run.log"))} == {
        k: v for k, v in before.items() if not k.startswith((".hydra", "run.log"))
    }


@pytest.mark.slow
def test_a_sweep_again_into_its_directory_with_other_settings_is_refused_untouched(tmp_path, tiny_data):
    sweep_dir = tmp_path / "sweep"
    first = finish(
        run_py("-m", *TINY, "peft.r=4,8", f"dataset.data_dir={tiny_data}", f"hydra.sweep.dir={sweep_dir}")
    )
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(sweep_dir)
    again = finish(
        run_py(
            "-m",
            *TINY,
            "peft.r=16",
            "train.lr=0.05",
            f"dataset.data_dir={tiny_data}",
            f"hydra.sweep.dir={sweep_dir}",
        )
    )
    assert again.returncode == 2
    assert error_lines(again.stderr) == [
        f"error: hydra.sweep.dir={sweep_dir} holds a sweep with other overrides (model=tiny_bert train.epochs=1 logger=null "
        f"peft.r=4,8 dataset.data_dir={tiny_data}; now model=tiny_bert train.epochs=1 logger=null peft.r=16 train.lr=0.05 "
        f"dataset.data_dir={tiny_data}); choose another hydra.sweep.dir, or repeat its overrides to resume it"
    ]
    assert snapshot(sweep_dir) == before
    resumed = finish(
        run_py(
            "-m",
            *TINY,
            "peft.r=4,8",
            f"dataset.data_dir={tiny_data}",
            f"hydra.sweep.dir={sweep_dir}",
            "resume=auto",
        )
    )  # the same sweep (resume= does not change a job's settings): skips its jobs
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (resumed.stdout + resumed.stderr).count("already holds a finished run") == 2


def test_a_sweep_of_other_config_values_behind_the_same_overrides_is_refused(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        old = compose(config_name="config", overrides=["train.epochs=3"], return_hydra_config=True)
        new = compose(
            config_name="config", overrides=["train.epochs=3", "model=tiny_bert"], return_hydra_config=True
        )
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(old))
    rundir.check_run_dir(
        new, tmp_path, sweep=True
    )  # none of its jobs finished or checkpointed: nothing to lose
    rundir.release(tmp_path)
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text('{"status": "finished"}')
    with pytest.raises(ValueError, match="holds a sweep with other overrides"):
        rundir.check_run_dir(new, tmp_path, sweep=True)
    new.hydra.overrides.task = list(
        old.hydra.overrides.task
    )  # same overrides, another model file behind them
    rundir.release(tmp_path)
    with pytest.raises(ValueError, match=r"holds a sweep of other settings \(model\.config"):
        rundir.check_run_dir(new, tmp_path, sweep=True)
    rundir.release(tmp_path)
    rundir.check_run_dir(old, tmp_path, sweep=True)  # the same sweep may use it (resume)
    rundir.release(tmp_path)


def test_compare_bench_and_the_last_line_report_the_same_figures_for_one_record():
    """One reader of metrics.json (rundir.headline): the GPU peak is the highest over all phases for all three."""
    from peftlab import compare
    from peftlab.experiment import summary_line

    from .test_bench import bench  # benchmarks/bench.py, loaded from its file

    metrics = {
        "status": "finished",
        "run_dir": "runs/x",
        "wall_s": 12.5,
        "time_to_first_step_s": 3.2,
        "final": {"split": "test", "accuracy": 0.75, "macro_f1": 0.7, "n_eval": 20},
        "phases": {
            "setup": {"gpu_peak_alloc_mb": 900.0, "cpu_peak_rss_mb": 1500.0},
            "train": {
                "gpu_peak_alloc_mb": 1200.5,
                "cpu_peak_rss_mb": 1400.0,
                "s_per_step": 0.25,
                "tokens_per_s": 900.0,
            },
            "eval": {"gpu_peak_alloc_mb": 1100.0, "cpu_peak_rss_mb": 1300.0},
            "save": {"gpu_peak_alloc_mb": 1300.0, "cpu_peak_rss_mb": 1450.0},
        },
    }
    row, bench_row, line = (
        compare.run_metrics(metrics),
        bench.peftlab_row(metrics, "stage3"),
        summary_line(metrics),
    )
    assert row["gpu_peak_mb"] == bench_row["gpu_peak_mb"] == rundir.headline(metrics)["gpu_peak_mb"] == 1300.0
    assert "GPU peak 1300 MB, CPU peak 1500 MB" in line
    assert row["cpu_peak_mb"] == bench_row["cpu_peak_mb"] == 1500.0
    assert row["s_per_step"] == bench_row["s_per_step"] == 0.25 and "0.25 s/step, 900.0 tokens/s" in line
    assert bench_row["time_to_first_step_s"] == 3.2


def test_a_run_refused_for_bad_input_does_not_block_its_corrected_command(tmp_path, tiny_data):
    """A named directory whose run failed before training (nothing finished, no checkpoint) is started over."""
    run_dir = tmp_path / "run"
    bad = finish(
        run_py(*TINY, "train.warmup_ratio=abc", f"dataset.data_dir={tiny_data}", f"hydra.run.dir={run_dir}")
    )
    assert bad.returncode == 2 and json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    fixed = finish(run_py(*TINY, "peft.r=0", f"dataset.data_dir={tiny_data}", f"hydra.run.dir={run_dir}"))
    assert fixed.returncode == 2 and error_lines(fixed.stderr) == [
        "error: peft.r=0 must be a whole number >= 1"
    ]
