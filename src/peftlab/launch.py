"""One run over several processes or machines: ``python run.py launcher.num_processes=N ...``.

The parent (``run.py``, after Hydra composed the config) checks the ``launcher`` settings and the
run config, writes the resolved ``config.yaml`` into the run directory and starts the ranks with

    accelerate launch --multi_gpu --num_processes N ... -m peftlab.launch RUN_DIR

Each rank reads RUN_DIR/config.yaml (nothing is composed again) and runs the experiment; rank 0
writes the records, the other ranks log warnings only. The parent trains nothing: it waits, and
returns the ranks' metrics.json or raises :class:`LaunchFailed` with their exit code.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from peftlab.config import ConfigError, validate
from peftlab.distributed import free_port, rank
from peftlab.logs import quiet_libraries, quiet_other_ranks
from peftlab.rundir import RunRecord, amend_record, read_json

log = logging.getLogger("peftlab")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's


class LaunchFailed(RuntimeError):
    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def requested(cfg: DictConfig) -> bool:
    """Whether ``launcher.*`` asks for anything but this one process."""
    return cfg.launcher.num_processes != 1 or cfg.launcher.num_machines != 1


def check(cfg: DictConfig, shared_dir_given: bool = True) -> None:
    """One-line ConfigError for launcher settings that cannot work."""
    la = cfg.launcher
    for key in ("num_processes", "num_machines"):
        value = la[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"launcher.{key}={value} must be a whole number >= 1")
    n, machines = la.num_processes, la.num_machines
    if n % machines:
        raise ConfigError(
            f"launcher.num_processes={n} must be a multiple of launcher.num_machines={machines} "
            "(the same number of processes, one per GPU, on every machine)"
        )
    if not (isinstance(la.machine_rank, int) and 0 <= la.machine_rank < machines):
        raise ConfigError(
            f"launcher.machine_rank={la.machine_rank} must be 0..{machines - 1} (this machine's place among launcher.num_machines)"
        )
    if machines > 1 and not la.main_process_ip:
        raise ConfigError(
            f"launcher.num_machines={machines} needs launcher.main_process_ip=ADDRESS (machine 0's, reachable from all)"
        )
    if machines > 1 and not shared_dir_given:
        raise ConfigError(
            f"launcher.num_machines={machines} needs hydra.run.dir=PATH (hydra.sweep.dir=PATH with -m) on a filesystem "
            "all machines share, the same in every machine's command"
        )
    port = la.main_process_port
    if port is not None and not (isinstance(port, int) and 1024 <= port <= 65535):
        raise ConfigError(
            f"launcher.main_process_port={port} must be a port number 1024..65535, or null for a free one"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(
            f"launcher.num_processes={n} inside a launch of {world} processes (WORLD_SIZE={world}): "
            "start with python run.py launcher.num_processes=N, or with accelerate launch/torchrun/deepspeed/SLURM tasks, not both"
        )
    gpus = (
        torch.cuda.device_count()
    )  # the visible ones (CUDA_VISIBLE_DEVICES); none: the ranks run on the CPU
    if gpus and n // machines > gpus:
        raise ConfigError(
            f"launcher.num_processes={n} starts {n // machines} processes on this machine, one per GPU, but it has "
            f"{gpus} GPU(s) visible: use launcher.num_processes={gpus * machines}, or set CUDA_VISIBLE_DEVICES= "
            "to run them on the CPU"
        )
    machine_gpus(cfg)  # several "machines" on this one host: each needs GPUs of its own


def _is_this_host(address: str) -> bool:
    """Whether ``address`` (machine 0's) names this host: a loopback address or one of its interfaces'."""
    import ipaddress
    import socket

    import psutil

    try:
        ips = {info[4][0] for info in socket.getaddrinfo(address, None)}
    except OSError:
        return False
    own = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return any(ipaddress.ip_address(ip).is_loopback or ip in own for ip in ips)


def machine_gpus(cfg: DictConfig) -> str | None:
    """CUDA_VISIBLE_DEVICES for this machine's ranks when several "machines" of one run share this host
    (``launcher.num_machines`` > 1 with machine 0's address on this host, e.g. 127.0.0.1): machine m's
    k ranks take the visible GPUs m*k .. m*k+k-1, since each machine numbers its ranks' GPUs from 0 and
    two ranks of one run on one GPU fail in NCCL ("invalid usage"). None when nothing needs changing
    (one machine, another host, or no GPU). ConfigError when this host has too few GPUs."""
    la = cfg.launcher
    gpus = torch.cuda.device_count()
    if (
        la.num_machines == 1
        or not gpus
        or not la.main_process_ip
        or not _is_this_host(str(la.main_process_ip))
    ):
        return None
    k, m = la.num_processes // la.num_machines, la.machine_rank
    if (m + 1) * k > gpus:
        raise ConfigError(
            f"launcher.machine_rank={m} runs on the host of machine 0 (launcher.main_process_ip={la.main_process_ip}), "
            f"whose machines share its {gpus} GPU(s): machine {m} needs GPUs {m * k}..{(m + 1) * k - 1}; "
            "give each machine its own GPUs (fewer processes, or CUDA_VISIBLE_DEVICES=...), or set "
            "CUDA_VISIBLE_DEVICES= to run on the CPU"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(gpus)]
    return ",".join(ids[m * k : (m + 1) * k])


def command(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The ``accelerate launch`` command line that starts this machine's ranks."""
    la = cfg.launcher
    port = la.main_process_port or (29500 if la.num_machines > 1 else free_port())
    # --multi_gpu: N processes through torch.distributed.run, also on a machine without GPUs (gloo then)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(la.num_processes),
        "--num_machines",
        str(la.num_machines),
        "--machine_rank",
        str(la.machine_rank),
        "--main_process_port",
        str(port),
        "--mixed_precision",
        str(cfg.train.mixed_precision),
        "--dynamo_backend",
        "no",
    ]
    if la.main_process_ip:
        cmd += ["--main_process_ip", str(la.main_process_ip)]
    return [*cmd, "-m", "peftlab.launch", str(run_dir)]


def _dir_given() -> bool:
    """Whether the command line named the run (or sweep) directory, rather than the clock."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return True
    hydra = HydraConfig.get()
    key = "hydra.sweep.dir=" if hydra.mode == RunMode.MULTIRUN else "hydra.run.dir="
    return any(o.startswith(key) for o in hydra.overrides.hydra)


def relaunch(cfg: DictConfig) -> dict:
    """Parent: start this machine's ranks and wait; the run's metrics.json once they finished.

    Decides about the run directory as a rank would (``resume=auto``: a finished run is not redone; a
    checkpoint of another number of processes is refused) before writing anything into it."""
    from peftlab import checkpoint

    run_dir = Path(cfg.paths.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    first_machine = cfg.launcher.machine_rank == 0
    previous = checkpoint.previous_status(run_dir)
    action = "fresh"
    try:
        check(cfg, _dir_given())
        validate(cfg)
        if first_machine:
            action, _ = checkpoint.plan_resume(cfg, run_dir, world_size=cfg.launcher.num_processes)
    except ConfigError as e:
        if previous is None:  # else the directory keeps the earlier run's record
            RunRecord(run_dir, write=first_machine).finish("failed", error=str(e))
        raise
    if action == "skip":
        log.info(
            "%s already holds a finished run (metrics.json): nothing to do; use another hydra.run.dir (hydra.sweep.dir), "
            "or resume=never to run it again",
            run_dir,
        )
        return previous
    RunRecord(run_dir, write=first_machine)  # 'running' until rank 0 takes over the file
    if first_machine:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    for stale in run_dir.glob(".rank*.error"):
        stale.unlink(missing_ok=True)
    cmd = command(cfg, run_dir)
    log.info(
        "launching %d processes on %d machine(s): %s",
        cfg.launcher.num_processes,
        cfg.launcher.num_machines,
        shlex.join(cmd),
    )
    devices = machine_gpus(cfg)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices) if devices is not None else None
    code = subprocess.run(cmd, env=env).returncode
    errors = rank_errors(run_dir, remove=first_machine)
    see = f"see {run_dir / 'run.log'}"
    if not first_machine:  # machine 0 holds rank 0, which writes the records
        if code != 0:
            raise LaunchFailed(
                f"this machine's processes exited with code {code}: {_joined(errors) or see}", code
            )
        return {"status": "finished", "final": {}}
    metrics = read_json(run_dir / "metrics.json") or {}
    if code == 0:
        return metrics
    status = metrics.get("status")
    others = _joined({r: e for r, e in errors.items() if r != 0 and e != metrics.get("error")})
    if status in (
        "finished",
        "running",
    ):  # rank 0 could not record the failure, or recorded success before it
        when = (
            "after rank 0 recorded the run finished"
            if status == "finished"
            else "before rank 0 could record it"
        )
        metrics = amend_record(
            run_dir, status="failed", error=f"a process exited with code {code} {when}: {others or see}"
        )
    elif (
        status in ("failed", "interrupted") and others
    ):  # rank 0 failed as its peer vanished mid-collective, or was
        # stopped by the launcher's SIGTERM once another rank died: that other rank's error is the cause
        metrics = amend_record(run_dir, status="failed", error=f"{others} (rank 0: {metrics.get('error')})")
    raise LaunchFailed(
        f"{cfg.launcher.num_processes} processes, exit code {code}: {metrics.get('error') or 'see run.log'}",
        code,
    )


def rank_errors(run_dir: Path, remove: bool = True) -> dict[int, str]:
    """{rank: one-line error} that failed ranks left in RUN_DIR/.rank<N>.error (and ``remove`` them)."""
    errors = {}
    for path in run_dir.glob(".rank*.error"):
        try:
            errors[int(path.name[5:-6])] = path.read_text(encoding="utf-8").strip()
            if remove:
                path.unlink()
        except (OSError, ValueError):
            continue
    return dict(sorted(errors.items()))


def _joined(errors: dict[int, str]) -> str:
    return "; ".join(f"rank {r}: {e}" for r, e in errors.items())


def setup_logging(run_dir: Path) -> None:
    """A rank's log: the console and RUN_DIR/run.log, like Hydra's; warnings only below rank 0."""
    formatter = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "run.log")):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    quiet_other_ranks()


def main(argv: list[str] | None = None) -> int:
    """One rank: ``python -m peftlab.launch RUN_DIR`` (started by :func:`relaunch`)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "config.yaml").is_file():
        print(
            "usage: python -m peftlab.launch RUN_DIR   (RUN_DIR/config.yaml, written by python run.py launcher.num_processes=N)",
            file=sys.stderr,
        )
        return 2
    run_dir = Path(argv[0])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    setup_logging(run_dir)
    quiet_libraries()
    from peftlab.experiment import run

    try:
        run(cfg)
    except ConfigError as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        else:  # the launcher stops every rank once one exits: let rank 0 record the error first
            wait_for_record(run_dir)
        return 2
    except (
        Exception
    ) as e:  # for the parent: rank 0 alone writes metrics.json (SystemExit: a stop signal, recorded there)
        from peftlab.experiment import one_line

        (run_dir / f".rank{rank()}.error").write_text(one_line(e) + "\n", encoding="utf-8")
        raise
    return 0


def wait_for_record(run_dir: Path, timeout_s: float = 10.0) -> None:
    """Until RUN_DIR/metrics.json no longer says running (rank 0 recorded the end), at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (
        time.monotonic() < deadline and (read_json(run_dir / "metrics.json") or {}).get("status") == "running"
    ):
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
