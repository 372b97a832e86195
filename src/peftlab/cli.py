"""Command-line entry points.

``run_job`` is what ``run.py`` (``@hydra.main``) calls for each job; ``peftlab`` is the console
script: ``peftlab compare DIR...``, ``peftlab predict RUN_DIR``, ``peftlab export RUN_DIR OUT`` and
``peftlab validate [overrides]`` (``peftlab --help`` lists them).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from peftlab.config import ConfigError
from peftlab.logs import quiet_libraries, quiet_other_ranks

log = logging.getLogger("peftlab")


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job. With ``launcher.num_processes=N`` this process starts N ranks and waits
    (peftlab.launch); in a task of a submitit/SLURM job it is one rank. A single run exits 2 with one
    line on a bad config and raises other errors; in a multirun a failed job is logged (its run
    directory records status and error) and the sweep goes on, except that one rank of several
    re-raises, so that its launcher ends the others. Returns the objective Hydra sweepers maximize: validation accuracy when
    ``eval.select_on=validation``, else the evaluation accuracy (None for a failed job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        from peftlab.sweep import job_banner

        log.info(job_banner(cfg))
    try:
        check_first(
            cfg
        )  # before torch, transformers, DeepSpeed and PEFT load (5-10 s): a bad value is reported at once
    except ConfigError as e:
        return _failed_job(e, multirun)

    from peftlab import distributed, launch

    distributed.forget_inherited_process_group_env()
    distributed.env_from_submitit()  # a task of a multi-task submitit/SLURM job is one rank
    quiet_other_ranks()
    quiet_libraries()
    from peftlab.experiment import run

    # The libraries just imported are hundreds of thousands of long-lived objects; without this every
    # gc.collect() between sweep jobs (Accelerate's free_memory) rescans them: ~0.4 s a job.
    gc.freeze()

    try:
        # launcher.num_processes=N: this process starts N ranks and waits; else it is the (or a) rank
        metrics = launch.relaunch(cfg) if launch.requested(cfg) else run(cfg)
    except (ConfigError, launch.LaunchFailed) as e:
        return _failed_job(e, multirun)
    except Exception as e:
        if (
            not multirun or int(os.environ.get("WORLD_SIZE", "1")) > 1
        ):  # one rank of several: exit, so the launcher ends the others
            raise
        log.exception("job failed: %s", e)
        return None
    final = metrics["final"]
    return final.get("val_accuracy") if cfg.eval.select_on == "validation" else final.get("accuracy")


def _failed_job(e: Exception, multirun: bool) -> None:
    """A job that failed in one line: logged in a sweep (which goes on), else printed, and exit 2."""
    if multirun:
        log.error("job failed: %s", e)
        return (
            None  # the sweeper's record of a failed job (Optuna marks the trial failed; NaN would crash it)
        )
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "returncode", 2))


def check_first(cfg: DictConfig) -> None:
    """``config.validate`` and the model's files, with nothing heavy imported (only omegaconf, hydra,
    huggingface_hub): a config error exits in about a second instead of after the libraries loaded.
    On a ConfigError the run directory records it (``config.yaml`` and ``metrics.json`` with
    ``status: failed``), as ``experiment.run`` does, unless it holds an earlier run's record, which is
    kept. In a task of a submitit job the rank is known only later: ``experiment.run`` checks there."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from peftlab.config import check_model_files, validate

    try:
        validate(cfg)
        check_model_files(cfg.model)
    except ConfigError as e:
        record_config_error(cfg, e)
        raise


def record_config_error(cfg: DictConfig, error: ConfigError) -> None:
    """config.yaml and a failed metrics.json in the run directory, without RunRecord (whose device
    record imports torch); rank 0 of machine 0 writes, and an earlier run's record is left as it is."""
    from omegaconf.errors import OmegaConfBaseException

    from peftlab import rundir

    if not rundir.first_process(cfg):
        return
    try:
        run_dir = Path(cfg.paths.output_dir)
        if rundir.read_json(run_dir / "metrics.json") is not None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, OmegaConfBaseException):  # an unwritable directory: the error line is all there is
        return
    rundir.save_resolved_config(cfg, run_dir)  # what compare shows for the failed run
    rundir.failed_record(run_dir, str(error))


COMMANDS = {  # name: (module with main(argv), what it does)
    "validate": (
        "peftlab.cli",
        "compose a run's config from conf/ and check it, its data and launcher, loading no weights",
    ),
    "predict": (
        "peftlab.predict",
        "reload a finished run: its evaluation rows again, or --input FILE's new rows",
    ),
    "export": (
        "peftlab.export",
        "a finished run as a folder plain transformers (or PEFT) loads, with a model card",
    ),
    "compare": ("peftlab.compare", "tables and plots over run directories and sweeps"),
}
USAGE = (
    "usage: peftlab {validate,predict,export,compare} ...\n\n"
    + "\n".join(f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items())
    + "\n\n  peftlab validate [overrides]     e.g. peftlab validate model=tiny_bert zero=stage3_cpu"
    + "\n  peftlab predict RUN_DIR [--input FILE] [--out FILE] [--device cpu|cuda]"
    + "\n  peftlab export RUN_DIR OUT [--merge] [--push-to-hub REPO]"
    + "\n  peftlab compare DIR... [--sort KEY] [--out DIR]"
    + "\n\npeftlab COMMAND --help describes each; training is python run.py [overrides] (python run.py --help)."
)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's conf/, as run.py beside it uses


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE if not argv else f"peftlab: unknown command '{argv[0]}'\n{USAGE}", file=sys.stderr)
        return 2
    import importlib

    try:
        if argv[0] == "validate":
            return validate_main(argv[1:])
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    except BrokenPipeError:  # `peftlab compare DIR | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(
            os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno()
        )  # no second error when Python flushes stdout at exit
        return 141


def validate_main(argv: list[str]) -> int:
    """``peftlab validate [overrides]``: the config as ``python run.py [overrides]`` would compose it, its composed
    choices, then every check that needs no weights; "ok" and exit 0, or the one-line error and exit 2."""
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="peftlab validate",
        description="Compose the run config from conf/ as python run.py would, print the "
        "choices, and run every check that needs no model weights: config values and combinations, the model's files "
        "(hub cache), the launcher against the visible GPUs, the data files, columns, labels and held-out rows, the "
        "prompt against train.max_length. Nothing is written. Exit 0 and 'ok', or exit 2 and one line.",
        epilog="examples: peftlab validate;  peftlab validate model=tiny_bert zero=stage3_cpu peft=ia3;  "
        "make validate ARGS='zero=stage2 zero.offload_param_device=cpu'",
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value and group=option, as for run.py (one value per key)"
    )
    parser.add_argument(
        "--config-dir", type=Path, default=CONF_DIR, help=f"the config folder (default: {CONF_DIR})"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(
        level=logging.WARNING, format="warning: %(message)s"
    )  # the data checks' warnings, one line each
    try:
        cfg = compose_run_config(args.config_dir, args.overrides)
        print(composed_choices(cfg))
        summary = check_all(
            cfg,
            shared_dir_given=any(
                o.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in args.overrides
            ),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ok: {summary} ({time.perf_counter() - started:.1f} s)")
    return 0


def compose_run_config(config_dir: Path, overrides: list[str]) -> DictConfig:
    """The run config as run.py composes it (Hydra's compose API); a composition error is one ConfigError.
    ``paths.output_dir`` (Hydra's run directory, claimed only when a run starts) is left unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import peftlab  # noqa: F401  (the resolvers the configs use)

    if not (Path(config_dir) / "config.yaml").is_file():
        raise ConfigError(
            f"--config-dir {config_dir} has no config.yaml; give the folder run.py composes from (conf/)"
        )
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        text = str(e).split("Config search path")[0]  # Hydra's own lines after it name its search path
        raise ConfigError(" ".join(line.strip() for line in text.splitlines() if line.strip())) from None
    if "${hydra:" in str(OmegaConf.to_container(cfg.paths, resolve=False).get("output_dir")):
        cfg.paths.output_dir = "(the run directory, claimed when the run starts)"
    return cfg


def composed_choices(cfg: DictConfig) -> str:
    """The composed choices, one group a line (a value that cannot be resolved shows as it is written)."""
    from omegaconf import OmegaConf

    from peftlab.config import objective_name, peft_method

    def show(node, keys) -> str:
        plain = OmegaConf.to_container(node, resolve=False)
        out = []
        for key in keys:
            if key in plain:
                try:
                    value = node[key]
                except Exception:
                    value = plain[key]
                out.append(f"{key}={list(value) if OmegaConf.is_list(value) else value}")
        return " ".join(out)

    m, ds = cfg.model, cfg.dataset
    peft_keys = [str(k) for k in cfg.peft if not str(k).startswith("_")] if cfg.peft else []
    from peftlab.export import base_model_id

    try:
        hub_id = base_model_id(m)
        source = (
            "random weights (model.config)"
            if not m.pretrained
            else m.pretrained
            if hub_id == str(m.pretrained)
            else f"{hub_id} (its packaged copy)"
        )
    except Exception:
        source = OmegaConf.to_container(m, resolve=False).get("pretrained")
    try:
        found = ds.data_dir or (
            Path(str(cfg.paths.data_dir)).expanduser() / ds.name if cfg.paths.data_dir else None
        )
        data_dir = (
            found
            if found and Path(str(found)).expanduser().is_dir() or ds.data_dir
            else f"the hub ({ds.hub.path}/{ds.hub.name}; no folder {found})"
        )
    except Exception:
        data_dir = "?"
    objective = cfg.get("objective")  # its knobs beside its name (none for cross_entropy)
    knobs = [str(k) for k in objective if k != "name"] if objective else []
    return "\n".join(
        [
            f"model     {m.name}: {m.task}, {source}"
            + (f", pooling={m.get('pooling')}" if m.task == "seq_cls" else ""),
            f"peft      {peft_method(cfg)}: "
            + (show(cfg.peft, peft_keys) if peft_keys else "full fine-tuning (every weight trains)"),
            f"zero      {cfg.zero.name}: "
            + show(cfg.zero, ["stage", "offload_optimizer_device", "offload_param_device"]),
            f"dataset   {ds.name}: {ds.format} from {data_dir}; "
            + show(ds, ["text_column", "label_column", "id_column"])
            + f"; labels {dict(ds.labels)}",
            f"train     {show(cfg.train, ['epochs', 'lr', 'batch_size', 'grad_accum', 'mixed_precision', 'max_length'])} seed={cfg.seed}",
            f"eval      {show(cfg.eval, ['mode', 'split', 'select_on', 'metrics'])}",
            f"objective {objective_name(cfg)}" + (f": {show(objective, knobs)}" if knobs else ""),
            f"launcher  {show(cfg.launcher, ['num_processes', 'num_machines'])}",
        ]
    )


def check_all(cfg: DictConfig, shared_dir_given: bool = False) -> str:
    """Every check ``python run.py`` makes before the first weight loads, in its order; returns a summary.

    Config values and combinations (``config.validate``), the model's files (``config.check_model_files``),
    ``launch.check`` when launcher.* asks for more than this process, ``model.pooling=mean`` on a weightless
    build, the data (``data.load_splits``, ``data.eval_plan``, ``data.check_disjoint``; ``data.doubts`` as
    warnings), the prompt against ``train.max_length`` on every row (the tokenizer), and AdaLoRA's schedule."""
    from omegaconf.errors import OmegaConfBaseException

    from peftlab.config import check_model_files, peft_method, validate

    try:
        validate(cfg)
        check_model_files(cfg.model)
        if (cfg.launcher.num_processes, cfg.launcher.num_machines) != (1, 1):
            from peftlab import launch

            launch.check(cfg, shared_dir_given)
        from peftlab import data

        if cfg.model.task == "seq_cls" and cfg.model.pooling == "mean":
            from peftlab.modeling import check_pooling

            check_pooling(cfg.model)
        splits = data.load_splits(cfg.dataset, cfg.paths.data_dir)
        plan_name, plan = data.eval_plan(cfg, splits)
        for train_rows, eval_rows in plan:
            data.check_disjoint(train_rows, eval_rows)
        if cfg.eval.select_on == "validation" and plan_name != "kfold":
            data.kfold_plan(
                [r for r in splits["train"] if r["label"] >= 0],
                cfg.eval.folds,
                cfg.seed,
                cfg.eval.fold_repeats,
            )
        for message in data.doubts(cfg.dataset, splits, plan_name, plan, speak=False):
            print(f"warning: {message}", file=sys.stderr)
        quiet_libraries()
        # the tokenizer alone, not through peftlab.modeling, which imports PEFT and the model classes (~5 s)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.tokenizer, trust_remote_code=cfg.model.trust_remote_code
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # as modeling.load_tokenizer
        cut = data.truncated_rows(
            splits,
            tokenizer,
            cfg.model.task,
            cfg.dataset.prompt,
            data.label_names(cfg.dataset),
            cfg.train.max_length,
            speak=False,
        )
        if peft_method(cfg) == "adalora":
            from peftlab import modeling

            modeling.check_adalora_schedule(cfg.peft, cfg.train, len(plan[0][0]), cfg.launcher.num_processes)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    sizes = ", ".join(f"{split} {len(rows)}" for split, rows in splits.items())
    cut_text = "; ".join(
        f"{n} {split} rows cut to train.max_length={cfg.train.max_length}" for split, n in cut.items() if n
    )
    return (
        f"rows {sizes}; eval.split={plan_name}: {len(plan)} x ({len(plan[0][0])} training, {len(plan[0][1])} held-out "
        "rows), disjoint" + (f"; {cut_text}" if cut_text else "")
    )


if __name__ == "__main__":
    sys.exit(main())
