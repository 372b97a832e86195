"""Accelerator and DeepSpeed plugin from the run config.

The DeepSpeed config is generated here from ``zero`` (stage, offload, tuning settings) and
``train`` (batch size, accumulation, clipping): each value is stated once in the run config.
Mixed precision reaches DeepSpeed through Accelerate (``train.mixed_precision``).
"""

from __future__ import annotations

import os
import socket

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin
from omegaconf import DictConfig, OmegaConf


def deepspeed_config(cfg: DictConfig) -> dict | None:
    """The DeepSpeed config for this run, or None for zero=none."""
    z = cfg.zero
    if z.stage == 0:
        return None
    zero = {"stage": z.stage, **OmegaConf.to_container(z.settings, resolve=True)}
    for kind in ("optimizer", "param"):  # zero.settings.offload_<kind> may add e.g. pin_memory
        device = z[f"offload_{kind}_device"]
        extra = zero.pop(f"offload_{kind}", None) or {}
        if device != "none":
            zero[f"offload_{kind}"] = {**extra, "device": device}
            if device == "nvme":
                zero[f"offload_{kind}"]["nvme_path"] = z[f"offload_{kind}_nvme_path"]
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group_env() -> None:
    """A plain ``python run.py`` is a world of one; DeepSpeed still wants a process group."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def make_accelerator(cfg: DictConfig, project_dir: str, log_with: str | None = None) -> Accelerator:
    """A fresh Accelerator for one training (state of any earlier one in this process is reset)."""
    reset_state()
    ds = deepspeed_config(cfg)
    plugin = None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = str(ds is not None).lower()  # read by PartialState below
    if ds is not None:
        ensure_process_group_env()
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=bool(cfg.zero.zero3_init),
                                 zero3_save_16bit_model=cfg.zero.stage == 3)
    if not torch.cuda.is_available() and (ds is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        PartialState(backend="gloo")  # on the CPU, Accelerate must know the backend before it counts processes
    return Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=log_with,
        project_dir=project_dir,
    )


def used_deepspeed_config(accelerator: Accelerator) -> dict | None:
    """The DeepSpeed config as the engine received it (Accelerate's fills included)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config


def is_zero3(accelerator: Accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def reset_state() -> None:
    """Forget the previous training's Accelerator/DeepSpeed globals (the process group stays)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:
        pass
    AcceleratorState._reset_state(reset_partial_state=True)
