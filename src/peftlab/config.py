"""Checks a composed run config before any data or model is loaded.

Every problem is a :class:`ConfigError` whose message is one line naming the config key (or file)
and the fix; ``run.py`` prints it and exits non-zero.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

TASKS = ("seq_cls", "seq2seq", "causal_lm")
GENERATIVE = ("seq2seq", "causal_lm")
PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal_lm": "CAUSAL_LM"}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
PRECISIONS = ("no", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad config value or input file; the message names the key or file and the fix."""


def peft_method(cfg: DictConfig) -> str:
    """'lora', 'ia3', ... from the PEFT config's ``_target_``; 'none' for full fine-tuning."""
    target = cfg.peft.get("_target_") if cfg.peft else None
    if not target:
        return "none"
    name = target.rsplit(".", 1)[-1].removesuffix("Config").lower()
    return {"promptencoder": "p_tuning", "prefixtuning": "prefix_tuning", "prompttuning": "prompt_tuning"}.get(
        name, name
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first impossible or out-of-range setting."""
    _validate_model(cfg)
    _validate_train(cfg)
    _validate_zero(cfg)
    _validate_peft(cfg)
    _validate_eval(cfg)
    _validate_devices(cfg)


def _validate_model(cfg: DictConfig) -> None:
    m = cfg.model
    _check(m.task in TASKS, f"model.task={m.task} is not one of {', '.join(TASKS)}: fix the model file conf/model/{m.name}.yaml")
    _check(
        bool(m.pretrained) or bool(m.config),
        f"model.pretrained and model.config are both empty: give a hub id or folder (model.pretrained=...) or a config for random weights in conf/model/{m.name}.yaml",
    )
    _check(m.get("pooling", "cls") in ("cls", "mean"), f"model.pooling={m.get('pooling')} must be cls or mean")
    pretrained = m.pretrained
    if pretrained and (str(pretrained).startswith((".", "/", "~"))):
        _check(Path(pretrained).expanduser().is_dir(), f"model.pretrained={pretrained}: no such folder; give an existing model folder or a hub id")


def _positive_int(value, key: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{key}={value} must be a whole number >= 1")


def _validate_train(cfg: DictConfig) -> None:
    t = cfg.train
    _positive_int(t.epochs, "train.epochs")
    _positive_int(t.batch_size, "train.batch_size")
    _positive_int(t.grad_accum, "train.grad_accum")
    _check(isinstance(t.lr, (int, float)) and t.lr > 0, f"train.lr={t.lr} must be a number > 0, e.g. train.lr=1e-3")
    _check(t.max_grad_norm is None or (isinstance(t.max_grad_norm, (int, float)) and t.max_grad_norm > 0),
           f"train.max_grad_norm={t.max_grad_norm} must be > 0, or null for no clipping")
    _check(t.mixed_precision in PRECISIONS, f"train.mixed_precision={t.mixed_precision} must be one of {', '.join(PRECISIONS)}")
    _check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _positive_int(t.max_length, "train.max_length")
    head = t.get("head_only_epochs", 0)
    _check(isinstance(head, int) and not isinstance(head, bool) and 0 <= head < t.epochs,
           f"train.head_only_epochs={head} must be a whole number from 0 to train.epochs-1 ({t.epochs - 1})")
    if head:
        _check(cfg.model.task == "seq_cls", f"train.head_only_epochs={head} needs a classification head (model.task=seq_cls); "
               f"model={cfg.model.name} is {cfg.model.task}: use train.head_only_epochs=0")
    for key in ("gradient_checkpointing", "tf32"):
        _check(isinstance(t.get(key, False), bool), f"train.{key}={t.get(key)} must be true or false")


def _validate_devices(cfg: DictConfig) -> None:
    """What this machine must have for the settings (checked in each process, after any launcher)."""
    import torch

    gpus = torch.cuda.device_count()  # the visible ones (CUDA_VISIBLE_DEVICES)
    if cfg.train.mixed_precision == "fp16":
        _check(gpus > 0, "train.mixed_precision=fp16 needs a GPU; use train.mixed_precision=bf16 or no on the CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _check(gpus == 0 or local_rank < gpus,
           f"this is process {local_rank} on its machine (LOCAL_RANK={local_rank}) but the machine has {gpus} GPU(s) visible: "
           f"start at most {gpus} process(es) per machine (launcher.num_processes), or set CUDA_VISIBLE_DEVICES= to run on the CPU")


def _validate_zero(cfg: DictConfig) -> None:
    z = cfg.zero
    _check(z.stage in (0, 1, 2, 3), f"zero.stage={z.stage} must be 0 (no DeepSpeed), 1, 2 or 3")
    for key in ("offload_optimizer_device", "offload_param_device"):
        _check(z[key] in OFFLOAD_DEVICES, f"zero.{key}={z[key]} must be one of {', '.join(OFFLOAD_DEVICES)}")
    if z.offload_param_device != "none":
        _check(z.stage == 3, f"zero.offload_param_device={z.offload_param_device} needs zero.stage=3; use zero=stage3_cpu")
    if z.offload_optimizer_device != "none":
        _check(z.stage >= 1, f"zero.offload_optimizer_device={z.offload_optimizer_device} needs DeepSpeed; use zero=stage2_cpu or zero=stage3_cpu")
    if z.zero3_init:
        _check(z.stage == 3, f"zero.zero3_init=true needs zero.stage=3 (zero={z.name} is stage {z.stage})")
    for kind in ("param", "optimizer"):
        if z[f"offload_{kind}_device"] == "nvme":
            key = f"offload_{kind}_nvme_path"
            _check(not OmegaConf.is_missing(z, key) and bool(z[key]),
                   f"zero.{key} is required for NVMe offload: add zero.{key}=/path/on/a/local/nvme/disk")
            path = Path(z[key])
            _check(path.is_dir() and os.access(path, os.W_OK), f"zero.{key}={path} is not a writable directory: create it or point to one")


def _validate_peft(cfg: DictConfig) -> None:
    method = peft_method(cfg)
    p = cfg.peft
    for key in ("r", "init_r", "target_r", "num_virtual_tokens", "encoder_hidden_size"):
        if key in p:
            _positive_int(p[key], f"peft.{key}")
    for key in ("lora_alpha", "alpha"):
        if key in p:
            _check(isinstance(p[key], (int, float)) and p[key] > 0, f"peft.{key}={p[key]} must be > 0")
    for key in ("lora_dropout", "rank_dropout", "module_dropout"):
        if key in p:
            _check(0 <= p[key] < 1, f"peft.{key}={p[key]} must be in [0, 1)")
    if method in ("lora", "adalora", "loha", "lokr", "ia3"):
        _check(bool(p.target_modules), f"peft.target_modules is empty: list the model's module names in conf/model/{cfg.model.name}.yaml")
    if method in cfg.model.get("unsupported_peft", []):
        raise ConfigError(f"peft={method} does not work with model={cfg.model.name} (see unsupported_peft in conf/model/{cfg.model.name}.yaml): "
                          "choose another method, e.g. peft=lora or peft=prompt_tuning")
    if method == "adalora":
        _check(cfg.zero.stage == 0,
               f"peft=adalora re-allocates ranks from gradients that DeepSpeed has already consumed in its step (zero={cfg.zero.name}); use zero=none")
        _check(p.target_r <= p.init_r, f"peft.target_r={p.target_r} must be <= peft.init_r={p.init_r}")
    if cfg.model.task == "seq_cls" and cfg.model.get("pooling", "cls") == "mean":
        _check(method not in ("prefix_tuning", "prompt_tuning", "p_tuning"),
               f"peft={method} adds virtual tokens, which model.pooling=mean would average in; use model.pooling=cls")


def _validate_eval(cfg: DictConfig) -> None:
    e = cfg.eval
    _check(e.mode in ("score", "generate", "both"), f"eval.mode={e.mode} must be score, generate or both")
    if e.mode != "score":
        _check(cfg.model.task in GENERATIVE,
               f"eval.mode={e.mode} needs a generative model (seq2seq or causal_lm); model={cfg.model.name} is {cfg.model.task}: use eval.mode=score")
    _check(e.split in ("test", "validation", "kfold"), f"eval.split={e.split} must be test, validation or kfold")
    _check(e.select_on in ("test", "validation"), f"eval.select_on={e.select_on} must be test or validation")
    _check(cfg.logger in (None, "tensorboard", "wandb", "mlflow"), f"logger={cfg.logger} must be tensorboard, wandb, mlflow or null")
    if cfg.logger:
        import importlib.util

        _check(importlib.util.find_spec(cfg.logger) is not None, f"logger={cfg.logger} needs `pip install {cfg.logger}`; or use logger=null")
    _check(0 < e.val_fraction < 1, f"eval.val_fraction={e.val_fraction} must be in (0, 1)")
    _check(isinstance(e.folds, int) and e.folds >= 2, f"eval.folds={e.folds} must be a whole number >= 2")
    _positive_int(e.batch_size, "eval.batch_size")
    _positive_int(e.max_new_tokens, "eval.max_new_tokens")
