"""The run directory's records: metrics.json (status, figures), predictions, versions.

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
import shutil
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "hydra-core", "omegaconf", "peftlab")


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
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    return info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """metrics.json of one run; only the main process writes it."""

    def __init__(self, run_dir: Path, write: bool = True):
        self.path = Path(run_dir) / "metrics.json"
        self.write_enabled = write
        self.start = time.perf_counter()
        self.started_at = time.time()
        self.data: dict = {"status": "running", "error": None, "started": now(), "run_dir": str(run_dir),
                           "versions": dict(versions()), "device": device_info()}
        self.save()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save(durable=False)  # progress (per epoch): atomic, not worth an fsync each

    def finish(self, status: str, error: str | None = None, **fields) -> None:
        self.data.update(fields, status=status, error=error, ended=now(), wall_s=round(time.perf_counter() - self.start, 2))
        self.save()

    def save(self, durable: bool = True) -> None:
        if self.write_enabled:
            write_json(self.path, self.data, durable)
