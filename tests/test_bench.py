"""The benchmark entry point: the guide-vs-peftlab figures (no subprocess) and one real CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from peftlab import bench

from .conftest import ROOT, write_raft


def guide_result(s_per_it: list[float]) -> dict:
    """A result JSON as the guide's script writes it, one entry per epoch."""
    return {"tracker": "off", "zero3": True,
            "epochs": [{"epoch": i, "s_per_it": s, "gpu_peak_mb": 3900 + 10 * i, "cpu_peak_mb": 2200 + i,
                        "eval_s": 5.0 + i, "eval_gpu_peak_mb": 3950 if i == 1 else 100} for i, s in enumerate(s_per_it)]}


def peftlab_metrics(s_per_step: float | None, status: str = "finished") -> dict:
    phases = {"setup": {"gpu_peak_alloc_mb": 500.0, "cpu_peak_rss_mb": 3000.0, "wall_s": 9.0},
              "train": {"s_per_step": s_per_step, "tokens_per_s": 1234.5, "gpu_peak_alloc_mb": 4000.0,
                        "cpu_peak_rss_mb": 2000.0, "wall_s": 30.0},
              "eval": {"gpu_peak_alloc_mb": 4200.0, "cpu_peak_rss_mb": 2500.0, "wall_s": 4.0}}
    return {"status": status, "phases": phases, "final": {"accuracy": 0.5, "n_eval": 3399}, "time_to_first_step_s": 12.5}


def test_guide_steady_state_and_ratio_to_the_comparable_guide_config():
    offload = bench.guide_row(guide_result([9.0, 1.2, 1.4, 1.3]), "zero3_cpu", eval_rows=50)
    assert offload["s_per_step"] == 1.3  # median of the epochs after the first
    assert offload["gpu_peak_mb"] == 3950 and offload["gpu_peak_train_mb"] == 3930  # training and generate peaks
    assert offload["cpu_peak_mb"] == 2203 and offload["eval_s_generate"] == 7.0 and offload["status"] == "finished"
    plain = bench.guide_row(guide_result([5.0, 0.9, 0.8, 0.85]), "zero3")

    rows = [offload, plain]
    for variant, s in (("none", 0.17), ("stage3", 0.425), ("stage3_cpu", 0.65), ("stage3_cpu_bf16", 0.39), ("stage2", None)):
        rows.append(bench.peftlab_row(peftlab_metrics(s), variant))
    failed = bench.peftlab_row({}, "stage2")
    rows.append(failed)
    ratios = {r["config"]: r["ratio_to_guide"] for r in bench.summarize(rows) if r["runner"] == "peftlab"}
    assert ratios == {"none": 0.2, "stage3": 0.5, "stage3_cpu": 0.5, "stage3_cpu_bf16": 0.3, "stage2": None}
    none = rows[2]
    assert none["gpu_peak_mb"] == 4200.0 and none["cpu_peak_mb"] == 3000.0  # max over phases
    assert none["eval_s_score"] == 4.0 and none["eval_s_generate"] is None and none["time_to_first_step_s"] == 12.5
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


@pytest.mark.slow
def test_bench_runs_on_the_cpu(tmp_path):
    data = write_raft(tmp_path / "data" / "twitter_complaints")
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "peftlab.bench", "--model", "tiny_bart", "--configs", "none,stage3_cpu", "--epochs", "1",
           "--data-dir", str(data), "--out", str(out), "--set", "train.max_length=32", "--set", "save_adapter=false",
           "--set", "eval.batch_size=24", "--timeout", "900"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))  # on the CPU, also on a GPU machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"none", "stage3_cpu"}, rows
    for row in rows.values():
        assert row["runner"] == "peftlab" and row["status"] == "finished", row.get("error")
        assert isinstance(row["s_per_step"], float) and row["s_per_step"] > 0
        assert row["ratio_to_guide"] is None
    assert result["device"] == "cpu" and result["versions"]["deepspeed"]
    md = (out / "bench.md").read_text()
    assert "| runner | config | s/step | tokens/s | GPU peak MB |" in md
    assert md.strip().splitlines()[-1] in proc.stdout  # the table is printed last
    assert (out / "bench.png").stat().st_size > 1000
    assert (out / "none.log").is_file() and (out / "stage3_cpu" / "metrics.json").is_file()
    print(f"bench CPU run: {time.perf_counter() - start:.0f} s")
