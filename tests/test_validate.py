"""peftlab validate [overrides]: the composed choices and "ok", or one line and exit 2; nothing is written.
Also the help pages: peftlab --help lists the commands, python run.py --help is peftlab's own page."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest

from peftlab import cli

from .conftest import ROOT


def validate(capsys, *overrides):
    code = cli.main(["validate", *overrides])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_a_good_config_prints_its_choices_and_ok(tmp_path, tiny_data, capsys):
    code, out, err = validate(
        capsys, "model=tiny_bert", "peft=ia3", "zero=stage2", f"dataset.data_dir={tiny_data}"
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "model     tiny_bert: seq_cls, random weights (model.config), pooling=cls"
    assert lines[1].startswith("peft      ia3: target_modules=['key', 'value', 'output.dense']")
    assert lines[2] == "zero      stage2: stage=2 offload_optimizer_device=none offload_param_device=none"
    assert lines[3].startswith(
        f"dataset   twitter_complaints: csv from {tiny_data}; text_column=Tweet text label_column=Label"
    )
    assert lines[5] == "eval      mode=score split=test select_on=test metrics=['accuracy', 'macro_f1']"
    assert lines[-1].startswith(
        "ok: rows train 16, test 28; eval.split=test: 1 x (16 training, 24 held-out rows), disjoint ("
    )
    assert not (ROOT / "outputs" / "(the run directory, claimed when the run starts)").exists()


def bad_data(tmp_path, tiny_data, change) -> str:
    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    for name in ("train.csv", "test.csv"):
        with open(folder / name, newline="") as f:
            rows = list(csv.reader(f))
        with open(folder / name, "w", newline="") as f:
            csv.writer(f).writerows(change(name, rows))
    return f"dataset.data_dir={folder}"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["zero=stage2", "zero.offload_param_device=cpu"],
            "error: zero.offload_param_device=cpu needs zero.stage=3; use zero=stage3_cpu",
        ),
        (
            ["model=tiny_bertt"],
            "error: In 'config': Could not find 'model/tiny_bertt' Available options in 'model': bart_large",
        ),
        (["model=tiny_bert", "peft.r=0"], "error: peft.r=0 must be a whole number >= 1"),
        (
            ["model=tiny_bert", "launcher.num_processes=0"],
            "error: launcher.num_processes=0 must be a whole number >= 1",
        ),
        (
            ["model=tiny_bert", "dataset.text_column=tweet", "DATA"],
            "(dataset.text_column); columns are: Tweet text, ID, Label",
        ),
        (
            ["model=tiny_bert", "LABEL_3"],
            "row 1 has label '3', not one of dataset.labels (1, 2) or dataset.unlabeled (0)",
        ),
        (
            ["model=tiny_bert", "eval.metrics=[peftlab_no_such_metric]"],
            "error: eval.metrics: peftlab_no_such_metric is an evaluate hub metric, not in the local cache",
        ),
        (["model=tiny_bert", "LEAK"], "test row 29 (id 200000) has the text of train row 1 (id 100000)"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, tiny_data, capsys, overrides, expected):
    with open(tiny_data / "train.csv", newline="") as f:
        trained_text = list(csv.reader(f))[1][0]
    data = {
        "DATA": f"dataset.data_dir={tiny_data}",
        "LABEL_3": bad_data(
            tmp_path,
            tiny_data,
            lambda name, rows: [rows[0], [*rows[1][:2], "3"], *rows[2:]] if name == "train.csv" else rows,
        ),
        "LEAK": bad_data(
            tmp_path / "leak",
            tiny_data,
            lambda name, rows: rows + [[trained_text, "200000", "1"]] if name == "test.csv" else rows,
        ),
    }
    code, out, err = validate(capsys, *[data.get(o, o) for o in overrides])
    assert code == 2 and "\n" not in err and expected in err, err


def test_validate_exits_quickly_on_a_config_error_without_heavy_imports():
    """A config error is found before torch loads: a second or two, whatever the libraries cost."""
    code = (
        "import sys; from peftlab import cli; rc = cli.main(['validate', 'zero=stage2', 'zero.offload_param_device=cpu']); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules)); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout.strip().splitlines()[-1] == "[]"


def test_peftlab_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("validate", "predict", "export", "compare"):
        assert f"\n  {command} " in out
    assert cli.main(["frobnicate"]) == 2
    assert capsys.readouterr().err.startswith("peftlab: unknown command 'frobnicate'\nusage: peftlab")


def test_run_py_help_is_peftlabs_own_page(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("peftlab: train and evaluate a PEFT adapter")
    assert (
        "peft: adalora, ia3, loha, lokr, lora, none, p_tuning, prefix_tuning, prompt_tuning" in out
    )  # listed from conf/
    assert "zero: none, stage1, stage2, stage2_cpu, stage3, stage3_cpu" in out and "model: bart_large," in out
    assert "Keys users type most: seed, train.epochs, train.lr" in out and "is powered by Hydra" not in out
    assert not (tmp_path / "outputs").exists()  # help claims no run directory
