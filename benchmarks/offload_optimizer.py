"""DeepSpeed's CPU Adam vs torch's AdamW as the offloaded optimizer of a LoRA run (issue 14).

    .venv/bin/python benchmarks/offload_optimizer.py --models tiny_bert,minilm --reps 3

Every run is one ``python run.py model=M zero=Z zero.optimizer=O ...`` subprocess, the two optimizers
alternating within each repetition (same load on the machine). Figures per run from metrics.json:
``phases.train.s_per_step`` (median step after the first epoch: DeepSpeedCPUAdam's build, if any, is
not in it), the loss curve. Printed: the median over repetitions of s/step per (model, config,
optimizer), the ratio torch / DeepSpeed, and the largest loss difference between the two optimizers'
loss curves. The evaluation uses the first ``--eval-rows`` rows of test.csv (the training rows are all
of train.csv). Results also go to ``<out>/offload_optimizer.json``.

    .venv/bin/python benchmarks/offload_optimizer.py --step-only 1058,75000,1000000

times the optimizer step alone, in this process, on one flat fp32 tensor of each size (what ZeRO's
offload hands the optimizer): median of 400 steps (60 from 10^6 elements up), and the largest
difference between the two optimizers' parameters after them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = {"ds_cpu_adam": "deepspeed.ops.adam.DeepSpeedCPUAdam", "torch_adamw": "torch.optim.AdamW"}


def small_eval_copy(data_dir: Path, out: Path, rows: int) -> Path:
    """train.csv as is, test.csv cut to its first ``rows`` labelled rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.csv").write_bytes((data_dir / "train.csv").read_bytes())
    with open(data_dir / "test.csv", newline="") as f:
        table = list(csv.reader(f))
    with open(out / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows(table[: rows + 1])
    return out


def one_run(model: str, zero: str, optimizer: str, args, run_dir: Path) -> dict:
    command = [
        sys.executable,
        "run.py",
        f"model={model}",
        f"zero={zero}",
        f"zero.optimizer={optimizer}",
        f"train.epochs={args.epochs}",
        "logger=null",
        "save_adapter=false",
        f"dataset.data_dir={args.data}",
        f"hydra.run.dir={run_dir}",
        *args.set,
    ]
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        rc = subprocess.run(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1")
        ).returncode
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "model": model,
        "zero": zero,
        "optimizer": optimizer,
        "rc": rc,
        "status": metrics["status"],
        "s_per_step": metrics.get("phases", {}).get("train", {}).get("s_per_step"),
        "steps": metrics.get("phases", {}).get("train", {}).get("steps"),
        "loss_curve": metrics.get("loss_curve"),
        "accuracy": (metrics.get("final") or {}).get("accuracy"),
        "run_wall_s": round(time.perf_counter() - start, 1),
    }


def step_only(sizes: list[int]) -> None:
    """Both optimizers' steps interleaved (one of each in turn), so both see the same machine load."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    makers = {
        "ds": lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.0),
        "torch": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
    }
    for n in sizes:
        torch.manual_seed(0)
        grad = torch.randn(n)
        params = {k: torch.nn.Parameter(torch.zeros(n)) for k in makers}
        optimizers = {k: make([params[k]]) for k, make in makers.items()}
        times = {k: [] for k in makers}
        for _ in range(400 if n < 10**6 else 60):
            for k, opt in optimizers.items():
                params[k].grad = grad.clone()
                start = time.perf_counter()
                opt.step()
                times[k].append(time.perf_counter() - start)
        ds, pt = (statistics.median(times[k][10:]) for k in makers)
        diff = float((params["ds"] - params["torch"]).abs().max())
        print(f"| {n:,} | {ds * 1e3:.3f} | {pt * 1e3:.3f} | {diff:.1e} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny_bert")
    p.add_argument("--configs", default="stage3_cpu,stage2_cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "twitter_complaints"))
    p.add_argument(
        "--out",
        default=str(ROOT / "outputs" / "bench_offload_optimizer" / time.strftime("%Y-%m-%d_%H-%M-%S")),
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override for every run"
    )
    p.add_argument(
        "--step-only", metavar="N,N,...", help="time the optimizer step alone on tensors of these sizes"
    )
    args = p.parse_args(argv)
    if args.step_only:
        print("| elements | DeepSpeedCPUAdam ms/step | torch AdamW ms/step | max param diff |")
        step_only([int(n) for n in args.step_only.split(",")])
        return 0
    out = Path(args.out)
    args.data = small_eval_copy(Path(args.data_dir), out / "data", args.eval_rows)
    runs = []
    for model in args.models.split(","):
        for zero in args.configs.split(","):
            for rep in range(args.reps):
                order = list(OPTIMIZERS.items()) if rep % 2 == 0 else list(OPTIMIZERS.items())[::-1]
                for name, target in order:
                    result = one_run(model, zero, target, args, out / f"{model}-{zero}-{name}-{rep}")
                    runs.append({**result, "name": name, "rep": rep})
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "loss_curve"}), flush=True)
    rows = []
    for model in args.models.split(","):
        for zero in args.configs.split(","):
            mine = [r for r in runs if r["model"] == model and r["zero"] == zero]
            med = {
                name: statistics.median(
                    [r["s_per_step"] for r in mine if r["name"] == name and r["s_per_step"]] or [float("nan")]
                )
                for name in OPTIMIZERS
            }
            curves = {
                name: next((r["loss_curve"] for r in mine if r["name"] == name and r["loss_curve"]), None)
                for name in OPTIMIZERS
            }
            diff = max(abs(a[1] - b[1]) for a, b in zip(*curves.values())) if all(curves.values()) else None
            rows.append(
                {
                    "model": model,
                    "zero": zero,
                    **{f"s_per_step_{k}": v for k, v in med.items()},
                    "ratio_torch_over_ds": round(med["torch_adamw"] / med["ds_cpu_adam"], 3),
                    "max_loss_diff": diff,
                    "steps": mine[0]["steps"],
                    "all_s_per_step": {
                        name: [r["s_per_step"] for r in mine if r["name"] == name] for name in OPTIMIZERS
                    },
                }
            )
    (out / "offload_optimizer.json").write_text(json.dumps({"runs": runs, "summary": rows}, indent=2) + "\n")
    print(
        "| model | zero | steps/run | DeepSpeedCPUAdam s/step | torch AdamW s/step | torch / DS | max loss diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['zero']} | {r['steps']} | {r['s_per_step_ds_cpu_adam']:.4f} | {r['s_per_step_torch_adamw']:.4f} "
            f"| {r['ratio_torch_over_ds']:.2f} | {r['max_loss_diff']:.1e} |"
        )
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
