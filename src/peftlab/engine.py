"""The training loop and prediction, one of each for all three task types.

The loop is the guide's (``accelerator.backward``, optimizer and scheduler steps, clipping,
accumulation), minus its per-step host syncs: losses stay on the device and step times are
CUDA events until they are read, at each checkpoint and at the end of each epoch. That is also
when a NaN/inf loss is noticed (``Diverged``): divergence is detected at checkpoint granularity.

Resuming: the shuffle order of the training data depends only on (seed, epoch) (``EpochShuffle``),
so a run restored from a checkpoint skips the batches of the epoch it had already seen and then
sees exactly the batches the uninterrupted run saw. SIGTERM/SIGINT during training finish the
current optimizer step, save a checkpoint and raise ``Interrupted`` (exit code 128 + signal).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peftlab import contrastive
from peftlab.data import IGNORE
from peftlab.memory import StepClock, synchronize


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(
            f"training loss is {loss} at optimizer step {step}; lower train.lr or use train.mixed_precision=no"
        )
        self.step = step


class Interrupted(SystemExit):
    """SIGTERM/SIGINT stopped the run; the exit code is 128 + the signal's number (143, 130)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint=None):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    def __str__(self) -> str:
        where = f" at optimizer step {self.step}" if self.step is not None else ""
        saved = f"; checkpoint {self.checkpoint}" if self.checkpoint else ""
        return f"interrupted by {signal.Signals(self.signum).name}{where}{saved}"


class StopSignals:
    """While active, the first SIGTERM/SIGINT during training is a request (``requested``) that
    the loop honours at the next optimizer step; outside training, or a second signal, stops at once."""

    def __init__(self):
        self.requested: int | None = None
        self.training = False

    def _handle(self, signum, frame):
        if self.requested is not None or not self.training:
            raise Interrupted(signum)
        self.requested = signum

    @contextlib.contextmanager
    def active(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


STOP = StopSignals()


class EpochShuffle(torch.utils.data.Sampler):
    """Row indices in an order that depends only on (seed, epoch): ``set_epoch`` before each epoch
    (Accelerate's prepared loaders pass it on), so a resumed run can rebuild any epoch's order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def train_loader(feats, collate_fn, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """The training loader: ``EpochShuffle`` order; its own generator, so iterating it never draws
    from the global RNG (whose state a checkpoint restores)."""
    return torch.utils.data.DataLoader(
        feats,
        batch_size=batch_size,
        sampler=EpochShuffle(len(feats), seed),
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class Parts:
    """What one training steps, as ``accelerator.prepare`` returned it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: (
        object  # an LR scheduler, stepped once per batch (Accelerate skips the batches of an accumulation)
    )
    loader: torch.utils.data.DataLoader  # ``train_loader``'s, prepared
    # objective=contrastive: ``train_loader`` over ``contrastive.pair_features``, prepared, whose epochs come
    # first; ``on_head_phase()`` is called as the first epoch of ``loader`` starts (objective.label_init)
    pair_loader: torch.utils.data.DataLoader | None = None
    on_head_phase: Callable[[], object] | None = None


@dataclass(frozen=True)
class LoopSettings:
    """How the loop trains: ``epochs`` in all; ``task`` (seq_cls, seq2seq, causal_lm) picks the loss;
    gradients clipped to ``max_grad_norm`` (None or 0: not clipped); ``adalora``: AdaLoRA re-allocates ranks
    after each optimizer step; ``profile_steps`` > 0: that many batches of the second epoch run under the
    torch profiler and its table (top operators by device, then host, time) goes to ``profile_to``.
    ``pair_epochs``: objective=contrastive's passes over ``Parts.pair_loader`` (SetFit's contrastive phase,
    arXiv:2209.11055), the first of the ``epochs``; the rest go over ``Parts.loader``."""

    epochs: int
    task: str
    max_grad_norm: float | None = None
    adalora: bool = False
    profile_steps: int = 0
    profile_to: Path | None = None
    pair_epochs: int = 0


def _phase(settings: LoopSettings, epoch: int) -> str:
    """``epoch``'s phase: "pairs" (objective=contrastive's first ``pair_epochs``) or "rows"."""
    return "pairs" if epoch < settings.pair_epochs else "rows"


def _epoch_loader(parts: Parts, settings: LoopSettings, epoch: int):
    """The loader of ``epoch``: the pair loader during the contrastive phase, else the rows' loader."""
    return parts.pair_loader if _phase(settings, epoch) == "pairs" else parts.loader


def _batches_before(parts: Parts, settings: LoopSettings, epoch: int) -> int:
    """Batches (per process) of the epochs before ``epoch``: the progress bar's position."""
    return sum(len(_epoch_loader(parts, settings, e)) for e in range(epoch))


def _new_history() -> dict:
    return {"epochs": [], "loss_curve": [], "lr_curve": [], "step_s": []}


@dataclass
class TrainState:
    """Where a training stands: what the loop advances, and what a checkpoint saves and restores
    (``to_json`` and ``from_json``: the one spelling of ``trainer_state.json``).

    ``epoch``: the epoch under way (at an epoch's end, the next one); ``batch``: batches of it this process
    has seen; ``step``: optimizer steps done; ``epoch_losses``: the epoch's per-batch losses so far, 0-d
    tensors on the device (read at checkpoints and at the epoch's end, not per step); ``tokens``,
    ``samples``: this process's counts for the epoch; ``history``: ``epochs`` (per-epoch figures),
    ``loss_curve`` and ``lr_curve`` ([optimizer step, value] pairs; the LR of each optimizer group),
    ``step_s`` (seconds per optimizer step) and ``first_step_at`` (Unix seconds).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    epoch_losses: list = field(default_factory=list)
    tokens: int = 0
    samples: int = 0
    history: dict = field(default_factory=_new_history)

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.epoch_losses, self.tokens, self.samples = self.epoch + 1, 0, [], 0, 0

    def to_json(self, epoch_losses: list[float]) -> dict:
        """The state for ``trainer_state.json``, with the epoch's losses as ``epoch_losses`` (host floats)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_losses": epoch_losses,
            "tokens": self.tokens,
            "samples": self.samples,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, saved: dict, device) -> TrainState:
        """The state ``to_json`` wrote (its losses back on ``device``); a checkpoint without an LR curve gets an empty one."""
        losses = [torch.tensor(v, dtype=torch.float32, device=device) for v in saved["epoch_losses"]]
        return cls(
            saved["epoch"],
            saved["batch"],
            saved["step"],
            losses,
            saved["tokens"],
            saved["samples"],
            {**_new_history(), **saved["history"]},
        )


def train(
    accelerator,
    parts: Parts,
    settings: LoopSettings,
    state: TrainState | None = None,
    checkpointer=None,
    on_epoch=None,
) -> dict:
    """Train until ``settings.epochs`` are done, from ``state`` (a checkpoint's, its model and optimizer states
    loaded; None: from the start). Returns the history (``TrainState``) with ``s_per_step``, the median
    seconds per optimizer step after the first epoch. ``checkpointer`` (peftlab.checkpoint.Checkpointer)
    saves at its interval and on SIGTERM/SIGINT; ``on_epoch(history)`` is called after each epoch.
    Raises Diverged (a NaN/inf loss) and Interrupted (a stop signal, after its checkpoint)."""
    state = state if state is not None else TrainState()
    bar = tqdm(
        total=_batches_before(parts, settings, settings.epochs),
        initial=_batches_before(parts, settings, state.epoch) + state.batch,
        desc="train",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    STOP.training = True
    try:
        while state.epoch < settings.epochs:
            _train_epoch(accelerator, parts, settings, state, checkpointer, bar, on_epoch)
    finally:
        STOP.training = False
    bar.close()
    history = state.history
    history["s_per_step"] = _median_s_per_step(history, "rows")
    if settings.pair_epochs:
        history["pair_s_per_step"] = _median_s_per_step(history, "pairs")
    return history


def _median_s_per_step(history: dict, phase: str) -> float | None:
    """Median seconds per optimizer step of ``phase``'s epochs ("rows", or objective=contrastive's "pairs"),
    the phase's first epoch left out as warm-up when it has more than one. ``history["step_s"]`` holds the step
    times of the epochs in order; the pair phase comes first (after a resume, only the steps run since)."""
    spans, at = [], len(history["step_s"])
    for epoch in reversed(history["epochs"]):  # from the end: the times of epochs before a resume are gone
        spans.append((epoch.get("phase", "rows"), max(0, at - epoch["steps"]), at))
        at = max(0, at - epoch["steps"])
    ours = [(start, end) for p, start, end in reversed(spans) if p == phase]
    ours = ours[1:] or ours  # its first epoch is warm-up
    steps = [t for start, end in ours for t in history["step_s"][start:end]]
    return round(statistics.median(steps), 5) if steps else None


def _train_epoch(
    accelerator, parts: Parts, settings: LoopSettings, state: TrainState, checkpointer, bar, on_epoch
) -> None:
    """One epoch, from batch ``state.batch`` on; ``state`` then stands at the next epoch."""
    parts.model.train()
    clock, skip = StepClock(), state.batch
    loader = _epoch_loader(parts, settings, state.epoch)
    if state.epoch == settings.pair_epochs > 0 and not skip and parts.on_head_phase is not None:
        parts.on_head_phase()  # not on a resume within the head phase: the checkpoint holds the head as it was
    loader.set_epoch(state.epoch)
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    profiling = settings.profile_steps and state.epoch == min(1, settings.epochs - 1) and not skip
    profiler = _profiler() if profiling else None
    clock.tick()
    for i, batch in enumerate(batches, start=skip):
        if profiler is not None and i == settings.profile_steps:
            _write_profile(profiler, settings.profile_to)
            profiler = None
        batch.pop("row")
        state.tokens += batch.pop("num_tokens")
        state.samples += len(batch["input_ids"])
        lrs = [group["lr"] for group in parts.optimizer.param_groups]  # what this batch's optimizer step uses
        state.epoch_losses.append(_step(accelerator, parts, settings, batch, state.step))
        state.batch = i + 1
        bar.update(1)
        if not accelerator.sync_gradients:  # within an accumulation: no optimizer step yet
            continue
        state.step += 1
        state.history["lr_curve"].append([state.step, *lrs])
        clock.tick()
        if state.step == 1:
            synchronize()
            state.history["first_step_at"] = time.time()
        if state.batch < len(loader):  # mid-epoch; the epoch's last step is handled below
            _checkpoint_if_due(accelerator, checkpointer, state)
    if profiler is not None:
        _write_profile(profiler, settings.profile_to)
    state.history["epochs"].append(
        {**_epoch_figures(accelerator, state, clock), "phase": _phase(settings, state.epoch)}
    )
    bar.set_postfix(loss=f"{state.history['epochs'][-1]['loss']:.4f}")
    if on_epoch is not None:
        on_epoch(state.history)
    state.next_epoch()
    _checkpoint_if_due(accelerator, checkpointer, state, epoch_end=True)


def _step(accelerator, parts: Parts, settings: LoopSettings, batch: dict, step: int) -> torch.Tensor:
    """Forward and backward on ``batch``; at the end of an accumulation also clipping, the optimizer step
    (AdaLoRA's rank re-allocation after optimizer step ``step``) and the scheduler step. The loss, on the device:
    ``contrastive.loss`` for a batch of pairs (it holds ``similarity``), else the task's ``training_loss``."""
    model = parts.model
    with accelerator.accumulate(model):
        if "similarity" in batch:
            loss = contrastive.loss(model, batch)
        else:
            loss = training_loss(model, batch, settings.task)
        accelerator.backward(loss)
        if accelerator.sync_gradients and settings.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        parts.optimizer.step()
        if settings.adalora and accelerator.sync_gradients:
            accelerator.unwrap_model(model).base_model.update_and_allocate(step)
        parts.scheduler.step()
        parts.optimizer.zero_grad()
    return loss.detach()


def _checkpoint_if_due(accelerator, checkpointer, state: TrainState, epoch_end: bool = False) -> None:
    """A checkpoint of ``state`` where one is due, or a stop signal asks for one; then Interrupted on a stop signal."""
    stop = _stop_requested(accelerator, checkpointer, state.step, epoch_end)
    if checkpointer is not None and (
        stop or checkpointer.due(state.step, state.epoch if epoch_end else None)
    ):
        losses = _host_losses(accelerator, state.epoch_losses, state.step) if state.epoch_losses else []
        checkpointer.save(state.to_json(losses))
    if stop:
        raise Interrupted(STOP.requested, state.step, checkpointer and checkpointer.last)


def _stop_requested(accelerator, checkpointer, step: int, epoch_end: bool = False) -> bool:
    """Whether a stop signal arrived. One process: a flag, read every step. Several: all ranks must
    agree before a collective save, so they compare flags (one small all-reduce) only where a
    checkpoint is due anyway or at the end of an epoch."""
    if accelerator.num_processes == 1:
        return STOP.requested is not None
    if not epoch_end and (checkpointer is None or not checkpointer.due(step)):
        return False
    flag = torch.tensor([STOP.requested or 0], device=accelerator.device)
    agreed = int(accelerator.reduce(flag, reduction="max").item())
    if agreed and STOP.requested is None:
        STOP.requested = agreed
    return bool(agreed)


def _host_losses(accelerator, losses, step: int) -> list[float]:
    """The epoch's per-batch losses so far, on the host (one sync); Diverged if one is NaN/inf."""
    values = _global_losses(accelerator, losses)
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        accum = max(1, accelerator.gradient_accumulation_steps)
        raise Diverged(step - (len(values) - 1 - bad) // accum, values[bad])
    return values


def _global_losses(accelerator, losses) -> list[float]:
    """Per-batch losses on the host, averaged over the ranks (a collective when there are several): the
    loss of the whole step's batch, as one process computes it, not rank 0's share of it."""
    values = torch.stack(losses).float()
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return values.cpu().tolist()


def _profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.__enter__()
    return profiler


def _write_profile(profiler, path) -> None:
    """Stops ``profiler`` and writes its table to ``path`` (None: nowhere)."""
    synchronize()
    profiler.__exit__(None, None, None)
    table = profiler.key_averages()
    device = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = "\n\n".join(
        f"sorted by {key}:\n" + table.table(sort_by=key, row_limit=30, max_name_column_width=70)
        for key in dict.fromkeys([device, "self_cpu_time_total", "cpu_time_total"])
    )
    if path is not None:
        Path(path).write_text(text)


def _epoch_figures(accelerator, state: TrainState, clock: StepClock) -> dict:
    """The finished epoch's figures (loss, steps, speed); its per-step losses and step times go to the history.
    Diverged if a step's loss is NaN/inf."""
    values = _global_losses(accelerator, state.epoch_losses)  # one host sync per epoch
    accum = max(1, accelerator.gradient_accumulation_steps)
    per_step = [sum(values[i : i + accum]) / len(values[i : i + accum]) for i in range(0, len(values), accum)]
    first_step = state.step - len(per_step)
    history = state.history
    history["loss_curve"].extend([first_step + i + 1, round(v, 6)] for i, v in enumerate(per_step))
    bad = next((i for i, v in enumerate(per_step) if not math.isfinite(v)), None)
    if bad is not None:
        raise Diverged(first_step + bad + 1, per_step[bad])
    durations = clock.durations()
    history["step_s"].extend(durations)
    seconds = sum(durations)
    counts = torch.tensor([state.tokens, state.samples], device=accelerator.device)
    tokens, samples = accelerator.reduce(counts, reduction="sum").tolist()
    return {
        "epoch": state.epoch,
        "loss": round(sum(values) / len(values), 6),
        "steps": len(per_step),
        "wall_s": round(seconds, 3),
        "s_per_step": round(statistics.median(durations), 5) if durations else None,
        "samples_per_s": round(samples / seconds, 2) if seconds else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
    }


@torch.no_grad()
def predict(
    accelerator,
    model,
    loader,
    task: str,
    mode: str,
    num_labels: int,
    *,
    tokenizer=None,
    label_names=None,
    max_new_tokens: int = 8,
    synced_gpus: bool = False,
    bf16: bool = False,
) -> dict:
    """Predictions for every row of ``loader``'s dataset, in row order (whatever order the loader gives).

    Returns ``{"row": [...], "pred": [...], "scores": [[log-likelihood per label], ...] | None,
    "text": [generated text] | None}``. ``score`` mode ranks each label by its (log-)likelihood;
    ``generate`` decodes greedily and maps the text to the closest label name. ``bf16``: the forward
    passes run under ``torch.autocast`` in bfloat16 (``eval.mixed_precision=bf16``; scores still float32).
    """
    model.eval()
    if bf16 and type(model).__name__ == "DeepSpeedEngine":
        # its forward switches torch.autocast off unless DeepSpeed's own torch_autocast section is on (for
        # training too); the module it wraps keeps ZeRO-3's gather hooks, and evaluation needs no backward hooks
        model = model.module
    rows, scores, texts = [], [], []
    bar = tqdm(loader, desc=f"eval ({mode})", disable=not accelerator.is_main_process, dynamic_ncols=True)
    for batch in bar:
        row = batch.pop("row")
        batch.pop("num_tokens")
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16):
            if mode == "generate":
                out = _generate(
                    accelerator, model, batch, task, max_new_tokens, synced_gpus, tokenizer.pad_token_id
                )
            else:
                s = _label_scores(accelerator, model, batch, task, num_labels)
        rows.append(accelerator.gather_for_metrics(row))
        if mode == "generate":
            texts.extend(
                accelerator.gather_for_metrics(
                    tokenizer.batch_decode(out, skip_special_tokens=True), use_gather_object=True
                )
            )
        else:
            scores.append(accelerator.gather_for_metrics(s).float().cpu())
    row = torch.cat(rows).cpu().tolist()
    if mode == "generate":
        texts = [t.strip() for t in texts]
        out = {
            "row": row,
            "pred": [closest_label(t, label_names) for t in texts],
            "scores": None,
            "text": texts,
        }
    else:
        table = torch.cat(scores)
        out = {"row": row, "pred": table.argmax(-1).tolist(), "scores": table.tolist(), "text": None}
    return _in_row_order(out)


def _in_row_order(out: dict) -> dict:
    order = sorted(range(len(out["row"])), key=out["row"].__getitem__)
    return {k: ([v[i] for i in order] if isinstance(v, list) else v) for k, v in out.items()}


def _label_scores(accelerator, model, batch, task: str, num_labels: int) -> torch.Tensor:
    """[rows, labels] log-likelihood of each label (log-softmax of the logits for seq_cls)."""
    if task == "seq_cls":
        return torch.log_softmax(model(**batch).logits.float(), dim=-1)
    labels = batch.pop("labels")
    logits = (
        _seq2seq_label_logits(accelerator, model, batch, labels, num_labels)
        if task == "seq2seq"
        else causal_logits(model, batch, labels.shape[1])
    )
    mask = labels != IGNORE
    picked = logits[mask].float().log_softmax(-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    per_pair = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(
        mask, picked
    )
    return per_pair.sum(-1).view(-1, num_labels)


def _seq2seq_label_logits(
    accelerator, model, batch: dict, labels: torch.Tensor, num_labels: int
) -> torch.Tensor:
    """Logits of each (row, label) pair's label tokens, [rows * labels, label tokens, vocab]. The encoder
    runs once per row and its states are shared by the row's labels (the decoder's inputs come from
    ``labels``); prompt-learning adapters add their virtual tokens in the PEFT model's own forward, so
    for them each pair runs whole."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    per_pair = lambda t: t.repeat_interleave(num_labels, dim=0)
    peft_model = accelerator.unwrap_model(model)
    config = getattr(peft_model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return model(input_ids=per_pair(ids), attention_mask=per_pair(mask), labels=labels).logits
    states = peft_model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return model(encoder_outputs=(per_pair(states),), attention_mask=per_pair(mask), labels=labels).logits


def causal_logits(model, batch: dict, width: int) -> torch.Tensor:
    """Logits that predict the last ``width`` tokens of left-padded rows (their labels), [rows, width, vocab]:
    the model computes the output projection at those positions only, not at every position."""
    return model(**batch, logits_to_keep=width + 1).logits[:, :-1]


def training_loss(model, batch: dict, task: str) -> torch.Tensor:
    """Mean cross-entropy over the label tokens (seq2seq, causal_lm) or rows (seq_cls)."""
    if task != "causal_lm":
        return model(**batch).loss
    labels = batch.pop("labels")
    logits = causal_logits(model, batch, labels.shape[1])
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE
    )


def _generate(accelerator, model, batch, task, max_new_tokens, synced_gpus, pad_id) -> torch.Tensor:
    out = accelerator.unwrap_model(model).generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        synced_gpus=synced_gpus,
        pad_token_id=pad_id,
    )
    if task == "causal_lm":
        out = out[:, batch["input_ids"].shape[1] :]  # only the new tokens
    return out


def closest_label(text: str, names: list[str]) -> int:
    """Index of the label name ``text`` is, or most resembles."""
    if text in names:
        return names.index(text)
    ratios = [difflib.SequenceMatcher(None, text.lower(), n.lower()).ratio() for n in names]
    return max(range(len(names)), key=ratios.__getitem__)
