"""SetFit's contrastive few-shot objective, in peftlab's loop: pairs of training rows, the encoder
trained so that the cosine of two mean-pooled embeddings is 1 for rows of one label and 0 otherwise,
then the classification head trained on those embeddings with the encoder still.

Source: Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts" (SetFit), arXiv:2209.11055,
section 3: R rounds in which each training row draws one partner of its own label (positive, target 1)
and one of another label (negative, target 0); sentence-transformers' ``CosineSimilarityLoss``
(mean squared error between the cosine and the target); then the head on the frozen body.

What is taken from the ``setfit`` library (1.2.0) and what is not:

* Pairs: setfit's ``sampler.ContrastiveDataset`` is not used. It draws its pairs with a fixed
  ``RandomState(42)`` (every seed of a sweep would see the same pairs), pairs each row with itself as a
  positive (``combinations_with_replacement``), and is a stateful ``IterableDataset`` whose position
  survives between epochs, which Accelerate's sharding, ``EpochShuffle`` and exact mid-epoch resume
  cannot follow. :func:`pairs` is the paper's sampler with the run's seed, as a plain list.
* Loss: setfit calls sentence-transformers' ``CosineSimilarityLoss`` on a ``SentenceTransformer``;
  here the model is a PEFT-wrapped ``AutoModelForSequenceClassification``, possibly inside a DeepSpeed
  engine, so :func:`loss` computes the same quantity from the model's own forward (last hidden states,
  masked mean: what ``model.pooling=mean`` feeds the head, ``modeling.MeanPooler``).
* Head: setfit fits scikit-learn's ``LogisticRegression`` on embeddings outside any model. peftlab's
  head is the model's own ``classifier`` (saved with the adapter, partitioned under ZeRO-3), so it is
  trained in the loop with cross-entropy while the body's learning rate is 0 (:func:`two_phase_schedule`).

Shapes: a pair batch (:class:`PairCollator`) holds the first texts of its B pairs, then the second
texts, as ``input_ids``/``attention_mask`` [2B, L], and the targets as ``similarity`` [B] (float).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

from peftlab.modeling import HEAD_NAMES


class Pair(NamedTuple):
    a: int  # index of a training row
    b: int  # index of another training row
    similarity: float  # 1.0: same label, 0.0: different labels


def pairs(labels: list[int], num_iterations: int, seed: int) -> list[Pair]:
    """SetFit's pairs of training rows (arXiv:2209.11055, section 3), shuffled, the same for a seed.

    In each of ``num_iterations`` rounds every row draws one partner of its own label (a positive pair)
    and one of another label (a negative one), so there are ``2 * num_iterations * len(labels)`` pairs,
    half of each kind, and a row is never paired with itself.

    Raises ValueError where a label has a single row (no positive partner), all rows share one label
    (no negative partner), a label is negative (an unlabeled row) or ``num_iterations`` < 1.
    """
    if num_iterations < 1:
        raise ValueError(f"num_iterations={num_iterations} must be >= 1")
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        if label < 0:
            raise ValueError(f"row {i} has no label ({label}): contrastive pairs need labelled rows")
        by_label.setdefault(label, []).append(i)
    alone = [label for label, rows in by_label.items() if len(rows) < 2]
    if alone or len(by_label) < 2:
        why = f"label(s) {alone} have a single row" if alone else "all rows share one label"
        raise ValueError(f"{why}: every row needs a partner of its own label and one of another")
    rng = random.Random(seed)
    others = {label: [i for i in range(len(labels)) if labels[i] != label] for label in by_label}
    out = []
    for _ in range(num_iterations):
        for i, label in enumerate(labels):
            same = by_label[label]
            j = same[rng.randrange(len(same) - 1)]
            j = same[-1] if j == i else j  # a uniform draw among the row's own label, itself left out
            out.append(Pair(i, j, 1.0))
            out.append(Pair(i, rng.choice(others[label]), 0.0))
    rng.shuffle(out)
    return out


def pair_features(feats: list[dict], num_iterations: int, seed: int) -> list[dict]:
    """Training features (``data.encode``: ``input_ids``, ``label``) made into pair features for
    :class:`PairCollator`: ``{"row": pair index, "a": ids, "b": ids, "similarity": 1.0 | 0.0}``."""
    chosen = pairs([f["label"] for f in feats], num_iterations, seed)
    return [
        {"row": k, "a": feats[p.a]["input_ids"], "b": feats[p.b]["input_ids"], "similarity": p.similarity}
        for k, p in enumerate(chosen)
    ]


class PairCollator:
    """A batch of B pair features: ``row`` [B], ``input_ids`` and ``attention_mask`` [2B, L] (right-padded
    with ``pad_id``; rows 0..B-1 the first texts, B..2B-1 the second), ``similarity`` [B] float32 and
    ``num_tokens`` (int: tokens of the 2B texts), the keys ``engine`` reads from a training batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict:
        seqs = [f["a"] for f in feats] + [f["b"] for f in feats]
        width = max(map(len, seqs))
        return {
            "row": torch.tensor([f["row"] for f in feats]),
            "input_ids": torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "similarity": torch.tensor([f["similarity"] for f in feats], dtype=torch.float32),
            "num_tokens": sum(map(len, seqs)),
        }


def embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled sentence embeddings [N, H] (float32) of a sequence classifier: the masked mean of its
    last hidden states, padding left out (sentence-transformers' mean pooling, ``modeling.MeanPooler``).

    ``model``: a transformers ``AutoModelForSequenceClassification``, a PEFT model wrapping one, or a
    DeepSpeed engine / Accelerate-prepared model around either: the model's own forward runs (ZeRO-3
    gathers parameters in its hooks as usual). Virtual tokens that prompt methods prepend are left out.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    states = out.hidden_states[-1][:, -input_ids.shape[1] :]  # prompt tuning: virtual tokens come first
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    return (states.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def loss(model, batch: dict) -> torch.Tensor:
    """SetFit's loss for a :class:`PairCollator` batch: mean squared error between the cosine similarity
    of each pair's two embeddings and its target (sentence-transformers' ``CosineSimilarityLoss``).
    A scalar; its gradient reaches whatever in ``model`` trains (the adapter, or every weight)."""
    a, b = embeddings(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    return F.mse_loss(F.cosine_similarity(a, b, dim=-1), batch["similarity"].float())


def two_phase_schedule(
    optimizer, body_steps: int, head_steps: int, warmup_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factors for the contrastive phase, then the head phase, over the two parameter
    groups of ``modeling.parameter_groups`` (0: the classification head, 1: the rest, i.e. the adapter).

    Steps 0 .. ``body_steps``-1: the body warms up over ``warmup_ratio`` of them and decays linearly to 0;
    the head's factor is 0 (the contrastive loss gives it no gradient anyway). Then ``head_steps`` in which
    the head warms up and decays the same way and the body's factor stays 0: the encoder is frozen
    without changing ``requires_grad``, which DeepSpeed's flattened partitions would not follow.
    Steps are scheduler steps (``num_processes`` per optimizer step when Accelerate steps it per process).
    """

    def ramp(start: int, span: int):
        warmup = int(warmup_ratio * span)

        def factor(step: int) -> float:
            step -= start
            if step < 0 or step >= span:
                return 0.0
            return (step + 1) / (warmup + 1) if step < warmup else (span - step) / max(1, span - warmup)

        return factor

    if len(optimizer.param_groups) != 2:
        raise ValueError(
            f"two_phase_schedule needs 2 parameter groups (head, body), the optimizer has "
            f"{len(optimizer.param_groups)}: build it from modeling.parameter_groups(model)"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [ramp(body_steps, head_steps), ramp(0, body_steps)])


def head_linear(model) -> torch.nn.Linear:
    """The classification head when it is one trainable ``nn.Linear`` on the pooled embedding (BERT's
    ``classifier`` after ``model.pooling=mean``, or PEFT's trained copy of it, ``modules_to_save``).

    Raises ValueError where it is not (MPNet's and RoBERTa's own heads put dense + tanh before their
    last layer), which label-name initialisation needs."""
    for name, module in model.named_modules():
        head = name.removesuffix(".modules_to_save.default").split(".")[-1] in HEAD_NAMES
        if head and isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            return module
    raise ValueError(
        "label-name initialisation needs a head that is one trainable linear layer on the pooled "
        "embedding (model.pooling=mean); this model's head is not"
    )


@torch.no_grad()
def init_head_from_names(
    model, tokenizer, names: list[str], device=None, scale: float = 10.0
) -> torch.Tensor:
    """Label-name initialisation: row c of the head's weight becomes the unit embedding of label name c
    divided by the names' mean embedding norm, times ``scale``, and the bias 0, so that the untrained head
    ranks labels by how close a text's embedding lies to each name's (a zero-shot prototype classifier;
    the idea of label-embedding heads, e.g. Wang et al. 2018, arXiv:1805.04174). Returns the weight [C, H].

    ``device``: where the model computes (``accelerator.device``; default: the head weight's device). Runs
    the model forward (on all ranks under ZeRO-3, which gathers the head to write it from rank 0).
    Raises ValueError as :func:`head_linear` does."""
    head = head_linear(model)
    device = device or head.weight.device
    enc = tokenizer(list(names), padding=True, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    emb = embeddings(model, enc["input_ids"], enc["attention_mask"])
    model.train(was_training)
    weight = F.normalize(emb, dim=-1) * scale / emb.norm(dim=-1).mean()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    with _gathered(params):
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()
    return weight


def _gathered(params):
    """ZeRO-3: the full parameters, written back from rank 0 on exit; otherwise nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    import contextlib

    return contextlib.nullcontext()
