"""peftlab export: the merged model loads with plain transformers, the adapter with PeftModel.from_pretrained, in
a Python that cannot import peftlab, and both reproduce the run's predictions.csv."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import yaml

from peftlab import export
from peftlab.export import base_model_id

from .conftest import ROOT, make_cfg

NAMES = ["complaint", "no complaint"]

# Run with `python -I -S`: no PYTHONPATH, no current directory, no site-packages .pth files (peftlab's editable
# install is one); site-packages itself is added by hand, so torch, transformers and peft are there, peftlab is not.
PLAIN = r"""
import json, sys
sys.path.append(sys.argv[1])
import importlib.util
assert importlib.util.find_spec("peftlab") is None, "peftlab is importable"
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, kind, texts = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(folder)
if kind == "merged":
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    id2label = model.config.id2label
else:
    from peft import PeftModel
    labels = json.load(open(folder + "/labels.json"))
    id2label = {int(k): v for k, v in labels["id2label"].items()}
    base = AutoModelForSequenceClassification.from_pretrained(folder + "/base_model")
    model = PeftModel.from_pretrained(base, folder)
model.eval()
with torch.no_grad():
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    logp = model(**batch).logits.float().log_softmax(-1)
print(json.dumps({"prediction": [id2label[int(i)] for i in logp.argmax(-1)], "logp": logp.tolist(),
                  "peftlab": sorted(m for m in sys.modules if m.startswith("peftlab"))}))
"""


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A run made by run.py (so .hydra/overrides.yaml records its command), trained enough to have opinions."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "model=tiny_bert",
        "train.lr=5e-2",
        "train.epochs=10",
        f"dataset.data_dir={tiny_data}",
        f"hydra.run.dir={run_dir}",
        "logger=null",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def plain_predictions(folder, kind: str, texts: list[str], cwd) -> dict:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            PLAIN,
            sysconfig.get_paths()["purelib"],
            str(folder),
            kind,
            json.dumps(texts),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def pointers(folder) -> list[str]:
    """Text files of ``folder`` that name a path into the cache, the virtualenv or the checkout."""
    places = [os.environ["PEFTLAB_CACHE_DIR"], sys.prefix, str(ROOT)]
    return [
        str(p)
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in (".json", ".md", ".txt", ".yaml")
        and any(place in p.read_text(encoding="utf-8", errors="replace") for place in places)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_export_reproduces_the_run_without_peftlab(trained, tmp_path, capsys, kind):
    out = tmp_path / "export"
    assert export.main([str(trained), str(out), *(["--merge"] if kind == "merged" else [])]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("exported the ")
    files = {p.name for p in out.iterdir()}
    assert {"README.md", "tokenizer.json", "tokenizer_config.json"} <= files
    if kind == "merged":
        assert {"config.json", "model.safetensors"} <= files and "adapter_config.json" not in files
        config = json.loads((out / "config.json").read_text())
        assert config["id2label"] == {"0": "complaint", "1": "no complaint"} and config["label2id"] == {
            "complaint": 0,
            "no complaint": 1,
        }
    else:
        assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "base_model"} <= files
        assert (
            json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base_model"
        )
    assert pointers(out) == []  # everything is in the folder: the random base weights too
    card = (out / "README.md").read_text()
    final = json.loads((trained / "metrics.json").read_text())["final"]
    assert f"| {final['accuracy']:.4f} | {final['macro_f1']:.4f} | 24 |" in card
    assert (
        "python run.py model=tiny_bert train.lr=5e-2 train.epochs=10 dataset.data_dir=" in card
    )  # .hydra/overrides.yaml
    assert "method: lora (peft.r=8, peft.lora_alpha=32" in card and "trained on 16 labelled rows" in card

    saved = read_csv(trained / "predictions.csv")
    got = plain_predictions(out, kind, [r["text"] for r in saved], cwd=tmp_path)
    assert got["peftlab"] == []
    assert got["prediction"] == [r["prediction"] for r in saved]
    assert len(set(got["prediction"])) == 2  # the run learned something: both labels are predicted
    expected = [[float(r[f"logp_{n}"]) for n in NAMES] for r in saved]
    assert max(abs(a - b) for row, exp in zip(got["logp"], expected) for a, b in zip(row, exp)) < 1e-4


@pytest.mark.slow
def test_the_runs_own_adapter_carries_tokenizer_and_labels(trained):
    adapter = trained / "adapter"
    assert {"tokenizer.json", "tokenizer_config.json", "labels.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "labels.json").read_text())["id2label"] == {
        "0": "complaint",
        "1": "no complaint",
    }


def test_a_packaged_hub_model_is_named_by_its_hub_id(tmp_path):
    assert base_model_id(make_cfg(tmp_path, "model=minilm").model) == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id(make_cfg(tmp_path, "model=bart_large").model) == "facebook/bart-large"
    assert (
        base_model_id(make_cfg(tmp_path, "model=minilm", "model.pretrained=./my-model").model) == "./my-model"
    )
    assert base_model_id(make_cfg(tmp_path, "model=tiny_bert").model) is None


def fake_run(folder, peft: dict, pooling: str = "cls"):
    """What export checks before any model loads."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": "finished"}))
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny_bert", "task": "seq_cls", "pooling": pooling},
                "peft": peft,
                "dataset": {"name": "twitter_complaints"},
            }
        )
    )
    return folder


@pytest.mark.parametrize(
    "peft,pooling,options,expected",
    [
        (
            {"_target_": "peft.PromptTuningConfig"},
            "cls",
            ["--merge"],
            "peftlab export: --merge: peft=prompt_tuning learns virtual tokens that are put before the input, not a change to any "
            "weight of the base model, so there is nothing to merge into it; export without --merge",
        ),
        (
            {"_target_": "peft.PrefixTuningConfig"},
            "cls",
            ["--merge"],
            "--merge: peft=prefix_tuning learns virtual tokens",
        ),
        (
            {"_target_": "peft.LoraConfig"},
            "mean",
            [],
            "model.pooling=mean: the run's classifier reads the mean of the token states",
        ),
    ],
)
def test_what_cannot_be_exported_is_one_line_and_exit_2(tmp_path, capsys, peft, pooling, options, expected):
    run_dir = fake_run(tmp_path / "run", peft, pooling)
    assert export.main([str(run_dir), str(tmp_path / "out"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err and not (tmp_path / "out").exists()


def test_an_existing_folder_is_not_overwritten(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", {"_target_": "peft.LoraConfig"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert export.main([str(run_dir), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peftlab export: {tmp_path / 'out'} already exists and is not empty; "
        "give a new folder for the export (or remove that one)"
    )


def test_push_to_hub_offline_fails_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(export.ConfigError) as failed:
        export.push(tmp_path, "someone/peftlab-export")
    message = str(failed.value)
    assert "\n" not in message and message.startswith(
        "--push-to-hub someone/peftlab-export: the upload failed ("
    )
    assert message.endswith(
        f"the export is in {tmp_path}: push it later with `huggingface-cli upload someone/peftlab-export "
        f"{tmp_path}` where the hub is reachable and you are logged in"
    )


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["ia3", "loha", "lokr", "adalora", "none"])
def test_every_mergeable_method_and_full_fine_tuning_export_for_plain_transformers(tmp_path, tiny_data, peft):
    from peftlab.experiment import run

    run_dir = tmp_path / "run"
    assert (
        run(
            make_cfg(run_dir, "model=tiny_bert", f"peft={peft}", "logger=null", data_dir=tiny_data, epochs=2)
        )["status"]
        == "finished"
    )
    what = export.export(run_dir, tmp_path / "export", merge=True)
    assert what.startswith(
        "the fully fine-tuned model" if peft == "none" else f"the base model with the {peft} adapter merged"
    )
    assert pointers(tmp_path / "export") == []
    saved = read_csv(run_dir / "predictions.csv")
    got = plain_predictions(tmp_path / "export", "merged", [r["text"] for r in saved], cwd=tmp_path)
    assert got["prediction"] == [r["prediction"] for r in saved]
    expected = [[float(r[f"logp_{n}"]) for n in NAMES] for r in saved]
    assert max(abs(a - b) for row, exp in zip(got["logp"], expected) for a, b in zip(row, exp)) < 1e-4
