"""hydra/launcher=ray and ray_cluster (hydra-ray-launcher): sweep jobs side by side as Ray tasks.

Real Ray on the CPU (a local instance of the sweep's own, and a cluster started with `ray start`), the tiny
model. Without the ray extra, one line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .conftest import ROOT

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="the ray extra: pip install -e '.[ray]'"
)
# A loopback-only Ray (see peftlab.sweep.prepare_local_ray): what the sweep's own instance gets, and for the
# test cluster of test_a_sweep_on_a_running_ray_cluster, so that it is reachable from this machine only.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LONG_TRAIN = ("train.epochs=100", "train.batch_size=2")  # 800 steps on tiny_data's 16 rows


def run_py(*args, cwd=ROOT, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, "-W", "ignore::UserWarning", str(ROOT / "run.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def statuses(sweep_dir: Path) -> dict[int, str]:
    return {
        int(d.name): json.loads((d / "metrics.json").read_text())["status"]
        for d in sweep_dir.iterdir()
        if d.name.isdigit()
    }


def ray_processes_of_this_session() -> list[int]:
    """Ray's server processes (GCS, raylet, agents, workers) started from this test session: they carry its
    PEFTLAB_CACHE_DIR (set by conftest's weights_cache), unlike any other Ray on the machine."""
    mine = f"PEFTLAB_CACHE_DIR={os.environ['PEFTLAB_CACHE_DIR']}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes()
            if (b"raylet" in name or b"gcs_server" in name or name.startswith(b"ray::")) and mine in Path(
                f"/proc/{pid}/environ"
            ).read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def no_ray_left(deadline_s: float = 30) -> list[int]:
    end = time.time() + deadline_s
    while (left := ray_processes_of_this_session()) and time.time() < end:
        time.sleep(0.5)
    return left


# ----------------------------------------------------------------------------- without the extra


def test_without_the_ray_extra_hydra_launcher_ray_fails_in_one_line(tmp_path):
    """`ray` hidden from imports (a sitecustomize on PYTHONPATH): one line naming the extra, exit 2, nothing written.
    (-W ignore::UserWarning: the plugin itself is still installed here, and Hydra warns that conf/hydra/launcher/
    ray.yaml shares its name with the plugin's schema; without the extra there is no schema to warn about.)"""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n\n\nclass HideRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
        "sys.meta_path.insert(0, HideRay())\n"
    )
    sweep = tmp_path / "sweep"
    result = run_py(
        "-m",
        "hydra/launcher=ray",
        "model=tiny_bert",
        "peft.r=4,8",
        f"hydra.sweep.dir={sweep}",
        env={"PYTHONPATH": str(shim)},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        == "error: hydra/launcher=ray needs the ray extra (ray not installed): pip install -e '.[ray]'"
    )
    assert not sweep.exists()


def test_ray_missing_names_what_is_not_installed(monkeypatch):
    from peftlab import sweep

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "ray" in name else real(name, *a)
    )
    assert sweep.ray_missing() == ["ray", "hydra_plugins.hydra_ray_launcher"]


@pytest.mark.parametrize("address", ["local", None])
def test_a_local_ray_instance_listens_on_loopback_with_token_auth(monkeypatch, address):
    from peftlab.sweep import prepare_local_ray

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setenv(
        "RAY_AUTH_MODE", "disabled"
    )  # turned off in the environment: the sweep's own instance keeps it
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    prepare_local_ray(OmegaConf.create({"ray": {"init": {"address": address}}}))
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and os.environ["RAY_AUTH_MODE"] == "token"


def test_joining_a_cluster_keeps_its_settings(monkeypatch):
    from peftlab.sweep import prepare_local_ray

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    prepare_local_ray(OmegaConf.create({"ray": {"init": {"address": "auto"}}}))
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ and "RAY_AUTH_MODE" not in os.environ


# ----------------------------------------------------------------------------- one worker, several jobs


@pytest.mark.parametrize(
    ("job_gpus", "instance_gpus", "safe"),
    [
        (0, None, True),
        (0, 4, True),  # CPU jobs: no GPU to keep
        (0.25, 1, True),
        (1, 1, True),  # one GPU: every job gets it
        (2, 2, True),  # two-GPU jobs on two GPUs: always both
        (0.25, 2, False),
        (1, 2, False),
        (2, 4, False),  # a choice of GPUs: a reused worker could hold the wrong one
        (0.25, None, False),
        (1, None, False),  # a cluster: its nodes' GPUs are not known here
    ],
)
def test_workers_are_reused_only_where_no_job_can_be_given_other_gpus(job_gpus, instance_gpus, safe):
    from peftlab.sweep import worker_reuse_safe

    assert worker_reuse_safe(job_gpus, instance_gpus) is safe


@needs_ray
@pytest.mark.parametrize(
    ("overrides", "max_calls"),
    [
        (["hydra.launcher.ray.init.num_gpus=0"], 0),  # CPU jobs
        (
            ["hydra.launcher.ray.init.num_gpus=1", "hydra.launcher.ray.remote.num_gpus=0.25"],
            0,
        ),  # four a GPU, one GPU
        (
            ["hydra.launcher.ray.init.num_gpus=2", "hydra.launcher.ray.remote.num_gpus=0.25"],
            1,
        ),  # two GPUs to choose from
        (["hydra.launcher.ray.init.num_gpus=2", "launcher.num_processes=2"], 0),  # each job takes both
        (["hydra.launcher.ray.init.num_gpus=2", "hydra.launcher.ray.remote.max_calls=1"], 1),  # asked for
    ],
)
def test_the_preset_reuses_workers_where_safe(monkeypatch, overrides, max_calls):
    """max_calls: null in conf/hydra/launcher/ray.yaml, as RaySweep resolves it before the launcher starts."""
    from hydra import compose, initialize_config_dir

    from peftlab.sweep import RaySweep

    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_DEDUP_LOGS"):
        monkeypatch.delenv(key, raising=False)  # prepare_local_ray sets them in this process
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["hydra/launcher=ray", *overrides], return_hydra_config=True
        )
    RaySweep().on_multirun_start(cfg)
    assert cfg.hydra.launcher.ray.remote.max_calls == max_calls


@needs_ray
def test_a_reused_worker_on_a_choice_of_gpus_is_refused_in_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_py(
        "-m",
        "hydra/launcher=ray",
        "hydra.launcher.ray.init.num_gpus=2",
        "hydra.launcher.ray.remote.num_gpus=0.5",
        "hydra.launcher.ray.remote.max_calls=0",
        "model=tiny_bert",
        "peft.r=4,8",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "error: hydra.launcher.ray.remote.max_calls=0 lets a Ray worker run several jobs, but jobs of num_gpus=0.5 on this "
        "Ray instance's 2 GPUs can be given other GPUs than the ones a reused worker keeps: use max_calls=1, or null "
        "(peftlab reuses workers where it is safe)"
    )
    assert not sweep.exists()


def test_a_worker_holding_other_gpus_refuses_the_job(monkeypatch):
    """The guard in the Ray worker, where the preset's choice was overridden on a cluster: the job never starts on
    the GPU that the worker's first job initialised CUDA on when Ray assigned it another."""
    from peftlab import sweep

    monkeypatch.setattr(sweep, "_worker_gpus", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    sweep.check_worker_gpus()  # no job initialised CUDA in this worker yet
    monkeypatch.setattr(sweep, "_worker_gpus", "1")
    sweep.check_worker_gpus()  # the same GPU again
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(
        RuntimeError,
        match=r"earlier job on GPU\(s\) '1' .* assigned this job GPU\(s\) '0': set "
        r"hydra\.launcher\.ray\.remote\.max_calls=1",
    ):
        sweep.check_worker_gpus()


# ----------------------------------------------------------------------------- real Ray


@pytest.fixture(scope="module")
def ray_sweep(tmp_path_factory, tiny_data):
    """peft.r=0,4,8 (r=0 fails) as Ray tasks, three at once (2 CPUs, half a CPU each), into the default
    hydra.sweep.dir (claimed by ${claim_dir:...} in this process). LONG_TRAIN: train phases of a few
    seconds, so that two jobs started within a second or two of each other overlap in them."""
    cwd = tmp_path_factory.mktemp("ray_cwd")
    start = time.time()
    result = run_py(
        "-m",
        "hydra/launcher=ray",
        "hydra.launcher.ray.init.num_cpus=2",
        "hydra.launcher.ray.remote.num_cpus=0.5",
        "model=tiny_bert",
        "peft.r=0,4,8",
        *LONG_TRAIN,
        "logger=null",
        f"dataset.data_dir={tiny_data}",
        cwd=cwd,
    )
    return cwd, result, time.time() - start


@pytest.mark.slow
@needs_ray
def test_ray_jobs_run_side_by_side_each_in_its_own_run_directory(ray_sweep):
    cwd, result, _ = ray_sweep
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]  # job 0 failed: the sweep says so
    # one sweep directory, the one this process claimed: no Ray worker claimed another (HH-MM-SS-1) for its job
    sweeps = list((cwd / "multirun").glob("*/*"))
    assert len(sweeps) == 1 and (sweeps[0] / ".owner").is_file(), sweeps
    sweep = sweeps[0]
    assert statuses(sweep) == {0: "failed", 1: "finished", 2: "finished"}
    assert (
        "peft.r=0 must be a whole number >= 1"
        in json.loads((sweep / "0" / "metrics.json").read_text())["error"]
    )
    summary = json.loads((sweep / "sweep.json").read_text())
    assert (summary["jobs"], summary["finished"], summary["statuses"]) == (3, 2, {"failed": 1, "finished": 2})
    for job in ("1", "2"):
        names = {p.name for p in (sweep / job).iterdir()}
        assert {".hydra", "config.yaml", "metrics.json", "predictions.csv", "adapter"} <= names, names
    # progress: each job's start and end, with the sweep's job count, from the Ray workers
    for n in (1, 2, 3):
        assert re.search(rf"job {n}/3: ", out), out[-3000:]
    assert re.search(r"job 1/3 failed: .*peft\.r=0.* \| \d running", out) and re.search(
        r"job 3/3 finished: ", out
    )
    # side by side: the two finished jobs' train phases overlap in time
    train = [json.loads((sweep / j / "metrics.json").read_text())["phases"]["train"] for j in ("1", "2")]
    assert max(t["start_time"] for t in train) < min(t["end_time"] for t in train), train
    assert not no_ray_left(), "the sweep's Ray instance outlived it"


@pytest.mark.slow
@needs_ray
def test_a_ray_sweep_run_again_skips_its_finished_jobs(ray_sweep, tiny_data):
    cwd, _, _ = ray_sweep
    sweep = next((cwd / "multirun").glob("*/*"))
    finished = {j: (sweep / j / "metrics.json").read_bytes() for j in ("1", "2")}
    again = run_py(
        "-m",
        "hydra/launcher=ray",
        "hydra.launcher.ray.init.num_cpus=2",
        "hydra.launcher.ray.remote.num_cpus=0.5",
        "model=tiny_bert",
        "peft.r=0,4,8",
        *LONG_TRAIN,
        "logger=null",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={sweep}",
        cwd=cwd,
    )
    assert again.returncode == 1, (again.stdout + again.stderr)[-3000:]
    assert {
        j: (sweep / j / "metrics.json").read_bytes() for j in ("1", "2")
    } == finished  # skipped, not redone
    summary = json.loads((sweep / "sweep.json").read_text())
    assert (summary["jobs"], summary["skipped_finished"], summary["finished"]) == (3, 2, 2)
    assert re.search(r"job 1/3 failed: ", again.stdout + again.stderr)  # the failed job was run again
    assert not no_ray_left()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_ray
def test_a_sweep_on_a_running_ray_cluster(tmp_path, tiny_data):
    """`ray start --head` in a process of its own (loopback only, token authentication: Ray's default), then
    hydra/launcher=ray_cluster joins it by address with the cluster's token, and leaves it running."""
    import psutil

    port, log = free_port(), tmp_path / "head.log"
    # `ray start` records its address for ray.init(address="auto") on this machine; put back what was there
    address_file = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    before = address_file.read_text() if address_file.is_file() else None
    env = {**os.environ, **LOOPBACK}
    with open(log, "wb") as f:
        head = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--block",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert head.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        sweep = tmp_path / "sweep"
        # the preset's one GPU a job on a cluster of CPUs: Ray would keep every job pending, silently
        start = time.time()
        refused = run_py(
            "-m",
            "hydra/launcher=ray_cluster",
            f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
            "model=tiny_bert",
            f"hydra.sweep.dir={tmp_path / 'refused'}",
            env={**LOOPBACK, "RAY_AUTH_MODE": "token", "CUDA_VISIBLE_DEVICES": ""},
            timeout=120,
        )
        assert refused.returncode == 2 and time.time() - start < 60
        assert refused.stderr.strip().splitlines()[-1] == (
            "error: hydra.launcher.ray.remote.num_gpus=1: no node of the Ray cluster has 1 GPUs (the most on one "
            "node: 0), so no job would ever start; use hydra.launcher.ray.remote.num_gpus=0 for a cluster without GPUs"
        )
        result = run_py(
            "-m",
            "hydra/launcher=ray_cluster",
            f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
            "hydra.launcher.ray.remote.num_gpus=0",
            "model=tiny_bert",
            "peft.r=4,8",
            "train.epochs=1",
            "logger=null",
            f"dataset.data_dir={tiny_data}",
            f"hydra.sweep.dir={sweep}",
            env={**LOOPBACK, "RAY_AUTH_MODE": "token"},
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-3000:]
        assert statuses(sweep) == {0: "finished", 1: "finished"}
        assert json.loads((sweep / "sweep.json").read_text())["finished"] == 2
        assert re.search(r"job 2/2: ", out) and "Connected to Ray cluster" in out
        assert head.poll() is None  # the cluster is left running
    finally:
        family = (
            [head.pid, *(p.pid for p in psutil.Process(head.pid).children(recursive=True))]
            if head.poll() is None
            else []
        )
        os.killpg(head.pid, signal.SIGTERM) if head.poll() is None else None
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid in family:  # Ray workers run in process groups of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if address_file.is_file() and address_file.read_text().strip() == f"127.0.0.1:{port}":
            address_file.write_text(before) if before is not None else address_file.unlink()
    assert not no_ray_left()


@pytest.mark.slow
@needs_ray
def test_optuna_trials_run_side_by_side_on_ray(tmp_path, tiny_data):
    """hydra.sweeper.n_jobs=2: the Optuna sweeper hands the launcher two trials at a time."""
    result = run_py(
        "-m",
        "experiment=optuna_lora",
        "hydra/launcher=ray",
        "hydra.launcher.ray.init.num_cpus=2",
        "model=tiny_bert",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "eval.folds=2",
        "train.epochs=1",
        "logger=null",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={tmp_path}",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert out.count("Ray Launcher is launching 2 jobs") == 1  # both trials in one batch
    assert statuses(tmp_path) == {0: "finished", 1: "finished"}
    assert (
        re.search(r"job 2/2 finished: ", out)
        and "best_value" in (tmp_path / "optimization_results.yaml").read_text()
    )
    assert not no_ray_left()


@needs_ray
def test_joining_no_running_cluster_is_one_line(tmp_path):
    """hydra/launcher=ray_cluster with no cluster to join: one line naming the address and the fix, in seconds."""
    start = time.time()
    result = run_py(
        "-m",
        "hydra/launcher=ray_cluster",
        "model=tiny_bert",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env={"RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": ""},  # no `ray start` address file to find
        timeout=120,
    )
    assert result.returncode == 2 and time.time() - start < 60, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: hydra.launcher.ray.init.address=auto: no Ray cluster joined ("
    ) and line.endswith(
        "start one with `ray start --head` (then `ray start --address=HEAD:6379` on the other nodes), or name it "
        "with hydra.launcher.ray.init.address=HOST:PORT"
    )
