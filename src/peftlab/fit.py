"""One model's life: setup -> train -> evaluate -> save, then nothing of it left behind.

``fit`` trains one model for one (training rows, held-out rows) pair of the run's plan: a fresh
Accelerator, the rows encoded and batched, the base model with its adapter, optimizer and LR schedule;
then ``engine.train``, predictions for the held-out (and unlabeled) rows, the adapter saved when asked.
Each ``_setup_*`` step takes what it uses. The run around it (run directory, resume plan, folds,
status) is ``peftlab.experiment``'s.

Tracking (``logger``; the last model of the run's main pass): per optimizer step ``train/loss`` and
``train/lr``, per epoch the speed, then ``eval/accuracy`` and ``eval/macro_f1``. Under TensorBoard the
run's hyper-parameters go to the HPARAMS tab of the run's own event files, with the eval figures as
their metrics, so the runs of a sweep can be filtered and compared by e.g. ``peft.r``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import get_linear_schedule_with_warmup

from peftlab import checkpoint, contrastive, data, distributed, engine, modeling
from peftlab.config import ConfigError, objective_name
from peftlab.distributed import is_zero3, used_deepspeed_config
from peftlab.memory import PhaseMeter
from peftlab.metrics import classification_figures
from peftlab.rundir import atomic_dir, write_json

log = logging.getLogger("peftlab")
EVAL_METRICS = ("accuracy", "macro_f1")  # to the tracker as eval/<name>; TensorBoard's HPARAMS metrics


@dataclass(frozen=True)
class Base:
    """What every model of a run starts from, resolved once per run (``peftlab.experiment``)."""

    tokenizer: Any
    weights: str | Path | None  # modeling.base_weights: model.pretrained, the random weights' folder, or None
    method: str  # config.peft_method: lora, ia3, ..., none
    names: list[str]  # the label names, in label order


@dataclass(frozen=True)
class Job:
    """One model of the run: the rows it trains on and predicts, and what it leaves behind."""

    train_rows: list[dict]
    eval_rows: list[dict]
    unlabeled: list[dict] = field(default_factory=list)  # rows without a label, predicted for submission.csv
    save: bool = False  # the adapter (the whole model for peft=none) into the run directory
    track: bool = False  # to the tracker (``logger``), with ``train.profile_steps``
    checkpoints: bool = False  # at ``checkpoint.*``'s interval and on SIGTERM/SIGINT
    resume_from: Path | None = None  # a checkpoint folder to continue from


def fit(cfg: DictConfig, base: Base, job: Job, meter: PhaseMeter, run_dir: Path, on_epoch=None) -> dict:
    """Train a fresh model on ``job.train_rows``, predict ``job.eval_rows`` (and ``job.unlabeled``).

    Returns ``{"history": engine.train's, "eval": predictions in row order ({"row", "pred", "scores",
    "text"}), "unlabeled": the same for job.unlabeled (if any), "eval_s": {mode: seconds},
    "trainable_params": int, "zero3_partitions": dict | None}``; the phases' time and memory go to ``meter``.
    ``on_epoch(history)`` is called after each epoch.
    """
    task, names = cfg.model.task, base.names
    with meter.phase("setup"):
        accelerator = distributed.make_accelerator(
            cfg.zero, cfg.train, str(run_dir), log_with=cfg.logger if job.track else None
        )
        if job.track and cfg.logger:
            _setup_tracker(accelerator, cfg.logger, hyperparameters(cfg, base.method))
        collator = _collators(task, base)
        train_feats, eval_feats, extra_feats = _setup_features(
            accelerator, base, job, task, cfg.dataset.prompt, cfg.train.max_length
        )
        train_dl = engine.train_loader(train_feats, collator("train"), cfg.train.batch_size, cfg.seed)
        modes = ["score", "generate"] if cfg.eval.mode == "both" else [cfg.eval.mode]
        eval_dls = {
            mode: data.loader(eval_feats, collator(mode), cfg.eval.batch_size, False, cfg.seed)
            for mode in modes
        }
        n = accelerator.num_processes
        if base.method == "adalora":
            modeling.check_adalora_schedule(cfg.peft, cfg.train, len(train_feats), n)
        total = modeling.optimizer_steps(len(train_feats), cfg.train, n)
        pair_dl, body_steps = _setup_pairs(cfg, base, train_feats, n)
        model = _setup_model(cfg, base, body_steps + total)
        distributed.note_cpu_adam_build(cfg.optimizer.get("_target_"))
        if pair_dl is None:
            optimizer, scheduler = _setup_optimizer(model, cfg.optimizer, cfg.train, total, n)
            model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
        else:
            optimizer, scheduler = _setup_two_phase(model, cfg, body_steps, total, n)
            model, optimizer, train_dl, pair_dl, scheduler = accelerator.prepare(
                model, optimizer, train_dl, pair_dl, scheduler
            )
        eval_dls = {mode: accelerator.prepare(dl) for mode, dl in eval_dls.items()}
        # each rank's share of the parameters (a collective)
        partitions = distributed.zero3_partitions(accelerator, model)
        what = f"{cfg.model.name} + {base.method}"
        trainable = _report_setup(accelerator, model, what, cfg.zero.name, run_dir)
        checkpointer, state = _setup_checkpoints(accelerator, run_dir, cfg.checkpoint, job)
    with meter.phase("train"):
        pair_epochs = (
            cfg.objective.epochs if pair_dl is not None else 0
        )  # objective=contrastive's first phase
        settings = engine.LoopSettings(
            cfg.train.epochs + pair_epochs,
            task,
            cfg.train.max_grad_norm,
            adalora=base.method == "adalora",
            profile_steps=cfg.train.profile_steps if job.track else 0,
            profile_to=run_dir / "profile.txt",
            pair_epochs=pair_epochs,
        )
        label_init = None  # objective.label_init: the head from the label names, as the head phase starts
        if pair_dl is not None and cfg.objective.label_init:
            label_init = lambda: contrastive.init_head_from_names(  # noqa: E731
                model, base.tokenizer, names, device=accelerator.device
            )
        history = engine.train(
            accelerator,
            engine.Parts(model, optimizer, scheduler, train_dl, pair_dl, label_init),
            settings,
            state,
            checkpointer,
            on_epoch=lambda h: (_log_epoch(accelerator, h), on_epoch and on_epoch(h)),
        )
    with meter.phase("eval"):
        extra_dl = None
        if extra_feats:
            extra_dl = data.loader(extra_feats, collator(modes[0]), cfg.eval.batch_size, False, cfg.seed)
        result = _evaluate(accelerator, model, eval_dls, extra_dl, base, task, cfg.eval)
    gold = [r["label"] for r in job.eval_rows]
    figures = classification_figures(gold, result["eval"]["pred"], names, cfg.eval.metrics)
    scalars = {f"eval/{k}": v for k, v in figures.items() if isinstance(v, int | float) and k != "n_eval"}
    accelerator.log(scalars, step=history["loss_curve"][-1][0])
    if job.save:
        with meter.phase("save"):
            save_trained(accelerator, model, run_dir)
    # not end_training(): it destroys the process group that the next training reuses
    for tracker in accelerator.trackers:
        tracker.finish()
    result.update(history=history, trainable_params=trainable, zero3_partitions=partitions)
    # Nothing of this training may outlive it (the next fold; the next job of a sweep): this frame lets go of it
    # first, so that free_memory()'s gc.collect() frees it now; free_memory() also destroys the DeepSpeed engine
    # (its hooks), empties Accelerate's lists and the CUDA cache.
    model = optimizer = scheduler = train_dl = pair_dl = eval_dls = extra_dl = checkpointer = None
    accelerator.free_memory()
    return result


def _setup_tracker(accelerator, logger: str, values: dict) -> None:
    """The tracker, with the run's hyper-parameters. TensorBoard: Accelerate's ``store_init_configuration``
    writes them into a sub-run of their own (a directory named by the clock) with no metrics, so the HPARAMS
    tab could neither show nor sort by the eval figures; they are written into the run's own event file
    instead, naming ``eval/accuracy`` and ``eval/macro_f1`` (logged there at the end) as the metrics."""
    if logger != "tensorboard":
        accelerator.init_trackers(logger, config=values)
        return
    accelerator.init_trackers(logger)
    if not accelerator.is_main_process:  # trackers live on the main process only
        return
    from torch.utils.tensorboard.summary import hparams

    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    experiment, session_start, session_end = hparams(values, {f"eval/{k}": 0.0 for k in EVAL_METRICS})
    for summary in (experiment, session_start, session_end):
        writer.file_writer.add_summary(summary)
    writer.flush()


def hyperparameters(cfg: DictConfig, method: str) -> dict:
    """Scalars for the tracker's hparams view: the groups chosen (``method``: the PEFT method) and the knobs swept most."""
    values = {
        "model": cfg.model.name,
        "peft": method,
        "zero": cfg.zero.name,
        "objective": objective_name(cfg),
        "seed": cfg.seed,
        **{f"train.{k}": v for k, v in cfg.train.items()},
        **{
            f"peft.{k}": v
            for k, v in cfg.peft.items()
            if isinstance(v, (int, float, str, bool)) and not k.startswith("_")
        },
    }
    return {k: v for k, v in values.items() if v is not None}


def _collators(task: str, base: Base):
    """``collator(mode)``: the batch maker for mode train, score or generate."""
    targets = data.class_targets(base.tokenizer, task, base.names) if task != "seq_cls" else None
    return lambda mode: data.Collator(task, mode, base.tokenizer.pad_token_id, targets)


def _setup_features(
    accelerator, base: Base, job: Job, task: str, prompt: str, max_length: int
) -> tuple[list, list, list]:
    """The job's training, held-out and unlabeled rows tokenized (the main process first: it fills the cache)."""
    with accelerator.main_process_first():
        encode = lambda rows: data.encode(rows, base.tokenizer, task, prompt, base.names, max_length)  # noqa: E731
        return (
            encode(job.train_rows),
            encode(job.eval_rows),
            encode(list(job.unlabeled)) if job.unlabeled else [],
        )


def _setup_model(cfg: DictConfig, base: Base, total_steps: int):
    """The base model with the run's adapter (the PEFT config for ``total_steps`` optimizer steps), ZeRO-3 leaves set."""
    adapter = modeling.peft_config(cfg.peft, base.method, cfg.model.task, total_steps)
    model = modeling.build_model(
        cfg.model,
        len(base.names),
        base.weights,
        seed=cfg.seed,
        pad_token_id=base.tokenizer.pad_token_id,
        peft=adapter,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )
    modeling.set_zero3_leaves(model, cfg.model, cfg.zero)
    return model


def _setup_optimizer(model, optimizer_cfg: DictConfig, train: DictConfig, total: int, num_processes: int):
    """(optimizer, LR scheduler) for ``total`` optimizer steps: linear warm-up (``train.warmup_ratio``) and decay;
    with ``train.head_only_epochs`` the head trains alone first (``modeling.head_first_schedule``)."""
    head_steps = total * train.head_only_epochs // train.epochs
    params = modeling.parameter_groups(model) if head_steps else modeling.trainable_parameters(model)
    optimizer = instantiate(optimizer_cfg, params)
    n = num_processes  # Accelerate steps a non-DeepSpeed scheduler once per process per step
    warmup = int(train.warmup_ratio * total)
    scheduler = (
        modeling.head_first_schedule(optimizer, warmup * n, total * n, head_steps * n)
        if head_steps
        else get_linear_schedule_with_warmup(optimizer, warmup * n, total * n)
    )
    return optimizer, scheduler


def _setup_pairs(cfg: DictConfig, base: Base, train_feats: list[dict], num_processes: int):
    """objective=contrastive: (the pair loader, its optimizer steps over ``objective.epochs``), SetFit's
    ``objective.num_iterations`` positive and negative partners per training row (arXiv:2209.11055,
    ``contrastive.pairs``) in batches of ``objective.batch_size`` pairs (null: ``train.batch_size``); else (None, 0). Raises ConfigError (one
    line) where the rows leave a row without a partner (a label with one row, or a single label)."""
    if objective_name(cfg) != "contrastive":
        return None, 0
    o = cfg.objective
    try:
        pair_feats = contrastive.pair_features(train_feats, o.num_iterations, cfg.seed)
    except ValueError as e:
        raise ConfigError(
            f"objective=contrastive cannot pair these {len(train_feats)} training rows ({e}); "
            "use objective=cross_entropy"
        ) from None
    pad_id = base.tokenizer.pad_token_id
    batch_size = o.get("batch_size") or cfg.train.batch_size  # a run's config from before the key: null
    loader = engine.train_loader(pair_feats, contrastive.PairCollator(pad_id), batch_size, cfg.seed)
    pair_train = OmegaConf.merge(cfg.train, {"batch_size": batch_size, "epochs": o.epochs})
    return loader, modeling.optimizer_steps(len(pair_feats), pair_train, num_processes)


def _setup_two_phase(model, cfg: DictConfig, body_steps: int, head_steps: int, num_processes: int):
    """objective=contrastive: (optimizer, scheduler) over the head's and the body's parameter groups
    (``modeling.parameter_groups``; the body at ``objective.body_lr`` when set), the body trained for
    ``body_steps`` optimizer steps, then the head alone for ``head_steps`` (``contrastive.two_phase_schedule``)."""
    groups = modeling.parameter_groups(model)
    if cfg.objective.body_lr is not None:
        groups[1]["lr"] = cfg.objective.body_lr
    optimizer = instantiate(cfg.optimizer, groups)
    n = num_processes  # Accelerate steps a non-DeepSpeed scheduler once per process per step
    scheduler = contrastive.two_phase_schedule(
        optimizer, body_steps * n, head_steps * n, cfg.train.warmup_ratio
    )
    return optimizer, scheduler


def _report_setup(accelerator, model, what: str, zero: str, run_dir: Path) -> int:
    """The trainable parameters' count; the main process logs the setup in a line and writes deepspeed.json."""
    trainable, params = modeling.count_parameters(model)
    if accelerator.is_main_process:
        log.info(
            "%s on %s (%s): %s of %s parameters train",
            what,
            accelerator.device,
            zero,
            f"{trainable:,}",
            f"{params:,}",
        )
        ds = used_deepspeed_config(accelerator)
        if ds is not None:
            write_json(run_dir / "deepspeed.json", ds)
    return trainable


def _setup_checkpoints(accelerator, run_dir: Path, ck: DictConfig, job: Job):
    """(checkpointer, training state): a Checkpointer at ``checkpoint.*``'s interval where the job keeps
    checkpoints, else None; the state of ``job.resume_from`` (model, optimizer, scheduler and RNG states
    restored), else None (from the start)."""
    if not job.checkpoints:
        return None, None
    checkpointer = checkpoint.Checkpointer(
        accelerator, run_dir, ck.every_steps, ck.every_epochs, ck.keep_last
    )
    if job.resume_from is None:
        return checkpointer, None
    return checkpointer, engine.TrainState.from_json(checkpointer.load(job.resume_from), accelerator.device)


def _evaluate(accelerator, model, loaders: dict, unlabeled, base: Base, task: str, ev: DictConfig) -> dict:
    """Predictions for the held-out rows in each mode of ``loaders`` (``eval``, in row order, and the seconds
    each mode took, ``eval_s``) and for the ``unlabeled`` loader's rows in the first mode (``unlabeled``)."""
    # several ZeRO-3 ranks generate in step (each forward gathers from all of them); one needs no sync
    synced = is_zero3(accelerator) and accelerator.num_processes > 1

    def predict(loader, mode: str) -> dict:
        return engine.predict(
            accelerator,
            model,
            loader,
            task,
            mode,
            len(base.names),
            tokenizer=base.tokenizer,
            label_names=base.names,
            max_new_tokens=ev.max_new_tokens,
            synced_gpus=synced,
            bf16=ev.mixed_precision == "bf16",
        )

    result = {"eval_s": {}}
    for mode, loader in loaders.items():
        start = time.perf_counter()
        out = predict(loader, mode)
        result["eval_s"][mode] = round(time.perf_counter() - start, 3)
        result["eval"] = _merge(result.get("eval"), out)
    if unlabeled is not None:
        result["unlabeled"] = predict(accelerator.prepare(unlabeled), next(iter(loaders)))
    return result


def _merge(first: dict | None, second: dict) -> dict:
    """eval.mode=both: score-mode predictions, with generate-mode text and labels beside them."""
    return second if first is None else dict(first, text=second["text"], generate_pred=second["pred"])


def _log_epoch(accelerator, history: dict) -> None:
    """The new epoch's per-step loss and learning rate (``train/lr``; ``train/lr_group<i>`` for further optimizer
    groups), then its speed, to the tracker (no-op without one). Written at the epoch's end, when the losses
    reach the host anyway: the loop reads no loss per step."""
    epoch = history["epochs"][-1]
    lrs = {row[0]: row[1:] for row in history["lr_curve"][-epoch["steps"] :]}
    for step, loss in history["loss_curve"][-epoch["steps"] :]:
        values = {"train/loss": loss}
        for i, lr in enumerate(lrs.get(step, [])):
            values["train/lr" if i == 0 else f"train/lr_group{i}"] = lr
        accelerator.log(values, step=step)
    accelerator.log(
        {
            f"train/{k}": v
            for k, v in epoch.items()
            if k in ("samples_per_s", "tokens_per_s", "s_per_step") and v
        },
        step=history["loss_curve"][-1][0],
    )


def save_trained(accelerator, model, run_dir: Path) -> None:
    """The adapter (or the full model for peft=none) into ``run_dir``; a collective under ZeRO-3.

    An adapter needs its own weights only: under ZeRO-3 just the trainable parameters are gathered
    (a few MB), not the whole model (1.6 GB for bart-large, 14 GB for a 7B model in bf16), which
    ``accelerator.get_state_dict`` would assemble on rank 0's CPU. Either folder also carries the tokenizer
    and the label names, and names the base model by its hub id (or the path the user gave), not by a path
    inside one virtualenv (``peftlab.export.describe_saved``).
    """
    from peftlab.export import describe_saved

    unwrapped = accelerator.unwrap_model(model)
    if hasattr(unwrapped, "peft_config"):
        with distributed.gathered(
            [p for p in unwrapped.parameters() if p.requires_grad], enabled=is_zero3(accelerator)
        ):
            if accelerator.is_main_process:
                with atomic_dir(run_dir / "adapter") as tmp:  # a reader never sees half an adapter
                    unwrapped.save_pretrained(tmp, safe_serialization=True)
                    describe_saved(tmp, run_dir)
    else:
        state = accelerator.get_state_dict(model)  # every weight trained: the whole model, gathered
        if accelerator.is_main_process:
            with atomic_dir(run_dir / "model") as tmp:
                unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                describe_saved(tmp, run_dir)
    accelerator.wait_for_everyone()
