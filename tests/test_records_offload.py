"""The optimizer under ZeRO-Offload: torch's AdamW by default (no C++ build), DeepSpeed's CPU Adam on
request, and one line before CPU Adam's build when the build is not cached yet."""

from __future__ import annotations

import logging

import pytest

from peftlab.distributed import deepspeed_config, note_cpu_adam_build

from .conftest import make_cfg

CPU_ADAM = "deepspeed.ops.adam.DeepSpeedCPUAdam"


@pytest.mark.parametrize("zero", ["stage2_cpu", "stage3_cpu"])
def test_offload_configs_use_torch_adamw_and_deepspeed_keeps_it(tmp_path, zero):
    cfg = make_cfg(tmp_path, f"zero={zero}")
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert (
        deepspeed_config(cfg.zero, cfg.train)["zero_force_ds_cpu_optimizer"] is False
    )  # else Accelerate swaps in CPU Adam
    assert make_cfg(tmp_path, f"zero={zero}", f"zero.optimizer={CPU_ADAM}").optimizer._target_ == CPU_ADAM
    assert make_cfg(tmp_path, "zero=stage3_cpu_guide").optimizer._target_ == CPU_ADAM  # what the guide ran


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["stage2_cpu", "stage3_cpu"])
def test_the_engine_steps_with_torch_adamw_under_offload(tmp_path, tiny_data, monkeypatch, zero):
    import deepspeed.runtime.engine as ds_engine
    import torch

    from peftlab.experiment import run

    seen = []
    configure = ds_engine.DeepSpeedEngine._configure_optimizer

    def spy(self, client_optimizer, model_parameters):
        configure(self, client_optimizer, model_parameters)
        seen.append(type(self.basic_optimizer))

    monkeypatch.setattr(ds_engine.DeepSpeedEngine, "_configure_optimizer", spy)
    metrics = run(
        make_cfg(
            tmp_path / "run", "model=tiny_bert", f"zero={zero}", "logger=null", data_dir=tiny_data, epochs=1
        )
    )
    assert metrics["status"] == "finished", metrics["error"]
    assert seen == [torch.optim.AdamW]


def test_cpu_adam_build_is_announced_once_not_when_cached(tmp_path, monkeypatch, caplog):
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(type(builder), "_loaded_ops", {})  # as in a fresh process
    cfg = make_cfg(tmp_path, "zero=stage3_cpu", f"zero.optimizer={CPU_ADAM}")
    folder = tmp_path / "ext" / builder.name

    def notes():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="peftlab"):
            note_cpu_adam_build(cfg.optimizer._target_)
        return [r.getMessage() for r in caplog.records if "CPU Adam" in r.getMessage()]

    assert len(notes()) == 1 and f"cached in {folder} " in notes()[0]
    (folder / f"{builder.name}.so").write_bytes(b"")
    source = builder.deepspeed_src_path(builder.sources()[0])
    (folder / "build.ninja").write_text(
        f"build cpu_adam.o: compile /another/venv/site-packages/deepspeed/ops/{builder.sources()[0]}\n"
    )
    assert len(notes()) == 1  # another installation's build: torch builds again
    (folder / "build.ninja").write_text(f"build cpu_adam.o: compile {source}\n")
    assert notes() == []  # cached
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    with caplog.at_level(logging.INFO, logger="peftlab"):
        note_cpu_adam_build(
            make_cfg(tmp_path, "zero=stage3_cpu").optimizer._target_
        )  # torch AdamW: nothing to build
    assert not [r for r in caplog.records if "CPU Adam" in r.getMessage()]


def test_the_shared_memory_collectives_build_is_announced_once_not_when_cached(tmp_path, monkeypatch, caplog):
    """DeepSpeed's CPU backend builds deepspeed_shm_comm whenever it starts (~1 min, silently): one line first."""
    from deepspeed.accelerator import get_accelerator

    from peftlab.distributed import note_shm_comm_build

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(type(builder), "_loaded_ops", {})  # as in a fresh process
    folder = tmp_path / "ext" / builder.name

    def notes():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="peftlab"):
            note_shm_comm_build()
        return [r.getMessage() for r in caplog.records if "shared-memory collectives" in r.getMessage()]

    assert len(notes()) == 1 and f"cached in {folder} " in notes()[0]
    (folder / f"{builder.name}.so").write_bytes(b"")
    (folder / "build.ninja").write_text(
        f"build shm.o: compile {builder.deepspeed_src_path(builder.sources()[0])}\n"
    )
    assert notes() == []  # this installation's build is cached
