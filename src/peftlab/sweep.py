"""Hydra multirun support: progress per job, a summary at the end, and the sweep's exit code.

``SweepSummary`` is a Hydra callback (registered in conf/config.yaml under ``hydra.callbacks``).
Jobs run in one process with the basic launcher; each starts from a fresh Accelerator/DeepSpeed
state and its run directory records its own status, so a failed job never stops the sweep.
At the end the callback reads every job's metrics.json, prints one summary line, writes
``sweep.json`` into the sweep directory and exits non-zero when any job did not finish.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from peftlab.rundir import read_json

log = logging.getLogger("peftlab")
TOTAL_ENV = "PEFTLAB_SWEEP_TOTAL"


def sweep_size(overrides: list[str]) -> int:
    """How many jobs the basic sweeper makes of command-line ``overrides`` (Hydra's own parser: ``a=1,2``,
    ``range(...)``, ...). Raises what Hydra raises for overrides only a sweeper can expand (``interval``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in parsed)


def count_jobs(config: DictConfig) -> int | None:
    """Number of jobs a basic-sweeper multirun will launch (None when the sweeper decides, e.g. Optuna)."""
    sweeper = config.hydra.sweeper.get("_target_", "")
    if "optuna" in sweeper.lower():
        return config.hydra.sweeper.get("n_trials")
    try:
        return sweep_size(list(config.hydra.overrides.task))
    except Exception:  # interval sweeps and the like: the sweeper alone knows
        return None


def job_banner(config: DictConfig) -> str:
    """'job 3/9: peft.r=8 peft.lora_alpha=16'."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    total = os.environ.get(TOTAL_ENV) or "?"
    return f"job {hydra.job.num + 1}/{total}: {' '.join(hydra.overrides.task) or '(no overrides)'}"


def read_jobs(sweep_dir: Path) -> list[dict]:
    found = sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name))
    return [read_json(p) or {"status": "corrupt", "run_dir": str(p.parent)} for p in found]


def started_before(job: dict, moment: float) -> bool:
    """Whether the job's record was started before ``moment`` (a time.time()), i.e. by an earlier
    invocation of the sweep: ``started`` is whole seconds, so one second of slack. A job this
    invocation ran or resumed has a new record (its ``started`` and phases are this invocation's)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(job["started"]).timestamp() < moment - 1
    except (KeyError, TypeError, ValueError):
        return False


def summarize(jobs: list[dict], wall_s: float, now: float | None = None) -> dict:
    """The sweep's summary; ``wall_s`` is this invocation's time, ending ``now`` (time.time()). Jobs a
    sweep run again skipped (finished earlier) count in the statuses, not in train_eval_s: their phases
    ran before this invocation's wall time."""
    statuses = [j.get("status", "unknown") for j in jobs]
    start = (time.time() if now is None else now) - wall_s
    earlier = [j for j in jobs if started_before(j, start)]
    ran = [j for j in jobs if not started_before(j, start)]
    in_jobs = round(
        sum(
            (j.get("phases", {}).get(p, {}).get("wall_s") or 0)
            for j in ran
            for p in ("train", "eval", "validation")
        ),
        2,
    )
    wall_s = round(wall_s, 2)  # the share is computed from the figures the record shows
    return {
        "jobs": len(jobs),
        "finished": statuses.count("finished"),
        "not_finished": len(jobs) - statuses.count("finished"),
        "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "wall_s": wall_s,
        "ran": len(ran),
        "skipped_finished": sum(j.get("status") == "finished" for j in earlier),
        "train_eval_s": in_jobs,
        "outside_train_eval": round(1 - in_jobs / wall_s, 4) if wall_s else None,
        "failed": [
            {"run_dir": j.get("run_dir"), "status": j.get("status"), "error": j.get("error")}
            for j in jobs
            if j.get("status") != "finished"
        ],
    }


def compose_each_job_once(loader) -> None:
    """Hydra composes every job's config twice: when the sweeper checks a batch
    (``validate_batch_is_legal``) and again when the launcher starts the job (~70 ms each, a
    quarter of a tiny job's own overhead). Keep the checked config and hand it to the launcher.

    A kept config is handed out only while no launcher has claimed it (``hydra.job.id`` still
    unset), so a sweeper that skips the check, or repeats overrides, still gets a fresh one.
    """
    compose = loader.load_sweep_config
    checked: dict[tuple, DictConfig] = {}

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = tuple(sweep_overrides)
        kept = checked.pop(key, None)
        if kept is not None and OmegaConf.is_missing(kept.hydra.job, "id"):
            return kept
        config = compose(master_config, sweep_overrides)
        checked[key] = config
        return config

    loader.load_sweep_config = load_sweep_config


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.start = time.perf_counter()
        from hydra.core.global_hydra import GlobalHydra

        if GlobalHydra.instance().is_initialized():
            compose_each_job_once(GlobalHydra.instance().config_loader())
        total = count_jobs(config)
        if total:
            os.environ[TOTAL_ENV] = str(total)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarize(
            read_jobs(sweep_dir), time.perf_counter() - getattr(self, "start", time.perf_counter())
        )
        (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
        share = summary["outside_train_eval"]
        skipped = (
            f", {summary['skipped_finished']} skipped as already finished"
            if summary.get("skipped_finished")
            else ""
        )
        log.info(
            "sweep %s: %d jobs, %d finished, %d not finished %s%s | %.0f s, %s outside the jobs' train/eval phases",
            sweep_dir,
            summary["jobs"],
            summary["finished"],
            summary["not_finished"],
            summary["statuses"],
            skipped,
            summary["wall_s"],
            f"{share:.0%}" if share is not None else "n/a",
        )
        for job in summary["failed"]:
            log.error("  %s: %s %s", job["run_dir"], job["status"], job["error"] or "")
        os.environ.pop(TOTAL_ENV, None)
        if summary["not_finished"]:
            sys.exit(1)


# ----------------------------------------------------------------------------- jobs side by side on Ray

RAY_EXTRA = "pip install -e '.[ray]'"


def ray_missing() -> list[str]:
    """The modules ``hydra/launcher=ray`` needs that are not installed (the ``ray`` extra)."""
    import importlib.util

    missing = []
    for module in ("ray", "hydra_plugins.hydra_ray_launcher"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def local_gpus() -> int:
    """GPUs a local Ray instance would find here (Ray's own count: CUDA_VISIBLE_DEVICES, else the devices)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    visible = manager.get_current_process_visible_accelerator_ids()
    return len(visible) if visible is not None else manager.get_current_node_num_accelerators()


def prepare_local_ray(launcher: DictConfig) -> None:
    """Before ``import ray``, for a Ray instance this sweep starts itself (``ray.init.address`` local or null):

    - its servers (GCS, raylet, workers, the dashboard agent) listen on the loopback address only. Ray 2.60
      turns ``_node_ip_address=127.0.0.1`` into the machine's routable address and then binds all
      interfaces; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read at ``import ray``) the node address
      is 127.0.0.1 and every server binds to it;
    - Ray's token authentication stays on (``RAY_AUTH_MODE=token``; Ray makes ~/.ray/auth_token if
      missing), also where the environment turned it off.
    Joining a cluster (``address: auto`` or host:port) changes nothing: that cluster's settings apply.
    """
    if launcher.ray.init.get("address") not in (None, "local"):
        return
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            log.warning("ray was imported before the sweep: its local instance listens on all interfaces")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        log.warning(
            "RAY_AUTH_MODE=%s ignored: the sweep's own Ray instance keeps token authentication on",
            os.environ["RAY_AUTH_MODE"],
        )
    os.environ["RAY_AUTH_MODE"] = "token"


def join_cluster(launcher: DictConfig) -> str | None:
    """Joining a running cluster (``ray.init.address`` auto or host:port): connect now, as the launcher would
    (it then finds Ray running and uses this connection), and return one line when no job can run there:
    no cluster at that address, or jobs asking for more GPUs or CPUs than any one node has, which Ray
    would otherwise keep pending forever without a word (a ``ray start`` cluster of CPUs and the preset's
    one GPU a job). None when the jobs fit."""
    import ray

    try:
        ray.init(**OmegaConf.to_container(launcher.ray.init, resolve=True))
    except (ConnectionError, RuntimeError, ValueError) as error:
        address = launcher.ray.init.get("address")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (
            f"hydra.launcher.ray.init.address={address}: no Ray cluster joined ({first[:200]}); start one with "
            "`ray start --head` (then `ray start --address=HEAD:6379` on the other nodes), or name it with "
            "hydra.launcher.ray.init.address=HOST:PORT"
        )
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    remote = launcher.ray.remote
    for key, asked in (("GPU", remote.get("num_gpus") or 0), ("CPU", remote.get("num_cpus") or 0)):
        most = max((r.get(key, 0) for r in nodes), default=0)
        if asked > most:
            name = f"hydra.launcher.ray.remote.num_{key.lower()}s"
            fix = f"{name}=0 for a cluster without GPUs" if key == "GPU" and not most else f"{name}<={most:g}"
            return (
                f"{name}={asked:g}: no node of the Ray cluster has {asked:g} {key}s (the most on one node: "
                f"{most:g}), so no job would ever start; use {fix}"
            )
    return None


def running_jobs(sweep_dir: Path, since: float) -> int:
    """Jobs of this sweep whose records say running, written since ``since`` (older ones were left
    running by an interrupted earlier invocation)."""
    count = 0
    for path in sweep_dir.glob("*/metrics.json"):
        try:
            if path.stat().st_mtime >= since and (read_json(path) or {}).get("status") == "running":
                count += 1
        except OSError:
            pass
    return count


def worker_reuse_safe(job_gpus: float, instance_gpus: int | None) -> bool:
    """Whether one Ray worker process may run several GPU jobs one after the other (``max_calls=0``).

    A job initialises CUDA in its worker on the GPUs that Ray's ``CUDA_VISIBLE_DEVICES`` names for it,
    and the process keeps them: Ray sets another ``CUDA_VISIBLE_DEVICES`` for a worker's next task, but
    a CUDA context already made does not follow, so that job would run on the first job's GPU. Safe when
    only one set of GPUs can be assigned: jobs without GPUs, or a Ray instance of this machine whose
    ``instance_gpus`` a job's ``job_gpus`` (a fraction, or whole GPUs) leave no choice among (one GPU;
    or jobs that take all of them). ``instance_gpus`` None (a cluster: GPUs per node unknown): not safe."""
    if not job_gpus:
        return True
    return instance_gpus is not None and instance_gpus <= math.ceil(job_gpus)


_worker_gpus: str | None = None  # CUDA_VISIBLE_DEVICES of the job that initialised CUDA in this Ray worker


def check_worker_gpus() -> None:
    """In a Ray worker, before a job: RuntimeError when this process initialised CUDA for an earlier job
    on other GPUs than Ray assigned this one (see :func:`worker_reuse_safe`), so it never runs there."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if _worker_gpus is not None and visible != _worker_gpus:
        raise RuntimeError(
            f"this Ray worker ran an earlier job on GPU(s) {_worker_gpus!r} and keeps them, but Ray assigned "
            f"this job GPU(s) {visible!r}: set hydra.launcher.ray.remote.max_calls=1 (a fresh worker per job)"
        )


def note_worker_gpus() -> None:
    """After a job in a Ray worker: the GPUs CUDA was initialised on, once it is."""
    global _worker_gpus
    torch = sys.modules.get("torch")
    if _worker_gpus is None and torch is not None and torch.cuda.is_initialized():
        _worker_gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")


class RaySweep(Callback):
    """Hydra callback of the Ray launcher presets (conf/hydra/launcher/ray*.yaml, hydra-ray-launcher).

    In the launching process, before the launcher exists: without the ``ray`` extra, one line and exit 2;
    a local Ray instance is made loopback-only with token authentication (:func:`prepare_local_ray`);
    ``num_gpus: null`` becomes ``launcher.num_processes`` GPUs a job where this machine has GPUs, else 0;
    ``max_calls: null`` becomes 0 (a worker runs job after job, keeping imports and the caches of data,
    tokenizer and base weights) where :func:`worker_reuse_safe`, else 1 (a fresh worker per job), and
    another value where it is not safe is refused in one line; Ray's log deduplication is turned off (it would fold the ``job i/n`` lines of different jobs into one).
    In each job's Ray worker (this object travels with the job): the sweep's job count for ``job i/n``,
    and a ``job i/n <status>`` line as the job ends, with the number of jobs still running; a job Ray gave
    other GPUs than the ones its reused worker holds is refused (:func:`check_worker_gpus`).
    At the end the sweep's own Ray instance is shut down (and by Ray's atexit hook on Ctrl-C or an error).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        missing = ray_missing()
        if missing:
            print(
                f"error: hydra/launcher={config.hydra.runtime.choices.get('hydra/launcher', 'ray')} needs the "
                f"ray extra ({', '.join(missing)} not installed): {RAY_EXTRA}",
                file=sys.stderr,
            )
            sys.exit(2)
        self.total, self.since = count_jobs(config), time.time()
        launcher = config.hydra.launcher
        prepare_local_ray(launcher)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        from omegaconf import open_dict, read_write

        remote, local = launcher.ray.remote, launcher.ray.init.get("address") in (None, "local")
        gpus = launcher.ray.init.get("num_gpus")
        gpus = local_gpus() if gpus is None else gpus  # this machine's, for this sweep's own instance
        with read_write(launcher), open_dict(launcher):
            if remote.get("num_gpus", 0) is None:
                remote.num_gpus = config.launcher.num_processes if gpus else 0
            safe = worker_reuse_safe(remote.get("num_gpus") or 0, gpus if local else None)
            if remote.get("max_calls") is None:
                remote.max_calls = 0 if safe else 1
            elif remote.max_calls != 1 and not safe:
                where = (
                    f"this Ray instance's {gpus} GPUs"
                    if local
                    else "a cluster's nodes (GPUs per node unknown here)"
                )
                print(
                    f"error: hydra.launcher.ray.remote.max_calls={remote.max_calls} lets a Ray worker run several jobs, "
                    f"but jobs of num_gpus={remote.num_gpus} on {where} can be given other GPUs than the ones a reused "
                    "worker keeps: use max_calls=1, or null (peftlab reuses workers where it is safe)",
                    file=sys.stderr,
                )
                sys.exit(2)
        problem = None if local else join_cluster(launcher)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        check_worker_gpus()
        if getattr(self, "total", None):
            os.environ[TOTAL_ENV] = str(self.total)  # a worker on another machine has not inherited it

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        note_worker_gpus()
        hydra = HydraConfig.get()
        job_dir = Path(hydra.runtime.output_dir)
        status = (read_json(job_dir / "metrics.json") or {}).get("status", "no record")
        running = running_jobs(job_dir.parent, getattr(self, "since", 0.0))
        log.info(
            "job %d/%s %s: %s | %d running",
            hydra.job.num + 1,
            self.total or "?",
            status,
            " ".join(hydra.overrides.task) or "(no overrides)",
            running,
        )
        if (
            not running
        ):  # maybe the last job: Ray forwards workers' output with a delay (its log monitor polls
            time.sleep(
                1.0
            )  # files), and output not forwarded when the sweep ends Ray never reaches the terminal

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
