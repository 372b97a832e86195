"""peftlab compare: hand-made run directories in tmp_path; no ML libraries, no training."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftlab import compare
from peftlab.compare import plots

R_VALUES = (4, 8)
ALPHA_VALUES = (8, 16, 32)


def _config(job: Path, **peft) -> dict:
    """A resolved run config with noise keys that differ per job (paths, hydra, output dirs)."""
    return {
        "seed": 42,
        "train": {"epochs": 2, "lr": 0.002, "batch_size": 8, "output_dir": str(job / "out")},
        "model": {"name": "minilm", "task": "seq_cls", "target_modules": ["query", "value"]},
        "peft": {"_target_": "peft.LoraConfig", "lora_dropout": 0.1, **peft},
        "zero": {"name": "none", "stage": 0},
        "paths": {"output_dir": str(job)},
        "hydra": {"run": {"dir": str(job)}, "job": {"num": int(job.name) if job.name.isdigit() else 0}},
    }


def _finished(accuracy: float, steps: int = 10) -> dict:
    return {
        "status": "finished",
        "error": None,
        "final": {"accuracy": accuracy, "macro_f1": accuracy - 0.05, "val_accuracy": None, "n_eval": 100},
        "phases": {
            "train": {
                "wall_s": 5.0,
                "s_per_step": 0.0512345,
                "tokens_per_s": 5000.4,
                "gpu_peak_alloc_mb": 3900.2,
                "cpu_peak_rss_mb": 2100.0,
                "steps": steps,
            },
            "eval": {"wall_s": 1.0, "gpu_peak_alloc_mb": 4100.7, "cpu_peak_rss_mb": 2300.6},
            "setup": {"wall_s": 2.0, "gpu_peak_alloc_mb": None, "cpu_peak_rss_mb": 1500.0},
        },
        "wall_s": 9.0,
        "loss_curve": [[s, 0.7 - 0.02 * s] for s in range(steps)],
    }


def make_run(
    job: Path, config: dict | None, metrics, overrides: list[str] | None = None, choices: dict | None = None
) -> Path:
    """metrics: dict -> metrics.json, str -> written verbatim, None -> no metrics.json;
    choices: config group -> option, as Hydra records them in .hydra/hydra.yaml."""
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    if choices is not None:
        hydra_choices = {**choices, "hydra/launcher": "basic", "hydra/sweeper": "basic"}
        (job / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"runtime": {"choices": hydra_choices}}})
        )
    if config is not None:
        (job / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if overrides is not None:
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if isinstance(metrics, dict):
        (job / "metrics.json").write_text(json.dumps(metrics))
    elif isinstance(metrics, str):
        (job / "metrics.json").write_text(metrics)
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2x3 sweep over peft.r x peft.lora_alpha: jobs 0..5 with every kind of outcome."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    outcomes = [
        _finished(0.80),
        {
            "status": "failed",
            "error": "CUDA error: device-side assert triggered " + "x" * 100,
            "final": {"accuracy": 0.99},
            "wall_s": 3.0,
        },
        {"status": "running", "final": {"accuracy": 0.98}, "loss_curve": [[0, 0.7], [1, 0.65]]},
        '{"status": "finished", "final": {"accur',
        None,
        _finished(0.85),
    ]
    for job, ((r, alpha), metrics) in enumerate(
        zip([(r, a) for r in R_VALUES for a in ALPHA_VALUES], outcomes, strict=True)
    ):
        path = root / str(job)
        make_run(
            path, _config(path, r=r, lora_alpha=alpha), metrics, [f"peft.r={r}", f"peft.lora_alpha={alpha}"]
        )
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = compare.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- library


def test_find_runs_is_recursive_and_numeric_aware(tmp_path):
    for name in ("10", "2", "1"):
        make_run(tmp_path / "s" / name, {"a": 1}, _finished(0.5))
    (tmp_path / "s" / "notes").mkdir()
    runs = compare.find_runs([tmp_path / "s"])
    assert [p.name for p in runs] == ["1", "2", "10"]
    with pytest.raises(FileNotFoundError):
        compare.find_runs([tmp_path / "nope"])


def test_table_rows_statuses_and_config_columns(sweep):
    table = compare.runs_table([compare.load_run(p) for p in compare.find_runs([sweep])])
    assert list(table["run"]) == ["0", "1", "2", "3", "4", "5"]
    assert list(table["status"]) == ["finished", "failed", "running", "corrupt", "missing", "finished"]
    assert compare.config_columns(table) == ["peft.r", "peft.lora_alpha"]
    assert list(table.columns[-10:-2]) == compare.METRIC_COLUMNS
    assert table.columns[-2:].tolist() == ["status", "error"]
    assert table.loc[0, "accuracy"] == 0.80
    assert table.loc[0, "gpu_peak_mb"] == pytest.approx(4100.7)  # max of train and eval
    assert table.loc[0, "cpu_peak_mb"] == pytest.approx(2300.6)  # max over all phases
    for row in (1, 2, 3, 4):  # failed / running / corrupt / missing: no results shown
        assert table.loc[row, compare.METRIC_COLUMNS].isna().all()
    error = table.loc[1, "error"]
    assert error.startswith("CUDA error") and len(error) <= compare.ERROR_WIDTH
    assert table.loc[0, "error"] == ""


def test_unresolved_hydra_config_is_shown_verbatim(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_run(a, None, _finished(0.6))
    (a / ".hydra" / "config.yaml").write_text("train:\n  lr: ${optimizer.lr}\n  epochs: 3\n")
    make_run(b, {"train": {"lr": 0.1, "epochs": 3}}, _finished(0.7))
    table = compare.runs_table([compare.load_run(a), compare.load_run(b)])
    assert compare.config_columns(table) == ["train.lr"]
    assert list(table["train.lr"]) == ["${optimizer.lr}", 0.1]


def test_a_key_that_echoes_a_swept_one_shows_once(tmp_path):
    """A resolved config repeats train.lr as optimizer.lr; a key with the same values but another name stays."""
    for i, lr in enumerate((0.1, 0.2)):
        make_run(
            tmp_path / str(i),
            {"train": {"lr": lr, "epochs": 3 + i}, "optimizer": {"lr": lr, "eps": 3 + i}},
            _finished(0.6),
        )
    table = compare.runs_table([compare.load_run(p) for p in compare.find_runs([tmp_path])])
    assert compare.config_columns(table) == ["train.lr", "train.epochs", "optimizer.eps"]


def test_swapped_group_shows_target_and_differing_keys(tmp_path):
    make_run(
        tmp_path / "0",
        {"peft": {"_target_": "peft.LoraConfig", "r": 8}, "seed": 1},
        _finished(0.7),
        ["peft=lora"],
    )
    make_run(
        tmp_path / "1",
        {"peft": {"_target_": "peft.IA3Config", "feedforward_modules": ["x"]}, "seed": 1},
        _finished(0.6),
        ["peft=ia3"],
    )
    runs = [compare.load_run(p) for p in compare.find_runs([tmp_path])]
    table = compare.runs_table(runs)  # no .hydra/hydra.yaml: the group's _target_ stands for the choice
    assert compare.config_columns(table) == ["peft._target_", "peft.r", "peft.feedforward_modules"]
    assert compare.sweep_keys(runs, table) == ["peft._target_"]


def test_swapped_group_shows_the_choice_not_the_keys_it_settles(tmp_path):
    """peft=lora,ia3 x peft.r=4,8 (r only for lora): the table shows peft (the option's name) and
    the lora runs' r; each method's fixed settings (target, modules, dropout) are left out."""
    jobs = [
        ("lora", {"_target_": "peft.LoraConfig", "r": 4, "lora_dropout": 0.1, "target_modules": ["q", "v"]}),
        ("lora", {"_target_": "peft.LoraConfig", "r": 8, "lora_dropout": 0.1, "target_modules": ["q", "v"]}),
        (
            "ia3",
            {"_target_": "peft.IA3Config", "target_modules": ["k", "v", "o"], "feedforward_modules": ["o"]},
        ),
    ]
    for i, (choice, peft) in enumerate(jobs):
        make_run(
            tmp_path / str(i),
            {"seed": 1, "model": {"name": "minilm"}, "peft": peft},
            _finished(0.6 + i / 10),
            [f"peft={choice}"] + ([f"peft.r={peft['r']}"] if "r" in peft else []),
            choices={"model": "minilm", "peft": choice, "zero": "none"},
        )
    runs = [compare.load_run(p) for p in compare.find_runs([tmp_path])]
    table = compare.runs_table(runs)
    assert compare.config_columns(table) == ["peft", "peft.r"]
    assert list(table["peft"]) == ["lora", "lora", "ia3"]
    assert compare.sweep_keys(runs, table) == ["peft", "peft.r"]
    assert compare.summary_line(table, "accuracy", ["peft", "peft.r"]).endswith(
        "best accuracy: 0.800 by 2 (peft=ia3)"
    )


def test_an_empty_group_option_shows_its_name(tmp_path):
    """peft=lora,none: peft=none's config is empty ({}), and its runs show 'none' in the peft column, as the
    lora runs show 'lora' (they showed '{}')."""
    lora = {"_target_": "peft.LoraConfig", "r": 8, "target_modules": ["q", "v"]}
    for i, (choice, peft) in enumerate([("lora", lora), ("none", {})]):
        make_run(
            tmp_path / str(i),
            {"seed": 1, "model": {"name": "minilm"}, "peft": peft},
            _finished(0.6 + i / 10),
            [f"peft={choice}"],
            choices={"model": "minilm", "peft": choice, "zero": "none"},
        )
    table = compare.runs_table([compare.load_run(p) for p in compare.find_runs([tmp_path])])
    assert list(table["peft"]) == ["lora", "none"]


def test_sort_table_directions(sweep):
    table = compare.runs_table([compare.load_run(p) for p in compare.find_runs([sweep])])
    assert list(compare.sort_table(table, "accuracy")["run"])[:2] == ["5", "0"]  # best first, blanks last
    assert list(compare.sort_table(table, "accuracy", ascending=True)["run"])[:2] == ["0", "5"]
    assert list(compare.sort_table(table, "-peft.lora_alpha")["peft.lora_alpha"]) == [32, 32, 16, 16, 8, 8]
    with pytest.raises(KeyError):
        compare.sort_table(table, "nope")


# --------------------------------------------------------------------------- CLI


def test_cli_table_outputs_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run_cli(capsys, sweep, "--out", out, "--sort", "accuracy")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "peft.r", "peft.lora_alpha"]
    assert lines[1].split()[:4] == ["5", "8", "32", "0.850"]  # sorted: best accuracy first, 3 decimals
    assert "0.05123" in stdout and "4101" in stdout  # s/step 4 significant digits, MB as integers
    summary = next(line for line in lines if line.startswith("6 runs"))
    assert (
        "2 finished, 4 failed/other" in summary
        and "best accuracy: 0.850 by 5 (r=8, lora_alpha=32)" in summary
    )
    rows = read_csv(out / "compare.csv")
    assert [r["run"] for r in rows] == ["5", "0", "1", "2", "3", "4"]
    assert {r["run"]: r["status"] for r in rows}["3"] == "corrupt"
    assert all(r["accuracy"] == "" for r in rows if r["status"] != "finished")
    markdown = (out / "compare.md").read_text().splitlines()
    assert markdown[0].startswith("| run | peft.r | peft.lora_alpha | accuracy") and len(markdown) == 8
    for name in ("heatmap_accuracy.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 1000
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_status_filter(sweep, capsys):
    code, stdout, _ = run_cli(capsys, sweep, "--status", "finished,failed", "--no-plots")
    assert code == 0
    assert "running" not in stdout and "missing" not in stdout and "corrupt" not in stdout
    assert "3 runs, 2 finished, 1 failed/other (1 failed)" in stdout
    assert not list(sweep.glob("*.png"))


def test_cli_default_plot_dir_is_the_sweep(sweep, capsys):
    assert run_cli(capsys, sweep, "--metric", "macro_f1")[0] == 0
    assert (sweep / "heatmap_macro_f1.png").stat().st_size > 0
    assert (sweep / "loss_curves.png").stat().st_size > 0
    assert not (sweep / "compare.csv").exists()


@pytest.mark.parametrize(("values", "numeric"), [((4, 8, 16), True), (("q", "qv", "qkvo"), False)])
def test_cli_single_key_sweep_line_or_bar(tmp_path, capsys, values, numeric):
    for job, value in enumerate(values):
        path = tmp_path / "sweep" / str(job)
        make_run(
            path,
            _config(path, r=value),
            _finished(0.6 + job / 100) if job else {"status": "oom"},
            [f"peft.r={value}"],
        )
    code, _, _ = run_cli(capsys, tmp_path / "sweep", "--out", tmp_path / "o")
    assert code == 0
    assert (tmp_path / "o" / "accuracy_by_peft.r.png").stat().st_size > 1000
    assert not (tmp_path / "o" / "heatmap_accuracy.png").exists()


def test_cli_several_sweeps_name_runs_by_relative_path(tmp_path, capsys):
    for sweep_name, r in (("a", 4), ("b", 8)):
        make_run(tmp_path / sweep_name / "0", {"peft": {"r": r}}, _finished(0.5))
    code, stdout, _ = run_cli(capsys, tmp_path / "a", tmp_path / "b", "--no-plots")
    assert code == 0
    assert [line.split()[0] for line in stdout.splitlines()[1:3]] == ["a/0", "b/0"]


def test_cli_errors_exit_2(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, tmp_path / "does-not-exist")
    assert code == 2 and stderr.startswith("peftlab compare:") and len(stderr.strip().splitlines()) == 1
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, _, stderr = run_cli(capsys, tmp_path / "empty")
    assert code == 2 and "no run directories under" in stderr
    make_run(tmp_path / "r", {"a": 1}, _finished(0.5))
    assert run_cli(capsys, tmp_path / "r", "--sort", "nope", "--no-plots")[0] == 2


def test_a_reader_that_leaves_early_ends_compare_quietly(sweep):
    """`peftlab compare DIR | head -1`: the pipe closes before compare prints; no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", "compare", str(sweep), "--no-plots"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before the first write: every write fails
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and stderr == ""


def test_targets_in_run_directories_are_never_executed(tmp_path, capsys):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("must survive")
    bad = {"cleanup": {"_target_": "os.remove", "path": str(sentinel)}, "seed": 1}
    make_run(tmp_path / "runs" / "0", bad, _finished(0.5), [f"+cleanup.path={sentinel}"])
    make_run(tmp_path / "runs" / "1", {**bad, "seed": 2}, _finished(0.6))
    # A YAML tag that an unsafe loader would turn into a call of os.remove.
    (tmp_path / "runs" / "1" / "config.yaml").write_text(
        f"x: !!python/object/apply:os.remove ['{sentinel}']\n"
    )
    code, stdout, _ = run_cli(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert code == 0
    assert sentinel.read_text() == "must survive"
    assert "2 runs, 2 finished" in stdout


def test_choosing_on_validation_reports_the_chosen_runs_test_accuracy(tmp_path, capsys):
    for i, (val, test) in enumerate([(0.70, 0.74), (0.80, 0.71), (0.60, 0.76)]):
        metrics = _finished(test)
        metrics["final"]["val_accuracy"] = val
        make_run(tmp_path / str(i), None, metrics, [f"peft.r={4 * (i + 1)}"])
    assert (
        compare.main([str(tmp_path), "--metric", "val_accuracy", "--sort", "val_accuracy", "--no-plots"]) == 0
    )
    out = capsys.readouterr().out
    assert (
        "best val_accuracy: 0.800 by 1 (r=8), whose accuracy is 0.710" in out
    )  # chosen without peeking at test


def test_mean_over_seeds_gives_one_row_per_setting(tmp_path, capsys):
    """r=4 has seeds 1-3 finished; r=8 has two finished and a failed seed: it is averaged but not 'finished'."""
    accuracies = {(4, 1): 0.70, (4, 2): 0.74, (4, 3): 0.72, (8, 1): 0.80, (8, 2): 0.76, (8, 3): None}
    for n, ((r, seed), acc) in enumerate(accuracies.items()):
        config = {**_config(tmp_path / str(n), r=r), "seed": seed}
        metrics = _finished(acc) if acc is not None else {"status": "failed", "error": "boom"}
        make_run(tmp_path / str(n), config, metrics, [f"peft.r={r}", f"seed={seed}"])
    assert (
        compare.main([str(tmp_path), "--mean-over", "seed", "--out", str(tmp_path / "report"), "--no-plots"])
        == 0
    )
    rows = {int(r["peft.r"]): r for r in csv.DictReader(open(tmp_path / "report" / "compare.csv"))}
    assert "seed" not in rows[4]
    assert (
        float(rows[4]["accuracy"]) == pytest.approx(0.72)
        and rows[4]["n"] == "3"
        and rows[4]["status"] == "finished"
    )
    assert float(rows[4]["accuracy_sd"]) == pytest.approx(0.02)
    assert (
        float(rows[8]["accuracy"]) == pytest.approx(0.78)
        and rows[8]["n"] == "2"
        and rows[8]["status"] == "2/3 finished"
    )
    assert "best accuracy: 0.720 by 0,1,2 (r=4)" in capsys.readouterr().out  # r=8 lost a seed: not a result
    assert compare.main([str(tmp_path), "--mean-over", "zero.stage"]) == 2
    assert "the runs do not differ in zero.stage" in capsys.readouterr().err


# --------------------------------------------------------------------------- what people look at


def _noisy_runs(tmp_path: Path, n: int, points: int = 40) -> list[dict]:
    """n finished runs of one sweep over peft.r whose loss falls with a zig-zag of +-0.1 on every step."""
    for job in range(n):
        metrics = _finished(0.6 + job / 100, steps=points)
        metrics["loss_curve"] = [[s, 0.7 - 0.005 * s + (0.1 if s % 2 else -0.1)] for s in range(points)]
        make_run(
            tmp_path / "sweep" / str(job),
            _config(tmp_path / "sweep" / str(job), r=4 * (job + 1)),
            metrics,
            [f"peft.r={4 * (job + 1)}"],
        )
    return [compare.load_run(p) for p in compare.find_runs([tmp_path / "sweep"])]


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.lines]


def test_loss_curves_are_smoothed_over_their_faded_raw_points(tmp_path):
    runs = _noisy_runs(tmp_path, 2)
    table = compare.runs_table(runs)
    (ax,) = _panels(plots.loss_curves_figure(table, runs, compare.sweep_keys(runs, table)))
    raw = [line for line in ax.lines if line.get_alpha() == plots.RAW_ALPHA]
    smoothed = [line for line in ax.lines if line.get_alpha() is None]
    assert len(raw) == len(smoothed) == 2
    for faded, line in zip(raw, smoothed):
        assert faded.get_color() == line.get_color() and line.get_label() in ("r=4", "r=8")
        wiggle = [sum(abs(b - a) for a, b in zip(y, y[1:])) for y in (faded.get_ydata(), line.get_ydata())]
        assert wiggle[1] < wiggle[0] / 4  # the zig-zag is gone, the fall stays
        assert (
            line.get_ydata()[-1] < sum(faded.get_ydata()[:6]) / 6 - 0.1
        )  # the fall (0.2 over the run) stays
    assert plots.smooth([1.0, 0.0, 1.0]) == [1.0, 0.0, 1.0]  # too short to smooth: drawn as logged


@pytest.mark.parametrize("n", [plots.PANELS_AFTER, plots.PANELS_AFTER + 1, 14])
def test_past_a_handful_of_runs_each_gets_its_own_panel(tmp_path, n):
    runs = _noisy_runs(tmp_path, n, points=12)
    table = compare.runs_table(runs)
    panels = _panels(plots.loss_curves_figure(table, runs, compare.sweep_keys(runs, table)))
    if n <= plots.PANELS_AFTER:
        assert len(panels) == 1 and len(panels[0].get_legend().get_texts()) == n
        return
    assert len(panels) == n and [ax.get_title() for ax in panels] == [f"r={4 * (j + 1)}" for j in range(n)]
    for ax in panels:  # its run raw and smoothed in colour, the other runs' smoothed curves in grey behind
        assert len(ax.lines) == (n - 1) + 2 and sum(line.get_color() == "0.85" for line in ax.lines) == n - 1
    assert len({ax.get_ylim() for ax in panels}) == 1  # shared axes: panels compare at a glance


def test_compare_of_one_run_writes_into_that_run(tmp_path, capsys, monkeypatch):
    run = make_run(
        tmp_path / "outputs" / "12-00-00", _config(tmp_path / "run", r=4), _finished(0.7), ["peft.r=4"]
    )
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_cli(capsys, run)
    assert code == 0 and f"wrote {run / 'loss_curves.png'}" in stdout
    assert (run / "loss_curves.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "compare").exists()
    other = make_run(
        tmp_path / "outputs" / "13-00-00", _config(tmp_path / "run", r=8), _finished(0.8), ["peft.r=8"]
    )
    assert run_cli(capsys, run, other)[0] == 0  # several directories: ./compare, as before
    assert (tmp_path / "compare" / "loss_curves.png").is_file()
    assert run_cli(capsys, tmp_path / "outputs")[0] == 0  # a folder of runs that is no sweep: ./compare too
    assert not (tmp_path / "outputs" / "loss_curves.png").exists()


def test_terminal_table_through_rich_plain_when_piped(sweep, monkeypatch):
    table = compare.runs_table([compare.load_run(p) for p in compare.find_runs([sweep])])
    piped = io.StringIO()
    compare.print_table(table, file=piped)
    lines = piped.getvalue().splitlines()
    assert "\x1b[" not in piped.getvalue() and len(lines) == 1 + len(table)  # one line per run, however wide
    assert "val_accuracy" not in lines[0] and "accuracy" in lines[0]  # blank in every row: left out here
    assert lines[1].rstrip() == lines[1] and lines[1].index("0.800") > lines[0].index(
        "accuracy"
    )  # right-aligned
    monkeypatch.setenv("FORCE_COLOR", "1")  # as on a terminal: statuses coloured
    terminal = io.StringIO()
    compare.print_table(table, file=terminal)
    assert "\x1b[32mfinished" in terminal.getvalue() and "31mfailed" in terminal.getvalue()  # failed: dim red


def _kfold_run(job: Path, repeats: list[float], params: int, folds: int = 2, rows: int = 20) -> Path:
    """A finished eval.split=kfold run whose predictions.csv has ``rows`` predictions per repeat, the first
    accuracy * rows of them correct, spread over ``folds`` folds numbered across repeats."""
    lines = ["id,fold,label,prediction,correct"]
    for r, accuracy in enumerate(repeats):
        right = round(accuracy * rows)
        lines += [f"{r}-{k},{r * folds + k % folds},a,a,{int(k < right)}" for k in range(rows)]
    job.mkdir(parents=True)
    (job / "predictions.csv").write_text("\n".join(lines) + "\n")
    config = {
        **_config(job, r=params),
        "eval": {"split": "kfold", "folds": folds, "fold_repeats": len(repeats)},
    }
    metrics = {**_finished(sum(repeats) / len(repeats)), "trainable_params": params}
    return make_run(job, config, metrics, [f"peft.r={params}", "hydra.job.num=0"])


def test_select_takes_the_fewest_trainable_parameters_within_one_standard_error_of_the_best(tmp_path, capsys):
    """The one-standard-error rule on repeat accuracies read from predictions.csv: run 0 is best (0.80, its
    three repeats 0.9/0.8/0.7: SE 0.1/sqrt(3) = 0.0577, the margin), run 1 (0.7667) lies within it with 100 parameters
    and is chosen, run 2 (0.70, 10 parameters) lies outside; the failed run takes no part."""
    root = tmp_path / "sweep"
    _kfold_run(root / "0", [0.9, 0.8, 0.7], 1000)
    _kfold_run(root / "1", [0.8, 0.75, 0.75], 100)
    _kfold_run(root / "2", [0.7, 0.7, 0.7], 10)
    make_run(root / "3", _config(root / "3", r=1), {"status": "failed", "error": "boom"}, ["peft.r=1"])
    code, out, err = run_cli(capsys, root, "--select", "--no-plots", "--out", tmp_path / "out")
    assert code == 0, err
    rows = {r["run"]: r for r in read_csv(tmp_path / "out" / "compare.csv")}
    assert abs(float(rows["0"]["repeat_se"]) - 0.1 / 3**0.5) < 1e-9
    assert abs(float(rows["1"]["repeat_se"]) - 0.05 / 3) < 1e-9  # sd 0.05/sqrt(3), over sqrt(3)
    assert [rows[k]["tie"] for k in "0123"] == ["tie", "tie", "", ""]
    assert [rows[k]["chosen"] for k in "0123"] == ["", "chosen", "", ""]
    assert float(rows["2"]["trainable_params"]) == 10
    assert "selected: 1  accuracy 0.7667 +- 0.0167, 2 within one standard error, 100 trainable" in out
    assert "| overrides: peft.r=100\n" in out  # hydra.* overrides left out


def test_select_ties_at_the_bound_and_with_one_repeat_only_equal_figures(tmp_path, capsys):
    """The bound is inclusive, also after metrics.json's rounding to 6 decimals (0.606667 - 0.006667 reaches
    0.600), so the 10-parameter run at 0.600 ties and is chosen; with one repeat nothing has a standard error
    and only equal accuracies tie, which the selected line says."""
    root = tmp_path / "three"
    _kfold_run(root / "0", [0.62, 0.60, 0.60], 1000, rows=50)  # pooled 0.606667, SE 0.006667
    _kfold_run(root / "1", [0.60, 0.60, 0.60], 10, rows=50)
    for run in (root / "0", root / "1"):  # as metrics.json records it
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["final"]["accuracy"] = round(metrics["final"]["accuracy"], 6)
        (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = run_cli(capsys, root, "--select", "--no-plots")
    assert code == 0, err
    assert "selected: 1  accuracy 0.6000 +- 0.0000, 2 within one standard error, 10 trainable" in out
    one = tmp_path / "one"
    _kfold_run(one / "0", [0.7], 1000)
    _kfold_run(one / "1", [0.7], 100)
    _kfold_run(one / "2", [0.6], 10)
    code, out, err = run_cli(capsys, one, "--select", "--no-plots")
    assert (
        "selected: 1  accuracy 0.7000 (one fold repeat: no standard error), 2 with the same accuracy" in out
    )


def test_select_refuses_runs_that_are_not_kfold(sweep, capsys):
    code, out, err = run_cli(capsys, sweep, "--select", "--no-plots")
    assert code == 2 and "--select: no finished eval.split=kfold run to select from" in err
