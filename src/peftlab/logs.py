"""What the libraries and the ranks may print: the run log is peftlab's, one voice."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep the libraries' start-up chatter out of the run log; their errors still show."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "compilers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors only (rank 0 speaks for the run)."""
    if int(os.environ.get("RANK", "0")) != 0:
        for name in ("", "submitit"):
            logging.getLogger(name).setLevel(logging.WARNING)
