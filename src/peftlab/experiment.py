"""One run: validate -> read data -> (train -> evaluate) per held-out split -> save -> record.

``run(cfg)`` is what ``run.py`` calls after Hydra composed the config; tests call it directly with
a config from ``compose``. Everything it writes goes under ``cfg.paths.output_dir``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import psutil
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import get_linear_schedule_with_warmup

from peftlab import checkpoint, data, distributed, engine, modeling, rundir
from peftlab.config import ConfigError, peft_method, validate
from peftlab.distributed import is_zero3, make_accelerator, reset_state, used_deepspeed_config
from peftlab.memory import PhaseMeter, free_job_memory, gpu_allocated_mb, release_failed_job
from peftlab.metrics import classification_figures
from peftlab.rundir import RunRecord, atomic_dir, headline, write_csv, write_json

log = logging.getLogger("peftlab")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


_runs_in_process = 0


def run(cfg: DictConfig) -> dict:
    """Train and evaluate as configured; returns the final metrics.json content.

    With ``resume=auto`` (the default) a run directory whose metrics.json says finished is left as
    it is (its metrics are returned), and one with a checkpoint continues from the newest one.
    """
    global _runs_in_process
    _runs_in_process += 1
    run_dir = Path(cfg.paths.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(f"Permission denied: '{run_dir}'")
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir} ({e.strerror or e}); "
                          "choose a writable hydra.run.dir (or hydra.sweep.dir)") from None
    try:
        action, resume_from = checkpoint.plan_resume(cfg, run_dir)
    except ConfigError as e:
        if checkpoint.previous_status(run_dir) is None:  # else keep the earlier run's record as it is
            RunRecord(run_dir, write=is_main_process()).finish("failed", error=str(e))
        raise
    if action == "skip":
        if is_main_process():
            log.info("%s already holds a finished run (metrics.json): nothing to do; use another hydra.run.dir (hydra.sweep.dir), "
                     "or resume=never to run it again", run_dir)
        return checkpoint.previous_status(run_dir)
    record = RunRecord(run_dir, write=is_main_process())
    if resume_from is not None:
        record.update(resumed_from=str(resume_from[0].relative_to(run_dir)), resumed_at_step=resume_from[1]["step"])
        if is_main_process():
            log.info("resuming from %s (epoch %d, batch %d, optimizer step %d)", resume_from[0], resume_from[1]["epoch"],
                     resume_from[1]["batch"], resume_from[1]["step"])
    engine.STOP.requested = None
    gpu_before = gpu_allocated_mb()  # and after the job's cleanup: an in-process sweep must not pile up models
    try:
        with engine.STOP.active():
            result = _run(cfg, run_dir, record, resume_from)
    except engine.Interrupted as e:
        record.finish("interrupted", error=str(e), interrupted_at_step=e.step)
        if is_main_process():
            log.warning("%s; continue with: python run.py <same overrides> resume=auto hydra.run.dir=%s", e, run_dir)
        raise
    except engine.Diverged as e:
        record.finish("diverged", error=str(e), diverged_at_step=e.step)
        raise
    except torch.OutOfMemoryError as e:
        record.finish("oom", error=f"out of memory: {str(e).splitlines()[0][:200]}")
        raise
    except KeyboardInterrupt:
        record.finish("interrupted", error="interrupted (SIGINT)")
        raise
    except Exception as e:
        record.finish("failed", error=one_line(e))
        raise
    finally:
        release_failed_job(sys.exc_info()[1])  # its traceback's frames hold the job's model and engine
        reset_state()
        free_job_memory()  # the job's reference cycles, now: the next job's gc.freeze() would keep them for good
        record.update(gpu_allocated_mb_before=gpu_before, gpu_allocated_mb_after=gpu_allocated_mb())
    record.finish("finished", processes=int(os.environ.get("WORLD_SIZE", "1")), **result)
    if is_main_process():
        checkpoint.clear(run_dir)  # only for resuming; the run's result is adapter/ and the records
        log.info(summary_line(record.data))
    return record.data


def _run(cfg: DictConfig, run_dir: Path, record: RunRecord, resume_from) -> dict:
    if is_main_process():
        rundir.save_resolved_config(cfg, run_dir)
    validate(cfg)
    modeling.check_pooling(cfg.model)
    splits = data.load_splits(cfg.dataset, cfg.paths.data_dir)
    plan_name, plan = data.eval_plan(cfg, splits)
    for train_rows, eval_rows in plan:
        data.check_disjoint(train_rows, eval_rows)
    warnings = data.doubts(cfg.dataset, splits, plan_name, plan, speak=is_main_process())
    # every split tokenized once here (cached for the training and evaluation lists): a prompt that leaves
    # no room for the text fails before any model loads, and the rows whose text was cut are counted
    truncated = data.truncated_rows(splits, modeling.load_tokenizer(cfg.model), cfg.model.task, cfg.dataset.prompt,
                                    data.label_names(cfg.dataset), cfg.train.max_length, speak=is_main_process())
    record.update(eval_split=plan_name, n_train=len(plan[0][0]), peft_method=peft_method(cfg), truncated_rows=truncated,
                  warnings=warnings)
    validation = None
    single = len(plan) == 1 and not (cfg.eval.select_on == "validation" and plan_name != "kfold")
    if resume_from is not None and not single:
        log.warning("resume: this run trains several models (eval.split=kfold or eval.select_on=validation), "
                    "which are not checkpointed; starting over")
        resume_from = None
    if cfg.eval.select_on == "validation" and plan_name != "kfold":  # choose settings without the test split
        train = [r for r in splits["train"] if r["label"] >= 0]
        validation = _fit_all(cfg, run_dir, splits, "kfold", data.kfold_plan(train, cfg.eval.folds, cfg.seed), record, prefix="val_")
    result = _fit_all(cfg, run_dir, splits, plan_name, plan, record, checkpoints=single, resume_from=resume_from)
    if validation is not None:
        result["final"].update(val_accuracy=validation["final"]["accuracy"], val_macro_f1=validation["final"]["macro_f1"])
        result["phases"]["validation"] = {"wall_s": round(sum(p["wall_s"] for p in validation["phases"].values()), 3),
                                          "folds": cfg.eval.folds}
    return result


def one_line(error: BaseException) -> str:
    """The error for metrics.json, in one line: the real error, not a library's wrapper around it."""
    wrappers = ("InstantiationException",)  # hydra.errors: "Error in call to target ...", raised from the real error
    seen = set()
    while type(error).__name__ in wrappers and id(error) not in seen:
        seen.add(id(error))
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None:
            break
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}" if not isinstance(error, ConfigError) else text[0]


def _fit_all(cfg, run_dir, splits, plan_name, plan, record, prefix: str = "", checkpoints: bool = False, resume_from=None) -> dict:
    """Train and evaluate once per (train, eval) pair of ``plan``; pooled figures over all of them.

    The main pass (``prefix=""``) saves the adapter and submission and logs to the tracker; the
    cross-validation pass of ``eval.select_on=validation`` writes ``val_predictions.csv`` only.
    """
    names = data.label_names(cfg.dataset)
    meter = PhaseMeter()
    gold, pred, rows_out, histories, outs = [], [], [], [], []
    final_model = not prefix and plan_name != "kfold"
    for fold, (train_rows, eval_rows) in enumerate(plan):
        last = fold == len(plan) - 1
        unlabeled = [r for r in splits.get("test", []) if r["label"] < 0] if last and final_model else []
        out = fit_and_evaluate(cfg, train_rows, eval_rows, meter, run_dir=run_dir,
                               save=last and final_model and cfg.save_adapter, track=last and not prefix, unlabeled=unlabeled,
                               checkpoints=checkpoints, resume_from=resume_from,
                               on_epoch=lambda h, f=fold: record.update(epochs=h["epochs"], fold=f, phase=f"{prefix}train"))
        histories.append(out["history"])
        outs.append(out)
        gold.extend(r["label"] for r in eval_rows)
        pred.extend(out["eval"]["pred"])
        rows_out.extend(_prediction_rows(eval_rows, out["eval"], names, fold))
        if unlabeled and is_main_process():
            write_csv(run_dir / "submission.csv", ["ID", "Label"],
                      [[r["id"], names[p]] for r, p in zip(unlabeled, out["unlabeled"]["pred"])])
    if is_main_process():
        header = ["id", "fold", "label", "prediction", "correct"] + [f"logp_{n}" for n in names] + ["generated", "text"]
        write_csv(run_dir / f"{prefix}predictions.csv", header, rows_out)
    final = classification_figures(gold, pred, names)
    final["split"] = plan_name
    last = outs[-1]
    final.update({f"eval_s_{mode}": seconds for mode, seconds in last["eval_s"].items()})
    if cfg.eval.mode == "both":
        final.update(agreement(last["eval"], names))
    steady = [e for h in histories for e in (h["epochs"][1:] or h["epochs"])]  # epoch 1 is warm-up
    meter.phases.get("train", {}).update(
        steps=sum(len(h["step_s"]) for h in histories), s_per_step=histories[-1]["s_per_step"],
        samples_per_s=_mean(e["samples_per_s"] for e in steady), tokens_per_s=_mean(e["tokens_per_s"] for e in steady))
    first_step = histories[0].get("first_step_at")
    started = record.started_at if _runs_in_process > 1 else psutil.Process().create_time()  # the command's start, once
    return {"final": final, "phases": meter.phases,
            "time_to_first_step_s": round(first_step - started, 2) if first_step else None,
            "epochs": histories[-1]["epochs"], "loss_curve": histories[-1]["loss_curve"],
            **({"folds": [h["epochs"][-1] for h in histories]} if len(histories) > 1 else {}),
            **({"zero3_partitions": last["zero3_partitions"]} if last.get("zero3_partitions") else {})}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def _prediction_rows(rows, out, names, fold) -> list[list]:
    table = []
    for i, (r, p) in enumerate(zip(rows, out["pred"])):
        scores = [round(s, 5) for s in out["scores"][i]] if out["scores"] else [""] * len(names)
        generated = out["text"][i] if out["text"] else ""
        table.append([r["id"], fold, names[r["label"]], names[p], int(p == r["label"]), *scores, generated, r["text"]])
    return table


def fit_and_evaluate(cfg: DictConfig, train_rows, eval_rows, meter: PhaseMeter, *, run_dir: Path, save: bool,
                     track: bool = False, unlabeled=(), on_epoch=None, checkpoints: bool = False, resume_from=None) -> dict:
    """Build a fresh Accelerator and model, train on ``train_rows``, predict ``eval_rows`` (and ``unlabeled``).

    ``checkpoints``: save at ``checkpoint.*``'s interval; ``resume_from``: (folder, trainer state) to continue from.
    """
    names = data.label_names(cfg.dataset)
    task = cfg.model.task
    with meter.phase("setup"):
        if not cfg.model.pretrained and cfg.model.get("materialize", True):
            modeling.random_weights(cfg, len(names))  # before zero.Init is switched on
        accelerator = make_accelerator(cfg, str(run_dir), log_with=cfg.logger if track else None)
        if track and cfg.logger:
            accelerator.init_trackers(cfg.logger, config=hyperparameters(cfg))
        tok = modeling.load_tokenizer(cfg.model)
        targets = data.class_targets(tok, task, names) if task != "seq_cls" else None
        with accelerator.main_process_first():
            encode = lambda rows: data.encode(rows, tok, task, cfg.dataset.prompt, names, cfg.train.max_length)
            train_feats, eval_feats, extra_feats = encode(train_rows), encode(eval_rows), encode(list(unlabeled)) if unlabeled else []
        train_dl = engine.train_loader(train_feats, data.Collator(task, "train", tok.pad_token_id), cfg.train.batch_size, cfg.seed)
        modes = ["score", "generate"] if cfg.eval.mode == "both" else [cfg.eval.mode]
        eval_dls = {mode: data.loader(eval_feats, data.Collator(task, mode, tok.pad_token_id, targets), cfg.eval.batch_size, False, cfg.seed)
                    for mode in modes}
        total = modeling.optimizer_steps(len(train_feats), cfg, accelerator.num_processes)
        model = modeling.build_model(cfg, len(names), total)
        modeling.set_zero3_leaves(model, cfg)
        head_steps = total * cfg.train.head_only_epochs // cfg.train.epochs
        optimizer = instantiate(cfg.optimizer, modeling.parameter_groups(model) if head_steps else modeling.trainable_parameters(model))
        n = accelerator.num_processes  # Accelerate steps a non-DeepSpeed scheduler once per process per step
        warmup = int(cfg.train.warmup_ratio * total)
        scheduler = (modeling.head_first_schedule(optimizer, warmup * n, total * n, head_steps * n) if head_steps
                     else get_linear_schedule_with_warmup(optimizer, warmup * n, total * n))
        model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
        eval_dls = {mode: accelerator.prepare(dl) for mode, dl in eval_dls.items()}
        partitions = distributed.zero3_partitions(accelerator, model)  # each rank's share of the parameters (a collective)
        trainable, params = modeling.count_parameters(model)
        if accelerator.is_main_process:
            log.info("%s + %s on %s (%s): %s of %s parameters train", cfg.model.name, peft_method(cfg), accelerator.device,
                     cfg.zero.name, f"{trainable:,}", f"{params:,}")
            ds = used_deepspeed_config(accelerator)
            if ds is not None:
                write_json(run_dir / "deepspeed.json", ds)
        ck = cfg.checkpoint
        checkpointer = checkpoint.Checkpointer(accelerator, run_dir, ck.every_steps, ck.every_epochs,
                                               ck.keep_last) if checkpoints else None
        if resume_from is not None:
            checkpointer.load(resume_from[0])
    with meter.phase("train"):
        history = engine.train(accelerator, model, optimizer, scheduler, train_dl, cfg.train.epochs, task=task,
                               max_grad_norm=cfg.train.max_grad_norm, adalora=peft_method(cfg) == "adalora",
                               on_epoch=lambda h: (_log_epoch(accelerator, h), on_epoch and on_epoch(h)),
                               profile_steps=cfg.train.profile_steps if track else 0, profile_to=run_dir / "profile.txt",
                               checkpointer=checkpointer, start=resume_from[1] if resume_from else None)
    predict = lambda dl, mode: engine.predict(
        accelerator, model, dl, task, mode, len(names), tokenizer=tok, label_names=names,
        max_new_tokens=cfg.eval.max_new_tokens,
        synced_gpus=is_zero3(accelerator) and accelerator.num_processes > 1)  # ranks keep stepping together; one needs no sync
    with meter.phase("eval"):
        result = {"history": history, "trainable_params": trainable, "eval_s": {}, "zero3_partitions": partitions}
        for mode, dl in eval_dls.items():
            start = time.perf_counter()
            out = _in_row_order(predict(dl, mode))
            result["eval_s"][mode] = round(time.perf_counter() - start, 3)
            result["eval"] = _merge(result.get("eval"), out)
        if extra_feats:
            mode = modes[0]
            extra_dl = accelerator.prepare(data.loader(extra_feats, data.Collator(task, mode, tok.pad_token_id, targets),
                                                       cfg.eval.batch_size, False, cfg.seed))
            result["unlabeled"] = _in_row_order(predict(extra_dl, mode))
    figures = classification_figures([r["label"] for r in eval_rows], result["eval"]["pred"], names)
    accelerator.log({"eval/accuracy": figures["accuracy"], "eval/macro_f1": figures["macro_f1"]}, step=history["loss_curve"][-1][0])
    if save:
        with meter.phase("save"):
            save_trained(accelerator, model, run_dir)
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group the next training reuses
        tracker.finish()
    # Nothing of this training may outlive it (the next fold; the next job of a sweep): this frame lets go of it
    # first (predict closes over model), so that free_memory()'s gc.collect() frees it now; free_memory() also
    # destroys the DeepSpeed engine (its hooks), empties Accelerate's lists and the CUDA cache.
    model = optimizer = scheduler = train_dl = eval_dls = checkpointer = predict = None
    accelerator.free_memory()
    return result


def _merge(first: dict | None, second: dict) -> dict:
    """eval.mode=both: score-mode predictions, with generate-mode text and labels beside them."""
    return second if first is None else dict(first, text=second["text"], generate_pred=second["pred"])


def agreement(out: dict, names: list[str]) -> dict:
    """How often generate's text is exactly a label, and how often it then equals the score prediction."""
    exact = [i for i, t in enumerate(out["text"]) if t in names]
    same = sum(names.index(out["text"][i]) == out["pred"][i] for i in exact)
    return {"generate_exact": round(len(exact) / len(out["text"]), 6),
            "agreement": round(same / len(exact), 6) if exact else None}


def hyperparameters(cfg: DictConfig) -> dict:
    """Scalars for the tracker's hparams view: the groups chosen and the knobs swept most."""
    values = {"model": cfg.model.name, "peft": peft_method(cfg), "zero": cfg.zero.name, "seed": cfg.seed,
              **{f"train.{k}": v for k, v in cfg.train.items()},
              **{f"peft.{k}": v for k, v in cfg.peft.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}}
    return {k: v for k, v in values.items() if v is not None}


def _log_epoch(accelerator, history: dict) -> None:
    """The new epoch's per-step losses and speed to the tracker (no-op without one)."""
    epoch = history["epochs"][-1]
    for step, loss in history["loss_curve"][-epoch["steps"]:]:
        accelerator.log({"train/loss": loss}, step=step)
    accelerator.log({f"train/{k}": v for k, v in epoch.items() if k in ("samples_per_s", "tokens_per_s", "s_per_step") and v},
                    step=history["loss_curve"][-1][0])


def _in_row_order(out: dict) -> dict:
    order = sorted(range(len(out["row"])), key=out["row"].__getitem__)
    return {k: ([v[i] for i in order] if isinstance(v, list) else v) for k, v in out.items()}


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
        with distributed.gathered([p for p in unwrapped.parameters() if p.requires_grad], enabled=is_zero3(accelerator)):
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


def summary_line(m: dict) -> str:
    """The run's last line, from the record's headline figures (rundir.headline, as compare and bench read them)."""
    h, f = headline(m), m.get("final", {})
    val = f" (validation folds {h['val_accuracy']:.4f})" if h["val_accuracy"] is not None else ""
    gpu, cpu = h["gpu_peak_mb"], h["cpu_peak_mb"]
    return (f"{f.get('split')} accuracy {f.get('accuracy', float('nan')):.4f}{val}, macro-F1 {f.get('macro_f1', float('nan')):.4f} "
            f"({f.get('n_eval')} rows) | {h['s_per_step']} s/step, {h['tokens_per_s']} tokens/s | "
            f"GPU peak {f'{gpu:.0f} MB' if gpu else 'n/a'}, CPU peak {cpu or 0:.0f} MB | wall {m.get('wall_s')} s | {m.get('run_dir')}")
