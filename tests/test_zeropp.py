"""zero=stage3_zeropp (ZeRO++) reaches the DeepSpeed config as DeepSpeed reads it: stage 3's settings plus
qwZ, hpZ and qgZ, and nothing else."""

from __future__ import annotations

from peftlab import distributed
from peftlab.config import validate

from .conftest import make_cfg


def test_zeropp_settings_reach_deepspeeds_zero_optimization(tmp_path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = make_cfg(tmp_path, "zero=stage3_zeropp")
    validate(cfg)
    zero = distributed.deepspeed_config(cfg.zero, cfg.train)["zero_optimization"]
    stage3 = distributed.deepspeed_config(make_cfg(tmp_path, "zero=stage3").zero, cfg.train)[
        "zero_optimization"
    ]
    assert zero == {
        **stage3,
        "zero_quantized_weights": True,
        "zero_hpz_partition_size": 8,
        "zero_quantized_gradients": True,
    }
    parsed = DeepSpeedZeroConfig(**zero)  # unknown keys are refused by DeepSpeed's model
    assert parsed.zero_quantized_weights and parsed.zero_quantized_gradients and parsed.reduce_scatter
    assert parsed.zero_hpz_partition_size == 8 and parsed.stage == 3
