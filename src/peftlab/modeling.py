"""Tokenizer, base model (pretrained or random weights) and the PEFT wrapper, from the config.

Under ZeRO-3 with ``zero.zero3_init`` the Accelerator must exist before :func:`build_model`
(and random weights must be made before it, :func:`base_weights`):
transformers then builds the model inside ``deepspeed.zero.Init``, so each parameter is
partitioned as it is created and the whole model never sits on one device.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    set_seed,
)

from peftlab.config import PEFT_TASK_TYPES, ConfigError, check_model_files, peft_method

log = logging.getLogger(__name__)
AUTO_CLASSES = {
    "seq_cls": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
    "causal_lm": AutoModelForCausalLM,
}
_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(m: DictConfig):
    """The model's tokenizer (cached per process), with a pad token guaranteed."""
    key = str(m.tokenizer)
    if key not in _TOKENIZERS:
        if m.trust_remote_code:
            log.warning("model.trust_remote_code=true: running code from %s", m.tokenizer)
        with _one_line(m, "model.tokenizer"):
            tok = AutoTokenizer.from_pretrained(m.tokenizer, trust_remote_code=m.trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def base_weights(m: DictConfig, seed: int, num_labels: int, cache_dir: str | Path) -> str | Path | None:
    """Where the base model's weights come from: ``model.pretrained``, else the folder of its random
    weights for ``seed`` (:func:`random_weights`, made once), else None (``model.materialize=false``:
    built from ``model.config`` in :func:`build_model`, inside ``zero.Init`` under ZeRO-3). Resolve it
    before a ZeRO-3 Accelerator exists (RuntimeError otherwise, when random weights are still to be made)."""
    if m.pretrained:
        return m.pretrained
    return random_weights(m, seed, num_labels, cache_dir) if m.materialize else None


def build_model(
    m: DictConfig,
    num_labels: int,
    weights: str | Path | None,
    *,
    seed: int,
    pad_token_id: int,
    peft=None,
    gradient_checkpointing: bool = False,
):
    """The base model from ``weights`` (:func:`base_weights`), with the adapter of ``peft`` (a PEFT config,
    :func:`peft_config`; None: no adapter, every weight trainable). ``num_labels`` sizes a classifier's head
    (seq_cls); ``seed`` draws the head and a config-built model; ``pad_token_id`` is the tokenizer's.
    Raises ConfigError (one line, naming ``model.pretrained``) when the weights cannot be loaded."""
    set_seed(seed)  # classification heads and random-weight models start the same for a seed
    auto = AUTO_CLASSES[m.task]
    extra = {"num_labels": num_labels} if m.task == "seq_cls" else {}
    if weights:
        if m.trust_remote_code:
            log.warning("model.trust_remote_code=true: running the model code of %s", weights)
        with _one_line(m):
            model = auto.from_pretrained(
                weights, trust_remote_code=m.trust_remote_code, use_safetensors=True, **extra
            )
    else:  # straight from the config: under zero.Init the init differs from a plain one, so reloads can't rebuild it
        model = auto.from_config(instantiate(m.config, **extra))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if wants_mean_pooling(m):
        use_mean_pooling(model)
    if gradient_checkpointing:  # non-reentrant: works with frozen inputs and ZeRO-3's hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_peft(model, peft)


class MeanPooler(torch.nn.Module):
    """In place of a BERT pooler (dense + tanh on the first token): the mean of the token states,
    padding left out, which is how sentence-transformers pools all-MiniLM-L6-v2. The encoder's
    attention mask reaches it through a pre-hook (``use_mean_pooling``)."""

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        mask = (
            (self.mask if self.mask is not None else states.new_ones(states.shape[:2]))
            .unsqueeze(-1)
            .to(states.dtype)
        )
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def wants_mean_pooling(m: DictConfig) -> bool:
    return m.task == "seq_cls" and m.pooling == "mean"


def check_pooling(m: DictConfig) -> None:
    """Before any weights load: the model's files are at hand (local folder, or the Hugging Face
    cache: :func:`peftlab.config.check_model_files`), and ``model.pooling=mean``, which replaces the
    encoder's pooler, has one to replace. That is checked on a weightless (meta-device) build."""
    check_model_files(m)
    if not wants_mean_pooling(m):
        return
    with _one_line(m):
        config = (
            AutoConfig.from_pretrained(m.pretrained, trust_remote_code=m.trust_remote_code)
            if m.pretrained
            else instantiate(m.config)
        )
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=m.trust_remote_code
        )
    if not isinstance(getattr(skeleton.base_model, "pooler", None), torch.nn.Module) and not _reads_states(
        skeleton
    ):
        raise ConfigError(
            f"model.pooling=mean needs an encoder with a pooler (BERT family) or a classifier head on the token "
            f"states (MPNet, RoBERTa); model={m.name} ({type(skeleton).__name__}) has neither: use model.pooling=cls"
        )


def _reads_states(model) -> bool:
    """Whether ``model.classifier`` is a head module on the token states [N, L, H] (MPNet's, RoBERTa's: the
    first token, dense + tanh, a projection), not a linear layer on a pooled vector (DistilBERT's)."""
    head = getattr(model, "classifier", None)
    return isinstance(head, torch.nn.Module) and not isinstance(head, torch.nn.Linear)


class _SharedMask:
    """The encoder's attention mask [N, L] (or None), one object for a :class:`MeanPoolLinear` and PEFT's
    trained copy of it: ``modules_to_save`` deep-copies the head, and a copy of this would never be written."""

    mask: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        return self


class MeanPoolLinear(torch.nn.Linear):
    """``model.pooling=mean`` for a classifier that reads the token states itself (MPNet, RoBERTa: the first
    token through dense + tanh, then a projection): in its place one linear layer on the masked mean of the
    token states, dropout before it, as BERT's classifier reads :class:`MeanPooler`'s mean.

    Input: the encoder's last hidden states [N, L, H]; output: logits [N, num_labels]. The mask reaches it
    through a pre-hook on the encoder (``use_mean_pooling``); without one every position counts."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__(hidden, num_labels)
        self.dropout, self.shared = torch.nn.Dropout(dropout), _SharedMask()

    def forward(self, states: torch.Tensor, **kwargs) -> torch.Tensor:
        mask = self.shared.mask if self.shared.mask is not None else states.new_ones(states.shape[:2])
        mask = mask.unsqueeze(-1).to(states.dtype)
        return super().forward(self.dropout((states * mask).sum(1) / mask.sum(1).clamp(min=1.0)))


def use_mean_pooling(model) -> None:
    """``model.pooling=mean``: the classifier reads the masked mean of the token states (how
    sentence-transformers pools all-MiniLM-L6-v2 and all-mpnet-base-v2). An encoder with a pooler (BERT)
    gets :class:`MeanPooler` in its place, under its own classifier; one without (MPNet, RoBERTa) gets a
    :class:`MeanPoolLinear` for its ``classifier``, drawn as the model draws its linear layers."""
    encoder = model.base_model
    if isinstance(getattr(encoder, "pooler", None), torch.nn.Module):
        pooler = encoder.pooler = MeanPooler()
        keep = lambda mask: setattr(pooler, "mask", mask)  # noqa: E731
    elif _reads_states(model):
        c = model.config
        head = MeanPoolLinear(c.hidden_size, c.num_labels, getattr(c, "hidden_dropout_prob", 0.0))
        if hasattr(model, "_init_weights"):
            model._init_weights(head)
        model.classifier = head
        keep = lambda mask: setattr(head.shared, "mask", mask)  # noqa: E731
    else:
        raise ValueError(
            f"model.pooling=mean: {type(model).__name__} has neither a pooler nor a head on the states"
        )

    def keep_mask(module, args, kwargs):
        keep(
            kwargs["attention_mask"]
            if kwargs.get("attention_mask") is not None
            else (args[1] if len(args) > 1 else None)
        )

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)


def random_weights(m: DictConfig, seed: int, num_labels: int, cache_dir: str | Path) -> Path:
    """A folder under ``cache_dir`` (``paths.cache_dir``) with the model's random weights for this seed,
    made once and cached.

    Building random weights inside ``zero.Init`` draws them differently from a plain build, so a
    ZeRO-3 run could not be reloaded onto the same base. Materializing them on the CPU first and
    loading them like a pretrained model makes the base identical in every setting and reload.
    """
    key = hashlib.sha1(f"{OmegaConf.to_yaml(m.config)}|{seed}|{num_labels}|{m.task}".encode()).hexdigest()[
        :12
    ]
    folder = Path(cache_dir).expanduser() / "random_weights" / f"{m.name}-{key}"
    if not (folder / "config.json").is_file():
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise RuntimeError(
                "random weights must be materialized before the ZeRO-3 Accelerator exists (zero.Init would partition them)"
            )
        set_seed(seed)
        extra = {"num_labels": num_labels} if m.task == "seq_cls" else {}
        model = AUTO_CLASSES[m.task].from_config(instantiate(m.config, **extra))
        tmp = Path(tempfile.mkdtemp(dir=folder.parent.mkdir(parents=True, exist_ok=True) or folder.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def set_zero3_leaves(model, m: DictConfig, z: DictConfig) -> list[str]:
    """Under ZeRO-3 (``z``: the run's ``zero``) with ``zero.leaf_layers``, fetch each transformer layer's
    parameters in one go; returns the leaf classes' names (empty: nothing changed).

    ZeRO-3 otherwise gathers and releases every submodule's parameters through its own hooks
    (hundreds per step for bart-large, each a small copy plus Python overhead); marking the layer
    classes named in ``model.layer_classes`` (``m``) as leaves makes it one gather per layer.
    """
    names = set(m.get("layer_classes") or [])
    if z.stage != 3 or not z.get("leaf_layers") or not names:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    classes = list({type(module) for module in model.modules() if type(module).__name__ in names})
    set_z3_leaf_modules(model, classes)
    # A leaf's backward hook fires through its inputs' gradients; with frozen embeddings the first
    # layer's input needs none, and its parameters would never be fetched for backward.
    model.enable_input_require_grads()
    return sorted(c.__name__ for c in classes)


def peft_config(peft: DictConfig, method: str, task: str, total_steps: int):
    """The PEFT config instantiated from ``peft`` (the run's ``peft``, through its ``_target_``) for a
    ``task`` model, or None for ``method`` none (``config.peft_method``: full fine-tuning). AdaLoRA gets
    its schedule from ``total_steps``, the run's optimizer steps."""
    if method == "none":
        return None
    extra = {"task_type": PEFT_TASK_TYPES[task]}
    if method == "adalora":
        extra["total_step"] = total_steps
        extra["tinit"], extra["tfinal"] = adalora_schedule(peft, total_steps)
    return instantiate(peft, _convert_="all", **extra)


def apply_peft(model, config):
    """``model`` wrapped by PEFT with the adapter of ``config`` (:func:`peft_config`); None: ``model`` itself."""
    from peft import get_peft_model

    return model if config is None else get_peft_model(model, config)


def optimizer_steps(n_rows: int, train: DictConfig, num_processes: int) -> int:
    """Optimizer steps of the whole run as one process sees them, for ``n_rows`` training rows split over
    ``num_processes`` in batches of ``train.batch_size``, ``train.grad_accum`` batches a step, ``train.epochs``."""
    batches = math.ceil(math.ceil(n_rows / train.batch_size) / num_processes)
    return math.ceil(batches / train.grad_accum) * train.epochs


def adalora_schedule(peft: DictConfig, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) as AdaLoRA gets them: the configured ones, or 10% and 20% of the run's steps."""
    return (
        peft.tinit if peft.tinit is not None else int(0.1 * total_steps),
        peft.tfinal if peft.tfinal is not None else int(0.2 * total_steps),
    )


def check_adalora_schedule(peft: DictConfig, train: DictConfig, n_rows: int, num_processes: int) -> None:
    """AdaLoRA (``peft``, the run's ``peft=adalora``) re-allocates ranks between step ``tinit`` and
    ``total_step - tfinal``: PEFT refuses a schedule that leaves no step for it, but only once the model is
    built, naming its own ``total_step``. Checked here, when the training rows are counted and before any
    model loads, in the run's keys: ConfigError naming peft.tinit and peft.tfinal otherwise."""
    total_steps = optimizer_steps(n_rows, train, num_processes)
    tinit, tfinal = adalora_schedule(peft, total_steps)
    if tinit + tfinal < total_steps:
        return
    how = (
        f"{n_rows} training rows, train.batch_size={train.batch_size}, train.grad_accum={train.grad_accum}, "
        f"{num_processes} process(es)"
    )
    per_epoch = total_steps // train.epochs
    given = lambda key, value: (
        f"peft.{key}={value}" if peft[key] is not None else f"peft.{key}=null ({value})"
    )  # noqa: E731
    raise ConfigError(
        f"{given('tinit', tinit)} + {given('tfinal', tfinal)} = {tinit + tfinal} leave AdaLoRA no steps to "
        f"re-allocate ranks in: the run has {total_steps} optimizer steps (train.epochs={train.epochs} x "
        f"{per_epoch} per epoch: {how}); make peft.tinit + peft.tfinal < {total_steps}, "
        "or raise train.epochs"
    )


class _one_line(contextlib.AbstractContextManager):
    """A model or tokenizer that cannot be loaded (files missing, hub unreachable): one line naming the key."""

    def __init__(self, m: DictConfig, key: str = "model.pretrained"):
        self.m, self.key = m, key

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError):  # transformers' "couldn't find / couldn't connect" errors
            source = self.m.get(self.key.split(".")[1])
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise ConfigError(
                f"{self.key}={source} cannot be loaded ({reason}); give a model folder ({self.key}=/path/to/folder) "
                "or a hub id that is in the local cache (`huggingface-cli download ID` on a machine with internet)"
            ) from None
        return False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters by their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_trained(run_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, cfg) rebuilt from a finished run directory, without DeepSpeed.

    The base model comes from ``model.pretrained`` or, for random weights, is rebuilt from the
    config with the run's seed; the adapter (or the full model for peft=none) from the run dir.
    """
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    tok = load_tokenizer(cfg.model)
    if peft_method(cfg) == "none" and wants_mean_pooling(cfg.model):
        # the trained head reads mean-pooled states (for MPNet it is not even the model class's own module):
        # rebuild the run's architecture, then load every saved weight into it (one file or shards)
        from accelerate.utils import load_checkpoint_in_model

        model = run_base_model(cfg, tok.pad_token_id)
        load_checkpoint_in_model(model, str(run_dir / "model"), strict=True)
    elif peft_method(cfg) == "none":
        model = AUTO_CLASSES[cfg.model.task].from_pretrained(run_dir / "model", use_safetensors=True)
    else:
        model = PeftModel.from_pretrained(run_base_model(cfg, tok.pad_token_id), run_dir / "adapter")
    return model.to(device).eval(), tok, cfg


def run_base_model(cfg: DictConfig, pad_token_id: int):
    """The base model, without adapter, of a run whose saved config.yaml is ``cfg`` (for reloading a run)."""
    num_labels = len(cfg.dataset.labels)
    weights = base_weights(cfg.model, cfg.seed, num_labels, cfg.paths.cache_dir)
    return build_model(cfg.model, num_labels, weights, seed=cfg.seed, pad_token_id=pad_token_id)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


HEAD_NAMES = ("classifier", "score")  # a sequence classifier's head (PEFT's modules_to_save for SEQ_CLS)


def parameter_groups(model) -> list[dict]:
    """Two optimizer groups, the classification head's trainable parameters first, then the rest."""
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if any(part in HEAD_NAMES for part in name.split(".")) else rest).append(p)
    return [{"params": head}, {"params": rest}]


def head_first_schedule(
    optimizer, warmup: int, total: int, head_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.head_only_epochs`` (linear probing, then fine-tuning): the head (group 0) follows the usual
    linear warm-up and decay over all ``total`` steps; the adapter (group 1) stays at learning rate 0 for
    the first ``head_steps``, then warms up and decays over the steps that remain."""

    def linear(start: int):
        span, ramp = max(1, total - start), max(1, warmup)

        def factor(step: int) -> float:
            if step < start:
                return 0.0
            step -= start
            return step / ramp if step < warmup else max(0.0, (span - step) / max(1, span - warmup))

        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [linear(0), linear(head_steps)])
