"""peftlab predict RUN_DIR --input FILE: new rows from csv, jsonl or parquet, for each task type, adapters and full
fine-tuning; bad input files are one line and exit 2."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import yaml

from peftlab import predict
from peftlab.experiment import run

from .conftest import make_cfg

NAMES = ["complaint", "no complaint"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(frame: pd.DataFrame, path) -> None:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,peft,fmt",
    [
        ("tiny_bert", "lora", "jsonl"),
        ("tiny_bart", "lora", "csv"),
        ("tiny_gpt", "prompt_tuning", "parquet"),
        ("tiny_bert", "none", "jsonl"),
        (
            "tiny_bert model.pooling=mean",
            "none",
            "csv",
        ),  # the whole model saved, its head on mean-pooled states
    ],
)
def test_predict_classifies_the_rows_of_a_new_file(tmp_path, tiny_data, capsys, model, peft, fmt):
    """The run's test rows, without their labels, as a new file: each gets the run's own prediction, and label
    probabilities that are its log-likelihoods in predictions.csv normalized over the labels."""
    run_dir = tmp_path / "run"
    metrics = run(make_cfg(run_dir, *f"model={model}".split(), f"peft={peft}", data_dir=tiny_data, epochs=2))
    assert metrics["status"] == "finished", metrics.get("error")
    rows = pd.read_csv(tiny_data / "test.csv", dtype=str).drop(columns=["Label"])
    new = tmp_path / f"new.{fmt}"
    write_rows(rows, new)
    out = tmp_path / "out.csv"
    assert predict.main([str(run_dir), "--input", str(new), "--out", str(out), "--device", "cpu"]) == 0
    assert f"28 rows of {new} classified" in capsys.readouterr().err
    got = read_csv(out)
    assert list(got[0]) == ["id", "text", "prediction", "p_complaint", "p_no complaint"]
    assert [r["id"] for r in got] == list(rows["ID"]) and [r["text"] for r in got] == list(rows["Tweet text"])
    saved = {r["id"]: r for r in read_csv(run_dir / "predictions.csv")}
    assert len(saved) == 24 and saved.keys() <= {r["id"] for r in got}
    for r in got:
        p = [float(r[f"p_{n}"]) for n in NAMES]
        assert abs(sum(p) - 1) < 1e-5 and r["prediction"] == NAMES[p.index(max(p))]
        if r["id"] in saved:
            assert r["prediction"] == saved[r["id"]]["prediction"]
            expected = predict.probabilities([float(saved[r["id"]][f"logp_{n}"]) for n in NAMES])
            assert max(abs(a - b) for a, b in zip(p, expected)) < 1e-4


@pytest.mark.slow
def test_predict_writes_to_standard_output_without_out(tmp_path, tiny_data, capsys):
    run_dir = tmp_path / "run"
    run(make_cfg(run_dir, "model=tiny_bert", data_dir=tiny_data, epochs=1))
    new = tmp_path / "new.jsonl"
    new.write_text(
        json.dumps({"Tweet text": "@acme my parcel never came"})
        + "\n"
        + json.dumps({"Tweet text": "thanks!"})
        + "\n"
    )
    assert predict.main([str(run_dir), "--input", str(new)]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == "id,text,prediction,p_complaint,p_no complaint" and len(lines) == 3
    assert lines[1].startswith("1,@acme my parcel never came,") and lines[2].startswith(
        "2,thanks!,"
    )  # no id column: row numbers
    assert err.strip().splitlines()[-1].startswith(f"2 rows of {new} classified (")


@pytest.fixture
def finished_run(tmp_path):
    """What check_run_dir accepts; the input file is read before any model loads, so nothing else is needed."""
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"status": "finished"}))
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny_bert", "task": "seq_cls"},
                "peft": {"_target_": "peft.LoraConfig"},
                "dataset": {"text_column": "Tweet text", "id_column": "ID"},
                "eval": {"batch_size": 8},
            }
        )
    )
    return run_dir


@pytest.mark.parametrize(
    "name,content,expected",
    [
        (
            "rows.jsonl",
            '{"text": "hi", "ID": 1}\n',
            "--input {path}: no column 'Tweet text' (the run's dataset.text_column); its "
            "columns are: text, ID; rename the text column, or give --text-column NAME",
        ),
        ("rows.csv", b"Tweet text\n\xff\xfe broken\n", "not valid UTF-8"),
        ("rows.jsonl", "{not json\n", "cannot be read as jsonl"),
        ("rows.parquet", "not parquet", "cannot be read as parquet"),
        (
            "rows.txt",
            "a text\n",
            "--input {path}: cannot tell its format from '.txt'; give a .csv, .jsonl or .parquet file",
        ),
        ("missing.csv", None, "--input {path}: no such file"),
        ("folder.csv", "dir", "--input {path}: a folder, not a file"),
    ],
)
def test_a_bad_input_file_is_one_line_and_exit_2(finished_run, tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert predict.main([str(finished_run), "--input", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("peftlab predict: --input ")
    assert expected.format(path=path) in err
