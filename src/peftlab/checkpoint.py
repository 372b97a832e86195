"""Checkpoints for resuming a run, and the decisions ``resume=auto`` makes about a run directory.

A checkpoint is ``<run_dir>/checkpoints/step_N/``: Accelerate's ``save_state`` (model, optimizer,
scheduler, RNG states; under DeepSpeed the engine's own checkpoint, ZeRO partitions and offloaded
optimizer states included) plus ``trainer_state.json`` with the data position (epoch, batches of
that epoch already seen, optimizer step), the losses of the unfinished epoch and the history so far.
It is written into ``.step_N.tmp/`` and renamed, so ``step_N/`` is always complete; the last
``checkpoint.keep_last`` are kept, and all are removed when the run finishes.

Only JSON and YAML are read from a run directory, with safe loaders: nothing in it is instantiated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig

from peftlab import rundir
from peftlab.config import ConfigError
from peftlab.rundir import read_json, write_json

log = logging.getLogger("peftlab")
STATE = "trainer_state.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(folder, trainer state) of the newest complete checkpoint, or None."""
    found = []
    for folder in checkpoints_dir(run_dir).glob("step_*"):
        state = read_json(folder / STATE)
        if state is not None:
            found.append((state["step"], folder, state))
    return max(found, key=lambda f: f[0])[1:] if found else None


def clear(run_dir: Path) -> None:
    shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)


def previous_status(run_dir: Path) -> dict | None:
    """The run directory's metrics.json, if it has a readable one."""
    return read_json(Path(run_dir) / "metrics.json")


def config_differences(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Keys whose value differs between ``cfg`` and the run directory's config.yaml (read with
    yaml.safe_load: never instantiated); empty when they agree or there is no config.yaml."""
    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return rundir.config_differences(cfg, saved)


def plan_resume(
    cfg: DictConfig, run_dir: Path, world_size: int | None = None
) -> tuple[str, tuple[Path, dict] | None]:
    """What to do with this run directory: ('skip', None) for a finished run under resume=auto,
    ('resume', (folder, state)) when it has a checkpoint, else ('fresh', None). Raises ConfigError
    when a checkpoint belongs to a different config, or to another number of processes than
    ``world_size`` (default: this process's WORLD_SIZE)."""
    mode = cfg.resume
    if mode not in ("auto", "never"):
        raise ConfigError(f"resume={mode} must be auto or never")
    if mode == "never":
        clear(run_dir)
        return "fresh", None
    previous = previous_status(run_dir)
    found = latest(run_dir)
    if previous is None and found is None:
        return "fresh", None
    differs = config_differences(cfg, run_dir)
    if differs and previous is not None and previous.get("status") == "finished":
        raise ConfigError(
            f"{run_dir} holds a finished run with other settings ({', '.join(differs[:5])}); "
            "use another hydra.run.dir, or resume=never to start this directory over"
        )
    if previous is not None and previous.get("status") == "finished":
        return "skip", None
    if found is None:
        return "fresh", None
    if differs:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a run with other settings ({', '.join(differs[:5])}); "
            "use another hydra.run.dir, or resume=never to start this directory over"
        )
    check_world_size(found, run_dir, world_size)
    return "resume", found


def check_world_size(found: tuple[Path, dict], run_dir: Path, world_size: int | None = None) -> None:
    """A checkpoint resumes only with the number of processes that wrote it: its data position counts
    batches per process and DeepSpeed's ZeRO partitions are per rank (not resharded here)."""
    saved = found[1].get("world_size")  # None: written before it was recorded
    now = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if saved is not None and saved != now:
        raise ConfigError(
            f"{found[0]} was written by {saved} processes and this run has {now} "
            f"(launcher.num_processes={now}): resume with launcher.num_processes={saved}, "
            "or resume=never to start this directory over"
        )


class Checkpointer:
    """Saves and restores the training state at the configured interval (every rank calls it)."""

    def __init__(
        self, accelerator, run_dir: Path, every_steps: int = 0, every_epochs: int = 0, keep_last: int = 1
    ):
        self.accelerator = accelerator
        self.dir = checkpoints_dir(run_dir)
        self.every_steps, self.every_epochs, self.keep_last = (
            every_steps or 0,
            every_epochs or 0,
            max(1, keep_last or 1),
        )
        self.last: Path | None = None

    def due(self, step: int, epochs_done: int | None = None) -> bool:
        """A checkpoint is due after optimizer step ``step`` (or at the end of epoch number ``epochs_done``)."""
        by_step = self.every_steps > 0 and step % self.every_steps == 0
        by_epoch = epochs_done is not None and self.every_epochs > 0 and epochs_done % self.every_epochs == 0
        return by_step or by_epoch

    def save(self, state: dict) -> Path:
        """``step_N/``: Accelerate's ``save_state`` and ``state`` (``engine.TrainState.to_json``, which holds
        ``step``, ``epoch`` and ``batch``) as trainer_state.json, with this run's number of processes; a collective."""
        acc = self.accelerator
        final = self.dir / f"step_{state['step']}"
        if final.is_dir() and (final / STATE).is_file():  # e.g. a signal right after a scheduled save
            return final
        tmp = self.dir / f".step_{state['step']}.tmp"
        state = {**state, "world_size": acc.num_processes}  # batches and ZeRO partitions are per process
        if (
            acc.is_main_process
        ):  # an empty folder, before any rank writes its files (RNG states, partitions) into it
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # a collective under DeepSpeed: every rank writes its partitions
        acc.wait_for_everyone()  # all ranks wrote: only now may rank 0 rename the folder
        if acc.is_main_process:
            write_json(tmp / STATE, state)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            older = sorted((p for p in self.dir.glob("step_*") if p != final), key=lambda p: int(p.name[5:]))
            for old in older[: max(0, len(older) - (self.keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last = final
        log.info("checkpoint %s (epoch %d, batch %d)", final, state["epoch"], state["batch"])
        return final

    def load(self, folder: Path) -> dict:
        """Model, optimizer, scheduler and RNG states from ``folder``, every torch.load with weights_only=True;
        returns its trainer state as saved (``engine.TrainState.from_json`` reads it)."""
        with _deepspeed_weights_only(self.accelerator):
            self.accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
        self.last = folder
        return read_json(Path(folder) / STATE)


@contextlib.contextmanager
def _deepspeed_weights_only(accelerator):
    """DeepSpeed's checkpoint engine calls ``torch.load(weights_only=False)``; load its files with
    ``weights_only=True`` instead, allowing only the plain types its checkpoints hold."""
    engines = [
        m for m in accelerator._models if hasattr(m, "checkpoint_engine") and m.checkpoint_engine is not None
    ]
    originals = [(e.checkpoint_engine, e.checkpoint_engine.load) for e in engines]

    def safe_load(path, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    for engine, _ in originals:
        engine.load = safe_load
    try:
        yield
    finally:
        for engine, load in originals:
            engine.load = load


def _deepspeed_safe_globals() -> list:
    import argparse
    import collections

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [collections.OrderedDict, argparse.Namespace, ZeroStageEnum, LossScaler, fragment_address, set]
