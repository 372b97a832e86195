"""What the tracker gets, read back from TensorBoard's event files: the loss and the learning rate of
every optimizer step, the eval figures, and the run's hyper-parameters in the HPARAMS tab with the eval
figures as its metrics, in the run's own event file (so a sweep's runs are filtered by peft.r)."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from peftlab.experiment import run

from .conftest import make_cfg

pytestmark = pytest.mark.slow

LR, WARMUP_RATIO = 1e-3, 0.25


def expected_lr(step: int, total: int) -> float:
    """transformers' linear schedule with warm-up, as optimizer step ``step`` (from 1) uses it."""
    warmup, k = int(WARMUP_RATIO * total), step - 1
    return LR * (k / warmup if k < warmup else max(0.0, (total - k) / (total - warmup)))


def events(run_dir) -> EventAccumulator:
    folders = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    assert folders == {run_dir / "tensorboard"}, folders  # one run, no sub-run of its hyper-parameters alone
    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()


@pytest.mark.parametrize(
    "r,alpha,zero", [(4, 8, "none"), (8, 32, "stage2")]
)  # DeepSpeed steps the scheduler itself
def test_tensorboard_gets_steps_eval_and_hparams(tmp_path, tiny_data, r, alpha, zero):
    run_dir = tmp_path / f"r{r}"
    metrics = run(
        make_cfg(
            run_dir,
            "model=tiny_bert",
            "logger=tensorboard",
            f"zero={zero}",
            f"peft.r={r}",
            f"peft.lora_alpha={alpha}",
            "train.batch_size=4",
            f"train.warmup_ratio={WARMUP_RATIO}",
            f"train.lr={LR}",
            data_dir=tiny_data,
            epochs=2,
        )
    )
    assert metrics["status"] == "finished", metrics["error"]
    acc = events(run_dir)
    total = len(metrics["loss_curve"])
    assert total == 8  # 16 rows in batches of 4, 2 epochs

    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, total + 1))
    assert [e.value for e in loss] == pytest.approx([v for _, v in metrics["loss_curve"]], rel=1e-6)
    lr = acc.Scalars("train/lr")
    assert [e.step for e in lr] == list(range(1, total + 1))
    assert [e.value for e in lr] == pytest.approx(
        [expected_lr(s, total) for s in range(1, total + 1)], rel=1e-6
    )
    assert lr[0].value == 0.0 and lr[2].value == pytest.approx(LR)  # warm-up over 2 steps, then decay

    (accuracy,) = acc.Scalars("eval/accuracy")
    assert accuracy.step == total and accuracy.value == pytest.approx(metrics["final"]["accuracy"], rel=1e-6)
    (macro_f1,) = acc.Scalars("eval/macro_f1")
    assert macro_f1.value == pytest.approx(metrics["final"]["macro_f1"], rel=1e-6)

    plugin = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    experiment = hparams_metadata.parse_experiment_plugin_data(plugin[hparams_metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == {"eval/accuracy", "eval/macro_f1"}
    assert {"peft.r", "peft.lora_alpha", "train.lr", "model", "peft"} <= {
        h.name for h in experiment.hparam_infos
    }
    session = hparams_metadata.parse_session_start_info_plugin_data(
        plugin[hparams_metadata.SESSION_START_INFO_TAG]
    )
    assert (
        session.hparams["peft.r"].number_value == r
        and session.hparams["peft.lora_alpha"].number_value == alpha
    )
    assert (
        session.hparams["peft"].string_value == "lora"
        and session.hparams["model"].string_value == "tiny_bert"
    )
