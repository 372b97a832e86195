"""Command-line entry points.

``run_job`` is what ``run.py`` (``@hydra.main``) calls for each job; ``peftlab`` is the console
script: ``peftlab compare DIR...`` and ``peftlab predict RUN_DIR``.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import sys
import warnings

from omegaconf import DictConfig

from peftlab.config import ConfigError

log = logging.getLogger("peftlab")


def quiet_libraries() -> None:
    """Keep the libraries' start-up chatter out of the run log; their errors still show."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "compilers"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
        check_first(cfg)  # before torch, transformers, DeepSpeed and PEFT load (5-10 s): a bad value is reported at once
    except ConfigError as e:
        return _failed_job(e, multirun)

    from peftlab import distributed, launch

    distributed.forget_inherited_process_group_env()
    distributed.env_from_submitit()  # a task of a multi-task submitit/SLURM job is one rank
    distributed.quiet_other_ranks()
    quiet_libraries()
    from peftlab.experiment import run

    # The libraries just imported are hundreds of thousands of long-lived objects; without this every
    # gc.collect() between sweep jobs (Accelerate's free_memory) rescans them: ~0.4 s a job.
    gc.freeze()

    try:
        # launcher.num_processes=N: this process starts N ranks and waits; else it is the (or a) rank
        metrics = launch.relaunch(cfg) if launch.requested(cfg) else distributed.add_run_figures(run(cfg))
    except (ConfigError, launch.LaunchFailed) as e:
        return _failed_job(e, multirun)
    except Exception as e:
        if not multirun or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of several: exit, so the launcher ends the others
            raise
        log.exception("job failed: %s", e)
        return None
    final = metrics["final"]
    return final.get("val_accuracy") if cfg.eval.select_on == "validation" else final.get("accuracy")


def _failed_job(e: Exception, multirun: bool) -> None:
    """A job that failed in one line: logged in a sweep (which goes on), else printed, and exit 2."""
    if multirun:
        log.error("job failed: %s", e)
        return None  # the sweeper's record of a failed job (Optuna marks the trial failed; NaN would crash it)
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
    from pathlib import Path

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from peftlab import rundir

    launcher = cfg.get("launcher") or {}
    if int(os.environ.get("RANK", "0")) != 0 or launcher.get("machine_rank", 0) != 0:
        return
    try:
        run_dir = Path(cfg.paths.output_dir)
        if rundir.read_json(run_dir / "metrics.json") is not None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, OmegaConfBaseException):  # an unwritable directory: the error line is all there is
        return
    try:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)  # what compare shows for the failed run
    except OmegaConfBaseException:
        pass
    now = rundir.now()
    rundir.write_json(run_dir / "metrics.json", {
        "status": "failed", "error": str(error), "started": now, "run_dir": str(run_dir), "versions": dict(rundir.versions()),
        "device": {"host": platform.node(), "cpu_count": os.cpu_count()}, "ended": now, "wall_s": 0.0})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"compare": "peftlab.compare", "predict": "peftlab.predict"}
    if not argv or argv[0] not in commands:
        print("usage: peftlab {compare,predict} ...   (peftlab compare --help)", file=sys.stderr)
        return 2
    import importlib

    try:
        return importlib.import_module(commands[argv[0]]).main(argv[1:])
    except BrokenPipeError:  # `peftlab compare DIR | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
