"""The benchmark entry point (benchmarks/bench.py, beside the package, not in it): the guide-vs-peftlab figures and
the sweep benchmark's (no subprocess), and real CPU runs of both."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, write_raft

BENCH = ROOT / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def guide_result(s_per_it: list[float]) -> dict:
    """A result JSON as the guide's script writes it, one entry per epoch."""
    return {
        "tracker": "off",
        "zero3": True,
        "epochs": [
            {
                "epoch": i,
                "s_per_it": s,
                "gpu_peak_mb": 3900 + 10 * i,
                "cpu_peak_mb": 2200 + i,
                "eval_s": 5.0 + i,
                "eval_gpu_peak_mb": 3950 if i == 1 else 100,
            }
            for i, s in enumerate(s_per_it)
        ],
    }


def peftlab_metrics(s_per_step: float | None, status: str = "finished") -> dict:
    phases = {
        "setup": {"gpu_peak_alloc_mb": 500.0, "cpu_peak_rss_mb": 3000.0, "wall_s": 9.0},
        "train": {
            "s_per_step": s_per_step,
            "tokens_per_s": 1234.5,
            "gpu_peak_alloc_mb": 4000.0,
            "cpu_peak_rss_mb": 2000.0,
            "wall_s": 30.0,
        },
        "eval": {"gpu_peak_alloc_mb": 4200.0, "cpu_peak_rss_mb": 2500.0, "wall_s": 4.0},
    }
    return {
        "status": status,
        "phases": phases,
        "final": {"accuracy": 0.5, "n_eval": 3399},
        "time_to_first_step_s": 12.5,
    }


def test_guide_steady_state_and_ratio_to_the_comparable_guide_config():
    offload = bench.guide_row(guide_result([9.0, 1.2, 1.4, 1.3]), "zero3_cpu", eval_rows=50)
    assert offload["s_per_step"] == 1.3  # median of the epochs after the first
    assert (
        offload["gpu_peak_mb"] == 3950 and offload["gpu_peak_train_mb"] == 3930
    )  # training and generate peaks
    assert (
        offload["cpu_peak_mb"] == 2203
        and offload["eval_s_generate"] == 7.0
        and offload["status"] == "finished"
    )
    plain = bench.guide_row(guide_result([5.0, 0.9, 0.8, 0.85]), "zero3")

    rows = [offload, plain]
    for variant, s in (
        ("none", 0.17),
        ("stage3", 0.425),
        ("stage3_cpu", 0.65),
        ("stage3_cpu_bf16", 0.39),
        ("stage2", None),
    ):
        rows.append(bench.peftlab_row(peftlab_metrics(s), variant))
    failed = bench.peftlab_row({}, "stage2")
    rows.append(failed)
    ratios = {r["config"]: r["ratio_to_guide"] for r in bench.summarize(rows) if r["runner"] == "peftlab"}
    assert ratios == {"none": 0.2, "stage3": 0.5, "stage3_cpu": 0.5, "stage3_cpu_bf16": 0.3, "stage2": None}
    none = rows[2]
    assert none["gpu_peak_mb"] == 4200.0 and none["cpu_peak_mb"] == 3000.0  # max over phases
    assert (
        none["eval_s_score"] == 4.0
        and none["eval_s_generate"] is None
        and none["time_to_first_step_s"] == 12.5
    )
    assert failed["status"] == "missing" and failed["s_per_step"] is None

    md = bench.table(rows, "device: test")
    assert "| runner | config | s/step |" in md and "| guide | zero3_cpu | 1.3 |" in md
    assert md.count("\n| peftlab |") == 6


def test_without_a_guide_run_there_is_no_ratio_and_a_failed_guide_counts_as_not_run():
    rows = [bench.guide_row(None, "zero3_cpu"), bench.peftlab_row(peftlab_metrics(0.5), "stage3_cpu")]
    bench.summarize(rows)
    assert rows[0]["status"] == "failed" and rows[1]["ratio_to_guide"] is None


def test_eval_both_figures_and_variant_overrides():
    m = peftlab_metrics(0.5)
    m["final"].update(eval_s_score=1.5, eval_s_generate=20.0, agreement=0.9, generate_exact=0.8)
    row = bench.peftlab_row(m, "stage3_cpu", "both")
    assert (row["eval_s_score"], row["eval_s_generate"], row["agreement"]) == (1.5, 20.0, 0.9)
    assert "agreement 0.900" in bench.table([row])
    assert bench.merge_overrides(["a=1", "b=2"], ["a=3"]) == ["a=3", "b=2"]
    with pytest.raises(SystemExit):
        bench.variants(["stage9"])
    with pytest.raises(SystemExit):  # --variant must name a new config and give its overrides
        bench.parse_args(["--variant", "stage3=zero=stage2"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--variant", "mine="])


@pytest.mark.slow
def test_bench_runs_on_the_cpu(tmp_path):
    data = write_raft(tmp_path / "data" / "twitter_complaints")
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(BENCH),
        "--model",
        "tiny_bart",
        "--configs",
        "none",
        "--variant",
        "offload=zero=stage3_cpu eval.mixed_precision=bf16",  # a config of one's own
        "--epochs",
        "1",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--set",
        "train.max_length=32",
        "--set",
        "save_adapter=false",
        "--set",
        "eval.batch_size=24",
        "--timeout",
        "900",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )  # on the CPU, also on a GPU machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"none", "offload"}, rows
    for row in rows.values():
        assert row["runner"] == "peftlab" and row["status"] == "finished", row.get("error")
        assert isinstance(row["s_per_step"], float) and row["s_per_step"] > 0
        assert row["ratio_to_guide"] is None
    assert result["device"] == "cpu" and result["versions"]["deepspeed"]
    md = (out / "bench.md").read_text()
    assert "| runner | config | s/step | tokens/s | GPU peak MB |" in md
    assert md.strip().splitlines()[-1] in proc.stdout  # the table is printed last
    assert (out / "bench.png").stat().st_size > 1000
    assert (out / "none.log").is_file() and (out / "offload" / "metrics.json").is_file()
    composed = (out / "offload" / "config.yaml").read_text()
    assert "name: stage3_cpu" in composed and "mixed_precision: bf16" in composed
    print(f"bench CPU run: {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------- the sweep benchmark


def test_sweep_rows_name_their_launcher_and_gpus():
    rows = bench.sweep_rows("basic:1,packed:1,packed:1@0.25,packed:2,fresh,pairs", ["0", "1"])
    assert rows == [
        ("basic_1gpu", "basic", 1, None),
        ("packed_1gpu", "packed", 1, None),
        ("packed_1gpu@0.25", "packed", 1, 0.25),
        ("packed_2gpu", "packed", 2, None),
        ("fresh_1gpu", "fresh", 1, None),
        ("pairs_2gpu", "pairs", 2, None),
    ]
    assert bench.sweep_rows("basic,packed:2", []) == [
        ("basic_cpu", "basic", 0, None),
        ("packed_cpu", "packed", 0, None),
    ]  # the CPU
    for spec, line in (
        ("packed:3", "--rows packed:3 needs 3 GPUs, 2 visible"),
        ("pairs:1", "two-process jobs need 2 GPUs"),
        ("ray:1", "unknown kind 'ray'"),
        ("basic,basic:1", "names basic_1gpu twice"),
        ("packed@2", "'@' takes a job's share of a GPU"),
        ("basic@0.5", "packed and fresh rows only"),
    ):
        with pytest.raises(SystemExit, match=line):
            bench.sweep_rows(spec, ["0", "1"])


def test_sweep_rows_run_the_same_sweep_under_each_launcher(tmp_path):
    args = bench.parse_args(
        [
            "--sweep",
            "--sweep-overrides",
            "model=tiny_bert peft.r=4,8,16 logger=tensorboard",
            "--set",
            "train.max_length=32",
            "--ray-set",
            "hydra.launcher.ray.init.num_cpus=2",
            "--gpu-fraction",
            "0.25",
        ]
    )
    basic = bench.sweep_overrides("basic", 1, args, tmp_path / "b")
    assert basic == [
        "-m",
        "logger=tensorboard",
        "save_adapter=false",
        "model=tiny_bert",
        "peft.r=4,8,16",
        "train.max_length=32",
        f"hydra.sweep.dir={tmp_path / 'b'}",
    ]
    packed = bench.sweep_overrides("packed", 1, args, tmp_path / "p")
    assert packed[1:6] == basic[1:6] and packed[6:-1] == [
        "hydra/launcher=ray",
        "hydra.launcher.ray.remote.num_gpus=0.25",
        "hydra.launcher.ray.init.num_cpus=2",
    ]
    assert "hydra.launcher.ray.remote.max_calls=1" in bench.sweep_overrides("fresh", 1, args, tmp_path / "f")
    assert "hydra.launcher.ray.remote.num_gpus=0.5" in bench.sweep_overrides(
        "packed", 1, args, tmp_path / "h", 0.5
    )
    assert "hydra.launcher.ray.remote.num_gpus=0.25" not in bench.sweep_overrides(
        "packed", 0, args, tmp_path / "c"
    )  # CPU
    pairs = bench.sweep_overrides("pairs", 2, args, tmp_path / "2")
    assert {"peft.r=4,8", "peft.lora_alpha=16,32", "launcher.num_processes=2", "hydra/launcher=ray"} <= set(
        pairs
    )
    assert not any(
        o.startswith("hydra.launcher.ray.remote.num_gpus") for o in pairs
    )  # the preset's: num_processes GPUs


def write_job(
    job_dir, status="finished", rows=3, n_eval=3, ttfs=4.0, s_per_step=0.2, labels="complaint", logp_shift=0.0
):
    job_dir.mkdir(parents=True)
    phases = {
        "setup": {"start_time": 100.0, "end_time": 101.0, "wall_s": 1.0},
        "train": {
            "start_time": 101.0,
            "end_time": 105.0,
            "wall_s": 4.0,
            "s_per_step": s_per_step,
            "gpu_peak_alloc_mb": 900.0,
        },
        "eval": {"start_time": 105.0, "end_time": 107.0, "wall_s": 2.0, "gpu_peak_alloc_mb": 1000.0},
    }
    (job_dir / "metrics.json").write_text(
        json.dumps(
            {
                "status": status,
                "phases": phases,
                "time_to_first_step_s": ttfs,
                "final": {"n_eval": n_eval, "accuracy": 0.5},
            }
        )
    )
    (job_dir / "predictions.csv").write_text(
        "id,prediction,logp_complaint,logp_no complaint\n"
        + "".join(f"{i},{labels},{-0.5 - logp_shift:.5f},-1.0\n" for i in range(rows))
    )


def test_sweep_job_figures_and_the_records_check(tmp_path):
    write_job(tmp_path / "0")
    job = bench.sweep_job(tmp_path / "0")
    assert (job["span_s"], job["startup_share"], job["predictions"], job["eval_s"]) == (
        10.0,
        0.4,
        3,
        2.0,
    )  # 4 s + 101..107
    assert job["gpu_peak_mb"] == 1000.0 and job["labels"] == ["complaint"] * 3
    write_job(tmp_path / "1")
    assert bench.records_check([bench.sweep_job(tmp_path / d) for d in "01"]) == (
        "2/2 finished, 3 predictions each",
        True,
    )
    write_job(tmp_path / "2", rows=2)
    write_job(tmp_path / "3", status="oom", rows=0, n_eval=None)
    text, ok = bench.records_check([bench.sweep_job(tmp_path / d) for d in "0123"])
    assert not ok and text == (
        "3/4 finished; job 3 oom; job 2 2 predictions for n_eval 3; "
        "prediction counts differ between jobs: [0, 2, 3]"
    )
    assert bench.records_check([]) == ("0/0 finished", False)


def test_rows_compare_with_the_basic_launchers_wall_time_and_predictions(tmp_path):
    for row, labels, shift in (
        ("basic", "complaint", 0.0),
        ("packed", "complaint", 4e-4),
        ("fresh", "no complaint", 0.25),
    ):
        for n in "01":
            write_job(
                tmp_path / row / n,
                labels=labels if n == "1" else "complaint",
                logp_shift=shift if n == "1" else 0.0,
            )

    def row(kind, wall):
        jobs = [bench.sweep_job(tmp_path / kind / n) for n in "01"]
        return {
            "row": kind,
            "kind": kind,
            "status": "finished",
            "wall_s": wall,
            "jobs_detail": jobs,
            "ratio_to_basic": None,
            "same_predictions": None,
        }

    rows = bench.compare_rows([row("basic", 100.0), row("packed", 30.0), row("fresh", 50.0)])
    assert [(r["ratio_to_basic"], r["same_predictions"]) for r in rows] == [
        (1.0, None),
        (0.3, "2/2"),
        (0.5, "1/2"),
    ]
    assert [r.get("max_logp_gap") for r in rows] == [None, pytest.approx(4e-4), pytest.approx(0.25)]
    assert all(
        "labels" not in j and "logps" not in j for r in rows for j in r["jobs_detail"]
    )  # not into bench.json
    md = bench.sweep_table(rows, "device: test")
    assert (
        "| row | GPUs | jobs | wall s | jobs/h | ratio to basic |" in md
        and "| packed |" in md
        and "| 0.30 |" in md
    )


@pytest.mark.slow
def test_the_sweep_benchmark_runs_on_the_cpu(tmp_path):
    """Two tiny_bert jobs on the basic launcher, then packed on Ray (half a CPU each), in one call."""
    data = write_raft(tmp_path / "data" / "twitter_complaints")
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(BENCH),
        "--sweep",
        "--sweep-overrides",
        "model=tiny_bert train.epochs=1 peft.r=4,8",
        "--rows",
        "basic,packed",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--set",
        "train.max_length=32",
        "--timeout",
        "600",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1300,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["device"] == "cpu" and result["versions"]["ray"] and result["cpus_per_job"] == 0.5
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["basic_cpu", "packed_cpu"]
    for name, row in rows.items():
        assert row["status"] == "finished" and row["jobs"] == row["finished"] == 2, (name, row.get("error"))
        assert row["records"] == "2/2 finished, 24 predictions each", row[
            "records"
        ]  # write_raft: 24 labelled test rows
        assert row["s_per_step"] > 0 and row["time_to_first_step_s"] > 0 and 0 < row["startup_share"] < 1
        assert row["jobs_per_hour"] == pytest.approx(2 * 3600 / row["wall_s"], rel=0.01)
        assert row["gpu_mem_peak_mb"] is None and row["job_gpu_peak_mb"] is None  # the CPU: no GPU figures
        assert json.loads((out / name / "sweep.json").read_text())["finished"] == 2
    assert (
        "hydra/launcher=ray" in rows["packed_cpu"]["command"]
        and "hydra/launcher=ray" not in rows["basic_cpu"]["command"]
    )
    assert rows["basic_cpu"]["ratio_to_basic"] == 1.0
    assert rows["packed_cpu"]["ratio_to_basic"] == pytest.approx(
        rows["packed_cpu"]["wall_s"] / rows["basic_cpu"]["wall_s"], abs=1e-3
    )
    assert rows["packed_cpu"]["same_predictions"] == "2/2"  # a packed job predicts what it predicts alone
    assert rows["packed_cpu"]["max_logp_gap"] < 1e-3  # and scores its rows as it does alone
    md = (out / "bench.md").read_text()
    assert md.strip().splitlines()[-1] in proc.stdout and "| packed_cpu |" in md
    assert (out / "bench.png").stat().st_size > 1000


def test_packed_rows_spread_all_jobs_over_their_gpus_by_default(tmp_path):
    """Ray fills one GPU before the next: nine jobs at 0.1 each left the second H200 idle."""
    sweep = ["model=bart_large_arch", "peft.r=4,8,16", "peft.lora_alpha=16,32,64", "hydra.sweep.dir=x"]
    assert bench.job_count(sweep) == 9 and bench.job_count(["peft.r=range(4,20,4)", "seed=0,1"]) == 8
    assert (bench.spread_share(sweep, 1), bench.spread_share(sweep, 2)) == (0.1111, 0.2)
    args = bench.parse_args(["--sweep", "--sweep-overrides", " ".join(sweep[:3])])
    assert "hydra.launcher.ray.remote.num_gpus=0.2" in bench.sweep_overrides("packed", 2, args, tmp_path)
    args = bench.parse_args(["--sweep", "--sweep-overrides", " ".join(sweep[:3]), "--gpu-fraction", "0.25"])
    assert "hydra.launcher.ray.remote.num_gpus=0.25" in bench.sweep_overrides("packed", 2, args, tmp_path)
