"""Compose a run config with Hydra and run it.

python run.py zero=stage3_cpu peft=lora                 # one run, into outputs/<date>/<time>/
python run.py -m peft.r=4,8,16 peft.lora_alpha=16,32    # a sweep, into multirun/<date>/<time>/<n>/
python run.py --cfg job                                 # print the composed config and stop
python run.py launcher.num_processes=2 zero=stage3      # one run over 2 processes (accelerate launch)
python run.py --help                                    # peftlab's help: the groups, their options, the keys
"""

import sys

import hydra
from omegaconf import DictConfig

import peftlab.cli


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return peftlab.cli.run_job(cfg)


if __name__ == "__main__":
    sys.argv = [
        a for a in sys.argv if not a.startswith("--local_rank")
    ]  # `deepspeed run.py` adds it (and sets LOCAL_RANK)
    main()
