"""Data as users describe it (dataset YAML) and store it (files): truncation keeps the prompt's tail,
row identity without an ID column, separate validation files, label spellings, doubtful data.

Real Hydra composition (a dataset YAML written here and found through hydra.searchpath), real files,
the real MiniLM tokenizer that model=tiny_bert/tiny_bart/tiny_gpt use.
"""

from __future__ import annotations

import csv
import json
import logging

import pytest

from peftlab import data, modeling
from peftlab.config import ConfigError
from peftlab.experiment import run

from .conftest import ModelLoaded, make_cfg, write_raft


def write_table(path, rows, header=("Tweet text", "ID", "Label")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def custom_dataset(tmp_path, yaml_text: str) -> list[str]:
    """Overrides that select conf/dataset/custom.yaml written (as users write it) under tmp_path."""
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True, exist_ok=True)
    (conf / "dataset" / "custom.yaml").write_text(yaml_text)
    return [f"hydra.searchpath=[file://{conf}]", "dataset=custom"]


DATASET_YAML = """\
name: custom
data_dir: null
format: {format}
files:
  train: train.{format}
  test: test.{format}
hub: {{path: none, name: none, revision: main}}
text_column: text
label_column: label
id_column: {id_column}
labels:
{labels}
unlabeled: {unlabeled}
prompt: "Text : {{text}} Answer : "
"""


def dataset_yaml(labels: str, unlabeled: str = "~", id_column: str = "null", fmt: str = "csv") -> str:
    return DATASET_YAML.format(labels=labels, unlabeled=unlabeled, id_column=id_column, format=fmt)


# ----------------------------------------------------------------------------- 7: truncation keeps the template


LONG = "my order never arrived, nobody answers the phone and the refund is still missing after weeks "


def long_and_short(folder):
    """train.csv/test.csv where every third row is far longer than 24 tokens."""

    def rows(start, n):
        return [
            [
                (LONG * 3 if i % 3 == 0 else "thanks for the quick delivery") + f" #{start + i}",
                str(start + i),
                1 + i % 2,
            ]
            for i in range(n)
        ]

    write_table(folder / "train.csv", rows(100, 12))
    write_table(folder / "test.csv", rows(200, 9))
    return folder


@pytest.mark.parametrize("model", ["tiny_bart", "tiny_gpt"])
def test_truncation_cuts_the_text_and_keeps_the_prompt_tail(tmp_path, model):
    folder = long_and_short(tmp_path / "data")
    cfg = make_cfg(tmp_path, f"model={model}", "train.max_length=24", data_dir=folder)
    tok, task, prompt = modeling.load_tokenizer(cfg.model), cfg.model.task, cfg.dataset.prompt
    names = data.label_names(cfg.dataset)
    rows = data.load_splits(cfg.dataset)["train"]
    feats = data.encode(rows, tok, task, prompt, names, 24)
    specials = task == "seq2seq"
    tail = tok(prompt.split("{text}")[1], add_special_tokens=False)["input_ids"]  # "Label :"
    assert tail
    end = len(tail) + (1 if specials else 0)  # seq2seq: then [SEP]
    empty = tok(prompt.format(text=""), add_special_tokens=specials)["input_ids"]
    longest = max(map(len, data.class_targets(tok, task, names))) if task == "causal_lm" else 0
    for row, feat in zip(rows, feats):
        ids = feat["input_ids"]
        assert ids[-end:] == empty[-end:], f"row {row['id']} lost the prompt's tail"
        assert len(ids) + longest <= 24
        full = tok(prompt.format(text=row["text"]), add_special_tokens=specials)["input_ids"]
        if len(full) + longest <= 24:
            assert ids == full and not feat["cut"]  # as before
        else:
            assert feat["cut"] and ids[:-end] == full[: len(ids) - end]  # the text's start, then the tail
    assert sum(f["cut"] for f in feats) == 4  # rows 0, 3, 6, 9


def test_classifier_truncation_is_counted_and_unchanged(tmp_path):
    folder = long_and_short(tmp_path / "data")
    cfg = make_cfg(tmp_path, "model=tiny_bert", data_dir=folder)
    tok = modeling.load_tokenizer(cfg.model)
    rows = data.load_splits(cfg.dataset)["test"]
    feats = data.encode(rows, tok, "seq_cls", cfg.dataset.prompt, data.label_names(cfg.dataset), 24)
    assert [f["input_ids"] for f in feats] == tok([r["text"] for r in rows], truncation=True, max_length=24)[
        "input_ids"
    ]
    assert [f["cut"] for f in feats] == [i % 3 == 0 for i in range(9)]


def test_a_run_records_how_many_rows_were_cut(tmp_path, no_model_loading, caplog):
    folder = long_and_short(tmp_path / "data")
    cfg = make_cfg(tmp_path / "run", "model=tiny_gpt", "train.max_length=24", data_dir=folder)
    with caplog.at_level(logging.INFO), pytest.raises(ModelLoaded):
        run(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["truncated_rows"] == {"train": 4, "test": 3}
    assert "train.max_length=24 cut the text of 4 of 12 train rows" in caplog.text


@pytest.mark.parametrize("model", ["tiny_bart", "tiny_gpt"])
def test_a_prompt_longer_than_max_length_is_one_line(tmp_path, tiny_data, no_model_loading, model):
    cfg = make_cfg(tmp_path / "run", f"model={model}", "train.max_length=6", data_dir=tiny_data)
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    message = str(caught.value)
    assert "train.max_length=6" in message and "dataset.prompt" in message and "\n" not in message
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


# ----------------------------------------------------------------------------- 8: row identity


@pytest.mark.parametrize("split", ["test", "validation", "kfold"])
@pytest.mark.parametrize("id_column", ["null", "NoSuchColumn"])
def test_a_dataset_without_ids_can_be_evaluated(tmp_path, tiny_data, id_column, split):
    cfg = make_cfg(
        tmp_path, f"dataset.id_column={id_column}", f"eval.split={split}", "eval.folds=4", data_dir=tiny_data
    )
    splits = data.load_splits(cfg.dataset)
    assert [r["id"] for r in splits["test"][:2]] == [
        "test:1",
        "test:2",
    ]  # the row number within its file, named so
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(set(ids)) == len(ids)
    name, plan = data.eval_plan(cfg, splits)
    for train, held in plan:
        data.check_disjoint(train, held)


def test_ids_are_compared_within_their_file_only(tmp_path):
    """Two files numbered 1..n in their own ID column: the same number is not the same row."""
    folder = tmp_path / "data"
    write_table(folder / "train.csv", [[f"train tweet {i}", str(i), 1 + i % 2] for i in range(1, 9)])
    write_table(folder / "test.csv", [[f"test tweet {i}", str(i), 1 + i % 2] for i in range(1, 7)])
    cfg = make_cfg(tmp_path, data_dir=folder)
    name, [(train, held)] = data.eval_plan(cfg, data.load_splits(cfg.dataset))
    assert name == "test" and len(held) == 6
    data.check_disjoint(train, held)


@pytest.mark.parametrize("id_column", ["ID", "null"])
def test_a_text_in_train_and_test_is_refused_with_the_pair_named(tmp_path, no_model_loading, id_column):
    folder = write_raft(tmp_path / "data")
    train, test = read_rows(folder / "train.csv"), read_rows(folder / "test.csv")
    test[11][0] = train[2][0]  # test row 12 is train row 3's tweet
    write_table(folder / "test.csv", test)
    cfg = make_cfg(tmp_path / "run", f"dataset.id_column={id_column}", data_dir=folder)
    with pytest.raises(
        ConfigError, match=r"test row 12 \(id \S+\) has the text of train row 3 \(id \S+\)"
    ) as caught:
        run(cfg)
    assert "\n" not in str(caught.value)


def test_a_row_held_out_and_trained_on_is_named(tmp_path, tiny_data):
    cfg = make_cfg(tmp_path, data_dir=tiny_data)
    train = data.load_splits(cfg.dataset)["train"]
    with pytest.raises(ConfigError, match=r"train row 5 \(id 100004\) is both trained on and evaluated"):
        data.check_disjoint(train[:8], train[4:6])


# ----------------------------------------------------------------------------- 9: a validation file


def test_a_validation_file_is_what_validation_evaluates(tmp_path, caplog):
    folder = write_raft(tmp_path / "data")
    validation = [[f"@acme a validation tweet #{i}", str(900 + i), 1 + i % 2] for i in range(6)]
    write_table(folder / "validation.csv", validation)
    cfg = make_cfg(
        tmp_path, "+dataset.files.validation=validation.csv", "eval.split=validation", data_dir=folder
    )
    with caplog.at_level(logging.INFO):
        name, plan = data.eval_plan(cfg, data.load_splits(cfg.dataset))
    assert name == "validation" and len(plan) == 1
    train, held = plan[0]
    assert [r["id"] for r in held] == [v[1] for v in validation]
    assert sorted(r["id"] for r in train) == sorted(r[1] for r in read_rows(folder / "train.csv"))
    assert "validation.csv" in caplog.text


def test_without_a_validation_file_validation_is_carved_from_train_and_says_so(tmp_path, tiny_data, caplog):
    cfg = make_cfg(tmp_path, "eval.split=validation", data_dir=tiny_data)
    with caplog.at_level(logging.INFO):
        name, [(train, held)] = data.eval_plan(cfg, data.load_splits(cfg.dataset))
    assert len(train) + len(held) == 16 and held
    assert "carved from train" in caplog.text


# ----------------------------------------------------------------------------- 10: label values as files store them


def test_yaml_boolean_label_keys_match_the_files_spellings(tmp_path):
    folder = tmp_path / "data"
    header = ("text", "id", "label")
    write_table(
        folder / "train.csv",
        [[f"tweet {i}", str(i), v] for i, v in enumerate(["yes", "No", "TRUE", "off", "On", "false", "YES"])],
        header,
    )
    write_table(folder / "test.csv", [["a", "20", "Yes"], ["b", "21", "no"], ["c", "22", ""]], header)
    cfg = make_cfg(
        tmp_path,
        *custom_dataset(tmp_path, dataset_yaml("  yes: complaint\n  no: other", id_column="id")),
        data_dir=folder,
    )
    assert list(cfg.dataset.labels) == [True, False]  # what YAML 1.1 makes of them
    splits = data.load_splits(cfg.dataset)
    assert [r["label"] for r in splits["train"]] == [0, 1, 0, 1, 0, 1, 0]
    assert [r["label"] for r in splits["test"]] == [0, 1, -1]  # unlabeled: ~ is the empty cell


def test_numeric_label_keys_match_however_the_file_writes_the_number(tmp_path):
    folder = tmp_path / "data"
    header = ("text", "id", "label")
    write_table(
        folder / "train.csv",
        [[f"tweet {i}", str(i), v] for i, v in enumerate(["1", "1.0", "+1", "2", "2.00", "0.0", "0"])],
        header,
    )
    write_table(folder / "test.csv", [["a", "20", "1"], ["b", "21", "2.0"]], header)
    cfg = make_cfg(
        tmp_path,
        *custom_dataset(tmp_path, dataset_yaml("  1: complaint\n  2.0: other", unlabeled="0")),
        data_dir=folder,
    )
    assert [r["label"] for r in data.load_splits(cfg.dataset)["train"]] == [0, 0, 0, 1, 1, -1, -1]


def test_zero_padded_codes_match_as_yaml_reads_them(tmp_path):
    folder = tmp_path / "data"
    header = ("text", "id", "label")
    write_table(
        folder / "train.csv",
        [[f"tweet {i}", str(i), v] for i, v in enumerate(["001", "010", "100", "08"])],
        header,
    )
    write_table(folder / "test.csv", [["a", "20", "010"]], header)
    cfg = make_cfg(
        tmp_path,
        *custom_dataset(tmp_path, dataset_yaml("  001: a\n  010: b\n  100: c\n  08: d")),
        data_dir=folder,
    )
    assert list(cfg.dataset.labels) == [1, 8, 100, "08"]  # YAML 1.1: 010 is octal, 08 a string
    assert [r["label"] for r in data.load_splits(cfg.dataset)["train"]] == [0, 1, 2, 3]


def test_jsonl_booleans_and_nulls(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [
        {"text": "a", "id": 1, "label": True},
        {"text": "b", "id": 2, "label": False},
        {"text": "c", "id": 3, "label": None},
    ]
    for name in ("train", "test"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = make_cfg(
        tmp_path,
        *custom_dataset(tmp_path, dataset_yaml("  yes: complaint\n  no: other", id_column="id", fmt="jsonl")),
        data_dir=folder,
    )
    splits = data.load_splits(cfg.dataset)
    assert [(r["id"], r["label"]) for r in splits["test"]] == [("1", 0), ("2", 1), ("3", -1)]


def test_an_unknown_label_names_the_values_as_users_write_them(tmp_path):
    folder = tmp_path / "data"
    header = ("text", "id", "label")
    write_table(folder / "train.csv", [["a", "1", "yes"], ["b", "2", "maybe"]], header)
    write_table(folder / "test.csv", [["a", "1", "yes"]], header)
    cfg = make_cfg(
        tmp_path, *custom_dataset(tmp_path, dataset_yaml("  yes: complaint\n  no: other")), data_dir=folder
    )
    with pytest.raises(ConfigError, match=r"row 2 has label 'maybe', not one of dataset.labels \(yes, no\)"):
        data.load_splits(cfg.dataset)


def test_a_label_name_yaml_made_a_boolean_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "data"
    for name in ("train", "test"):
        write_table(folder / f"{name}.csv", [["a", "1", "1"], ["b", "2", "2"]], ("text", "id", "label"))
    cfg = make_cfg(tmp_path, *custom_dataset(tmp_path, dataset_yaml("  1: yes\n  2: no")), data_dir=folder)
    with pytest.raises(ConfigError, match=r"dataset.labels.1 is the YAML boolean true: quote it"):
        data.load_splits(cfg.dataset)


# ----------------------------------------------------------------------------- 11: doubtful data


def test_duplicate_ids_are_refused_naming_the_file_and_ids(tmp_path, no_model_loading):
    folder = write_raft(tmp_path / "data")
    test = read_rows(folder / "test.csv")
    test[8][1] = test[4][1]
    test[9][1] = test[4][1]
    write_table(folder / "test.csv", test)
    with pytest.raises(ConfigError) as caught:
        run(make_cfg(tmp_path / "run", data_dir=folder))
    message = str(caught.value)
    assert (
        f"{folder / 'test.csv'}: id {test[4][1]} is on rows 5, 9, 10" in message
        and "dataset.id_column" in message
    )
    assert "\n" not in message


def test_duplicate_ids_matter_only_with_an_id_column(tmp_path):
    folder = write_raft(tmp_path / "data")
    test = read_rows(folder / "test.csv")
    test[8][1] = test[4][1]
    write_table(folder / "test.csv", test)
    cfg = make_cfg(tmp_path, "dataset.id_column=null", data_dir=folder)
    assert len(data.load_splits(cfg.dataset)["test"]) == 28


@pytest.mark.parametrize(
    "case,warning",
    [
        ("missing_class", "no training row has label 'no complaint'"),
        ("one_row", "only 1 labelled training row"),
    ],
)
def test_doubtful_data_is_a_warning_in_the_log_and_metrics(tmp_path, no_model_loading, caplog, case, warning):
    folder = write_raft(tmp_path / "data")
    train = read_rows(folder / "train.csv")
    train = [r for r in train if r[2] == "1"] if case == "missing_class" else train[:1]
    write_table(folder / "train.csv", train)
    with caplog.at_level(logging.WARNING), pytest.raises(ModelLoaded):
        run(make_cfg(tmp_path / "run", data_dir=folder))
    assert warning in caplog.text
    assert any(warning in w for w in json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"])


def test_a_training_text_repeated_with_another_label_is_a_warning(tmp_path, no_model_loading):
    folder = write_raft(tmp_path / "data")
    train = read_rows(folder / "train.csv")
    train[6][0], train[6][2] = (
        train[1][0],
        "1" if train[1][2] == "2" else "2",
    )  # row 7: row 2's text, the other label
    write_table(folder / "train.csv", train)
    with pytest.raises(ModelLoaded):
        run(make_cfg(tmp_path / "run", data_dir=folder))
    warnings = json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"]
    assert any(
        "1 training row repeats a text with another label (e.g. train row 7 (id 100006) and train row 2 (id 100001))"
        in w
        for w in warnings
    ), warnings


def test_a_files_key_no_run_reads_is_refused(tmp_path, tiny_data, no_model_loading):
    with pytest.raises(
        ConfigError,
        match=r"dataset.files.dev: a run reads train, test, validation files only; rename the key",
    ):
        run(make_cfg(tmp_path / "run", "+dataset.files.dev=test.csv", data_dir=tiny_data))


def test_clean_data_has_no_warnings(tmp_path, tiny_data, no_model_loading):
    with pytest.raises(ModelLoaded):
        run(make_cfg(tmp_path / "run", data_dir=tiny_data))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["warnings"] == [] and metrics["truncated_rows"] == {"train": 0, "test": 0}


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_dataset_without_ids_with_yes_no_labels_and_a_validation_file_trains_and_evaluates(tmp_path):
    folder = tmp_path / "data"
    header = ("text", "label")
    train = [[(LONG * 2 if i == 0 else f"tweet number {i}"), "yes" if i % 2 else "No"] for i in range(10)]
    write_table(folder / "train.csv", train, header)
    write_table(
        folder / "validation.csv", [[f"held out {i}", "YES" if i % 2 else "no"] for i in range(6)], header
    )
    write_table(folder / "test.csv", [[f"test {i}", ""] for i in range(3)], header)
    yaml_text = dataset_yaml("  yes: complaint\n  no: other").replace(
        "  test: test.csv", "  test: test.csv\n  validation: validation.csv"
    )
    cfg = make_cfg(
        tmp_path / "run",
        *custom_dataset(tmp_path, yaml_text),
        "model=tiny_gpt",
        "eval.split=validation",
        "train.max_length=24",
        "logger=null",
        data_dir=folder,
        epochs=1,
    )
    metrics = run(cfg)
    assert metrics["status"] == "finished" and metrics["n_train"] == 10 and metrics["final"]["n_eval"] == 6
    assert metrics["truncated_rows"] == {"train": 1, "test": 0, "validation": 0}
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [f"validation:{i}" for i in range(1, 7)]


# ----------------------------------------------------------------------------- one reader: datasets.load_dataset


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_read_as_the_same_rows_as_csv(tmp_path, fmt):
    """csv, jsonl and parquet all go through datasets.load_dataset; numbers and nulls come out as the csv's text."""
    import pandas as pd

    lines = [{"text": f"tweet {i}", "id": 10 + i, "label": [1, 2, None][i % 3]} for i in range(6)]
    folder = tmp_path / fmt
    folder.mkdir()
    frame = pd.DataFrame(lines).astype({"label": "Int64"})
    for name in ("train", "test"):
        frame.to_csv(folder / f"{name}.csv", index=False)
        frame.to_json(
            folder / f"{name}.jsonl", orient="records", lines=True
        ) if fmt == "jsonl" else frame.to_parquet(folder / f"{name}.parquet")
    labels = "  1: complaint\n  2: other"
    as_csv = data.load_splits(
        make_cfg(
            tmp_path / "a",
            *custom_dataset(tmp_path / "a", dataset_yaml(labels, id_column="id")),
            data_dir=folder,
        ).dataset
    )
    other = data.load_splits(
        make_cfg(
            tmp_path / "b",
            *custom_dataset(tmp_path / "b", dataset_yaml(labels, id_column="id", fmt=fmt)),
            data_dir=folder,
        ).dataset
    )
    assert [(r["id"], r["text"], r["label"]) for r in other["train"]] == [
        (r["id"], r["text"], r["label"]) for r in as_csv["train"]
    ]
    assert [r["label"] for r in other["train"]] == [0, 1, -1, 0, 1, -1]


def test_too_few_rows_to_carve_a_validation_split_is_one_line(tmp_path):
    folder = tmp_path / "data"
    write_table(
        folder / "train.csv", [["only tweet", "1", "1"], ["second tweet", "2", "2"], ["third", "3", "1"]]
    )
    write_table(folder / "test.csv", [["a test tweet", "9", "1"]])
    cfg = make_cfg(tmp_path, "eval.split=validation", "eval.val_fraction=0.2", data_dir=folder)
    with pytest.raises(
        ConfigError,
        match=r"eval.split=validation: 3 labelled training rows are too few to hold out eval.val_fraction=0.2",
    ):
        data.eval_plan(cfg, data.load_splits(cfg.dataset))
