"""The loop's arithmetic against plain transformers: scoring, the causal training loss, pooling, schedules."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from peftlab import data, engine, modeling
from peftlab.config import peft_method
from peftlab.distributed import reset_state

from .conftest import make_cfg


def build(cfg, num_labels: int, total_steps: int = 10):
    """The run's model with its adapter, as peftlab.fit builds it."""
    weights = modeling.base_weights(cfg.model, cfg.seed, num_labels, cfg.paths.cache_dir)
    adapter = modeling.peft_config(cfg.peft, peft_method(cfg), cfg.model.task, total_steps)
    return modeling.build_model(
        cfg.model,
        num_labels,
        weights,
        seed=cfg.seed,
        pad_token_id=modeling.load_tokenizer(cfg.model).pad_token_id,
        peft=adapter,
    )


def _setup(tmp_path, tiny_data, *overrides):
    cfg = make_cfg(tmp_path, *overrides, data_dir=tiny_data)
    names = data.label_names(cfg.dataset)
    torch.manual_seed(0)
    model = build(cfg, len(names)).eval()
    for name, p in model.named_parameters():  # a non-trivial adapter: LoRA's B starts at zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    tok = modeling.load_tokenizer(cfg.model)
    rows = data.load_splits(cfg.dataset, cfg.paths.data_dir)["test"][:11]
    return cfg, names, model, tok, rows


@pytest.mark.parametrize("peft", ["lora", "prompt_tuning"])
def test_seq2seq_scores_equal_a_whole_forward_per_row_and_label(tmp_path, tiny_data, peft):
    """Score mode runs the encoder once per row; each (row, label) pair run whole must give the same log-likelihood."""
    cfg, names, model, tok, rows = _setup(tmp_path, tiny_data, "model=tiny_bart", f"peft={peft}")
    feats = data.encode(rows, tok, "seq2seq", cfg.dataset.prompt, names, 128)
    targets = data.class_targets(tok, "seq2seq", names)
    reset_state()
    loader = data.loader(feats, data.Collator("seq2seq", "score", tok.pad_token_id, targets), 4, False, 0)
    got = torch.tensor(
        engine.predict(Accelerator(cpu=True), model, loader, "seq2seq", "score", len(names))["scores"]
    )
    reset_state()
    want = []
    with torch.no_grad():
        for f in feats:
            for t in targets:
                labels = torch.tensor([t])
                logits = model(input_ids=torch.tensor([f["input_ids"]]), labels=labels).logits
                want.append(logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).sum().item())
    assert torch.allclose(got, torch.tensor(want).view(-1, len(names)), atol=1e-4)


def test_causal_training_loss_on_label_positions_equals_the_models_own_loss(tmp_path, tiny_data):
    """Training computes logits at the label positions only (left-padded rows); the loss must equal the one
    transformers computes from every position's logits with the prompt masked out (right-padded rows)."""
    cfg, names, model, tok, rows = _setup(tmp_path, tiny_data, "model=tiny_gpt")
    feats = data.encode(rows[:6], tok, "causal_lm", cfg.dataset.prompt, names, 128)
    batch = data.Collator("causal_lm", "train", tok.pad_token_id)(feats)
    batch.pop("row"), batch.pop("num_tokens")
    with torch.no_grad():
        got = engine.training_loss(model, dict(batch), "causal_lm")
        seqs = [f["input_ids"] + f["target"] for f in feats]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = torch.tensor(
            [
                [-100] * len(f["input_ids"]) + f["target"] + [-100] * (width - len(s))
                for f, s in zip(feats, seqs)
            ]
        )
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_mean_pooling_averages_the_tokens_and_ignores_padding(tmp_path, tiny_data):
    cfg, names, model, tok, rows = _setup(tmp_path, tiny_data, "model=tiny_bert", "model.pooling=mean")
    texts = [rows[0]["text"], rows[1]["text"] + " and then some more words to pad the first row"]
    both = tok(texts, padding=True, return_tensors="pt")
    bert = model.base_model.model.bert
    with torch.no_grad():
        logits = model(**both).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
        states = bert(**both).last_hidden_state
    m = both["attention_mask"].unsqueeze(-1).float()
    head = model.base_model.model.classifier
    assert type(bert.pooler).__name__ == "MeanPooler"
    assert torch.allclose(logits, head((states * m).sum(1) / m.sum(1)), atol=1e-6)
    assert torch.allclose(alone, logits[:1], atol=1e-5)


MPNET = [  # tiny_bert's shape as an MPNet (random weights): an encoder without a pooler
    "model=tiny_bert",
    "model.config._target_=transformers.MPNetConfig",
    "model.target_modules=[q,v]",
    "model.pooling=mean",
]


def test_mean_pooling_of_an_encoder_without_a_pooler_is_one_linear_layer_on_the_masked_mean(
    tmp_path, tiny_data
):
    """MPNet's own head reads <s> through dense + tanh; model.pooling=mean puts one linear layer on the masked
    mean in its place, and PEFT's trained copy of it (modules_to_save) still sees the encoder's mask."""
    cfg, names, model, tok, rows = _setup(tmp_path, tiny_data, *MPNET)
    modeling.check_pooling(cfg.model)  # accepted before any weights load
    texts = [rows[0]["text"], rows[1]["text"] + " and then some more words to pad the first row"]
    both = tok(texts, padding=True, return_tensors="pt")
    mpnet = model.base_model.model.mpnet
    assert type(mpnet).__name__ == "MPNetModel" and getattr(mpnet, "pooler", None) is None
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert type(head).__name__ == "MeanPoolLinear" and head.weight.shape == (len(names), 16)
    model.eval()
    with torch.no_grad():
        logits = model(**both).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
        states = mpnet(**both).last_hidden_state
    m = both["attention_mask"].unsqueeze(-1).float()
    assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]  # the first row is padded
    assert torch.allclose(
        logits, torch.nn.functional.linear((states * m).sum(1) / m.sum(1), head.weight, head.bias), atol=1e-6
    )
    assert torch.allclose(alone, logits[:1], atol=1e-5)


def test_mean_pooling_is_refused_for_a_head_on_a_pooled_vector(tmp_path):
    """DistilBERT has no pooler and its classifier is a linear layer on an already pooled vector: nothing to replace."""
    from peftlab.config import ConfigError

    cfg = make_cfg(
        tmp_path,
        "model=tiny_bert",
        "model.config._target_=transformers.DistilBertConfig",
        "+model.config.dim=16",
        "+model.config.n_layers=1",
        "+model.config.n_heads=2",
        "+model.config.hidden_dim=32",
        "model.pooling=mean",
    )
    with pytest.raises(ConfigError, match="has neither: use model.pooling=cls"):
        modeling.check_pooling(cfg.model)


def test_head_first_schedule_holds_the_adapter_until_the_head_has_trained(tmp_path):
    cfg = make_cfg(tmp_path, "model=tiny_bert")
    model = build(cfg, 2)
    head, rest = modeling.parameter_groups(model)
    assert head["params"] and all(p.shape[0] == 2 for p in head["params"])  # the classifier's weight and bias
    optimizer = torch.optim.SGD([head, rest], lr=1.0)
    schedule = modeling.head_first_schedule(optimizer, warmup=0, total=10, head_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert [a for _, a in lrs[:4]] == [0.0] * 4 and lrs[4][1] == 1.0 and lrs[5][1] < 1.0
    assert lrs[0][0] == 1.0 and lrs[-1][0] == pytest.approx(0.1) and lrs[-1][1] == pytest.approx(1 / 6)


def test_held_out_batches_go_longest_first_and_predictions_come_back_in_row_order(tmp_path, tiny_data):
    """Evaluation batches rows of about one length (less padding); predict undoes the order."""
    cfg, names, model, tok, rows = _setup(tmp_path, tiny_data, "model=tiny_bert")
    feats = data.encode(rows, tok, "seq_cls", cfg.dataset.prompt, names, 128)
    assert len({len(f["input_ids"]) for f in feats}) > 3  # rows of several lengths
    collator = data.Collator("seq_cls", "score", tok.pad_token_id)
    widths = [b["input_ids"].shape[1] for b in data.loader(feats, collator, 3, False, 0)]
    assert widths == sorted(widths, reverse=True) and widths[0] == max(len(f["input_ids"]) for f in feats)
    reset_state()
    batched = engine.predict(
        Accelerator(cpu=True), model, data.loader(feats, collator, 3, False, 0), "seq_cls", "score", 2
    )
    one_by_one = engine.predict(
        Accelerator(cpu=True), model, data.loader(feats, collator, 1, False, 0), "seq_cls", "score", 2
    )
    reset_state()
    assert batched["row"] == list(range(len(feats))) and batched["pred"] == one_by_one["pred"]
    assert torch.allclose(torch.tensor(batched["scores"]), torch.tensor(one_by_one["scores"]), atol=1e-5)


def test_bf16_scoring_rounds_the_forward_pass_and_keeps_the_ranking(tmp_path, tiny_data):
    """eval.mixed_precision=bf16: the forward runs in bfloat16 (scores move by rounding, not more)."""
    cfg, names, model, tok, rows = _setup(tmp_path, tiny_data, "model=tiny_bart")
    feats = data.encode(rows, tok, "seq2seq", cfg.dataset.prompt, names, 128)
    collator = data.Collator("seq2seq", "score", tok.pad_token_id, data.class_targets(tok, "seq2seq", names))
    reset_state()
    fp32, bf16 = (
        engine.predict(
            Accelerator(cpu=True),
            model,
            data.loader(feats, collator, 4, False, 0),
            "seq2seq",
            "score",
            len(names),
            bf16=half,
        )
        for half in (False, True)
    )
    reset_state()
    a, b = torch.tensor(fp32["scores"]), torch.tensor(bf16["scores"])
    assert not torch.equal(a, b)  # bf16 did run
    assert torch.allclose(a, b, atol=0.1, rtol=0.02)
    margin = (a[:, 0] - a[:, 1]).abs()
    assert all(p == q for p, q, m in zip(fp32["pred"], bf16["pred"], margin) if m > 0.2)


@pytest.mark.slow
def test_bf16_scoring_reaches_the_model_inside_a_zero3_engine(tmp_path, tiny_data):
    """eval.mixed_precision=bf16 through a ZeRO-3 engine: scores in bfloat16, within rounding of fp32. (On a GPU,
    DeepSpeed's forward turns CUDA autocast off, so predict calls the module it wraps; on the CPU its check,
    torch.is_autocast_enabled(), looks at CUDA only: the GPU benchmark is what shows that path.)"""
    from peftlab.distributed import make_accelerator

    cfg, names, _, tok, rows = _setup(tmp_path, tiny_data, "model=tiny_bert", "zero=stage3")
    feats = data.encode(rows, tok, "seq_cls", cfg.dataset.prompt, names, 128)
    collator = data.Collator("seq_cls", "score", tok.pad_token_id)
    reset_state()
    try:
        accelerator = make_accelerator(cfg.zero, cfg.train, str(tmp_path))
        torch.manual_seed(0)
        model = build(cfg, len(names))
        optimizer = torch.optim.AdamW(modeling.trainable_parameters(model), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        assert type(model).__name__ == "DeepSpeedEngine"
        scores = [
            torch.tensor(
                engine.predict(
                    accelerator,
                    model,
                    accelerator.prepare(data.loader(feats, collator, 4, False, 0)),
                    "seq_cls",
                    "score",
                    len(names),
                    bf16=half,
                )["scores"]
            )
            for half in (False, True)
        ]
    finally:
        reset_state()
    assert not torch.equal(scores[0], scores[1])  # the forward ran in bfloat16
    assert torch.allclose(scores[0], scores[1], atol=0.1, rtol=0.02)
