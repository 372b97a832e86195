"""Reading, held-out splits, tokenization and batching, on the real tokenizer."""

from __future__ import annotations

import pytest

from peftlab import data, modeling
from peftlab.config import ConfigError
from peftlab.engine import closest_label

from .conftest import make_cfg


def test_reads_raft_layout_with_label_ids_and_unlabeled_rows(tmp_path, tiny_data):
    cfg = make_cfg(tmp_path, data_dir=tiny_data)
    splits = data.load_splits(cfg.dataset)
    assert len(splits["train"]) == 16 and len(splits["test"]) == 28
    assert {r["label"] for r in splits["train"]} == {0, 1}  # 1 -> complaint (0), 2 -> no complaint (1)
    assert sum(r["label"] == -1 for r in splits["test"]) == 4


def test_paths_data_dir_is_searched_when_no_data_dir_is_given(tmp_path, tiny_data):
    cfg = make_cfg(tmp_path, f"paths.data_dir={tiny_data.parent}")
    assert data.resolve_data_dir(cfg.dataset, cfg.paths.data_dir) == tiny_data


@pytest.mark.parametrize("split", ["test", "validation", "kfold"])
def test_evaluation_never_sees_a_training_row(tmp_path, tiny_data, split):
    cfg = make_cfg(tmp_path, f"eval.split={split}", "eval.folds=4", data_dir=tiny_data)
    name, plan = data.eval_plan(cfg, data.load_splits(cfg.dataset))
    assert name == split
    for train, held in plan:
        assert not {r["id"] for r in train} & {r["id"] for r in held}
        assert all(r["label"] >= 0 for r in held)
        data.check_disjoint(train, held)
    if split == "kfold":
        assert len(plan) == 4
        assert sorted(r["id"] for _, held in plan for r in held) == sorted(
            r["id"] for r in data.load_splits(cfg.dataset)["train"]
        )


def test_check_disjoint_catches_a_leak():
    row = {"id": "1", "text": "a", "label": 0}
    with pytest.raises(ConfigError, match="the row with id 2 has the text of the row with id 1"):
        data.check_disjoint([row], [dict(row, id="2")])
    with pytest.raises(ConfigError, match="the row with id 1 is both trained on and evaluated"):
        data.check_disjoint([row], [dict(row, text="b")])


def test_unlabeled_test_split_falls_back_to_validation(tmp_path, tiny_data):
    cfg = make_cfg(tmp_path, data_dir=tiny_data)
    splits = data.load_splits(cfg.dataset)
    splits["test"] = [dict(r, label=-1) for r in splits["test"]]
    name, plan = data.eval_plan(cfg, splits)
    assert name == "validation" and plan[0][1]


def test_folds_are_stratified():
    rows = [{"id": str(i), "text": str(i), "label": int(i < 12)} for i in range(30)]
    for fold in data.stratified_folds(rows, 3, seed=1):
        assert sum(r["label"] for r in fold) == 4 and len(fold) == 10


def test_repeated_folds_hold_out_every_row_once_per_repeat_each_repeat_shuffled_anew():
    rows = [{"id": str(i), "text": str(i), "label": int(i < 12)} for i in range(30)]
    plan = data.kfold_plan(rows, 3, seed=1, repeats=3)
    assert len(plan) == 9 and plan[:3] == data.kfold_plan(rows, 3, seed=1)  # repeat 0: the unrepeated plan
    repeats = [plan[i : i + 3] for i in (0, 3, 6)]
    for folds in repeats:
        held = [r["id"] for _, out in folds for r in out]
        assert sorted(held) == sorted(r["id"] for r in rows)  # every row once per repeat
        assert all(sum(r["label"] for r in out) == 4 for _, out in folds)  # stratified
        assert all(not {r["id"] for r in kept} & {r["id"] for r in out} for kept, out in folds)
    first = [{r["id"] for r in out} for _, out in repeats[0]]
    assert all([{r["id"] for r in out} for _, out in other] != first for other in repeats[1:])  # reshuffled


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_bart", "tiny_gpt"])
def test_batches_for_every_purpose(tmp_path, tiny_data, model):
    cfg = make_cfg(tmp_path, f"model={model}", data_dir=tiny_data)
    tok = modeling.load_tokenizer(cfg.model)
    names = data.label_names(cfg.dataset)
    rows = [r for r in data.load_splits(cfg.dataset)["train"]][:4]
    feats = data.encode(rows, tok, cfg.model.task, cfg.dataset.prompt, names, 32)
    assert data.encode(rows, tok, cfg.model.task, cfg.dataset.prompt, names, 32) is feats  # cached
    targets = data.class_targets(tok, cfg.model.task, names) if cfg.model.task != "seq_cls" else None
    train = data.Collator(cfg.model.task, "train", tok.pad_token_id)(feats)
    assert train["input_ids"].shape == train["attention_mask"].shape and train["labels"].shape[0] == 4
    if cfg.model.task == "causal_lm":  # loss only on the label tokens, which end the left-padded rows
        first = train["labels"][0]
        n_target = len(targets[rows[0]["label"]])
        assert (first != -100).sum() == n_target and (first[-n_target:] != -100).all()
        assert (train["attention_mask"][:, -1] == 1).all()
    if targets:
        score = data.Collator(cfg.model.task, "score", tok.pad_token_id, targets)(feats)
        assert score["labels"].shape[0] == 4 * len(names)  # every row with every label
        # seq2seq: each row's input once (the encoder runs once per row); causal: each (row, label) pair
        assert score["input_ids"].shape[0] == (4 if cfg.model.task == "seq2seq" else 4 * len(names))
        gen = data.Collator(cfg.model.task, "generate", tok.pad_token_id, targets)(feats)
        assert "labels" not in gen
        if cfg.model.task == "causal_lm":
            assert (gen["attention_mask"][:, -1] == 1).all()  # left-padded: prompts end together


def test_closest_label():
    names = ["complaint", "no complaint"]
    assert closest_label("complaint", names) == 0
    assert closest_label("no complaint", names) == 1
    assert closest_label("no complain", names) == 1
    assert closest_label("complaints!", names) == 0
