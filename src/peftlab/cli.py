"""Command-line entry points.

``run_job`` is what ``run.py`` (``@hydra.main``) calls for each job; ``peftlab`` is the console
script: ``peftlab compare DIR...`` and ``peftlab predict RUN_DIR``.
"""

from __future__ import annotations

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
    for name in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job: run it; a bad config exits with one line, other failures are recorded then raised."""
    quiet_libraries()
    from peftlab.experiment import run

    try:
        metrics = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics["final"]["accuracy"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"compare": "peftlab.compare", "predict": "peftlab.predict"}
    if not argv or argv[0] not in commands:
        print("usage: peftlab {compare,predict} ...   (peftlab compare --help)", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
