"""Command-line entry points.

``run_job`` is what ``run.py`` (``@hydra.main``) calls for each job; ``peftlab`` is the console
script: ``peftlab compare DIR...`` and ``peftlab predict RUN_DIR``.
"""

from __future__ import annotations

import gc
import logging
import os
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

    from peftlab import distributed, launch

    distributed.forget_inherited_process_group_env()
    distributed.env_from_submitit()  # a task of a multi-task submitit/SLURM job is one rank
    distributed.quiet_other_ranks()
    quiet_libraries()
    from peftlab.experiment import run

    # The libraries just imported are hundreds of thousands of long-lived objects; without this every
    # gc.collect() between sweep jobs (Accelerate's free_memory) rescans them: ~0.4 s a job.
    gc.freeze()

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        from peftlab.sweep import job_banner

        log.info(job_banner(cfg))
    try:
        # launcher.num_processes=N: this process starts N ranks and waits; else it is the (or a) rank
        metrics = launch.relaunch(cfg) if launch.requested(cfg) else distributed.add_run_figures(run(cfg))
    except (ConfigError, launch.LaunchFailed) as e:
        if multirun:
            log.error("job failed: %s", e)
            return None  # the sweeper's record of a failed job (Optuna marks the trial failed; NaN would crash it)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "returncode", 2))
    except Exception as e:
        if not multirun or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of several: exit, so the launcher ends the others
            raise
        log.exception("job failed: %s", e)
        return None
    final = metrics["final"]
    return final.get("val_accuracy") if cfg.eval.select_on == "validation" else final.get("accuracy")


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
