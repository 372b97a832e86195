"""Issue 14 item 6: a job leaves nothing of its model behind, so an in-process sweep (Hydra's basic
launcher: every job in one process) does not pile up every earlier job's model on the GPU.

The CPU proxy for "GPU memory back at its level before the job": weak references to the job's model,
its DeepSpeed engine (the prepared model), optimizer and Accelerator are dead once ``run`` returns or
raises. On a GPU metrics.json also records ``torch.cuda.memory_allocated()`` before and after each job.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from accelerate import Accelerator

from peftlab import modeling
from peftlab.experiment import run

from .conftest import ROOT, make_cfg

pytestmark = pytest.mark.slow
ZEROS = ["none", "stage2", "stage3"]
GPU_SLACK_MB = 8  # the allocator's rounding and small caches (RNG states) that may stay


@pytest.fixture
def spied(monkeypatch):
    """Weak references to every model built and to what each training's ``accelerator.prepare`` returned."""
    refs: dict[str, weakref.ref] = {}
    build = modeling.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        refs["model"] = weakref.ref(model)
        return model

    prepare = Accelerator.prepare

    def spy_prepare(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        if len(args) == 4:  # model, optimizer, train loader, scheduler
            refs.update(
                engine=weakref.ref(out[0]), optimizer=weakref.ref(out[1]), accelerator=weakref.ref(self)
            )
        return out

    monkeypatch.setattr(modeling, "build_model", build_model)
    monkeypatch.setattr(Accelerator, "prepare", spy_prepare)
    return refs


def alive(refs: dict) -> list[str]:
    return sorted(name for name, ref in refs.items() if ref() is not None)


def check_gpu_figures(metrics: dict) -> None:
    before, after = metrics["gpu_allocated_mb_before"], metrics["gpu_allocated_mb_after"]
    if not torch.cuda.is_available():
        assert before is None and after is None
    else:
        assert after <= before + GPU_SLACK_MB, metrics


@pytest.mark.parametrize("zero", ZEROS)
def test_a_finished_job_leaves_nothing_of_its_model_behind(tmp_path, tiny_data, spied, zero):
    metrics = run(
        make_cfg(
            tmp_path / "run", "model=tiny_bert", f"zero={zero}", "logger=null", data_dir=tiny_data, epochs=1
        )
    )
    assert metrics["status"] == "finished"
    assert set(spied) == {"model", "engine", "optimizer", "accelerator"}
    # Freed before run() returned, no collection needed: the next job's gc.freeze() (peftlab.cli) would
    # otherwise move the job's uncollected cycles into the permanent generation, for good.
    assert alive(spied) == []
    gc.collect()
    assert alive(spied) == []
    check_gpu_figures(json.loads((tmp_path / "run" / "metrics.json").read_text()))


@pytest.mark.parametrize(
    "zero,forward",
    [*((z, 2) for z in ZEROS), ("none", 4), ("stage3", 4)],
    ids=[*(f"{z}-training" for z in ZEROS), "none-evaluation", "stage3-evaluation"],
)
def test_a_job_that_fails_mid_forward_leaves_nothing_of_its_model_behind(
    tmp_path, tiny_data, spied, monkeypatch, zero, forward
):
    """Its traceback, still held (as Hydra's JobReturn, a log record or a notebook's sys.last_exc would hold
    it), must not keep the model; under ZeRO-3 the forward that raised leaves modules on DeepSpeed's stack.
    Forward 2 is the second training batch's, 4 the evaluation's second (the unlabeled rows)."""
    build = modeling.build_model
    calls = []

    def build_failing(*args, **kwargs):
        model = build(*args, **kwargs)
        layer = next(m for m in model.modules() if type(m).__name__ == "BertLayer")

        def fail(module, inputs):
            calls.append(1)
            if len(calls) == forward:
                raise RuntimeError("injected failure mid-forward")

        layer.register_forward_pre_hook(fail)
        return model

    monkeypatch.setattr(modeling, "build_model", build_failing)
    with pytest.raises(RuntimeError, match="injected failure") as failure:
        run(
            make_cfg(
                tmp_path / "run",
                "model=tiny_bert",
                f"zero={zero}",
                "logger=null",
                data_dir=tiny_data,
                epochs=1,
            )
        )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "injected failure" in metrics["error"]
    assert set(spied) == {"model", "engine", "optimizer", "accelerator"}
    gc.collect()
    assert failure.value.__traceback__ is not None  # the exception and its traceback are still here
    assert alive(spied) == []
    check_gpu_figures(metrics)


def test_a_job_that_diverges_leaves_nothing_of_its_model_behind(tmp_path, tiny_data, spied, monkeypatch):
    from peftlab import engine

    def diverge(accelerator, epoch, step, *args):
        raise engine.Diverged(step, float("nan"))

    monkeypatch.setattr(engine, "_epoch_figures", diverge)
    with pytest.raises(engine.Diverged) as failure:
        run(
            make_cfg(
                tmp_path / "run",
                "model=tiny_bert",
                "zero=stage3",
                "logger=null",
                data_dir=tiny_data,
                epochs=1,
            )
        )
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "diverged"
    gc.collect()
    assert failure.value is not None and alive(spied) == []


SWEEP_DRIVER = textwrap.dedent("""
    import gc, json, sys, weakref
    from accelerate import Accelerator
    from peftlab import modeling

    built, seen = [], []
    build, prepare = modeling.build_model, Accelerator.prepare

    def build_model(*args, **kwargs):
        # a new job's model: are the earlier jobs' objects gone, before and after a collection?
        earlier = [r for job in built for r in job]
        check = {"without_collection": [r() is not None for r in earlier]}
        gc.collect()
        check["after_collection"] = [r() is not None for r in earlier]
        seen.append(check)
        model = build(*args, **kwargs)
        built.append([weakref.ref(model)])
        return model

    def spy_prepare(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        if len(args) == 4:
            built[-1] += [weakref.ref(out[0]), weakref.ref(out[1]), weakref.ref(self)]
        return out

    modeling.build_model, Accelerator.prepare = build_model, spy_prepare
    import runpy
    sys.argv = [RUN, *sys.argv[1:]]
    try:
        runpy.run_path(RUN, run_name="__main__")
    finally:
        gc.collect()
        seen.append({"after_collection": [r() is not None for job in built for r in job]})
        open(OUT, "w").write(json.dumps(seen))
""")


def test_an_in_process_sweep_frees_each_job_before_the_next(tmp_path, tiny_data):
    """Two jobs through real Hydra (basic launcher: one process, peftlab.cli.run_job per job, its
    gc.freeze() included), ZeRO-3 on the CPU: the second job starts with none of the first one's
    objects alive, and each job's records show GPU memory back at its level before the job."""
    out, sweep = tmp_path / "seen.json", tmp_path / "sweep"
    driver = tmp_path / "driver.py"
    driver.write_text(f"OUT, RUN = {str(out)!r}, {str(ROOT / 'run.py')!r}\n" + SWEEP_DRIVER)
    result = subprocess.run(
        [
            sys.executable,
            str(driver),
            "-m",
            "model=tiny_bert",
            "zero=stage3",
            "peft.r=4,8",
            "train.epochs=1",
            "logger=null",
            f"dataset.data_dir={tiny_data}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, end = json.loads(out.read_text())
    assert first == {"without_collection": [], "after_collection": []}
    assert second == {
        "without_collection": [False] * 4,
        "after_collection": [False] * 4,
    }  # job 0's model, engine, ...
    assert end == {"after_collection": [False] * 8}
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert [j["status"] for j in jobs] == ["finished", "finished"]
    for job in jobs:
        check_gpu_figures(job)
    if torch.cuda.is_available():  # the second job starts where the first one did
        assert jobs[1]["gpu_allocated_mb_before"] <= jobs[0]["gpu_allocated_mb_before"] + GPU_SLACK_MB
