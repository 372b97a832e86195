"""Accelerator and DeepSpeed plugin from the run config.

The DeepSpeed config is generated here from ``zero`` (stage, offload, tuning settings) and
``train`` (batch size, accumulation, clipping): each value is stated once in the run config.
Mixed precision reaches DeepSpeed through Accelerate (``train.mixed_precision``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin
from omegaconf import DictConfig, OmegaConf


def op_build_dir(builder) -> str | None:
    """Where DeepSpeed's op ``builder`` is about to be compiled (torch extensions' cache: ``TORCH_EXTENSIONS_DIR``,
    else ~/.cache/torch_extensions/py<ver>_<cpu|cuXYZ>/<op>), or None when no build is due: DeepSpeed was
    installed with it prebuilt (DS_BUILD_...=1), this process loaded it already, or the cache holds a build
    from this DeepSpeed (a build.ninja naming another installation's sources, e.g. another virtualenv's,
    makes torch build again)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(builder.name) or builder.name in getattr(builder, "_loaded_ops", {}):
        return None
    folder = _get_build_directory(builder.name, verbose=False)
    ninja = os.path.join(folder, "build.ninja")
    source = os.path.abspath(builder.deepspeed_src_path(builder.sources()[0]))
    with contextlib.suppress(OSError):
        if os.path.exists(os.path.join(folder, f"{builder.name}.so")) and source in open(ninja).read():
            return None
    return folder


def cpu_adam_build_dir() -> str | None:
    """:func:`op_build_dir` of DeepSpeed's CPU Adam."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return op_build_dir(CPUAdamBuilder())


def note_shm_comm_build() -> None:
    """One line before DeepSpeed starts on the CPU where its shared-memory collectives (deepspeed_shm_comm,
    which its CPU backend builds whenever it starts) are not built yet: the first ZeRO run on a machine, or
    after switching virtualenvs, compiles C++ for about a minute, silently."""
    if rank() != 0:
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    folder = op_build_dir(builder)
    if folder is not None:
        logging.getLogger("peftlab").info(
            "DeepSpeed builds its CPU shared-memory collectives once (~1 min on 2 cores); cached in %s "
            "for the next runs of this virtualenv",
            folder,
        )


def note_cpu_adam_build(optimizer_target: str | None) -> None:
    """One line before the optimizer (``optimizer._target_``) is built, where it is DeepSpeed's CPU Adam and not
    built yet: its first use compiles C++ for minutes, silently."""
    if not (optimizer_target or "").endswith("DeepSpeedCPUAdam") or rank() != 0:
        return
    folder = cpu_adam_build_dir()
    if folder is not None:
        logging.getLogger("peftlab").info(
            "building DeepSpeed's CPU Adam once (~4-7 min on a busy 2-core CPU); cached in %s for the next runs "
            "(TORCH_EXTENSIONS_DIR moves it; zero.optimizer=torch.optim.AdamW needs no build)",
            folder,
        )


def deepspeed_config(z: DictConfig, train: DictConfig) -> dict | None:
    """The DeepSpeed config for the run's ``zero`` (``z``) and ``train`` sections, or None for zero stage 0."""
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
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # zero.optimizer is the optimizer, offloaded or not: without this Accelerate swaps a torch
        # optimizer for DeepSpeed's CPU Adam under optimizer offload (and DeepSpeed refuses it)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PG_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
PG_OWNER = "PEFTLAB_PG_OWNER"  # pid of the process that made itself a world of one


def ensure_process_group_env() -> None:
    """A plain ``python run.py`` is a world of one; DeepSpeed still wants a process group."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        **{PG_OWNER: str(os.getpid())},
    )


def forget_inherited_process_group_env() -> None:
    """A process that ran peftlab in-process (a notebook, pytest) made itself a world of one; a
    ``python run.py`` it starts inherits those variables and must not join that world (its port is taken)."""
    owner = os.environ.get(PG_OWNER)
    if owner and owner != str(os.getpid()) and os.environ.get("WORLD_SIZE") == "1":
        for name in (*PG_VARS, PG_OWNER):
            os.environ.pop(name, None)


@contextlib.contextmanager
def world_of_one():
    """Accelerate sees one process here, whatever process-group variables an earlier run in this
    process left (a notebook or pytest that trained, then predicts): without them it would gather
    through that run's process group, NCCL on a GPU machine, which cannot gather CPU tensors."""
    saved = {k: os.environ.pop(k) for k in (*PG_VARS, "ACCELERATE_USE_DEEPSPEED") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_accelerator(
    z: DictConfig, train: DictConfig, project_dir: str, log_with: str | None = None
) -> Accelerator:
    """A fresh Accelerator for one training with the run's ``zero`` (``z``) and ``train`` sections, its
    trackers (``log_with``) writing under ``project_dir``; state of any earlier one in this process is reset.
    RuntimeError when WORLD_SIZE > 1 and Accelerate would not train the ranks together."""
    reset_state()
    ds = deepspeed_config(z, train)
    plugin = None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = str(ds is not None).lower()  # read by PartialState below
    if ds is not None:
        ensure_process_group_env()
        plugin = DeepSpeedPlugin(
            hf_ds_config=ds, zero3_init_flag=bool(z.zero3_init), zero3_save_16bit_model=z.stage == 3
        )
        plugin.deepspeed_config["steps_per_print"] = ds[
            "steps_per_print"
        ]  # Accelerate sets inf: not standard JSON
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and (ds is not None or world > 1):
        # On the CPU Accelerate must know the backend before it counts processes. Without DeepSpeed it
        # also needs cpu=True: with cpu=False and no GPU, PartialState joins the ranks' process group but
        # leaves distributed_type NO (its MULTI_CPU branch is for cpu=True only), so nothing would be
        # distributed: no DDP, no gradient all-reduce, no barriers, evaluation gathered from rank 0 only.
        # DeepSpeed wants cpu=False (AcceleratorState turns DeepSpeed off under cpu=True).
        if ds is not None:
            note_shm_comm_build()
        PartialState(cpu=ds is None, backend="gloo")
    torch.backends.cuda.matmul.allow_tf32 = bool(train.tf32)  # per run: a sweep's jobs may differ
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum,
        log_with=log_with,
        project_dir=project_dir,
    )
    check_distributed(accelerator, world)
    return accelerator


def check_distributed(accelerator: Accelerator, world: int) -> None:
    """Several ranks must make a distributed Accelerator; else each would train alone on its shard."""
    from accelerate.utils import DistributedType

    if world > 1 and (
        accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO
    ):
        raise RuntimeError(
            f"WORLD_SIZE={world} but Accelerate sees {accelerator.num_processes} process(es), distributed type "
            f"{accelerator.distributed_type}: the ranks would not train together"
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
    from accelerate.state import GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()  # its dataloader_references: a failed training's loaders (and their data)
    forget_deepspeed_modules()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_from_submitit() -> None:
    """Inside a task of a submitit job (``hydra/launcher=slurm|submitit_slurm|submitit_local``), one task
    per GPU: torch.distributed's variables from the scheduler's. On SLURM: SLURM_PROCID -> RANK,
    SLURM_NTASKS -> WORLD_SIZE, SLURM_LOCALID -> LOCAL_RANK, the first host of SLURM_JOB_NODELIST ->
    MASTER_ADDR, and a port derived from the job id (the same in all its tasks) -> MASTER_PORT."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import zlib

    import submitit

    job = submitit.JobEnvironment()
    port = 20000 + zlib.crc32(job.job_id.encode()) % 30000 if job.num_tasks > 1 else free_port()
    os.environ.update(
        RANK=str(job.global_rank),
        WORLD_SIZE=str(job.num_tasks),
        LOCAL_RANK=str(job.local_rank),
        LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes),
        MASTER_ADDR=job.hostnames[0],
        MASTER_PORT=str(port),
    )


def gathered(params, enabled: bool):
    """Under ZeRO-3 (``enabled``), ``params`` whole on every rank inside the block (read-only; a collective)."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def zero3_partitions(accelerator: Accelerator, model) -> dict | None:
    """Under ZeRO-3, how many parameter elements each rank holds (``ds_tensor``, its partition) and
    the model's total, for metrics.json; None otherwise. A collective: every rank calls it, after ``prepare``."""
    if not is_zero3(accelerator):
        return None
    params = list(model.parameters())
    local = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
    per_rank = accelerator.gather(torch.tensor([local], device=accelerator.device)).tolist()
    partitions = {
        "numel_per_rank": per_rank,
        "numel_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }
    if accelerator.is_main_process:
        logging.getLogger("peftlab").info(
            "ZeRO-3 partitions: %s of %s parameter elements per rank",
            per_rank,
            f"{partitions['numel_total']:,}",
        )
    return partitions


def forget_deepspeed_modules() -> None:
    """Drop what DeepSpeed keeps at module level of a ZeRO-3 training's model, which otherwise outlives the
    training (and its GPU memory the job, in an in-process sweep):

    - ``parameter_offload.FWD_MODULE_STACK``: every ZeRO-3 engine appends its top module and never pops it
      (``setup_zero_stage3_hooks``); a forward that raised also leaves its submodules there;
    - the ``functools.lru_cache`` on ``PartitionedParameterCoordinator.__params_to_release``, a class-level
      cache keyed by (coordinator, submodule, step): every coordinator, so every model, that ever trained.

    Only between trainings (no forward runs): both are emptied. Nothing to do where DeepSpeed was never imported.
    """
    import sys

    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    if coordinator is not None:
        cls = coordinator.PartitionedParameterCoordinator
        for cache in _lru_caches(vars(cls).get(f"_{cls.__name__}__params_to_release")):
            cache.cache_clear()


def _lru_caches(fn, depth: int = 3) -> list:
    """The functools caches in ``fn``, through ``__wrapped__`` and closures (DeepSpeed's NVTX wrapper has no wraps)."""
    if fn is None or depth == 0:
        return []
    if hasattr(fn, "cache_clear"):
        return [fn]
    inner = [getattr(fn, "__wrapped__", None)] + [
        c.cell_contents for c in getattr(fn, "__closure__", None) or () if callable(c.cell_contents)
    ]
    return [cache for f in inner for cache in _lru_caches(f, depth - 1)]
