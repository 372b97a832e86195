"""Several processes on the CPU: one run directory shared by all ranks, ZeRO-3 partitions, gathered
evaluation, sweeps of multi-process jobs, the SLURM path through submitit's local executor.

Real processes throughout (accelerate launch, torchrun, deepspeed, submitit), gloo and DeepSpeed's
CPU accelerator; the tests that train are marked slow.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from peftlab import distributed, launch
from peftlab.config import ConfigError, validate

from .conftest import CONF, ROOT, make_cfg

BIN = Path(sys.executable).parent
NO_DROPOUT = [
    "peft.lora_dropout=0",
    "+model.config.hidden_dropout_prob=0",
    "+model.config.attention_probs_dropout_prob=0",
]
# 16 training rows: 2 optimizer steps an epoch at 8 rows a step (4 per process with 2 processes);
# eval.batch_size=5 splits the 24 evaluation rows unevenly over the ranks (gather_for_metrics must drop the padding)
TWO_PROC = [
    "launcher.num_processes=2",
    "zero=stage3",
    "model=tiny_bert",
    "train.batch_size=4",
    "eval.batch_size=5",
]


# The ranks of these tests run on the CPU (gloo), also on a machine with one GPU, where two ranks
# would share it; with two GPUs or more they run on the GPUs (NCCL).
ON_CPU = {"CUDA_VISIBLE_DEVICES": ""} if torch.cuda.device_count() < 2 else {}


def env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **ON_CPU, **extra)


def run_py(*args, cwd=ROOT, timeout=600):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
    )


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_complete(run_dir: Path, tiny_data: Path, processes: int = 2, zero3: bool = True) -> dict:
    """A finished run directory of a multi-process (ZeRO-3) run: records from rank 0, every row once."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished", metrics.get("error")
    assert metrics["processes"] == processes
    labelled = [r["ID"] for r in read_csv(tiny_data / "test.csv") if r["Label"] != "0"]
    predictions = read_csv(run_dir / "predictions.csv")
    assert sorted(r["id"] for r in predictions) == sorted(labelled)  # gathered: none dropped, none twice
    assert metrics["final"]["n_eval"] == len(labelled) == sum(map(sum, metrics["final"]["confusion_matrix"]))
    assert len(read_csv(run_dir / "submission.csv")) == 4
    assert (run_dir / "config.yaml").is_file() and (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).is_file()
    log = (run_dir / "run.log").read_text()
    assert log.count("test accuracy") == 1 and log.count("ZeRO-3 partitions") == int(
        zero3
    )  # rank 0 alone logs info
    return metrics


def check_halves(metrics: dict) -> None:
    parts = metrics["zero3_partitions"]
    assert len(parts["numel_per_rank"]) == 2
    for numel in parts["numel_per_rank"]:  # each rank ~half: a parameter's partition is rounded up
        assert abs(numel / parts["numel_total"] - 0.5) < 0.01, parts


# --- one run directory for all ranks ------------------------------------------------------------


def test_launch_time_is_the_launchers_start_in_every_rank():
    """Two ranks started 1.2 s apart by one launcher name the same time; two plain runs do not."""
    child = "import peftlab; print(peftlab._launch_time('%H-%M-%S.%f'))"
    launcher = (
        "import os, subprocess, sys, time\n"
        "for i in range(2):\n"
        f"    subprocess.run([sys.executable, '-c', {child!r}])\n"
        "    time.sleep(1.2)\n"
    )
    ranks = subprocess.run(
        [sys.executable, "-c", launcher], env=env(WORLD_SIZE="2"), capture_output=True, text=True
    ).stdout.split()
    plain = subprocess.run(
        [sys.executable, "-c", launcher],
        env={k: v for k, v in env().items() if k != "WORLD_SIZE"},
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    assert len(plain) == 2 and plain[0] != plain[1]
    assert "${launch_time:%H-%M-%S}" in (CONF / "config.yaml").read_text()


# --- launcher settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["launcher.num_processes=0"], "launcher.num_processes=0 must be a whole number >= 1"),
        (
            ["launcher.num_processes=3", "launcher.num_machines=2"],
            "must be a multiple of launcher.num_machines=2",
        ),
        (
            [
                "launcher.num_processes=4",
                "launcher.num_machines=2",
                "launcher.machine_rank=2",
                "launcher.main_process_ip=10.0.0.1",
            ],
            "launcher.machine_rank=2 must be 0..1",
        ),
        (["launcher.num_processes=4", "launcher.num_machines=2"], "needs launcher.main_process_ip=ADDRESS"),
        (
            ["launcher.num_processes=2", "launcher.main_process_port=80"],
            "launcher.main_process_port=80 must be a port number",
        ),
    ],
)
def test_bad_launcher_settings_fail_with_one_line(tmp_path, overrides, fragment):
    cfg = make_cfg(tmp_path, *overrides)
    assert launch.requested(cfg)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        launch.check(cfg)


def test_more_processes_than_gpus_fail_with_one_line(tmp_path, monkeypatch):
    """On a machine with one GPU two ranks would both take it (or fail on cuda:1, after a 30 s wait)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ConfigError,
        match=r"launcher\.num_processes=2 starts 2 processes on this machine, one per GPU, but it has 1 GPU",
    ):
        launch.check(make_cfg(tmp_path, "launcher.num_processes=2"))
    launch.check(
        make_cfg(
            tmp_path,
            "launcher.num_processes=2",
            "launcher.num_machines=2",
            "launcher.main_process_ip=10.0.0.1",
        )
    )
    validate(make_cfg(tmp_path))
    monkeypatch.setenv(
        "LOCAL_RANK", "1"
    )  # a rank started by an outside launcher: accelerate launch --num_processes 2
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1\) but the machine has 1 GPU\(s\) visible"):
        validate(make_cfg(tmp_path))


def test_launcher_inside_another_launch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="inside a launch of 2 processes"):
        launch.check(make_cfg(tmp_path, "launcher.num_processes=2"))


def test_several_machines_need_a_shared_run_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(
        torch.cuda, "device_count", lambda: 2
    )  # 2 processes per machine: as many as GPUs, or CPU ranks
    cfg = make_cfg(
        tmp_path, "launcher.num_processes=4", "launcher.num_machines=2", "launcher.main_process_ip=10.0.0.1"
    )
    with pytest.raises(ConfigError, match="needs hydra.run.dir=PATH"):
        launch.check(cfg, shared_dir_given=False)
    launch.check(cfg)


@pytest.mark.parametrize("visible", [None, "4,5,6,7"])
def test_machines_sharing_one_host_take_gpus_of_their_own(tmp_path, monkeypatch, visible):
    """Two one-process "machines" on one host with two GPUs both took GPU 0 (NCCL: invalid usage)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if visible else 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    here = ["launcher.num_processes=2", "launcher.num_machines=2", "launcher.main_process_ip=127.0.0.1"]
    ids = (visible or "0,1").split(",")
    assert [
        launch.machine_gpus(make_cfg(tmp_path, *here, f"launcher.machine_rank={m}")) for m in (0, 1)
    ] == ids[:2]
    four = [
        "launcher.num_processes=4",
        "launcher.num_machines=2",
        "launcher.main_process_ip=localhost",
        "launcher.machine_rank=1",
    ]
    if visible:
        assert launch.machine_gpus(make_cfg(tmp_path, *four)) == "6,7"
    else:
        with pytest.raises(
            ConfigError, match=r"launcher.machine_rank=1 runs on the host of machine 0 .* needs GPUs 2..3"
        ):
            launch.check(make_cfg(tmp_path, *four))
    elsewhere = [
        "launcher.num_processes=2",
        "launcher.num_machines=2",
        "launcher.main_process_ip=10.0.0.1",
        "launcher.machine_rank=1",
    ]
    assert (
        launch.machine_gpus(make_cfg(tmp_path, *elsewhere)) is None
    )  # a machine of its own numbers its GPUs from 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert launch.machine_gpus(make_cfg(tmp_path, *here, "launcher.machine_rank=1")) is None  # CPU ranks


def test_the_ranks_are_started_by_accelerate_launch_reading_the_run_directory(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "launcher.num_processes=16",
        "launcher.num_machines=2",
        "launcher.machine_rank=1",
        "launcher.main_process_ip=10.0.0.1",
    )
    cmd = launch.command(cfg, tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    flags = dict(zip(cmd[4:-3:2], cmd[5:-3:2]))
    assert flags == {
        "--num_processes": "16",
        "--num_machines": "2",
        "--machine_rank": "1",
        "--main_process_port": "29500",
        "--mixed_precision": "no",
        "--dynamo_backend": "no",
        "--main_process_ip": "10.0.0.1",
    }
    assert cmd[-3:] == ["-m", "peftlab.launch", str(tmp_path)]
    assert not launch.requested(make_cfg(tmp_path))


# --- SLURM ----------------------------------------------------------------------------------------


def test_slurm_environment_becomes_torch_distributed_environment(monkeypatch):
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    seen = []
    for procid, localid in (("9", "1"), ("0", "0")):
        for key, value in {**slurm, "SLURM_PROCID": procid, "SLURM_LOCALID": localid}.items():
            monkeypatch.setenv(key, value)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.setenv(key, "unset")  # so that monkeypatch restores what env_from_submitit sets
        distributed.env_from_submitit()
        seen.append(
            {
                k: os.environ[k]
                for k in (
                    "RANK",
                    "WORLD_SIZE",
                    "LOCAL_RANK",
                    "LOCAL_WORLD_SIZE",
                    "MASTER_ADDR",
                    "MASTER_PORT",
                )
            }
        )
    assert seen[0]["RANK"] == "9" and seen[1]["RANK"] == "0"
    assert (
        seen[0]["LOCAL_RANK"] == "1" and seen[0]["WORLD_SIZE"] == "16" and seen[0]["LOCAL_WORLD_SIZE"] == "8"
    )
    assert seen[0]["MASTER_ADDR"] == seen[1]["MASTER_ADDR"] == "gpu07"
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"]  # every task of the job meets at one port


def test_slurm_launcher_config_is_the_documented_sbatch_script(tmp_path, monkeypatch):
    """conf/hydra/launcher/slurm.yaml, turned into sbatch by submitit as hydra-submitit-launcher does."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "srun").write_text(
        "#!/bin/sh\nexit 1\n"
    )  # submitit's SLURM executor only checks that srun exists
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    params = OmegaConf.to_container(cfg.hydra.launcher)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {
        k if k in base else f"slurm_{k}": v
        for k, v in params.items()
        if k not in ("_target_", "submitit_folder", "max_num_timeout", "name")
    }
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "0")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--time=240",
        "--partition=gpu",
        "--mem=0",
        "export SLURM_KILL_BAD_EXIT=1",
        "srun ",
    ):
        assert line in script
    text = (CONF / "hydra" / "launcher" / "slurm.yaml").read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=240",
        "#SBATCH --mem=0",
    ):
        assert line in text  # the comments state what the settings do


# --- real multi-process runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, tiny_data):
    """python run.py launcher.num_processes=2 zero=stage3 (dropout off: see test_two_processes_match_one_process)."""
    out = tmp_path_factory.mktemp("two_proc") / "run"
    result = run_py(
        *TWO_PROC,
        *NO_DROPOUT,
        "train.epochs=10",
        "train.lr=5e-2",
        f"dataset.data_dir={tiny_data}",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_process_zero3_run_writes_one_complete_run_directory(two_proc, tiny_data):
    out, result = two_proc
    check_complete(out, tiny_data)
    assert (
        "-m peftlab.launch " + str(out) in (out / "run.log").read_text()
    )  # the parent composed; the ranks read config.yaml
    assert OmegaConf.load(out / "config.yaml").launcher.num_processes == 2


@pytest.mark.slow
def test_each_rank_holds_half_of_the_parameters(two_proc):
    out, _ = two_proc
    check_halves(json.loads((out / "metrics.json").read_text()))


@pytest.mark.slow
def test_finished_multi_process_run_is_not_redone(two_proc, tiny_data):
    """resume=auto: the same launcher.num_processes=2 command again leaves the finished run as it is
    (the parent used to write 'running' over its record before the ranks could skip it)."""
    out, _ = two_proc
    before = (out / "metrics.json").read_bytes()
    again = run_py(
        *TWO_PROC,
        *NO_DROPOUT,
        "train.epochs=10",
        "train.lr=5e-2",
        f"dataset.data_dir={tiny_data}",
        f"hydra.run.dir={out}",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "already holds a finished run" in again.stdout + again.stderr
        and "launching" not in again.stdout + again.stderr
    )
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_adapter_saved_under_zero3_is_complete_and_reproduces_the_predictions(two_proc):
    from safetensors.torch import load_file

    from peftlab.predict import predict_run

    out, _ = two_proc
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in tensors.items()}
    assert len(shapes) == 10 and all(
        t.numel() > 0 for t in tensors.values()
    )  # 2 layers x query,value x A,B + head
    assert {s for k, s in shapes.items() if "lora_A" in k} == {(8, 16)} and {
        s for k, s in shapes.items() if "lora_B" in k
    } == {(16, 8)}
    assert shapes["classifier.weight"] == (2, 16) and shapes["classifier.bias"] == (2,)
    saved = read_csv(out / "predictions.csv")
    rows, again, names = predict_run(out, device="cpu")  # one process, no DeepSpeed, on the ranks' device
    assert [names[p] for p in again["pred"]] == [r["prediction"] for r in saved]
    assert (
        max(
            abs(float(r[f"logp_{n}"]) - s)
            for r, scores in zip(saved, again["scores"])
            for n, s in zip(names, scores)
        )
        < 1e-3
    )


@pytest.mark.slow
def test_two_processes_match_one_process(two_proc, tmp_path, tiny_data):
    """The same 8-row global batches (8 rows in one process, 4 in each of two) give the same model.

    Tolerance: at most one of the 24 evaluation rows may change its prediction and each
    log-likelihood may move by 1e-3; observed: no prediction changes, 1e-5 (the CSV's rounding).
    What remains is floating-point summation order (gradients averaged over ranks, not over one
    batch). Dropout is off: each rank draws its masks from the same seeded generator for its own 4
    rows, so the masks differ from one process's masks for 8 rows, and on this near-chance tiny
    model that alone moves accuracy by up to 0.3: no useful tolerance exists with it on.
    """
    out, _ = two_proc
    result = run_py(
        "zero=stage3",
        "model=tiny_bert",
        "train.batch_size=8",
        "eval.batch_size=5",
        "train.lr=5e-2",
        *NO_DROPOUT,
        "train.epochs=10",
        f"dataset.data_dir={tiny_data}",
        f"hydra.run.dir={tmp_path}",
    )  # on the two ranks' device
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, out))
    assert abs(one["final"]["accuracy"] - two["final"]["accuracy"]) <= 1 / 24 + 1e-9
    a, b = read_csv(tmp_path / "predictions.csv"), read_csv(out / "predictions.csv")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert sum(x["prediction"] != y["prediction"] for x, y in zip(a, b)) <= 1
    assert (
        max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in x if k.startswith("logp_")) < 1e-3
    )


def adapter_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two runs' saved adapter weights (the same tensors in both)."""
    from safetensors.torch import load_file

    x, y = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert x.keys() == y.keys() and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["none", "stage1", "stage2", "stage3", "stage2_cpu", "stage3_cpu"])
def test_two_processes_train_the_one_process_model_under_every_zero_stage(tmp_path, tiny_data, zero):
    """launcher.num_processes=2 x every ZeRO config against one process with the same 8-row global
    batch and the same zero config (so whichever optimizer a *_cpu config names): the same adapter
    within 1e-5, the same loss curve (the whole batch's loss, averaged over the ranks), every row
    scored once. Observed on the CPU: at most 6.6e-7 apart, loss curves equal to the 6 digits kept.
    zero=none once trained two independent halves (Accelerate saw no distribution: no DDP) and scored
    half of the rows. The 2-process run also saves a checkpoint every 2 steps (each rank writes into
    the same folder) without changing the training."""
    common = [
        f"zero={zero}",
        "model=tiny_bert",
        "eval.batch_size=5",
        "train.lr=5e-2",
        *NO_DROPOUT,
        "train.epochs=3",
        "logger=null",
        f"dataset.data_dir={tiny_data}",
    ]
    two = run_py(
        "launcher.num_processes=2",
        "train.batch_size=4",
        "checkpoint.every_steps=2",
        *common,
        f"hydra.run.dir={tmp_path / 'two'}",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_py("train.batch_size=8", *common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    m2 = check_complete(tmp_path / "two", tiny_data, zero3=zero.startswith("stage3"))
    m1 = check_complete(tmp_path / "one", tiny_data, processes=1, zero3=zero.startswith("stage3"))
    assert "(24 rows)" in (tmp_path / "two" / "run.log").read_text()
    assert [s for s, _ in m2["loss_curve"]] == [s for s, _ in m1["loss_curve"]] == list(range(1, 7))
    assert max(abs(x - y) for (_, x), (_, y) in zip(m2["loss_curve"], m1["loss_curve"])) <= 1e-5
    assert adapter_difference(tmp_path / "two", tmp_path / "one") <= 1e-5
    a, b = read_csv(tmp_path / "two" / "predictions.csv"), read_csv(tmp_path / "one" / "predictions.csv")
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]


# A training script's checkpoint, saved 12 times over 2 processes; rank 1 is slow to write its RNG
# states, so a rank 0 that does not wait for it renames (or removes) the folder under it.
SAVE_MANY = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import accelerate.accelerator, torch
from peftlab import checkpoint, distributed
from tests.conftest import make_cfg

run_dir = Path(sys.argv[1])
cfg = make_cfg(run_dir, {zero!r})
acc = distributed.make_accelerator(cfg.zero, cfg.train, str(run_dir))
model = torch.nn.Linear(4, 2)
model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters()))
original = accelerate.accelerator.save_accelerator_state
def slow_rank_1(*args, **kwargs):
    if acc.process_index == 1:
        time.sleep(0.1)
    return original(*args, **kwargs)
accelerate.accelerator.save_accelerator_state = slow_rank_1
saver = checkpoint.Checkpointer(acc, run_dir, every_steps=1, keep_last=2)
for step in range(1, 13):
    saver.save({{"epoch": 0, "batch": step, "step": step}})
"""


@pytest.mark.slow
def test_checkpoint_saves_over_two_processes_wait_for_every_rank(tmp_path):
    """Each rank writes into the checkpoint's temporary folder; rank 0 renames it only when all have
    written. It once died in 3 of 9 runs with 'Parent directory .../.step_N.tmp does not exist'."""
    script = tmp_path / "save_many.py"
    script.write_text(SAVE_MANY.format(root=str(ROOT), zero="zero=none"))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(distributed.free_port()),
        str(script),
        str(tmp_path / "run"),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step_11", "step_12"]  # no temporary folder left
    for folder in folders:
        assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {
            p.name for p in folder.iterdir()
        }
        assert json.loads((folder / "trainer_state.json").read_text())["world_size"] == 2


# Rank 1 of a run dies once rank 0 recorded the run finished (exit code 3 at interpreter exit).
DIE_AFTER_FINISH = """
import atexit, json, os, sys, time
if os.environ.get("RANK") == "1":
    def die():
        if not sys.argv[0].endswith(os.path.join("peftlab", "launch.py")):  # a rank: python -m peftlab.launch RUN_DIR
            return
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.load(open(os.path.join(sys.argv[-1], "metrics.json")))["status"] == "finished":
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        os._exit(3)
    atexit.register(die)
"""


@pytest.mark.slow
def test_a_rank_dying_after_rank_0_finished_fails_the_run(tmp_path, tiny_data):
    """Any rank's non-zero exit fails the run (status failed, non-zero exit, one line), even when
    rank 0 had already written finished: it used to end finished, exit 0, with a warning."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_AFTER_FINISH)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "launcher.num_processes=2",
            "zero=none",
            "model=tiny_bert",
            "train.batch_size=4",
            "train.epochs=1",
            "logger=null",
            f"dataset.data_dir={tiny_data}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env(PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))),
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "after rank 0 recorded the run finished" in errors[0], result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "a process exited with code" in metrics["error"]


def test_a_rank_error_is_recorded_by_the_parent(tmp_path, tiny_data, monkeypatch):
    """A rank other than 0 that raised leaves its one-line error; the parent puts it into metrics.json."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, "launcher.num_processes=2", "model=tiny_bert", data_dir=tiny_data)

    def ranks(cmd, **kwargs):  # rank 0 finished, rank 1 failed afterwards
        (run_dir / "metrics.json").write_text(json.dumps({"status": "finished", "error": None, "final": {}}))
        (run_dir / ".rank1.error").write_text("RuntimeError: rank 1 broke\n")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(launch.subprocess, "run", ranks)
    with pytest.raises(launch.LaunchFailed, match="rank 1: RuntimeError: rank 1 broke") as failed:
        launch.relaunch(cfg)
    assert failed.value.returncode == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].endswith("rank 1: RuntimeError: rank 1 broke")
    assert not list(run_dir.glob(".rank*.error"))


def test_rank_0_stopped_after_another_rank_died_records_that_ranks_error(tmp_path, tiny_data, monkeypatch):
    """The launcher stops rank 0 with SIGTERM once rank 1 died: the run failed, by rank 1's error."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, "launcher.num_processes=2", "model=tiny_bert", data_dir=tiny_data)

    def ranks(cmd, **kwargs):
        (run_dir / "metrics.json").write_text(
            json.dumps({"status": "interrupted", "error": "interrupted by SIGTERM"})
        )
        (run_dir / ".rank1.error").write_text("ValueError: bad batch\n")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(launch.subprocess, "run", ranks)
    with pytest.raises(
        launch.LaunchFailed, match=r"rank 1: ValueError: bad batch \(rank 0: interrupted by SIGTERM\)"
    ):
        launch.relaunch(cfg)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


def test_parent_refuses_a_checkpoint_of_another_number_of_processes_before_writing(
    tmp_path, tiny_data, monkeypatch
):
    """launcher.num_processes=2 on a 1-process run's checkpoint: one line, before any rank starts or any record is written."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, "launcher.num_processes=2", "model=tiny_bert", data_dir=tiny_data)
    (run_dir / "checkpoints" / "step_3").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_3" / "trainer_state.json").write_text(
        json.dumps({"step": 3, "world_size": 1})
    )
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    (run_dir / "metrics.json").write_text('{"status": "running"}')
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, **kwargs: pytest.fail("the ranks started"))
    with pytest.raises(
        ConfigError,
        match=r"written by 1 processes and this run has 2 \(launcher\.num_processes=2\): "
        r"resume with launcher\.num_processes=1, or resume=never",
    ):
        launch.relaunch(cfg)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun", "deepspeed"])
def test_outside_launchers_give_one_run_directory(tmp_path, tiny_data, launcher):
    """accelerate launch / torchrun / deepspeed run.py ...: every rank composes, all pick one directory."""
    port = str(distributed.free_port())
    cmd = {
        "accelerate": [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            port,
        ],
        "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port],
        "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port],
    }[launcher]  # deepspeed adds --local_rank
    args = [a for a in TWO_PROC if not a.startswith("launcher.")]
    result = subprocess.run(
        [*cmd, str(ROOT / "run.py"), *args, "train.epochs=1", f"dataset.data_dir={tiny_data}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    if (
        launcher == "deepspeed" and torch.cuda.device_count() == 1
    ):  # it hands out GPUs itself, whatever CUDA_VISIBLE_DEVICES says
        assert (
            result.returncode == 2 and "(LOCAL_RANK=1) but the machine has 1 GPU(s) visible" in result.stderr
        ), result.stderr[-3000:]
        return
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    check_halves(check_complete(run_dirs[0], tiny_data))


@pytest.mark.slow
def test_two_machines_meet_in_one_run_directory(tmp_path, tiny_data):
    """launcher.num_machines=2 with one process each, both 'machines' on this host."""
    args = [
        *TWO_PROC,
        "launcher.num_machines=2",
        "launcher.main_process_ip=127.0.0.1",
        f"launcher.main_process_port={distributed.free_port()}",
        "train.epochs=1",
        f"dataset.data_dir={tiny_data}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    machines = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *args, f"launcher.machine_rank={m}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(),
        )
        for m in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in machines]
    assert [p.returncode for p in machines] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    check_halves(check_complete(tmp_path / "run", tiny_data))


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_with_one_line(tmp_path):
    """An error the ranks meet (the parent's validate only checks that the data folder exists)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("Tweet text,ID\nhello,1\n")
    (data / "test.csv").write_text("Tweet text,ID,Label\nhi,2,1\n")
    result = run_py(*TWO_PROC, f"dataset.data_dir={data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: 2 processes")]
    assert len(errors) == 1 and "train.csv: no column 'Label' (dataset.label_column)" in errors[0], (
        result.stderr[-3000:]
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "no column 'Label'" in metrics["error"]


# --- sweeps of multi-process jobs -----------------------------------------------------------


@pytest.mark.slow
def test_sweep_of_two_process_jobs(tmp_path, tiny_data):
    result = run_py(
        "-m",
        *TWO_PROC,
        "peft.r=4,8",
        "train.epochs=1",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        check_halves(check_complete(tmp_path / job, tiny_data))
    assert [OmegaConf.load(tmp_path / j / "config.yaml").peft.r for j in ("0", "1")] == [4, 8]
    assert json.loads((tmp_path / "sweep.json").read_text())["finished"] == 2


@pytest.mark.slow
def test_submitit_sweep_with_one_task_per_rank(tmp_path, tiny_data):
    """The SLURM path on this machine: hydra/launcher=submitit_local, 2 tasks (ranks) per job, both jobs at once."""
    args = [a for a in TWO_PROC if not a.startswith("launcher.")]
    result = run_py(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        *args,
        "peft.r=4,8",
        "train.epochs=1",
        f"dataset.data_dir={tiny_data}",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        check_halves(check_complete(tmp_path / job, tiny_data))
    assert json.loads((tmp_path / "sweep.json").read_text())["finished"] == 2
