"""Every option of every config group composes, resolves and validates; PEFT configs instantiate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from peftlab import modeling
from peftlab.config import PEFT_TASK_TYPES, peft_method, validate
from peftlab.distributed import deepspeed_config

from .conftest import CONF, make_cfg

GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("model", "peft", "zero", "dataset", "objective")
}
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]


def test_groups_hold_the_issue_options():
    assert {
        "minilm",
        "bart_large",
        "flan_t5_base",
        "bloomz_560m",
        "bloomz_7b1",
        "tiny_bert",
        "tiny_bart",
        "tiny_gpt",
        "bart_large_arch",
    } <= set(GROUPS["model"])
    assert {
        "lora",
        "ia3",
        "adalora",
        "loha",
        "lokr",
        "prefix_tuning",
        "prompt_tuning",
        "p_tuning",
        "none",
    } <= set(GROUPS["peft"])
    assert {"none", "stage1", "stage2", "stage2_cpu", "stage3", "stage3_cpu", "stage3_nvme"} <= set(
        GROUPS["zero"]
    )


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_validates(tmp_path, group, option):
    extra = ["zero.offload_param_nvme_path=" + str(tmp_path)] if option == "stage3_nvme" else []
    if option == "prefix_tuning":  # the default model (BERT) takes no past key values
        extra.append("model=tiny_bart")
    if option == "contrastive":  # trains mean-pooled embeddings: the head must read them
        extra.append("model.pooling=mean")
    cfg = make_cfg(tmp_path, f"{group}={option}", *extra)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved[group] or (group, option) == ("peft", "none")
    validate(cfg)
    first_line = (CONF / group / f"{option}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# python run.py"), (
        f"{group}/{option}.yaml should open with the command that uses it"
    )


def test_model_files_inherit_the_base_and_compose_as_before(tmp_path):
    """conf/model/*.yaml state only what differs from conf/model_base.yaml (or from the model whose shape they
    take); each composes to exactly the values it held as a flat file (tests/model_options.yaml). The base is
    no option of model=: Hydra's list, the one --help prints, holds the model files alone."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    expected = OmegaConf.to_container(OmegaConf.load(Path(__file__).parent / "model_options.yaml"))
    assert set(expected) <= set(GROUPS["model"])
    for model in GROUPS["model"]:
        defaults = OmegaConf.load(CONF / "model" / f"{model}.yaml").get("defaults")
        assert defaults and defaults[-1] == "_self_", (
            f"conf/model/{model}.yaml: start from the shared keys (defaults: [/model_base@_here_, _self_]) "
            "and keep only what differs"
        )
        composed = OmegaConf.to_container(
            make_cfg(tmp_path, f"model={model}").model
        )  # interpolations as written
        assert composed == expected.get(model, composed), (
            f"model={model} composes to other values than before"
        )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert GlobalHydra.instance().config_loader().get_group_options("model") == GROUPS["model"]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(tmp_path, experiment):
    cfg = make_cfg(tmp_path, f"experiment={experiment}")
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert text[0] == "# @package _global_" and text[1].startswith("# python run.py"), (
        f"experiment/{experiment}.yaml"
    )


def test_the_selected_experiment_is_the_setting_its_selection_chose(tmp_path):
    """experiment=twitter_fewshot_selected composes, for training and the test split, exactly the config that
    scripts/twitter_fewshot_selection.sh ran for its choice (the overrides `peftlab compare --select` printed);
    only the keys of recording and of the folds may differ."""
    from hydra import compose, initialize_config_dir

    chosen = "model=mpnet peft=lora objective=contrastive train.lr=0.001 train.epochs=30 eval.fold_repeats=3"
    ran = ["experiment=twitter_fewshot_selection", *chosen.split(), "eval.split=test"]
    with initialize_config_dir(
        config_dir=str(CONF), version_base="1.3"
    ):  # not make_cfg: it sets train.epochs
        a, b = (
            OmegaConf.to_container(compose("config", [f"paths.output_dir={tmp_path}", *o]), resolve=True)
            for o in (ran, ["experiment=twitter_fewshot_selected"])
        )
    for cfg in (a, b):
        del cfg["logger"], cfg["save_adapter"], cfg["eval"]["folds"], cfg["eval"]["fold_repeats"]
    assert a == b


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")))
def test_every_launcher_preset_composes(tmp_path, launcher):
    """hydra/launcher=NAME as `python run.py -m` composes it (ray_callback is ray's part, not a preset)."""
    from hydra import compose, initialize_config_dir

    if launcher == "ray_callback":
        return
    text = (CONF / "hydra" / "launcher" / f"{launcher}.yaml").read_text()
    assert text.splitlines()[0].startswith("# python run.py")
    if launcher.startswith("ray") and importlib.util.find_spec("ray") is None:
        pytest.skip("the ray extra is not installed")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True
        )
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


@pytest.mark.parametrize("model", [m for m in GROUPS["model"]])
@pytest.mark.parametrize("peft", [p for p in GROUPS["peft"] if p != "none"])
def test_peft_config_instantiates_for_every_model(tmp_path, model, peft):
    cfg = make_cfg(tmp_path, f"model={model}", f"peft={peft}")
    config = modeling.peft_config(cfg.peft, peft_method(cfg), cfg.model.task, total_steps=100)
    assert config.task_type == PEFT_TASK_TYPES[cfg.model.task]
    assert peft_method(cfg) == peft


def test_command_line_reaches_the_peft_config(tmp_path):
    cfg = make_cfg(tmp_path, "peft.r=16", "peft.lora_alpha=64")
    config = modeling.peft_config(cfg.peft, peft_method(cfg), cfg.model.task, total_steps=10)
    assert (config.r, config.lora_alpha, config.target_modules) == (16, 64, {"query", "value"})


def test_train_settings_are_stated_once_and_reach_deepspeed(tmp_path):
    cfg = make_cfg(
        tmp_path, "zero=stage3_cpu", "train.batch_size=4", "train.grad_accum=2", "train.max_grad_norm=0.5"
    )
    ds = deepspeed_config(cfg.zero, cfg.train)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    none, stage2 = make_cfg(tmp_path, "zero=none"), make_cfg(tmp_path, "zero=stage2")
    assert deepspeed_config(none.zero, none.train) is None
    assert "offload_optimizer" not in deepspeed_config(stage2.zero, stage2.train)["zero_optimization"]


def test_nvme_path_reaches_deepspeed(tmp_path):
    cfg = make_cfg(tmp_path, "zero=stage3_nvme", f"zero.offload_param_nvme_path={tmp_path}")
    zero = deepspeed_config(cfg.zero, cfg.train)["zero_optimization"]
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": str(tmp_path)}
    assert zero["offload_optimizer"]["nvme_path"] == str(tmp_path)


def test_a_sweep_composes_each_job_once():
    """Hydra's sweeper checks each job's config, then the launcher composes it again: peftlab hands the
    checked one over, unless a launcher already claimed it (then a fresh one is composed)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import open_dict

    from peftlab.sweep import compose_each_job_once

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", ["model=tiny_bert"], run_mode=RunMode.MULTIRUN)
        compose_each_job_once(loader)
        checked = loader.load_sweep_config(master, ["peft.r=4"])
        launched = loader.load_sweep_config(master, ["peft.r=4"])
        assert launched is checked and launched.peft.r == 4
        with open_dict(launched):
            launched.hydra.job.id = "0"  # what the launcher does with it
        again = loader.load_sweep_config(master, ["peft.r=4"])
        assert again is not launched and OmegaConf.is_missing(again.hydra.job, "id")
        assert loader.load_sweep_config(master, ["peft.r=8"]).peft.r == 8
