"""SetFit's contrastive objective (peftlab.contrastive): pairs, the loss on real models and rows, the
two-phase schedule, label-name heads, and a step through a real DeepSpeed ZeRO-3 engine on the CPU."""

from __future__ import annotations

import json
import math
import signal
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from peftlab import contrastive, data, modeling
from peftlab.config import ConfigError, check_objective, peft_method

from .conftest import make_cfg
from .test_determinism import comparable


def _model(cfg, names, tok):
    """The run's model as the loop builds it: base weights (random for tiny_bert), then the adapter."""
    m = cfg.model
    weights = modeling.base_weights(m, cfg.seed, len(names), cfg.paths.cache_dir)
    peft = modeling.peft_config(cfg.peft, peft_method(cfg), m.task, total_steps=8)
    return modeling.build_model(
        m, len(names), weights, seed=cfg.seed, pad_token_id=tok.pad_token_id, peft=peft
    )


def _rows(tmp_path, tiny_data, *overrides):
    cfg = make_cfg(tmp_path, "model=tiny_bert", "model.pooling=mean", *overrides, data_dir=tiny_data)
    names = data.label_names(cfg.dataset)
    tok = modeling.load_tokenizer(cfg.model)
    rows = data.load_splits(cfg.dataset, cfg.paths.data_dir)["train"]
    return cfg, names, tok, data.encode(rows, tok, "seq_cls", cfg.dataset.prompt, names, 64)


def test_pairs_are_balanced_never_a_row_with_itself_and_fixed_by_the_seed():
    labels = [0, 1, 1, 0, 2, 2, 1, 0, 2, 1]
    got = contrastive.pairs(labels, num_iterations=3, seed=5)
    assert len(got) == 2 * 3 * len(labels)
    assert all(p.a != p.b for p in got)
    assert all(p.similarity == float(labels[p.a] == labels[p.b]) for p in got)
    kinds = Counter((p.a, p.similarity) for p in got)  # each row anchors 3 positives and 3 negatives
    assert set(kinds.values()) == {3} and len(kinds) == 2 * len(labels)
    assert got == contrastive.pairs(labels, num_iterations=3, seed=5)
    assert got != contrastive.pairs(labels, num_iterations=3, seed=6)
    partners = {
        p.b for p in contrastive.pairs(labels, num_iterations=50, seed=0) if p.a == 4 and p.similarity
    }
    assert partners == {5, 8}  # every other row of its label is drawn, and no row of another


@pytest.mark.parametrize(
    "labels,fix", [([0, 0, 1], "single row"), ([1, 1, 1], "one label"), ([0, -1, 0, 1, 1], "no label")]
)
def test_pairs_refuse_labels_that_leave_a_row_without_partners(labels, fix):
    with pytest.raises(ValueError, match=fix):
        contrastive.pairs(labels, num_iterations=1, seed=0)


def test_pair_batches_hold_both_texts_of_each_pair_and_their_targets(tmp_path, tiny_data):
    _, _, tok, feats = _rows(tmp_path, tiny_data)
    pairs = contrastive.pair_features(feats, num_iterations=2, seed=0)
    chosen = contrastive.pairs([f["label"] for f in feats], 2, 0)
    batch = contrastive.PairCollator(tok.pad_token_id)(pairs[:4])
    assert batch["input_ids"].shape[0] == 8 and batch["similarity"].tolist() == [
        p.similarity for p in chosen[:4]
    ]
    for k, p in enumerate(chosen[:4]):
        for row, ids in ((k, feats[p.a]["input_ids"]), (k + 4, feats[p.b]["input_ids"])):
            n = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :n].tolist() == ids
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())


def test_embeddings_are_the_mean_pooled_states_the_head_reads(tmp_path, tiny_data):
    """model.pooling=mean feeds the classifier modeling.MeanPooler's mean; the objective's embedding is that mean."""
    cfg, names, tok, feats = _rows(tmp_path, tiny_data, "peft=none")
    model = _model(cfg, names, tok).eval()
    batch = data.Collator("seq_cls", "score", tok.pad_token_id)(feats[:5])
    with torch.no_grad():
        got = contrastive.embeddings(model, batch["input_ids"], batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(model.classifier(got), logits, atol=1e-5)
    one = torch.tensor([feats[0]["input_ids"]])
    with torch.no_grad():  # padding changes nothing
        assert torch.allclose(contrastive.embeddings(model, one, torch.ones_like(one))[0], got[0], atol=1e-5)


def _separation(model, batch, labels) -> float:
    """Mean cosine of same-label pairs minus that of different-label pairs (distinct rows)."""
    with torch.no_grad():
        emb = F.normalize(
            contrastive.embeddings(model.eval(), batch["input_ids"], batch["attention_mask"]), dim=-1
        )
    cos, same = emb @ emb.T, labels[:, None] == labels[None, :]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return (cos[same & off].mean() - cos[~same].mean()).item()


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_training_lowers_the_loss_and_pulls_same_label_rows_together(tmp_path, tiny_data, peft):
    """A few steps of the objective on tiny_bert and the conftest rows (complaints and other tweets): the
    loss on a fixed set of pairs falls, and same-label rows end closer than different-label ones."""
    cfg, names, tok, feats = _rows(
        tmp_path, tiny_data, f"peft={peft}", "peft.r=8" if peft == "lora" else "seed=42"
    )
    model = _model(cfg, names, tok)
    collate = contrastive.PairCollator(tok.pad_token_id)
    pairs = contrastive.pair_features(feats, num_iterations=4, seed=0)
    held = collate(contrastive.pair_features(feats, num_iterations=1, seed=99))
    rows = data.Collator("seq_cls", "score", tok.pad_token_id)(feats)
    labels = torch.tensor([f["label"] for f in feats])

    def fixed_loss():
        with torch.no_grad():
            return contrastive.loss(model.eval(), held).item()

    before, apart = fixed_loss(), _separation(model, rows, labels)
    optimizer = torch.optim.AdamW(modeling.trainable_parameters(model), lr=3e-2 if peft == "lora" else 3e-3)
    model.train()
    for _ in range(6):
        for k in range(0, len(pairs), 16):
            contrastive.loss(model, collate(pairs[k : k + 16])).backward()
            optimizer.step()
            optimizer.zero_grad()
    after, together = fixed_loss(), _separation(model, rows, labels)
    assert after < 0.7 * before, (before, after)
    assert together > apart + 0.2, (apart, together)


def test_two_phase_schedule_trains_the_body_then_the_head_only(tmp_path, tiny_data):
    """Phase 1 moves the adapter and not the head; phase 2 (cross-entropy, body at rate 0) the head alone."""
    cfg, names, tok, feats = _rows(tmp_path, tiny_data, "peft=lora")
    model = _model(cfg, names, tok)
    groups = modeling.parameter_groups(model)
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    scheduler = contrastive.two_phase_schedule(optimizer, body_steps=4, head_steps=3, warmup_ratio=0.5)
    factors = [scheduler.lr_lambdas[g](s) for s in range(8) for g in (0, 1)]
    assert factors[0::2] == [0, 0, 0, 0, 0.5, 1.0, 0.5, 0]  # head: 1 warm-up step of 3, then linear decay
    assert factors[1::2] == [1 / 3, 2 / 3, 1.0, 0.5, 0, 0, 0, 0]  # body: 2 warm-up steps of 4
    snapshot = lambda i: [p.detach().clone() for p in groups[i]["params"]]
    moved = lambda old, i: any(not torch.equal(a, b) for a, b in zip(old, groups[i]["params"]))
    pairs = contrastive.pair_features(feats, num_iterations=1, seed=0)
    train = data.Collator("seq_cls", "train", tok.pad_token_id)
    for step in range(7):
        head, body = snapshot(0), snapshot(1)
        if step < 4:
            loss = contrastive.loss(
                model, contrastive.PairCollator(tok.pad_token_id)(pairs[8 * step : 8 * step + 8])
            )
        else:
            batch = train(feats[:8] if step % 2 else feats[8:16])
            batch.pop("row"), batch.pop("num_tokens")
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        assert (moved(head, 0), moved(body, 1)) == ((False, True) if step < 4 else (True, False)), step


def test_label_names_initialise_a_linear_head_and_not_mpnets(tmp_path, tiny_data):
    cfg, names, tok, feats = _rows(tmp_path, tiny_data, "peft=lora")
    model = _model(cfg, names, tok)
    head = contrastive.head_linear(model)
    assert head is model.base_model.model.classifier.modules_to_save["default"]
    weight = contrastive.init_head_from_names(model, tok, names)
    assert torch.equal(head.weight, weight) and not head.bias.any()
    enc = tok(names, padding=True, return_tensors="pt")
    with torch.no_grad():  # each name is classified as itself: its row is the one most aligned with it
        logits = model.eval()(**enc).logits
    assert logits.argmax(-1).tolist() == list(range(len(names)))
    from transformers import AutoModelForSequenceClassification, MPNetConfig

    mpnet = AutoModelForSequenceClassification.from_config(
        MPNetConfig(
            vocab_size=100,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
    )
    with pytest.raises(ValueError, match="one trainable linear layer"):
        contrastive.head_linear(mpnet)


def test_objective_checks_name_the_key_and_the_fix():
    check_objective("contrastive", "seq_cls", "mean")
    check_objective("cross_entropy", "seq2seq", "cls")
    for args, fix in [
        (("setfit", "seq_cls", "mean"), "cross_entropy, contrastive"),
        (("contrastive", "seq2seq", "cls"), "model.task=seq_cls"),
        (("contrastive", "seq_cls", "cls"), "model.pooling=mean"),
    ]:
        with pytest.raises(ConfigError, match=fix):
            check_objective(*args)


@pytest.mark.slow
def test_the_loss_trains_through_a_deepspeed_zero3_engine(tmp_path, tiny_data):
    """The objective's forward and backward through a real ZeRO-3 engine (Accelerate's prepare, CPU): the
    loss on fixed pairs falls, and label-name initialisation writes the partitioned head."""
    from peftlab.distributed import make_accelerator, reset_state

    cfg, names, tok, feats = _rows(tmp_path, tiny_data, "peft=lora", "zero=stage3", "train.batch_size=8")
    modeling.base_weights(cfg.model, cfg.seed, len(names), cfg.paths.cache_dir)  # made before zero.Init is on
    try:
        accelerator = make_accelerator(cfg.zero, cfg.train, str(tmp_path))
        model = _model(cfg, names, tok)
        optimizer = torch.optim.AdamW(modeling.parameter_groups(model), lr=3e-2)
        collate = contrastive.PairCollator(tok.pad_token_id)
        loader = torch.utils.data.DataLoader(
            contrastive.pair_features(feats, 4, 0), batch_size=8, collate_fn=collate
        )
        scheduler = contrastive.two_phase_schedule(optimizer, body_steps=3 * len(loader), head_steps=1)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        assert type(model).__name__ == "DeepSpeedEngine"
        held = {
            k: v.to(accelerator.device) if torch.is_tensor(v) else v
            for k, v in collate(contrastive.pair_features(feats, 1, 99)).items()
        }
        fixed_loss = lambda: (model.eval(), contrastive.loss(model, held).item())[1]
        with torch.no_grad():
            before = fixed_loss()
        model.train()
        for _ in range(3):
            for batch in loader:
                accelerator.backward(contrastive.loss(model, batch))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        with torch.no_grad():
            after = fixed_loss()
        assert after < 0.8 * before, (before, after)
        weight = contrastive.init_head_from_names(model, tok, names, device=accelerator.device)
        head = contrastive.head_linear(model)
        import deepspeed

        with deepspeed.zero.GatheredParameters([head.weight]):
            assert torch.allclose(head.weight, weight)
    finally:
        reset_state()


# tiny_bert on the conftest rows (16 training rows), 1 round of pairs: 32 pairs in batches of 2 make 16
# optimizer steps of the contrastive phase, then 2 head epochs of 8 steps each
RUN = [
    "model=tiny_bert",
    "model.pooling=mean",
    "objective=contrastive",
    "objective.num_iterations=1",
    "objective.batch_size=2",
    "train.batch_size=2",
    "logger=null",
]


def test_a_contrastive_run_trains_the_body_on_pairs_then_the_head_from_label_names(tmp_path, tiny_data):
    """A real run (experiment.run, as python run.py): the loss curve covers the pair phase and the head phase;
    the head starts from the label names' embeddings under the body the pair phase left (label_init at the
    head phase's start, not the run's: the body moved in between) and, at a head learning rate of 1e-9, ends
    there: the body stays frozen through the head phase."""
    from peftlab.experiment import run, summary_line

    cfg = make_cfg(
        tmp_path / "run",
        *RUN,
        "objective.label_init=true",
        "objective.body_lr=1e-2",
        "train.lr=1e-9",
        data_dir=tiny_data,
    )
    metrics = run(cfg)
    assert metrics["status"] == "finished", metrics["error"]
    assert [e["steps"] for e in metrics["epochs"]] == [16, 8, 8]
    assert [e["phase"] for e in metrics["epochs"]] == ["pairs", "rows", "rows"]
    train = metrics["phases"]["train"]  # s/step of the row phase (its first epoch is warm-up), pairs apart
    assert train["s_per_step"] == metrics["epochs"][2]["s_per_step"]
    assert train["pair_s_per_step"] == metrics["epochs"][0]["s_per_step"]
    speed = f"{train['s_per_step']} s/step (pair phase {train['pair_s_per_step']} s/step)"
    assert speed in summary_line(metrics)
    assert [s for s, _ in metrics["loss_curve"]] == list(range(1, 33))
    pair_loss, head_loss = metrics["epochs"][0]["loss"], metrics["epochs"][1]["loss"]
    assert 0 < pair_loss < 1 and abs(head_loss - math.log(2)) < 0.1  # cosine MSE, then 2-label cross-entropy
    model, tok, saved = modeling.load_trained(tmp_path / "run")
    names = data.label_names(saved.dataset)
    head = model.base_model.model.classifier.modules_to_save["default"]
    enc = tok(names, padding=True, return_tensors="pt")
    with torch.no_grad():
        after = contrastive.embeddings(model, enc["input_ids"], enc["attention_mask"])
        base = modeling.run_base_model(saved, tok.pad_token_id).eval()  # the body before the pair phase
        before = contrastive.embeddings(base, enc["input_ids"], enc["attention_mask"])
    expected = F.normalize(after, dim=-1) * 10 / after.norm(dim=-1).mean()  # init_head_from_names' rows
    assert torch.allclose(head.weight, expected, atol=1e-5), (head.weight - expected).abs().max()
    assert not head.bias.abs().gt(1e-5).any()
    assert not torch.allclose(F.normalize(before, dim=-1), F.normalize(after, dim=-1), atol=1e-3)


def test_the_pair_phase_steps_in_objective_batch_size_pairs(tmp_path, tiny_data):
    """objective.batch_size (SetFit's 16 by default) sets the pair phase's batches apart from train.batch_size:
    32 pairs in batches of 8 are 4 steps, then 2 head epochs of 16 rows in batches of 2, 8 steps each."""
    from peftlab.experiment import run

    args = [a for a in RUN if not a.startswith("objective.batch_size")]
    metrics = run(
        make_cfg(tmp_path / "run", *args, "objective.batch_size=8", "train.epochs=2", data_dir=tiny_data)
    )
    assert metrics["status"] == "finished", metrics["error"]
    assert [e["steps"] for e in metrics["epochs"]] == [4, 8, 8]


@pytest.mark.slow
@pytest.mark.parametrize("every", [3, 19], ids=["in-the-pair-phase", "in-the-head-phase"])
def test_a_contrastive_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, tiny_data, every):
    """SIGKILL after the first checkpoint (step 3: pair epoch 0, batch 3; step 19: head epoch 1, batch 3), then
    resume=auto: the same metrics, loss curve and predictions as the run never stopped (the head is
    initialised from the label names once, at the head phase's start, not again on a resume within it)."""
    from .test_resume import finish, metrics, start, wait_for_checkpoint

    args = [
        *[a for a in RUN if a != "model=tiny_bert"],
        "objective.label_init=true",
        "train.epochs=2",
        f"checkpoint.every_steps={every}",
    ]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    finish(reference, tiny_data, *args)
    proc = start(run_dir, tiny_data, *args)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert metrics(run_dir)["status"] == "running"
    newest = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["batch"] > 0 and state["epoch"] == (0 if every == 3 else 1)
    finish(run_dir, tiny_data, *args)
    a, b = metrics(run_dir), metrics(reference)
    assert a["status"] == "finished" and a["resumed_at_step"] == state["step"]
    assert comparable(a) == comparable(b) and len(a["loss_curve"]) == 32
    assert (run_dir / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()
