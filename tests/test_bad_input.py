"""Bad input fails fast: one line naming the key or file and the fix, before any model is loaded,
and the run directory says failed, never finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from peftlab.config import ConfigError
from peftlab.experiment import run

from .conftest import ROOT, make_cfg, write_raft


def broken_data(tmp_path, name: str):
    folder = write_raft(tmp_path / name)
    train = folder / "train.csv"
    if name == "label_out_of_range":
        train.write_text(train.read_text().replace(",1\n", ",7\n", 1))
    elif name == "empty_split":
        train.write_text("Tweet text,ID,Label\n")
    elif name == "missing_test_file":
        (folder / "test.csv").unlink()
    elif name == "not_utf8":
        train.write_bytes(train.read_bytes() + b"caf\xe9 \xff\xfe,99,1\n")
    elif name == "malformed_csv":
        train.write_text('Tweet text,ID,Label\n"unclosed quote,1,1\nfine,2,2\n')
    elif name == "no_labelled_rows":
        train.write_text(train.read_text().replace(",1\n", ",0\n").replace(",2\n", ",0\n"))
    return folder


BAD = [
    # (overrides, data variant or None, a fragment the one-line message must contain)
    (
        ["zero=stage2", "zero.offload_param_device=cpu"],
        None,
        "zero.offload_param_device=cpu needs zero.stage=3; use zero=stage3_cpu",
    ),
    (
        ["zero=none", "zero.offload_optimizer_device=cpu"],
        None,
        "zero.offload_optimizer_device=cpu needs DeepSpeed",
    ),
    (["zero=stage3_nvme"], None, "zero.offload_param_nvme_path is required"),
    (
        ["zero=stage3_nvme", "zero.offload_param_nvme_path=/nonexistent/nvme"],
        None,
        "is not a writable directory",
    ),
    (["peft.r=0"], None, "peft.r=0 must be a whole number >= 1"),
    (["peft.r=-4"], None, "peft.r=-4"),
    (["peft.lora_alpha=0"], None, "peft.lora_alpha=0 must be > 0"),
    (["peft.lora_dropout=1.5"], None, "peft.lora_dropout=1.5"),
    (["peft=prefix_tuning"], None, "peft=prefix_tuning does not work with model=minilm"),
    (["peft=adalora", "zero=stage2"], None, "peft=adalora"),
    (["eval.mode=generate"], None, "eval.mode=generate needs a generative model"),
    (["eval.mode=beam"], None, "eval.mode=beam must be score, generate or both"),
    (
        ["train.head_only_epochs=30"],
        None,
        "train.head_only_epochs=30 must be a whole number from 0 to train.epochs-1",
    ),
    (
        ["model=tiny_bart", "train.head_only_epochs=1"],
        None,
        "train.head_only_epochs=1 needs a classification head",
    ),
    # objective=contrastive (issue 18): mean-pooled embeddings, and its own head phase
    (
        ["model=tiny_bert", "objective=contrastive"],
        None,
        "objective=contrastive trains mean-pooled embeddings, which the head must read: model.pooling=cls "
        "feeds it the first token; use model.pooling=mean",
    ),
    (
        ["model=tiny_bert", "model.pooling=mean", "objective=contrastive", "train.head_only_epochs=1"],
        None,
        "train.head_only_epochs=1 does not apply to objective=contrastive",
    ),
    (
        ["model=tiny_bert", "model.pooling=mean", "objective=contrastive", "objective.num_iterations=0"],
        None,
        "objective.num_iterations=0 must be a whole number >= 1",
    ),
    (
        ["model=tiny_bert", "model.pooling=mean", "objective=contrastive", "objective.batch_size=0"],
        None,
        "objective.batch_size=0 must be a whole number >= 1, or null for train.batch_size",
    ),
    (["objective.name=setfit"], None, "objective=setfit must be one of cross_entropy, contrastive"),
    (["train.tf32=yes"], None, "train.tf32=yes must be true or false"),
    (["train.gradient_checkpointing=1"], None, "train.gradient_checkpointing=1 must be true or false"),
    (["eval.split=train"], None, "eval.split=train must be test, validation or kfold"),
    (["train.lr=0"], None, "train.lr=0 must be a number > 0"),
    (["train.epochs=0"], None, "train.epochs=0 must be a whole number >= 1"),
    (["train.batch_size=0"], None, "train.batch_size=0"),
    (["train.mixed_precision=fp8"], None, "train.mixed_precision=fp8 must be one of"),
    (["train.mixed_precision=fp16"], None, "train.mixed_precision=fp16 needs a GPU"),
    (["eval.mixed_precision=fp16"], None, "eval.mixed_precision=fp16 must be no or bf16"),
    (["eval.fold_repeats=0"], None, "eval.fold_repeats=0 must be a whole number >= 1"),
    (["model.task=regression"], None, "model.task=regression is not one of"),
    (["model.pretrained=./no/such/model"], None, "no such folder"),
    (
        ["model=tiny_bart", "model.task=seq_cls", "model.pooling=mean"],
        None,
        "model.pooling=mean needs an encoder with a pooler",
    ),
    (
        ["dataset.data_dir=/no/such/folder"],
        "skip_data_dir",
        "dataset.data_dir=/no/such/folder: no such folder",
    ),
    (["dataset.text_column=Text"], "ok", "no column 'Text' (dataset.text_column)"),
    (["dataset.format=xml"], "ok", "dataset.format=xml must be csv, jsonl or parquet"),
    ([], "label_out_of_range", "has label '7', not one of dataset.labels"),
    ([], "empty_split", "the split is empty"),
    ([], "missing_test_file", "test.csv: file not found"),
    ([], "not_utf8", "not valid UTF-8"),
    ([], "malformed_csv", "cannot be read as csv"),
    ([], "no_labelled_rows", "no labelled rows to train on"),
    (["eval.split=kfold", "eval.folds=40"], "ok", "eval.folds=40 is more than"),
    # issue 14: every scalar has its default's type, checked up front (these were tracebacks after data loading)
    (["train.warmup_ratio=abc"], None, "train.warmup_ratio=abc must be a number"),
    (["seed=abc"], None, "seed=abc must be a whole number"),
    (["peft.lora_dropout=abc"], None, "peft.lora_dropout=abc must be a number"),
    (["+peft.use_rslora=maybe"], None, "peft.use_rslora=maybe must be true or false"),
    (["+peft.bias=some"], None, "peft.bias=some must be one of none, all, lora_only"),
    (["train.lr=${nowhere}"], None, "train.lr cannot be resolved (Interpolation key 'nowhere' not found)"),
    (["dataset.text_column=5"], None, "dataset.text_column=5 must be text: quote it"),
    # a key added with + that the target class (or the section) does not have
    (["+peft.rank=16"], None, "peft.rank is not a key of peft=lora; did you mean peft.r?"),
    (
        ["peft=loha", "+peft.lora_alpha=8"],
        None,
        "peft.lora_alpha is not a key of peft=loha; did you mean peft.alpha?",
    ),
    (["+optimizer.momentum=0.9"], None, "optimizer.momentum is not a key of optimizer (torch.optim.AdamW)"),
    (
        ["+train.warmup_steps=10"],
        None,
        "train.warmup_steps is not a key of train; did you mean train.warmup_ratio?",
    ),
    (["+model.poolng=mean"], None, "model.poolng is not a key of model=minilm; did you mean model.pooling?"),
    # a file where a folder belongs
    ([], "file_as_data_dir", "is a file, not a folder; point it at a folder holding train.csv, test.csv"),
    (["model.pretrained=README.md"], None, "model.pretrained=README.md is a file, not a folder"),
    # a hub model that is not in the cache, the hub being off (conftest: HF_HUB_OFFLINE=1)
    (
        ["model.pretrained=nobody-peftlab/no-such-model"],
        None,
        "model.pretrained=nobody-peftlab/no-such-model is not in the local Hugging Face cache and the hub is off (HF_HUB_OFFLINE=1): "
        "run `huggingface-cli download nobody-peftlab/no-such-model` on a machine with internet",
    ),
    # AdaLoRA's schedule against the run's optimizer steps (16 rows, batch 8, 2 epochs: 4 steps), before the model loads
    (
        ["peft=adalora", "peft.tinit=2", "peft.tfinal=2"],
        "ok",
        "peft.tinit=2 + peft.tfinal=2 = 4 leave AdaLoRA no steps to re-allocate ranks in: the run has 4 optimizer steps "
        "(train.epochs=2 x 2 per epoch: 16 training rows, train.batch_size=8, train.grad_accum=1, 1 process(es)); "
        "make peft.tinit + peft.tfinal < 4, or raise train.epochs",
    ),
    (
        ["peft=adalora", "peft.tinit=4"],
        "ok",
        "peft.tinit=4 + peft.tfinal=null (0) = 4 leave AdaLoRA no steps",
    ),
    (["peft=adalora", "peft.tfinal=-1"], None, "peft.tfinal=-1 must be a whole number >= 0"),
    # a dtype traceback after the model loaded (11 minutes with the default data); refused on the CPU only
    (
        ["zero=stage3_cpu", "train.mixed_precision=bf16"],
        None,
        "train.mixed_precision=bf16 with zero=stage3_cpu (stage 3) fails on the CPU for a classifier with an adapter",
    ),
]


@pytest.mark.parametrize("overrides,variant,fragment", BAD, ids=[" ".join(b[0]) or b[1] for b in BAD])
def test_bad_input_is_reported_before_any_model_loads(
    tmp_path, tiny_data, no_model_loading, overrides, variant, fragment
):
    if ("needs a GPU" in fragment or "fails on the CPU" in fragment) and torch.cuda.is_available():
        pytest.skip("a valid setting on a GPU")
    data_dir = (
        None
        if variant == "skip_data_dir"
        else (broken_data(tmp_path, variant) if variant not in (None, "ok") else tiny_data)
    )
    if variant == "file_as_data_dir":
        data_dir = tiny_data / "train.csv"
    cfg = make_cfg(tmp_path / "run", *overrides, data_dir=data_dir)
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and fragment in metrics["error"]
    assert not (tmp_path / "run" / "predictions.csv").exists()


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["peft.r=0"], "error: peft.r=0 must be a whole number >= 1"),
        (["zero=stage9"], "Could not find 'zero/stage9'"),
        (["train.lrr=1"], "Key 'lrr' is not in struct"),
    ],
)
def test_command_line_exits_nonzero_with_one_line(tmp_path, tiny_data, args, fragment):
    result = run_cli(*args, f"dataset.data_dir={tiny_data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    if args == ["peft.r=0"]:
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
            f"error: {result.stderr.split('error: ')[1].strip()}"
        ]
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_unwritable_run_directory_is_one_line(tmp_path, tiny_data, no_model_loading):
    (tmp_path / "a_file").write_text("not a folder")
    cfg = make_cfg(tmp_path / "a_file" / "run", data_dir=tiny_data)
    with pytest.raises(
        ConfigError, match="cannot write the run directory .* choose a writable hydra.run.dir"
    ):
        run(cfg)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, tiny_data, no_model_loading):
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_2").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_2" / "trainer_state.json").write_text(
        '{"step": 2, "epoch": 0, "batch": 2}'
    )
    OmegaConf.save(make_cfg(run_dir, "peft.r=4", data_dir=tiny_data), run_dir / "config.yaml", resolve=True)
    interrupted = '{"status": "interrupted", "error": "interrupted by SIGTERM"}'
    (run_dir / "metrics.json").write_text(interrupted)
    with pytest.raises(ConfigError, match=r"other settings \(peft.r\).*resume=never"):
        run(make_cfg(run_dir, "peft.r=16", data_dir=tiny_data))
    assert (run_dir / "metrics.json").read_text() == interrupted  # the interrupted run's record is kept


@pytest.mark.slow
def test_a_10_megabyte_tweet_is_truncated_not_fatal(tmp_path):
    folder = write_raft(tmp_path / "data")
    train = folder / "train.csv"
    train.write_text(train.read_text() + '"' + "please fix my order " * 500_000 + '",999999,1\n')
    assert train.stat().st_size > 10_000_000
    metrics = run(make_cfg(tmp_path / "run", "model=tiny_bert", "logger=null", data_dir=folder, epochs=1))
    assert metrics["status"] == "finished" and metrics["n_train"] == 17


HEAVY = ("torch", "transformers", "accelerate", "deepspeed", "peft")


def test_a_config_error_exits_before_the_heavy_libraries_load(tmp_path, tiny_data):
    """`python run.py train.warmup_ratio=abc`: one line, exit 2, metrics.json failed, and none of torch,
    transformers, accelerate, DeepSpeed or PEFT imported before (they took 5-10 s of a config error)."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "run.py",
            "train.warmup_ratio=abc",
            f"dataset.data_dir={tiny_data}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == ["error: train.warmup_ratio=abc must be a number"]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == "train.warmup_ratio=abc must be a number"
    assert (run_dir / "config.yaml").is_file()


def test_the_early_check_keeps_an_earlier_runs_record(tmp_path, monkeypatch):
    from peftlab.cli import check_first

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"status": "finished", "error": null}')
    with pytest.raises(ConfigError, match="seed=abc must be a whole number"):
        check_first(make_cfg(run_dir, "seed=abc"))
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


def test_peft_keys_are_read_without_importing_peft():
    """The PEFT fields come from its source (ast): the same as the dataclasses' init fields, and no import."""
    code = (
        "import sys, dataclasses; from peftlab.config import target_fields; "
        "names = ['LoraConfig', 'AdaLoraConfig', 'IA3Config', 'LoHaConfig', 'LoKrConfig', 'PrefixTuningConfig', "
        "'PromptTuningConfig', 'PromptEncoderConfig']; "
        "read = {n: sorted(target_fields('peft.' + n)) for n in names}; assert 'peft' not in sys.modules; "
        "import peft; "
        "real = {n: sorted(f.name for f in dataclasses.fields(getattr(peft, n)) if f.init) for n in names}; "
        "print(read == real, [n for n in names if read[n] != real[n]])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.stdout.strip() == "True []", out.stderr[-2000:]


def test_a_wrapped_library_error_is_recorded_as_its_cause():
    from hydra.utils import instantiate

    from peftlab.experiment import one_line

    with pytest.raises(Exception) as caught:
        instantiate({"_target_": "builtins.int", "_args_": ["abc"]})
    assert type(caught.value).__name__ == "InstantiationException"
    assert one_line(caught.value) == "ValueError: invalid literal for int() with base 10: 'abc'"
    try:
        try:
            raise ConfigError("peft.r=0 must be a whole number >= 1")
        except ConfigError as e:
            from hydra.errors import InstantiationException

            raise InstantiationException("Error in call to target 'x':\nConfigError(...)") from e
    except InstantiationException as e:
        assert one_line(e) == "peft.r=0 must be a whole number >= 1"


def _predict(capsys, *args) -> tuple[int, list[str]]:
    from peftlab import predict

    code = predict.main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_predict_on_a_failed_run_is_one_line(tmp_path, tiny_data, capsys, no_model_loading):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError):
        run(make_cfg(run_dir, "train.warmup_ratio=abc", data_dir=tiny_data))
    assert _predict(capsys, run_dir, "--device", "cpu") == (
        2,
        [
            f"peftlab predict: {run_dir} holds a run that did not finish (status failed: train.warmup_ratio=abc must be a number); "
            "predict needs a finished run: run it again, or choose another"
        ],
    )


def test_predict_on_a_folder_that_is_not_a_run_directory_is_one_line(tmp_path, capsys):
    assert _predict(capsys, ROOT / "conf") == (
        2,
        [
            f"peftlab predict: {ROOT / 'conf'} is not a run directory (no readable metrics.json); give one that python run.py wrote, "
            "e.g. outputs/<date>/<time>"
        ],
    )
    assert _predict(capsys, tmp_path / "nowhere") == (
        2,
        [
            f"peftlab predict: {tmp_path / 'nowhere'}: no such folder; "
            "give a run directory (outputs/<date>/<time>)"
        ],
    )
    (tmp_path / "metrics.json").write_text('{"status": "finished"}')
    (tmp_path / "config.yaml").write_text("model: {}\ndataset: {}\npeft: {_target_: peft.LoraConfig}\n")
    assert _predict(capsys, tmp_path) == (
        2,
        [
            f"peftlab predict: {tmp_path} has no adapter/ to reload (was it run with "
            "save_adapter=false?); run it again with save_adapter=true"
        ],
    )
