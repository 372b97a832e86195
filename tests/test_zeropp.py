"""zero.deepcompile (DeepSpeed's DeepCompile) and zero=stage3_zeropp (ZeRO++) reach the DeepSpeed config as
DeepSpeed reads it; bad combinations stop before any model loads; ``distributed.compile_engine`` compiles a
real DeepSpeed engine with DeepCompile where CUDA is (on the CPU it stops at DeepCompile's CUDA-only op)."""

from __future__ import annotations

import json

import pytest
import torch

from peftlab import distributed
from peftlab.config import ConfigError, validate
from peftlab.experiment import run

from .conftest import make_cfg

# What DeepSpeed 0.19.8 does on the CPU accelerator, tried: engine.compile() -> init_z3 ->
# get_deepcompile_handle() -> DeepCompileBuilder().load() compiles csrc/compile/*.cpp, whose deepcompile.h
# includes ATen/cuda/CUDAEvent.h
CPU_ERROR = "Error building extension 'dc'"
CPU_CAUSE = "cuda.h: No such file or directory"
NO_CUDA = (
    "DeepCompile needs CUDA: on DeepSpeed's CPU accelerator its op 'dc' does not build "
    f"({CPU_ERROR}: ... {CPU_CAUSE}); deepspeed.compile.util.is_deepcompile_supported() is false"
)


def test_deepcompile_adds_deepspeeds_compile_section(tmp_path):
    from deepspeed.compile.config import CompileConfig

    off = distributed.deepspeed_config(make_cfg(tmp_path, "zero=stage3").zero, make_cfg(tmp_path).train)
    assert "compile" not in off
    cfg = make_cfg(tmp_path, "zero=stage3", "zero.deepcompile=true")
    ds = distributed.deepspeed_config(cfg.zero, cfg.train)
    assert ds["compile"] == {"deepcompile": True}
    assert CompileConfig(**ds["compile"]).deepcompile  # DeepSpeed's own model of the section takes it
    assert {k: v for k, v in ds.items() if k != "compile"} == off  # nothing else changes
    for stage in ("stage1", "stage2", "stage3_cpu"):
        cfg = make_cfg(tmp_path, f"zero={stage}", "zero.deepcompile=true")
        assert distributed.deepspeed_config(cfg.zero, cfg.train)["compile"] == {"deepcompile": True}


def test_an_old_run_config_without_the_key_still_builds(tmp_path):
    """A run directory's config.yaml written before zero.deepcompile existed resumes with DeepCompile off."""
    from omegaconf import OmegaConf

    cfg = make_cfg(tmp_path, "zero=stage3")
    zero = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.zero).items() if k != "deepcompile"})
    assert "compile" not in distributed.deepspeed_config(zero, cfg.train)
    assert distributed.compile_engine("model", zero) == "model"


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


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["zero=none"], "zero.deepcompile=true needs DeepSpeed ZeRO stage 1, 2 or 3 (zero=none is stage 0)"),
        (["zero=stage3"], "zero.deepcompile=true needs a CUDA GPU"),
    ],
)
def test_a_bad_deepcompile_setting_stops_before_any_model_loads(
    tmp_path, tiny_data, no_model_loading, overrides, fragment
):
    if "CUDA" in fragment and torch.cuda.is_available():
        pytest.skip("a valid setting on a GPU")
    cfg = make_cfg(
        tmp_path / "run", *overrides, "zero.deepcompile=true", "model=tiny_bert", data_dir=tiny_data
    )
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and "zero.deepcompile=false" in message
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_compile_engine_leaves_the_model_when_off_and_refuses_a_plain_module(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert distributed.compile_engine(model, make_cfg(tmp_path, "zero=stage3").zero) is model
    with pytest.raises(RuntimeError, match="not a DeepSpeedEngine"):
        distributed.compile_engine(model, make_cfg(tmp_path, "zero=stage3", "zero.deepcompile=true").zero)


def _tiny_engine(tmp_path, *overrides):
    """A real DeepSpeed ZeRO engine (Accelerate's prepare, as fit.py does) around a 2-layer MLP whose first layer
    is frozen, as a LoRA base is; then ``compile_engine``; returns (accelerator, engine, optimizer)."""
    cfg = make_cfg(tmp_path, "zero.deepcompile=true", "train.batch_size=4", *overrides)
    accelerator = distributed.make_accelerator(cfg.zero, cfg.train, str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, distributed.compile_engine(engine, cfg.zero), optimizer


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage3", "stage2"])
def test_deepcompile_trains_a_real_engine(tmp_path, stage):
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    try:
        accelerator, engine, optimizer = _tiny_engine(tmp_path, f"zero={stage}")
        assert engine.is_compiled and engine.is_deepcompile_active()
        x = torch.randn(4, 16, device=accelerator.device)
        losses = []
        for _ in range(8):  # past DeepCompile's 5 warm-up steps, when ZeRO-3's prefetch passes join
            loss = engine(x).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    finally:
        distributed.reset_state()


@pytest.mark.slow
def test_on_the_cpu_deepcompile_stops_at_its_cuda_only_op(tmp_path, monkeypatch):
    """Records what DeepSpeed does on its CPU accelerator (why validate refuses zero.deepcompile there): when
    this fails because the build succeeds, DeepSpeed has learnt DeepCompile on the CPU and the refusal can go."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: test_deepcompile_trains_a_real_engine runs instead")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))  # the failed build's files
    try:
        with pytest.raises(RuntimeError, match=CPU_ERROR) as caught:
            _tiny_engine(tmp_path, "zero=stage3")
        assert CPU_CAUSE in str(caught.value)
    finally:
        distributed.reset_state()
