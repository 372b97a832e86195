"""Compose a run config with Hydra and run it.

    python run.py zero=stage3_cpu peft=lora                 # one run, into outputs/<date>/<time>/
    python run.py -m peft.r=4,8,16 peft.lora_alpha=16,32    # a sweep, into multirun/<date>/<time>/<n>/
    python run.py --cfg job                                 # print the composed config and stop
    python run.py launcher.num_processes=2 zero=stage3      # one run over 2 processes (accelerate launch)
    python run.py --help                                    # peftlab's help: the groups, their options, the keys
"""

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

import peftlab.cli

# `python run.py --help`: peftlab's own page (Hydra's hydra/help config group, an option stored here), with the
# groups and their options listed from conf/ by Hydra ($APP_CONFIG_GROUPS); --hydra-help is Hydra's own page.
HELP = {
    "app_name": "peftlab",
    "header": "peftlab: train and evaluate a PEFT adapter (or a full fine-tune) under any DeepSpeed ZeRO setting,\n"
              "composed from conf/ with Hydra; each run leaves a run directory (outputs/<date>/<time>/) with its\n"
              "config, metrics.json, predictions.csv and adapter/.\n\n"
              "  python run.py [group=option ...] [key=value ...]        one run\n"
              "  python run.py -m peft.r=4,8,16 peft.lora_alpha=16,32    a sweep (multirun/<date>/<time>/<n>/)\n"
              "  python run.py --cfg job                                 print the composed config, run nothing\n"
              "  peftlab validate [overrides]                            check a config, its data and launcher in seconds\n",
    "footer": "Keys users type most: seed, train.epochs, train.lr, train.batch_size, train.grad_accum,\n"
              "train.mixed_precision=no|bf16|fp16, eval.mode=score|generate|both, eval.split=test|validation|kfold,\n"
              "dataset.data_dir=PATH, peft.r, peft.lora_alpha, model.pooling=cls|mean, train.head_only_epochs=N,\n"
              "zero.offload_optimizer_device, zero.offload_param_device, zero.offload_param_nvme_path,\n"
              "launcher.num_processes=N, checkpoint.every_steps=N, resume=auto|never, hydra.run.dir, hydra.sweep.dir.\n\n"
              "After a run: peftlab predict RUN_DIR [--input FILE], peftlab export RUN_DIR OUT [--merge],\n"
              "peftlab compare DIR... (peftlab --help). The README has the details; --hydra-help shows Hydra's flags.\n",
    "template": "${hydra.help.header}\n== Config groups: choose one option of each (group=option) ==\n\n$APP_CONFIG_GROUPS\n"
                "model: tiny_* and *_arch are random weights (offline); peft=none is full fine-tuning; zero=none is no DeepSpeed.\n"
                "experiment=NAME applies a file of conf/experiment/ over the others.\n\n"
                "== Keys (key=value; any key of the composed config, see --cfg job) ==\n\n${hydra.help.footer}",
}
ConfigStore.instance().store(group="hydra/help", name="peftlab", node=HELP, provider="peftlab")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return peftlab.cli.run_job(cfg)


if __name__ == "__main__":
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]  # `deepspeed run.py` adds it (and sets LOCAL_RANK)
    if {"--help", "-h"} & set(sys.argv[1:]) and not any(a.startswith("hydra/help=") for a in sys.argv):
        sys.argv.append("hydra/help=peftlab")  # peftlab's page (HELP above) instead of Hydra's generic one
    main()
