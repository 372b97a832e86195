"""End-to-end runs on the CPU: real Hydra config, real Accelerate + DeepSpeed ZeRO, real PEFT models."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from accelerate.utils import DistributedType

from peftlab import engine, predict
from peftlab.experiment import run
from peftlab.predict import predict_run

from .conftest import make_cfg

pytestmark = pytest.mark.slow


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_run_dir(run_dir, tiny_data, zero: str):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished", metrics.get("error")
    final = metrics["final"]
    assert final["n_eval"] == 24 and 0 <= final["accuracy"] <= 1
    assert sum(map(sum, final["confusion_matrix"])) == 24
    train_phase = metrics["phases"]["train"]
    assert (
        train_phase["s_per_step"] > 0
        and train_phase["tokens_per_s"] > 0
        and train_phase["cpu_peak_rss_mb"] > 0
    )
    assert len(metrics["loss_curve"]) == metrics["phases"]["train"]["steps"]
    assert metrics["versions"]["deepspeed"] and metrics["device"]
    assert metrics["time_to_first_step_s"] > 0
    predictions = read_csv(run_dir / "predictions.csv")
    train_ids = {r["ID"] for r in read_csv(tiny_data / "train.csv")}
    assert len(predictions) == 24 and not train_ids & {r["id"] for r in predictions}
    submission = read_csv(run_dir / "submission.csv")
    assert len(submission) == 4 and {r["Label"] for r in submission} <= {"complaint", "no complaint"}
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    if zero == "none":
        assert not (run_dir / "deepspeed.json").exists()
    else:
        ds = json.loads((run_dir / "deepspeed.json").read_text())
        assert ds["zero_optimization"]["stage"] == {"stage2": 2, "stage3_cpu": 3}[zero]
        assert ds["train_micro_batch_size_per_gpu"] == 8
    return metrics, predictions


@pytest.mark.parametrize("zero", ["none", "stage2", "stage3_cpu"])
@pytest.mark.parametrize("model", ["tiny_bert", "tiny_bart", "tiny_gpt"])
def test_each_task_type_trains_under_each_zero_setting(tmp_path, tiny_data, model, zero):
    cfg = make_cfg(
        tmp_path / "run", f"model={model}", f"zero={zero}", "eval.batch_size=16", data_dir=tiny_data
    )
    run(cfg)
    _, predictions = check_run_dir(tmp_path / "run", tiny_data, zero)
    if zero != "stage2":  # the adapter saved (gathered from ZeRO-3 partitions too) reproduces the predictions
        rows, out, names = predict_run(tmp_path / "run")
        assert [names[p] for p in out["pred"]] == [r["prediction"] for r in predictions]
        saved = [[float(r[f"logp_{n}"]) for n in names] for r in predictions]
        assert max(abs(a - b) for s, o in zip(saved, out["scores"]) for a, b in zip(s, o)) < 1e-3


def test_predict_after_a_deepspeed_run_in_the_same_process_is_one_process(
    tmp_path, tiny_data, monkeypatch, capsys
):
    """A DeepSpeed run leaves its process group and its variables (RANK, LOCAL_RANK, ...) in the
    process; reloading the run there (a notebook, pytest) must predict as one process. Through the
    run's group it failed on a GPU machine: NCCL cannot gather the CPU tensors of the reloaded model."""
    run_dir = tmp_path / "run"
    run(make_cfg(run_dir, "model=tiny_bert", "zero=stage3_cpu", data_dir=tiny_data, epochs=1))
    seen, real = [], engine.predict
    monkeypatch.setattr(
        engine,
        "predict",
        lambda accelerator, *a, **k: seen.append(accelerator.distributed_type) or real(accelerator, *a, **k),
    )
    rows, out, names = predict_run(run_dir)
    assert seen == [DistributedType.NO] and len(out["pred"]) == 24
    assert (
        predict.main([str(run_dir), "--device", "cpu", "--out", str(tmp_path / "again.csv")]) == 0
    )  # peftlab predict
    assert "24/24 predictions equal the run's predictions.csv" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert predict.main([str(run_dir), "--device", "cuda"]) == 2
        assert (
            capsys.readouterr().err.strip()
            == "peftlab predict: --device cuda: this machine has no GPU visible; use --device cpu"
        )
    assert read_csv(tmp_path / "again.csv") == [
        {"id": r["id"], "prediction": r["prediction"]} for r in read_csv(run_dir / "predictions.csv")
    ]


@pytest.mark.parametrize(
    "model,peft",
    [
        ("tiny_bert", "ia3"),
        ("tiny_bert", "prompt_tuning"),
        ("tiny_bert", "adalora"),
        ("tiny_bert", "loha"),
        ("tiny_bert", "lokr"),
        ("tiny_bert", "p_tuning"),
        ("tiny_bert", "none"),
        ("tiny_bart", "prefix_tuning"),
        ("tiny_gpt", "prompt_tuning"),
    ],
)
def test_each_peft_method_trains(tmp_path, tiny_data, model, peft):
    cfg = make_cfg(
        tmp_path, f"model={model}", f"peft={peft}", "eval.batch_size=16", data_dir=tiny_data, epochs=1
    )
    metrics = run(cfg)
    assert metrics["status"] == "finished" and metrics["peft_method"] == peft
    saved = tmp_path / ("model" if peft == "none" else "adapter")
    assert any(saved.glob("*.safetensors"))


def test_both_modes_are_timed_and_compared_on_one_model(tmp_path, tiny_data):
    cfg = make_cfg(tmp_path, "model=tiny_gpt", "eval.mode=both", data_dir=tiny_data)
    final = run(cfg)["final"]
    assert final["eval_s_score"] > 0 and final["eval_s_generate"] > 0
    assert 0 <= final["generate_exact"] <= 1
    predictions = read_csv(tmp_path / "predictions.csv")
    assert all(r["logp_complaint"] != "" for r in predictions)  # the result is score mode's
    exact = [r for r in predictions if r["generated"] in ("complaint", "no complaint")]
    if exact:
        assert final["agreement"] == sum(r["generated"] == r["prediction"] for r in exact) / len(exact)


def test_score_and_generate_agree_on_a_trained_model(tmp_path, tiny_data):
    """Where greedy decoding writes a label exactly, ranking the labels by likelihood picks the same one."""
    cfg = make_cfg(
        tmp_path,
        "model=tiny_bart",
        "peft=none",
        "train.lr=1e-2",
        "eval.mode=both",
        "save_adapter=false",
        data_dir=tiny_data,
        epochs=60,
    )
    final = run(cfg)["final"]
    assert final["generate_exact"] >= 0.9
    assert final["agreement"] >= 0.99


def test_generate_mode_maps_text_to_labels(tmp_path, tiny_data):
    cfg = make_cfg(tmp_path, "model=tiny_bart", "eval.mode=generate", "zero=stage3_cpu", data_dir=tiny_data)
    metrics = run(cfg)
    assert metrics["final"]["n_eval"] == 24
    predictions = read_csv(tmp_path / "predictions.csv")
    assert all(r["prediction"] in ("complaint", "no complaint") for r in predictions)
    assert all(r["logp_complaint"] == "" for r in predictions)


def test_kfold_evaluates_every_training_row_once(tmp_path, tiny_data):
    cfg = make_cfg(
        tmp_path, "model=tiny_bert", "eval.split=kfold", "eval.folds=2", data_dir=tiny_data, epochs=1
    )
    metrics = run(cfg)
    assert metrics["final"]["split"] == "kfold" and metrics["final"]["n_eval"] == 16
    assert sorted(r["fold"] for r in read_csv(tmp_path / "predictions.csv")) == ["0"] * 8 + ["1"] * 8
    assert not (tmp_path / "adapter").exists()  # k models, none of them "the" result


def test_repeated_kfold_pools_every_repeat(tmp_path, tiny_data):
    """eval.fold_repeats=2: the 2 folds twice, reshuffled; each training row predicted once per repeat."""
    cfg = make_cfg(
        tmp_path,
        "model=tiny_bert",
        "eval.split=kfold",
        "eval.folds=2",
        "eval.fold_repeats=2",
        data_dir=tiny_data,
        epochs=1,
    )
    metrics = run(cfg)
    assert metrics["final"]["n_eval"] == 32 and len(metrics["folds"]) == 4
    # LoRA r=8 on query and value of 2 layers of width 16 (A 8x16, B 16x8), then the 16 -> 2 head
    assert metrics["trainable_params"] == 2 * 2 * (8 * 16 + 16 * 8) + (16 * 2 + 2)
    rows = read_csv(tmp_path / "predictions.csv")
    assert sorted(r["fold"] for r in rows) == ["0"] * 8 + ["1"] * 8 + ["2"] * 8 + ["3"] * 8
    ids = [r["id"] for r in rows]
    assert sorted(ids[:16]) == sorted(ids[16:]) and len(set(ids)) == 16


def test_grad_accum_and_bf16_reach_the_engine(tmp_path, tiny_data):
    cfg = make_cfg(
        tmp_path,
        "model=tiny_bert",
        "zero=stage2",
        "train.grad_accum=2",
        "train.mixed_precision=bf16",
        data_dir=tiny_data,
    )
    metrics = run(cfg)
    ds = json.loads((tmp_path / "deepspeed.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"] is True
    assert metrics["epochs"][0]["steps"] == 1  # 16 rows, batch 8, 2 micro-batches per optimizer step


@pytest.mark.parametrize(
    "model,options",
    [
        ("tiny_gpt", ["train.gradient_checkpointing=true"]),
        (
            "tiny_bert",
            ["model.pooling=mean", "train.head_only_epochs=1"],
        ),  # two optimizer groups under DeepSpeed
    ],
)
def test_memory_speed_and_head_options_train_under_zero3_offload(tmp_path, tiny_data, model, options):
    cfg = make_cfg(
        tmp_path, f"model={model}", "zero=stage3_cpu", "eval.batch_size=16", *options, data_dir=tiny_data
    )
    metrics = run(cfg)
    assert metrics["status"] == "finished", metrics.get("error")
    predictions = read_csv(tmp_path / "predictions.csv")
    rows, out, names = predict_run(
        tmp_path
    )  # reloaded without the option's machinery, the adapter predicts the same
    assert [names[p] for p in out["pred"]] == [r["prediction"] for r in predictions]
    saved = [[float(r[f"logp_{n}"]) for n in names] for r in predictions]
    assert max(abs(a - b) for s, o in zip(saved, out["scores"]) for a, b in zip(s, o)) < 1e-3
