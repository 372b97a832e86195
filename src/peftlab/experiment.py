"""One run: validate -> read data -> (train -> evaluate) per held-out split -> save -> record.

``run(cfg)`` is what ``run.py`` calls after Hydra composed the config; tests call it directly with
a config from ``compose``. Everything it writes goes under ``cfg.paths.output_dir``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig

from peftlab import checkpoint, data, engine, metrics, modeling, rundir
from peftlab.config import ConfigError, peft_method, validate
from peftlab.distributed import reset_state
from peftlab.fit import Base, Job, fit
from peftlab.memory import PhaseMeter, free_job_memory, gpu_allocated_mb, release_failed_job
from peftlab.metrics import classification_figures
from peftlab.rundir import RunRecord, headline, write_csv

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
        raise ConfigError(
            f"cannot write the run directory {run_dir} ({e.strerror or e}); "
            "choose a writable hydra.run.dir (or hydra.sweep.dir)"
        ) from None
    try:
        action, resume_from = checkpoint.plan_resume(cfg, run_dir)
    except ConfigError as e:
        if checkpoint.previous_status(run_dir) is None:  # else keep the earlier run's record as it is
            RunRecord(run_dir, write=is_main_process()).finish("failed", error=str(e))
        raise
    if action == "skip":
        if is_main_process():
            log.info(
                "%s already holds a finished run (metrics.json): nothing to do; use another hydra.run.dir (hydra.sweep.dir), "
                "or resume=never to run it again",
                run_dir,
            )
        return checkpoint.previous_status(run_dir)
    record = RunRecord(run_dir, write=is_main_process())
    if resume_from is not None:
        record.update(
            resumed_from=str(resume_from[0].relative_to(run_dir)), resumed_at_step=resume_from[1]["step"]
        )
        if is_main_process():
            log.info(
                "resuming from %s (epoch %d, batch %d, optimizer step %d)",
                resume_from[0],
                resume_from[1]["epoch"],
                resume_from[1]["batch"],
                resume_from[1]["step"],
            )
    engine.STOP.requested = None
    gpu_before = (
        gpu_allocated_mb()
    )  # and after the job's cleanup: an in-process sweep must not pile up models
    try:
        with engine.STOP.active():
            result = _run(cfg, run_dir, record, resume_from)
    except engine.Interrupted as e:
        record.finish("interrupted", error=str(e), interrupted_at_step=e.step)
        if is_main_process():
            log.warning(
                "%s; continue with: python run.py <same overrides> resume=auto hydra.run.dir=%s", e, run_dir
            )
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
    metrics.load_metrics(cfg.eval.metrics, len(data.label_names(cfg.dataset)))  # one unable to score: now
    # every split tokenized once here (cached for the training and evaluation lists): a prompt that leaves
    # no room for the text fails before any model loads, and the rows whose text was cut are counted
    names, tokenizer, method = (
        data.label_names(cfg.dataset),
        modeling.load_tokenizer(cfg.model),
        peft_method(cfg),
    )
    truncated = data.truncated_rows(
        splits,
        tokenizer,
        cfg.model.task,
        cfg.dataset.prompt,
        names,
        cfg.train.max_length,
        speak=is_main_process(),
    )
    record.update(
        eval_split=plan_name,
        n_train=len(plan[0][0]),
        peft_method=method,
        truncated_rows=truncated,
        warnings=warnings,
    )
    validation = None
    single = len(plan) == 1 and not (cfg.eval.select_on == "validation" and plan_name != "kfold")
    if resume_from is not None and not single:
        log.warning(
            "resume: this run trains several models (eval.split=kfold or eval.select_on=validation), "
            "which are not checkpointed; starting over"
        )
        resume_from = None
    # random weights are made before any ZeRO-3 Accelerator exists (zero.Init would partition them)
    base = Base(
        tokenizer, modeling.base_weights(cfg.model, cfg.seed, len(names), cfg.paths.cache_dir), method, names
    )
    if cfg.eval.select_on == "validation" and plan_name != "kfold":  # choose settings without the test split
        train = [r for r in splits["train"] if r["label"] >= 0]
        validation = _fit_all(
            cfg,
            base,
            run_dir,
            splits,
            ("kfold", data.kfold_plan(train, cfg.eval.folds, cfg.seed, cfg.eval.fold_repeats)),
            record,
            prefix="val_",
        )
    result = _fit_all(
        cfg,
        base,
        run_dir,
        splits,
        (plan_name, plan),
        record,
        resume_from=resume_from[0] if resume_from else None,
        checkpoints=single,
    )
    if validation is not None:
        result["final"].update(
            val_accuracy=validation["final"]["accuracy"], val_macro_f1=validation["final"]["macro_f1"]
        )
        result["phases"]["validation"] = {
            "wall_s": round(sum(p["wall_s"] for p in validation["phases"].values()), 3),
            "folds": cfg.eval.folds,
        }
    return result


def one_line(error: BaseException) -> str:
    """The error for metrics.json, in one line: the real error, not a library's wrapper around it."""
    wrappers = (
        "InstantiationException",
    )  # hydra.errors: "Error in call to target ...", raised from the real error
    seen = set()
    while type(error).__name__ in wrappers and id(error) not in seen:
        seen.add(id(error))
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None:
            break
        error = cause
    text = str(error).strip().splitlines()
    return (
        f"{type(error).__name__}: {text[0][:300] if text else ''}"
        if not isinstance(error, ConfigError)
        else text[0]
    )


def _fit_all(
    cfg,
    base: Base,
    run_dir,
    splits,
    named_plan,
    record,
    prefix: str = "",
    resume_from=None,
    checkpoints: bool = False,
) -> dict:
    """Train and evaluate once per (train, eval) pair of the plan (``named_plan``: its name and its pairs);
    pooled figures over all of them. ``resume_from``: a checkpoint folder for the single model of the run.

    The main pass (``prefix=""``) saves the adapter and submission and logs to the tracker; the
    cross-validation pass of ``eval.select_on=validation`` writes ``val_predictions.csv`` only.
    """
    plan_name, plan = named_plan
    names = base.names
    meter = PhaseMeter()
    gold, pred, rows_out, histories, outs = [], [], [], [], []
    final_model = not prefix and plan_name != "kfold"
    for fold, (train_rows, eval_rows) in enumerate(plan):
        last = fold == len(plan) - 1
        unlabeled = [r for r in splits.get("test", []) if r["label"] < 0] if last and final_model else []
        job = Job(
            train_rows,
            eval_rows,
            unlabeled,
            save=last and final_model and cfg.save_adapter,
            track=last and not prefix,
            checkpoints=checkpoints,
            resume_from=resume_from,
        )
        out = fit(
            cfg,
            base,
            job,
            meter,
            run_dir,
            on_epoch=lambda h, f=fold: record.update(epochs=h["epochs"], fold=f, phase=f"{prefix}train"),
        )
        histories.append(out["history"])
        outs.append(out)
        gold.extend(r["label"] for r in eval_rows)
        pred.extend(out["eval"]["pred"])
        rows_out.extend(_prediction_rows(eval_rows, out["eval"], names, fold))
        if unlabeled and is_main_process():
            write_csv(
                run_dir / "submission.csv",
                ["ID", "Label"],
                [[r["id"], names[p]] for r, p in zip(unlabeled, out["unlabeled"]["pred"])],
            )
    if is_main_process():
        header = (
            ["id", "fold", "label", "prediction", "correct"]
            + [f"logp_{n}" for n in names]
            + ["generated", "text"]
        )
        write_csv(run_dir / f"{prefix}predictions.csv", header, rows_out)
    final = classification_figures(gold, pred, names, cfg.eval.metrics)
    final["split"] = plan_name
    last = outs[-1]
    final.update({f"eval_s_{mode}": seconds for mode, seconds in last["eval_s"].items()})
    if cfg.eval.mode == "both":
        final.update(agreement(last["eval"], names))
    # speed of the row phase (objective=contrastive's pair epochs apart), its first epoch left out as warm-up
    rows = [[e for e in h["epochs"] if e.get("phase", "rows") == "rows"] for h in histories]
    steady = [e for epochs in rows for e in (epochs[1:] or epochs)]
    meter.phases.get("train", {}).update(
        steps=sum(len(h["step_s"]) for h in histories),
        s_per_step=histories[-1]["s_per_step"],
        **(
            {"pair_s_per_step": histories[-1]["pair_s_per_step"]}
            if "pair_s_per_step" in histories[-1]
            else {}
        ),
        samples_per_s=_mean(e["samples_per_s"] for e in steady),
        tokens_per_s=_mean(e["tokens_per_s"] for e in steady),
    )
    first_step = histories[0].get("first_step_at")
    started = (
        record.started_at if _runs_in_process > 1 else psutil.Process().create_time()
    )  # the command's start, once
    return {
        "final": final,
        "phases": meter.phases,
        "time_to_first_step_s": round(first_step - started, 2) if first_step else None,
        "trainable_params": last["trainable_params"],
        "epochs": histories[-1]["epochs"],
        "loss_curve": histories[-1]["loss_curve"],
        **({"folds": [h["epochs"][-1] for h in histories]} if len(histories) > 1 else {}),
        **({"zero3_partitions": last["zero3_partitions"]} if last.get("zero3_partitions") else {}),
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def _prediction_rows(rows, out, names, fold) -> list[list]:
    table = []
    for i, (r, p) in enumerate(zip(rows, out["pred"])):
        scores = [round(s, 5) for s in out["scores"][i]] if out["scores"] else [""] * len(names)
        generated = out["text"][i] if out["text"] else ""
        table.append(
            [r["id"], fold, names[r["label"]], names[p], int(p == r["label"]), *scores, generated, r["text"]]
        )
    return table


def agreement(out: dict, names: list[str]) -> dict:
    """How often generate's text is exactly a label, and how often it then equals the score prediction."""
    exact = [i for i, t in enumerate(out["text"]) if t in names]
    same = sum(names.index(out["text"][i]) == out["pred"][i] for i in exact)
    return {
        "generate_exact": round(len(exact) / len(out["text"]), 6),
        "agreement": round(same / len(exact), 6) if exact else None,
    }


def summary_line(m: dict) -> str:
    """The run's last line, from the record's headline figures (rundir.headline, as compare and bench read them)."""
    h, f = headline(m), m.get("final", {})
    val = f" (validation folds {h['val_accuracy']:.4f})" if h["val_accuracy"] is not None else ""
    gpu, cpu = h["gpu_peak_mb"], h["cpu_peak_mb"]
    pairs = ((m.get("phases") or {}).get("train") or {}).get("pair_s_per_step")  # objective=contrastive
    speed = f"{h['s_per_step']} s/step" + (f" (pair phase {pairs} s/step)" if pairs else "")
    return (
        f"{f.get('split')} accuracy {f.get('accuracy', float('nan')):.4f}{val}, macro-F1 {f.get('macro_f1', float('nan')):.4f} "
        f"({f.get('n_eval')} rows) | {speed}, {h['tokens_per_s']} tokens/s | "
        f"GPU peak {f'{gpu:.0f} MB' if gpu else 'n/a'}, CPU peak {cpu or 0:.0f} MB | wall {m.get('wall_s')} s | {m.get('run_dir')}"
    )
