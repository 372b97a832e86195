"""The training loop and prediction, one of each for all three task types.

The loop is the guide's (``accelerator.backward``, optimizer and scheduler steps, clipping,
accumulation), minus its per-step host syncs: losses stay on the device and step times are
CUDA events until the end of each epoch.
"""

from __future__ import annotations

import difflib
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peftlab.memory import StepClock, synchronize


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training loss is {loss} at optimizer step {step}; lower train.lr or use train.mixed_precision=no")
        self.step = step


def train(accelerator, model, optimizer, scheduler, loader, epochs: int, *, max_grad_norm, adalora: bool,
          on_epoch=None, profile_steps: int = 0, profile_to=None) -> dict:
    """Train for ``epochs``; returns per-epoch figures, the loss curve and step statistics.

    With ``profile_steps`` > 0 the first that many batches of the second epoch run under the torch
    profiler and its table (top operators by device, then host, time) goes to ``profile_to``.
    """
    history = {"epochs": [], "loss_curve": [], "step_s": []}
    step = 0
    bar = tqdm(total=epochs * len(loader), desc="train", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for epoch in range(epochs):
        model.train()
        clock, losses, tokens, samples = StepClock(), [], 0, 0
        profiler = _profiler(profile_steps) if epoch == min(1, epochs - 1) and profile_steps else None
        clock.tick()
        for i, batch in enumerate(loader):
            if profiler is not None and i == profile_steps:
                _write_profile(profiler, profile_to)
                profiler = None
            batch.pop("row")
            tokens += batch.pop("num_tokens")
            samples += len(batch["input_ids"])
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                if adalora and accelerator.sync_gradients:
                    accelerator.unwrap_model(model).base_model.update_and_allocate(step)
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
            if accelerator.sync_gradients:
                step += 1
                clock.tick()
                if step == 1:
                    synchronize()
                    history["first_step_at"] = time.time()
            bar.update(1)
        if profiler is not None:
            _write_profile(profiler, profile_to)
        history["epochs"].append(_epoch_figures(accelerator, epoch, step, losses, clock, tokens, samples, history))
        bar.set_postfix(loss=f"{history['epochs'][-1]['loss']:.4f}")
        if on_epoch is not None:
            on_epoch(history)
    bar.close()
    steady = history["step_s"][len(history["step_s"]) // max(epochs, 1):] or history["step_s"]  # skip epoch 1 (warm-up)
    history["s_per_step"] = round(statistics.median(steady), 5) if steady else None
    return history


def _profiler(steps: int):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.__enter__()
    return profiler


def _write_profile(profiler, path) -> None:
    synchronize()
    profiler.__exit__(None, None, None)
    table = profiler.key_averages()
    device = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = "\n\n".join(f"sorted by {key}:\n" + table.table(sort_by=key, row_limit=30, max_name_column_width=70)
                        for key in dict.fromkeys([device, "self_cpu_time_total", "cpu_time_total"]))
    if path is not None:
        Path(path).write_text(text)


def _epoch_figures(accelerator, epoch, step, losses, clock, tokens, samples, history) -> dict:
    values = torch.stack(losses).float().cpu().tolist()  # one host sync per epoch
    accum = max(1, accelerator.gradient_accumulation_steps)
    per_step = [sum(values[i:i + accum]) / len(values[i:i + accum]) for i in range(0, len(values), accum)]
    first_step = step - len(per_step)
    history["loss_curve"].extend([first_step + i + 1, round(v, 6)] for i, v in enumerate(per_step))
    bad = next((i for i, v in enumerate(per_step) if not math.isfinite(v)), None)
    if bad is not None:
        raise Diverged(first_step + bad + 1, per_step[bad])
    durations = clock.durations()
    history["step_s"].extend(durations)
    seconds = sum(durations)
    totals = accelerator.reduce(torch.tensor([tokens, samples], device=accelerator.device), reduction="sum").tolist()
    return {"epoch": epoch, "loss": round(sum(values) / len(values), 6), "steps": len(per_step), "wall_s": round(seconds, 3),
            "s_per_step": round(statistics.median(durations), 5) if durations else None,
            "samples_per_s": round(totals[1] / seconds, 2) if seconds else None,
            "tokens_per_s": round(totals[0] / seconds, 1) if seconds else None}


@torch.no_grad()
def predict(accelerator, model, loader, task: str, mode: str, num_labels: int, *, tokenizer=None,
            label_names=None, max_new_tokens: int = 8, synced_gpus: bool = False) -> dict:
    """Predictions for every row of ``loader``'s dataset, in row order.

    Returns ``{"row": [...], "pred": [...], "scores": [[log-likelihood per label], ...] | None,
    "text": [generated text] | None}``. ``score`` mode ranks each label by its (log-)likelihood;
    ``generate`` decodes greedily and maps the text to the closest label name.
    """
    model.eval()
    rows, scores, texts = [], [], []
    bar = tqdm(loader, desc=f"eval ({mode})", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for batch in bar:
        row = batch.pop("row")
        batch.pop("num_tokens")
        if mode == "generate":
            out = _generate(accelerator, model, batch, task, max_new_tokens, synced_gpus, tokenizer.pad_token_id)
            rows.append(accelerator.gather_for_metrics(row))
            texts.extend(accelerator.gather_for_metrics(tokenizer.batch_decode(out, skip_special_tokens=True), use_gather_object=True))
            continue
        s = _label_scores(model, batch, task, num_labels)
        rows.append(accelerator.gather_for_metrics(row))
        scores.append(accelerator.gather_for_metrics(s).float().cpu())
    row = torch.cat(rows).cpu().tolist()
    if mode == "generate":
        texts = [t.strip() for t in texts]
        return {"row": row, "pred": [closest_label(t, label_names) for t in texts], "scores": None, "text": texts}
    table = torch.cat(scores)
    return {"row": row, "pred": table.argmax(-1).tolist(), "scores": table.tolist(), "text": None}


def _label_scores(model, batch, task: str, num_labels: int) -> torch.Tensor:
    """[rows, labels] log-likelihood of each label (log-softmax of the logits for seq_cls)."""
    if task == "seq_cls":
        return torch.log_softmax(model(**batch).logits.float(), dim=-1)
    if task == "seq2seq":  # the labels also give the decoder its inputs
        labels = batch["labels"]
        logits = model(**batch).logits[:, -labels.shape[1]:]
    else:  # left-padded rows end with the label: keep only the logits that predict it
        labels = batch.pop("labels")
        width = labels.shape[1]
        logits = model(**batch, logits_to_keep=width + 1).logits[:, -(width + 1):-1]
    mask = labels != -100
    picked = logits[mask].float().log_softmax(-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    per_pair = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return per_pair.sum(-1).view(-1, num_labels)


def _generate(accelerator, model, batch, task, max_new_tokens, synced_gpus, pad_id) -> torch.Tensor:
    out = accelerator.unwrap_model(model).generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, synced_gpus=synced_gpus, pad_token_id=pad_id)
    if task == "causal_lm":
        out = out[:, batch["input_ids"].shape[1]:]  # only the new tokens
    return out


def closest_label(text: str, names: list[str]) -> int:
    """Index of the label name ``text`` is, or most resembles."""
    if text in names:
        return names.index(text)
    ratios = [difflib.SequenceMatcher(None, text.lower(), n.lower()).ratio() for n in names]
    return max(range(len(names)), key=ratios.__getitem__)
