"""The run directory: who owns it, and its records (metrics.json, predictions, versions).

A run owns its directory: a clock-named default is claimed atomically (runs started in the same
second get ``HH-MM-SS``, ``HH-MM-SS-1``, ...), a running run or sweep holds its directory's lock, and
a directory holding another run's record is refused before anything is written into it.

Everything a reader could take for a result is written to a temporary name and renamed, so a
killed run never leaves a half-written file; ``status`` moves running -> finished | failed |
diverged | oom | interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from hydra.experimental.callback import Callback

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "datasets",
    "hydra-core",
    "omegaconf",
    "peftlab",
)


def atomic_write(path: Path, text: str, durable: bool = True) -> None:
    """``text`` into ``path`` through a temporary file and a rename: readers see the old or the new
    content, never a part. ``durable`` also flushes it to disk first (survives a power cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yields a temporary folder beside ``path``; when the block succeeds it replaces ``path``
    (an earlier ``path`` is moved aside first and removed after), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old.{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> dict | None:
    """A JSON record, or None where it is missing or unreadable (e.g. truncated by a kill)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finite(value):
    """``value`` with every NaN/Infinity float, however deep in dicts, lists and tuples, as None:
    standard JSON has no such numbers (Python writes ``NaN``/``Infinity``, strict parsers refuse them).
    E.g. a diverged run's NaN loss, or Accelerate's ``steps_per_print=inf`` (DeepSpeed reads None as never)."""
    if isinstance(value, float):
        return value if value - value == 0 else None  # inf - inf and nan - nan are nan
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, data: dict, durable: bool = True) -> None:
    """Standard JSON (non-finite numbers as null, see :func:`finite`), written atomically."""
    atomic_write(path, json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n", durable)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


@functools.cache  # package metadata lookups cost ~0.1 s; a sweep asks once
def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def device_info() -> dict:
    import torch

    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    return info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def first_process(config) -> bool:
    """Whether this process speaks for the run: rank 0 (RANK unset: the only one), on machine 0 of
    ``launcher.*`` (the process that starts machine 0's ranks). It locks the directory and writes the records."""
    return (
        int(os.environ.get("RANK", "0")) == 0 and (config.get("launcher") or {}).get("machine_rank", 0) == 0
    )


def save_resolved_config(cfg, run_dir: Path) -> None:
    """config.yaml, resolved: also for a run that fails validation, so compare sees its real values."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.save(cfg, Path(run_dir) / "config.yaml", resolve=True)
    except OmegaConfBaseException:  # a mandatory value is missing: validate() names it next
        pass


def headline(metrics: dict) -> dict:
    """The figures every reader of a run shows (the run's last line, ``peftlab compare``, the benchmark):
    accuracy, macro_f1, val_accuracy (from ``final``); gpu_peak_mb (allocated) and cpu_peak_mb (RSS), the
    highest over all of the run's phases; s_per_step and tokens_per_s of training; time_to_first_step_s;
    wall_s. A figure the record lacks is None."""
    final, phases = metrics.get("final") or {}, metrics.get("phases") or {}
    train = phases.get("train") or {}

    def peak(key):
        found = [
            p.get(key)
            for p in phases.values()
            if isinstance(p, dict) and isinstance(p.get(key), (int, float))
        ]
        return max(found) if found else None

    return {
        "accuracy": final.get("accuracy"),
        "macro_f1": final.get("macro_f1"),
        "val_accuracy": final.get("val_accuracy"),
        "gpu_peak_mb": peak("gpu_peak_alloc_mb"),
        "gpu_peak_reserved_mb": peak("gpu_peak_reserved_mb"),
        "cpu_peak_mb": peak("cpu_peak_rss_mb"),
        "s_per_step": train.get("s_per_step"),
        "tokens_per_s": train.get("tokens_per_s"),
        "time_to_first_step_s": metrics.get("time_to_first_step_s"),
        "wall_s": metrics.get("wall_s"),
    }


def amend_record(run_dir: Path, **fields) -> dict:
    """metrics.json of ``run_dir`` with ``fields`` changed (e.g. a launcher's verdict on a run whose ranks died)."""
    metrics = read_json(Path(run_dir) / "metrics.json") or {}
    metrics.update(fields)
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


def failed_record(run_dir: Path, error: str) -> None:
    """metrics.json of a run refused before anything heavy loaded (no torch: no device figures)."""
    started = now()
    write_json(
        Path(run_dir) / "metrics.json",
        {
            "status": "failed",
            "error": error,
            "started": started,
            "run_dir": str(run_dir),
            "versions": dict(versions()),
            "device": {"host": platform.node(), "cpu_count": os.cpu_count()},
            "ended": started,
            "wall_s": 0.0,
        },
    )


class RunRecord:
    """metrics.json of one run; only the main process writes it."""

    def __init__(self, run_dir: Path, write: bool = True):
        self.path = Path(run_dir) / "metrics.json"
        self.write_enabled = write
        self.start = time.perf_counter()
        self.started_at = time.time()
        self.data: dict = {
            "status": "running",
            "error": None,
            "started": now(),
            "run_dir": str(run_dir),
            "versions": dict(versions()),
            "device": device_info(),
        }
        self.save()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save(durable=False)  # progress (per epoch): atomic, not worth an fsync each

    def finish(self, status: str, error: str | None = None, **fields) -> None:
        self.data.update(
            fields, status=status, error=error, ended=now(), wall_s=round(time.perf_counter() - self.start, 2)
        )
        self.save()

    def save(self, durable: bool = True) -> None:
        if self.write_enabled:
            write_json(self.path, self.data, durable)


# ----------------------------------------------------------------------------- owning a run directory

OWNER = ".owner"  # who claimed a clock-named directory: "host pid start" of the launching process
LOCK = ".lock"  # flock-ed by the run (or sweep) using the directory, while it runs
IGNORED_KEYS = ("resume", "checkpoint", "paths", "launcher")  # may change between a run and its resumption
_HELD: dict[str, int] = {}  # run directory -> file descriptor of its held lock (released at exit)


def _launcher_id() -> str:
    pid, started = launcher_process()
    return f"{platform.node()} {pid} {started:.3f}"


_LAUNCHER: list[tuple[int, float]] = []


def launcher_process() -> tuple[int, float]:
    """(pid, start time) of the process that launched this run: the launcher when this process is one
    rank of several (accelerate launch, torchrun and deepspeed start every rank of a machine as
    children of one process), else this process. The same in every rank of a machine, so
    ``hydra.run.dir`` names (and claims) one directory for all of them."""
    if not _LAUNCHER:
        pid, started = os.getpid(), time.time()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import psutil

            parent = psutil.Process().parent()
            if parent is not None:
                pid, started = parent.pid, parent.create_time()
        _LAUNCHER.append((pid, started))
    return _LAUNCHER[0]


def launch_started() -> float:
    """When this run was launched (see :func:`launcher_process`)."""
    return launcher_process()[1]


def claim_dir(path: str) -> str:
    """``path`` made this launch's own: ``path`` itself when it is free, else ``path-1``, ``path-2``, ...

    A directory is claimed atomically (a temporary folder holding ``.owner`` is renamed onto the
    name; rename fails when another run got there first), so runs started in the same second never
    share one. The ranks of one launch (children of one accelerate launch / torchrun / deepspeed
    process) have the same owner and so agree on the same directory. Used for the clock-named
    defaults of ``hydra.run.dir`` and ``hydra.sweep.dir`` (``${claim_dir:...}``); a directory the user
    names is used as named (see :class:`RunDirGuard`).
    """
    me, base = _launcher_id(), Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        if _owner(candidate) == me or _try_claim(candidate, me):
            return str(candidate)
    raise RuntimeError(f"no free directory next to {base}")


def _owner(folder: Path) -> str | None:
    try:
        return (folder / OWNER).read_text(encoding="utf-8")
    except OSError:
        return None


def _try_claim(folder: Path, me: str) -> bool:
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.claim-"))
    try:
        (tmp / OWNER).write_text(me, encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.rename(tmp, folder)  # atomic; fails if folder exists and is not empty
        return True
    except OSError:
        return _owner(folder) == me  # another rank of this launch may have claimed it meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DirectoryInUse(RuntimeError):
    """Another live process holds the run (or sweep) directory's lock."""


def hold(folder: Path) -> None:
    """Lock ``folder`` for this process until it exits (``flock``, released by the kernel when the
    process dies, so a killed run leaves no stale lock). Raises DirectoryInUse naming the holder."""
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _HELD:
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DirectoryInUse(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} since {now()}".encode(), 0)
    _HELD[key] = fd


def release(folder: Path) -> None:
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)


def config_differences(cfg, saved, resolve: bool = True) -> list[str]:
    """Keys whose value differs between two run configs (a DictConfig and a dict read with
    ``yaml.safe_load``, never instantiated), ignoring ``hydra`` and the keys a resumed run may change
    (IGNORED_KEYS). ``resolve``: compare ``cfg`` resolved (``saved`` is a resolved config.yaml)."""
    from omegaconf import OmegaConf

    kept = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in (*IGNORED_KEYS, "hydra")])
    now_values = OmegaConf.to_container(kept, resolve=resolve)
    now_values = json.loads(json.dumps(now_values, default=str))
    saved = json.loads(json.dumps(saved or {}, default=str))
    keys = sorted((set(now_values) | set(saved)) - {*IGNORED_KEYS, "hydra"})
    return [d for k in keys for d in _diff(now_values.get(k), saved.get(k), k)]


def _diff(a, b, key: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [key]


def read_yaml(path: Path):
    """Parsed YAML, or None where it is missing or unreadable. Safe loader: never builds Python objects
    (``_target_`` and ``${...}`` stay plain strings)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def check_run_dir(config, run_dir: Path, sweep: bool) -> None:
    """Whether this run (``sweep``: this sweep) may use ``run_dir``; ValueError with one line if not.

    - it must be writable;
    - no other live run or sweep may be using it (its lock);
    - if it holds an earlier run's record (a sweep's ``multirun.yaml``), that run's settings must be
      these (then ``resume=auto`` continues or skips it); otherwise this run would mix its records
      with the earlier one's, so it is refused and nothing in the directory is touched.
    """
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(run_dir, os.W_OK)
        probe = tempfile.TemporaryFile(
            dir=run_dir
        )  # root ignores permission bits; a read-only mount does not
        probe.close()
    except OSError as e:
        raise ValueError(
            f"cannot write {key}={run_dir} ({e.strerror or e}); choose a writable {key}"
        ) from None
    if not writable:
        raise ValueError(f"cannot write {key}={run_dir} (permission denied); choose a writable {key}")
    if sweep:  # read-only checks first: a refused run leaves even the lock file as it was
        _check_same_sweep(config, run_dir, key)
    elif config.get("resume") == "auto" and _worth_keeping(run_dir):
        saved = read_yaml(run_dir / "config.yaml")
        differs = config_differences(config, saved) if saved is not None else []
        if differs:
            raise ValueError(
                f"{key}={run_dir} holds a run with other settings ({', '.join(differs[:5])}); "
                f"choose another {key}, or resume=never to start it over"
            )
    if first_process(
        config
    ):  # one lock per run: its rank 0, or the process that starts machine 0's ranks (launcher.*)
        try:
            hold(run_dir)
        except DirectoryInUse as e:
            raise ValueError(
                f"{key}={run_dir} is in use by another {'sweep' if sweep else 'run'} ({e}); "
                f"wait for it to end, or choose another {key}"
            ) from None


def _worth_keeping(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run or a checkpoint: what another run there would destroy. A run
    that failed before its first checkpoint (a config error, say) is started over by its corrected command."""
    finished = (read_json(run_dir / "metrics.json") or {}).get("status") == "finished"
    return finished or any(run_dir.glob("checkpoints/step_*/trainer_state.json"))


def _sweep_overrides(overrides) -> list[str]:
    """A sweep's task overrides that decide its jobs' settings (not resume/checkpoint/paths/launcher)."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] not in IGNORED_KEYS]


def _check_same_sweep(config, sweep_dir: Path, key: str) -> None:
    """A sweep directory holding an earlier sweep (its ``multirun.yaml``) is reused only by the same
    sweep: same overrides, same config; otherwise its jobs' records would mix with this sweep's."""

    old = read_yaml(sweep_dir / "multirun.yaml")
    if not isinstance(old, dict) or not any(
        _worth_keeping(job) for job in sweep_dir.iterdir() if job.is_dir()
    ):
        return  # no sweep there, or none of its jobs finished or checkpointed: nothing to lose
    before = _sweep_overrides(((old.get("hydra") or {}).get("overrides") or {}).get("task") or [])
    after = _sweep_overrides(list(config.hydra.overrides.task))
    if before != after:
        raise ValueError(
            f"{key}={sweep_dir} holds a sweep with other overrides ({' '.join(before) or 'none'}; now "
            f"{' '.join(after) or 'none'}); choose another {key}, or repeat its overrides to resume it"
        )
    differs = config_differences(config, old, resolve=False)  # multirun.yaml holds the config as written
    if differs:
        raise ValueError(
            f"{key}={sweep_dir} holds a sweep of other settings ({', '.join(differs[:5])}); "
            f"choose another {key}"
        )


class RunDirGuard(Callback):
    """Hydra callback (conf/config.yaml ``hydra.callbacks``): before Hydra writes anything into the
    run directory (``.hydra/``, the log) or the sweep directory (``multirun.yaml``), check that this
    run may use it (:func:`check_run_dir`); if not, one line on stderr and exit 2, the directory
    untouched. Reading ``hydra.run.dir``/``hydra.sweep.dir`` here also claims a clock-named default."""

    def on_run_start(self, config, **kwargs) -> None:
        _guard(config, config.hydra.run.dir, sweep=False)

    def on_multirun_start(self, config, **kwargs) -> None:
        _guard(config, config.hydra.sweep.dir, sweep=True)


def _guard(config, folder: str, sweep: bool) -> None:
    try:
        check_run_dir(config, Path(folder), sweep)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- reading run directories


def natural_key(text: str) -> list[tuple[int, int, str]]:
    """Sort key that orders embedded numbers numerically: 'job2' < 'job10'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text) if t]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory: it holds metrics.json or Hydra's ``.hydra/``."""
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def _subdirs(path: Path) -> list[Path]:
    """Visible, non-symlinked child directories, numeric-aware sorted."""
    try:
        children = [
            p for p in path.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        ]
    except OSError:
        return []
    return sorted(children, key=lambda p: natural_key(p.name))


def _walk_runs(path: Path):
    if is_run_dir(path):
        yield path
        return
    for child in _subdirs(path):
        yield from _walk_runs(child)


def find_runs(paths) -> list[Path]:
    """Run directories at or below ``paths`` (a file stands for its folder), resolved, in argument order,
    each path's runs sorted numeric-aware (``2`` before ``10``), each run once.
    Raises FileNotFoundError (message: the path) for a path that does not exist."""
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(str(raw))
        path = path.resolve()
        for run in _walk_runs(path.parent if path.is_file() else path):
            if run not in runs:
                runs.append(run)
    return runs


def read_record(run_dir: Path) -> tuple[dict | None, str]:
    """(metrics.json as a dict, status): status is the record's own, ``unknown`` when it states none,
    ``missing`` (no metrics.json; the dict is None) or ``corrupt`` (unreadable or not a JSON object: None)."""
    file = Path(run_dir) / "metrics.json"
    if not file.is_file():
        return None, "missing"
    data = read_json(file)
    if not isinstance(data, dict):
        return None, "corrupt"
    status = data.get("status")
    return data, status if isinstance(status, str) and status else "unknown"


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def read_config(run_dir: Path) -> dict:
    """The run's resolved config.yaml, else Hydra's unresolved ``.hydra/config.yaml``, else {}."""
    for candidate in (Path(run_dir) / "config.yaml", Path(run_dir) / ".hydra" / "config.yaml"):
        data = read_yaml(candidate)
        if isinstance(data, dict):
            return data
    return {}


def read_choices(run_dir: Path) -> dict[str, str]:
    """The option chosen in each config group (``peft: lora``), from Hydra's record of the run
    (``.hydra/hydra.yaml``); Hydra's own groups (``hydra/...``) and nested groups left out."""
    hydra = read_yaml(Path(run_dir) / ".hydra" / "hydra.yaml")
    choices = _dict(_dict(_dict(hydra).get("hydra")).get("runtime")).get("choices")
    return {
        str(k): v for k, v in _dict(choices).items() if "/" not in str(k) and not str(k).startswith("hydra")
    }


def load_run(path) -> dict:
    """Everything a reader of one run directory shows, read without executing anything from it.

    Keys: path (Path), config (nested dict, {} when none), choices (config group -> option), overrides
    (list of str), metrics (dict or None), status (str, see :func:`read_record`), error (str or None)."""
    path = Path(path)
    overrides = read_yaml(path / ".hydra" / "overrides.yaml")
    metrics, status = read_record(path)
    error = metrics.get("error") if metrics else None
    return {
        "path": path,
        "config": read_config(path),
        "choices": read_choices(path),
        "overrides": [str(o) for o in overrides] if isinstance(overrides, list) else [],
        "metrics": metrics,
        "status": status,
        "error": error if isinstance(error, str) and error.strip() else None,
    }
