"""Per-phase wall time and memory peaks, measured without a polling thread.

GPU: the allocator's own peak counters, reset at the start of each phase.
CPU: the kernel's peak resident set size (VmHWM), reset per phase through /proc/self/clear_refs;
where that file is not writable the peak is the process's peak so far (and says so).
The guide's busy-wait thread instead spins a core and cost ~30% of step time on an H100.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch

MB = 2**20


def _vm_hwm_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseMeter:
    """``with meter.phase("train"): ...`` records wall_s and peaks into ``meter.phases["train"]``, and when
    the phase started and ended (``start_time``, ``end_time``: Unix seconds, the first entry's start and the
    last one's end), so that jobs run side by side can be seen to overlap."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.cuda = torch.cuda.is_available()

    @contextmanager
    def phase(self, name: str):
        synchronize()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        per_phase = _reset_cpu_peak()
        start = time.perf_counter()
        record = self.phases.setdefault(name, {})
        record.setdefault("start_time", round(time.time(), 3))
        try:
            yield record
        finally:
            synchronize()
            record["wall_s"] = round(record.get("wall_s", 0.0) + time.perf_counter() - start, 3)
            record["end_time"] = round(time.time(), 3)
            record["gpu_peak_alloc_mb"] = (
                round(torch.cuda.max_memory_allocated() / MB, 1) if self.cuda else None
            )
            record["gpu_peak_reserved_mb"] = (
                round(torch.cuda.max_memory_reserved() / MB, 1) if self.cuda else None
            )
            peak = round(_vm_hwm_mb(), 1)
            record["cpu_peak_rss_mb"] = max(peak, record.get("cpu_peak_rss_mb") or 0.0)
            record["cpu_peak_scope"] = "phase" if per_phase else "process"


class StepClock:
    """Per-step durations without a host sync per step: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.marks: list = []

    def tick(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds between consecutive ticks (synchronizes once)."""
        if len(self.marks) < 2:
            return []
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def gpu_allocated_mb() -> float | None:
    """GPU memory held by tensors now (``torch.cuda.memory_allocated``), None without a GPU; no sync, cheap."""
    return round(torch.cuda.memory_allocated() / MB, 1) if torch.cuda.is_available() else None


def release_failed_job(error: BaseException | None) -> None:
    """What a failed job's exception (and the exceptions chained to it) still holds, let go.

    Its traceback's frames hold the job's locals (model, optimizer, Accelerator, DeepSpeed engine), and
    whoever keeps the exception after the job (Hydra's JobReturn, a logging handler that keeps records,
    pytest, ``sys.last_exc`` in a notebook) would keep them, on the GPU, through the next jobs. The failed
    training never reached its own cleanup, so each Accelerator found in those frames gets it here
    (``free_memory()``: the DeepSpeed engine's ``destroy()`` removes the gradient hooks whose closures hold
    the engine from inside autograd, where the garbage collector cannot see them), then the finished
    frames are cleared. A cleared frame still keeps the function it ran, so a closure that one of the failed
    calls made and that failed inside itself would keep what it closes over (``predict`` over ``model`` in
    ``fit.fit``, torch's per-call ``Module._call_impl.<locals>.inner`` over the module): the cells of
    closures made by the traceback's own frames are emptied too. The traceback still reads the same (files,
    lines, functions); frames still running are left as they are.
    """
    import gc
    import traceback
    import types

    from accelerate import Accelerator

    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        frames = [
            frame for frame, _ in traceback.walk_tb(e.__traceback__) if frame.f_code.co_name != "<module>"
        ]
        made_here = {c for frame in frames for c in frame.f_code.co_consts if isinstance(c, types.CodeType)}
        for frame in frames:
            running = [
                f for f in gc.get_referents(frame) if isinstance(f, types.FunctionType)
            ]  # the frame's function
            for value in [*frame.f_locals.values(), *running]:
                if isinstance(value, Accelerator) and id(value) not in seen:
                    seen.add(id(value))
                    value.free_memory()
                elif isinstance(value, types.FunctionType) and value.__code__ in made_here:
                    for cell in value.__closure__ or ():  # a closure the failed calls made for themselves
                        cell.cell_contents = None
        traceback.clear_frames(e.__traceback__)
        for frame in frames:
            frame.f_locals  # noqa: B018  reading f_locals above left a copy of them on the frame; reading it again drops it
        stack += [e.__cause__, e.__context__]


def free_job_memory() -> None:
    """After a job has let go of its objects: collect their reference cycles (a DeepSpeed engine and its model
    hold each other through hooks), so that they are freed now and not frozen into the permanent generation
    by the next job's ``gc.freeze()`` (peftlab.cli), and return the freed blocks of the device's cache."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
    if torch.cuda.is_available():  # cuBLAS's per-stream workspaces (~32 MB each on Hopper) come from the
        torch._C._cuda_clearCublasWorkspaces()  # same allocator: a job's first matmul makes them, none frees them
