"""Speed and memory of peftlab on whatever device is here: the PEFT guide's comparison, and a sweep.

Usage (from the repository root; peftlab installed, e.g. ``pip install -e '.[ray]'``)::

    python benchmarks/bench.py                                   # the guide's comparison, defaults for this device
    python benchmarks/bench.py --configs none,stage3_cpu --epochs 3
    python benchmarks/bench.py --guide .bench_guide --data-dir ../shared/data/twitter_complaints
    python benchmarks/bench.py --eval-both --set save_adapter=false --out outputs/bench/try1
    python benchmarks/bench.py --sweep                           # one sweep, basic launcher against Ray packing
    python benchmarks/bench.py --sweep --rows basic:1,packed:1,packed:2,pairs:2

Every configuration is one ``python run.py model=M peft=lora peft.r=8 peft.lora_alpha=32
train.lr=3e-3 train.batch_size=8 ...`` subprocess (so GPU memory and DeepSpeed state never carry
over), run from the repository root into ``<out>/<variant>/``, its output in ``<out>/<variant>.log``.
A variant is a name for a few Hydra overrides (``VARIANTS`` below); the ZeRO settings themselves
are conf/zero/*.yaml. With ``--guide DIR`` the guide's own script (``DIR/guide_script.py``, see
its README) also runs under ``accelerate launch --config_file DIR/assets/<cfg>.yaml``.

Figures, per run (steady state = every epoch after the first):
  s/step      peftlab: phases.train.s_per_step (median step); guide: median of the epochs' s_per_it
  GPU peak    peftlab: max over phases of gpu_peak_alloc_mb; guide: max over epochs of train and eval peaks
  eval s      peftlab: the eval phase's wall time (or final.eval_s_score / eval_s_generate with
              eval.mode=both); guide: median eval_s (generate on its training rows)
  ratio       peftlab s/step / the guide's s/step: stage3_cpu* vs the guide's zero3_cpu, the rest vs zero3
A failed run is a row with its status and last error line. Written to ``--out``: bench.json (all
figures), bench.md (the table), bench.png (s/step and GPU peak per config); the table is printed last.

``--sweep``: one sweep (``--sweep-overrides``) under several launchers, one after the other, each a
``python run.py -m ...`` subprocess into ``<out>/<row>/`` (its output in ``<out>/<row>.log``); see
:func:`sweep_main` for the rows and their figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

from peftlab.rundir import headline, read_json

# Variant name -> Hydra overrides on top of BASE_OVERRIDES (ZeRO settings live in conf/zero/*.yaml).
VARIANTS: dict[str, list[str]] = {
    "none": ["zero=none"],
    "stage2": ["zero=stage2"],
    "stage3": ["zero=stage3"],
    "stage3_both": ["zero=stage3", "eval.mode=both"],  # score vs generate on one model and run
    "stage3_cpu_guide": ["zero=stage3_cpu_guide"],  # the guide's DeepSpeed settings, untuned
    "stage3_cpu": ["zero=stage3_cpu"],
    "stage3_cpu_bf16": ["zero=stage3_cpu", "train.mixed_precision=bf16"],
    # the capacity run (--model bloomz_7b1_arch): bf16, activations recomputed in backward
    "stage3_cpu_bf16_ckpt": [
        "zero=stage3_cpu",
        "train.mixed_precision=bf16",
        "train.gradient_checkpointing=true",
    ],
}
# The guide's script under its two accelerate configs: name -> (config file in assets/, TRACKER).
GUIDE_CONFIGS: dict[str, tuple[str, str]] = {
    "zero3_cpu": ("ds_zero3_cpu.yaml", "busy"),  # the guide as written
    "zero3": ("ds_zero3.yaml", "off"),
}
# The guide's hyper-parameters; the model, epochs and variant come on top.
BASE_OVERRIDES = [
    "peft=lora",
    "peft.r=8",
    "peft.lora_alpha=32",
    "train.lr=3e-3",
    "train.batch_size=8",
    "eval.mode=score",
]

COLUMNS = [
    ("runner", "runner"),
    ("config", "config"),
    ("s_per_step", "s/step"),
    ("tokens_per_s", "tokens/s"),
    ("gpu_peak_mb", "GPU peak MB"),
    ("cpu_peak_mb", "CPU peak MB"),
    ("eval_s_score", "eval s (score)"),
    ("eval_s_generate", "eval s (generate)"),
    ("eval_rows", "eval rows"),
    ("time_to_first_step_s", "time to first step s"),
    ("ratio_to_guide", "ratio to guide"),
    ("status", "status"),
]
FORMATS = {
    "s_per_step": "{:.4g}",
    "tokens_per_s": "{:.0f}",
    "gpu_peak_mb": "{:.0f}",
    "cpu_peak_mb": "{:.0f}",
    "eval_s_score": "{:.2f}",
    "eval_s_generate": "{:.2f}",
    "time_to_first_step_s": "{:.1f}",
    "ratio_to_guide": "{:.2f}",
}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


ROOT = Path(__file__).resolve().parents[1]  # the checkout: run.py, conf/


def repo_root() -> Path:
    """The checkout holding run.py and conf/ (this file lives in its benchmarks/)."""
    if not ((ROOT / "run.py").is_file() and (ROOT / "conf").is_dir()):
        raise SystemExit(
            f"error: run.py and conf/ not found in {ROOT}: run benchmarks/bench.py from a peftlab checkout"
        )
    return ROOT


def variants(names: list[str]) -> dict[str, list[str]]:
    """The overrides of each named variant, in the order given; an unknown name exits with the known ones."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown config(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return {n: VARIANTS[n] for n in names}


def guide_config_for(variant: str) -> str:
    """The guide configuration a peftlab variant compares with: CPU-offloaded stage 3 vs zero3_cpu, else zero3."""
    return "zero3_cpu" if any(o.startswith("zero=stage3_cpu") for o in VARIANTS.get(variant, [])) else "zero3"


def merge_overrides(*groups: list[str]) -> list[str]:
    """Hydra overrides, one per key, a later value replacing an earlier one (in place)."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            key = item.split("=", 1)[0]
            merged[key] = item
    return list(merged.values())


def peftlab_overrides(variant: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    extra = [f"dataset.data_dir={args.data_dir}"] if args.data_dir else []
    if args.eval_both and variant == "stage3_cpu":
        extra.append("eval.mode=both")
    return merge_overrides(
        [f"model={args.model}"],
        BASE_OVERRIDES,
        [f"train.epochs={args.epochs}"],
        VARIANTS[variant],
        extra,
        args.set,
        [f"hydra.run.dir={run_dir}"],
    )


def launch(cmd: list[str], log_path: Path, env: dict, timeout: float | None) -> tuple[int | None, float]:
    """Run ``cmd`` from the repo root, output into ``log_path``; (exit code or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=repo_root(), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own process group: a timeout ends launcher and workers
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, round(time.perf_counter() - start, 2)


ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b:|^error:|Killed|out of memory")
LAUNCHER_LINE = re.compile(r"ChildFailedError|CalledProcessError")  # the launcher's wrapper, not the cause


def last_error_line(log_path: Path) -> str | None:
    """The last line of a log that looks like an error, else its last non-empty line."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln.strip()) for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for line in reversed(lines):
        if ERROR_LINE.search(line) and not LAUNCHER_LINE.search(line):
            return line[:300]
    return lines[-1][:300] if lines else None


def run_peftlab(variant: str, args: argparse.Namespace, out: Path) -> dict:
    """One peftlab run of ``variant`` as a subprocess; its table row."""
    run_dir = out / variant
    overrides = peftlab_overrides(variant, args, run_dir)
    rc, wall = launch(
        [sys.executable, "run.py", *overrides], out / f"{variant}.log", dict(os.environ), args.timeout
    )
    metrics = read_json(run_dir / "metrics.json") or {}
    mode = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("eval.mode=")), "score")
    row = peftlab_row(metrics, variant, mode)
    row.update(overrides=overrides, wall_s=wall, returncode=rc, log=str(out / f"{variant}.log"))
    if rc is None:
        row.update(status="timeout", error=f"killed after --timeout {args.timeout} s")
    elif rc != 0 or row["status"] != "finished":
        row["status"] = row["status"] if row["status"] not in ("finished", "running", "missing") else "failed"
        row["error"] = row.get("error") or last_error_line(out / f"{variant}.log")
    return row


def _get(d: dict, *path):
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _max(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def _median(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def peftlab_row(metrics: dict, variant: str, eval_mode: str = "score") -> dict:
    """The figures of one peftlab metrics.json (missing keys are None)."""
    phases = metrics.get("phases") or {}
    final = metrics.get("final") or {}
    eval_wall = _get(phases, "eval", "wall_s")
    figures = headline(metrics)  # as the run's last line and peftlab compare read the record
    return {
        "runner": "peftlab",
        "config": variant,
        "guide_config": guide_config_for(variant),
        "status": metrics.get("status", "missing"),
        "error": metrics.get("error"),
        **{
            k: figures[k]
            for k in (
                "s_per_step",
                "tokens_per_s",
                "gpu_peak_mb",
                "gpu_peak_reserved_mb",
                "cpu_peak_mb",
                "accuracy",
                "time_to_first_step_s",
            )
        },
        "eval_s_score": final.get("eval_s_score", eval_wall if eval_mode == "score" else None),
        "eval_s_generate": final.get("eval_s_generate", eval_wall if eval_mode == "generate" else None),
        "eval_rows": final.get("n_eval"),
        "agreement": final.get("agreement"),
        "generate_exact": final.get("generate_exact"),
        "phase_wall_s": {k: p.get("wall_s") for k, p in phases.items()},
        "run_wall_s": metrics.get("wall_s"),
        "epochs": [
            {k: e.get(k) for k in ("epoch", "s_per_step", "tokens_per_s", "loss")}
            for e in metrics.get("epochs") or []
        ],
        "ratio_to_guide": None,
    }


def guide_row(result: dict | None, config: str, eval_rows: int | None = None) -> dict:
    """The figures of the guide script's result JSON; steady state = epochs after the first."""
    epochs = (result or {}).get("epochs") or []
    steady = epochs[1:] or epochs
    return {
        "runner": "guide",
        "config": config,
        "status": "finished" if epochs else "failed",
        "error": None,
        "tracker": (result or {}).get("tracker"),
        "zero3": (result or {}).get("zero3"),
        "s_per_step": _median(e.get("s_per_it") for e in steady),
        "tokens_per_s": None,
        "gpu_peak_mb": _max(
            [e.get("gpu_peak_mb") for e in epochs] + [e.get("eval_gpu_peak_mb") for e in epochs]
        ),
        "gpu_peak_train_mb": _max(e.get("gpu_peak_mb") for e in epochs),
        "cpu_peak_mb": _max(e.get("cpu_peak_mb") for e in epochs),
        "eval_s_score": None,
        "eval_s_generate": _median(e.get("eval_s") for e in steady),
        "eval_rows": eval_rows,
        "time_to_first_step_s": None,
        "ratio_to_guide": None,
        "epochs": epochs,
    }


def guide_data_dir(args: argparse.Namespace) -> str | None:
    """--data-dir, else $PEFTLAB_DATA_DIR/twitter_complaints if there, else None (the script's own default)."""
    if args.data_dir:
        return str(Path(args.data_dir).resolve())
    env = os.environ.get("PEFTLAB_DATA_DIR")
    if env and (Path(env) / "twitter_complaints").is_dir():
        return str((Path(env) / "twitter_complaints").resolve())
    return None


def count_rows(csv_path: Path) -> int | None:
    try:
        with open(csv_path, newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except OSError:
        return None


def run_guide(config: str, args: argparse.Namespace, out: Path) -> dict:
    """The guide's script under ``accelerate launch`` with one of its configs; its table row."""
    guide = Path(args.guide).resolve()
    assets_cfg, tracker = GUIDE_CONFIGS[config]
    result_path = out / f"guide_{config}.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "EPOCHS": str(args.epochs), "RESULT": str(result_path), "TRACKER": tracker}
    data_dir = guide_data_dir(args)
    if data_dir:
        env["DATA_DIR"] = data_dir
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(guide / "assets" / assets_cfg),
        str(guide / "guide_script.py"),
    ]
    log = out / f"guide_{config}.log"
    rc, wall = launch(cmd, log, env, args.timeout)
    rows = count_rows(Path(data_dir) / "train.csv") if data_dir else None
    row = guide_row(read_json(result_path) if rc == 0 else None, config, rows)
    row.update(command=cmd, wall_s=wall, returncode=rc, log=str(log))
    if rc is None:
        row.update(status="timeout", error=f"killed after --timeout {args.timeout} s")
    elif row["status"] != "finished":
        row.update(status="failed", error=last_error_line(log))
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Fill each peftlab row's ratio_to_guide: its s/step over the comparable guide run's (None if not run)."""
    guide = {r["config"]: r["s_per_step"] for r in rows if r["runner"] == "guide" and r.get("s_per_step")}
    for r in rows:
        if r["runner"] == "peftlab":
            base = guide.get(r.get("guide_config") or guide_config_for(r["config"]))
            r["ratio_to_guide"] = (
                round(r["s_per_step"] / base, 3) if base and r.get("s_per_step") is not None else None
            )
    return rows


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in FORMATS:
        return FORMATS[key].format(value)
    return str(value).replace("|", "\\|")


def _or_na(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(rows: list[dict], environment: str = "") -> str:
    """The Markdown table (with the environment line above it and notes on failures / agreement below)."""
    lines = [environment, ""] if environment else []
    lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cell(key, r.get(key)) for key, _ in COLUMNS) + " |")
    notes = [
        f"- {r['runner']} {r['config']}: {r['status']}: {r.get('error') or 'no error line'}"
        for r in rows
        if r["status"] != "finished"
    ]
    notes += [
        f"- {r['config']}: score vs generate agreement {_or_na(r.get('agreement'))} (rows where generate gave a label), "
        f"generate exact {_or_na(r.get('generate_exact'))}"
        for r in rows
        if r.get("agreement") is not None or r.get("generate_exact") is not None
    ]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Two horizontal bar panels, s/step and GPU peak MB per run; guide and peftlab in different colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"guide": "tab:orange", "peftlab": "tab:blue"}
    labels = [f"{r['runner']} {r['config']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * max(len(rows), 2)), sharey=True)
    for ax, key, xlabel in (
        (axes[0], "s_per_step", "seconds per step (median, steady state)"),
        (axes[1], "gpu_peak_mb", "GPU peak allocated (MB)"),
    ):
        values = [r.get(key) for r in rows]
        ax.barh(range(len(rows)), [v or 0 for v in values], color=[colours[r["runner"]] for r in rows])
        top = max([v for v in values if v] or [1])
        for i, (v, r) in enumerate(zip(values, rows)):
            text = _cell(key, v) if v is not None else (r["status"] if r["status"] != "finished" else "n/a")
            ax.text((v or 0) + top * 0.01, i, text, va="center", fontsize=9)
        ax.set_xlim(0, top * 1.25)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes[1].legend(handles, list(colours), loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(rows: list[dict]) -> dict:
    """Device, date and versions (CUDA is touched only now, after the runs)."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    found = {}
    for name in ("torch", "deepspeed", "transformers", "peft", "accelerate", "ray"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {
        "device": device,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": found,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = cuda_available()
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="bart_large_arch" if gpu else "tiny_bart",
        help="conf/model/<name> (default: %(default)s)",
    )
    p.add_argument(
        "--configs",
        default="none,stage2,stage3,stage3_cpu,stage3_cpu_bf16" if gpu else "none,stage2,stage3_cpu",
        help=f"comma list of {', '.join(VARIANTS)} (default: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=4 if gpu else 2,
        help="epochs per run, peftlab and guide (default: %(default)s)",
    )
    p.add_argument("--guide", help="folder with guide_script.py and assets/: also run the guide's script")
    p.add_argument(
        "--guide-configs", default=",".join(GUIDE_CONFIGS), help="with --guide: comma list of %(default)s"
    )
    p.add_argument(
        "--data-dir", help="RAFT-layout twitter_complaints folder (train.csv, test.csv) for every run"
    )
    p.add_argument("--out", help="output folder (default: outputs/bench/<timestamp>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every peftlab run (repeatable)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a config of your own, run after --configs: a name, '=', then its Hydra overrides separated by "
        "spaces, e.g. --variant 'stage3_gran=zero=stage3 +zero.settings.stage3_module_granularity_threshold=1e4' "
        "(repeatable)",
    )
    p.add_argument(
        "--eval-both",
        action="store_true",
        help="eval.mode=both in the stage3_cpu run: score and generate timed on one model",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per run (--sweep: per sweep) before it is killed (default: none)",
    )
    s = p.add_argument_group(
        "the sweep benchmark (--sweep; --set, --data-dir, --out and --timeout apply too)"
    )
    s.add_argument(
        "--sweep",
        action="store_true",
        help="run one sweep under several launchers instead of the guide's comparison",
    )
    s.add_argument(
        "--sweep-overrides",
        help=f"the sweep's Hydra overrides, one string (default on GPUs: {SWEEP_GPU!r}; "
        f"on the CPU: {SWEEP_CPU!r}); {' '.join(SWEEP_BASE)} beneath them",
    )
    s.add_argument(
        "--rows",
        help="comma list of kind[:GPUs][@share of a GPU a job], kinds "
        + ", ".join(ROW_KINDS)
        + " (default: basic:1,packed:1,"
        "packed:2,pairs:2 with 2+ GPUs, basic:1,packed:1 with one, basic,packed on the CPU)",
    )
    s.add_argument(
        "--gpu-fraction",
        type=float,
        default=None,
        help="packed/fresh rows: hydra.launcher.ray.remote.num_gpus, a job's share of a GPU (default: 1/ceil(jobs/GPUs), "
        "all jobs at once, spread evenly: Ray fills one GPU before it places a task on the next)",
    )
    s.add_argument(
        "--cpus-per-job",
        type=float,
        help="Ray rows: hydra.launcher.ray.remote.num_cpus (default: the preset's 1 on GPUs, 0.5 on the CPU)",
    )
    s.add_argument(
        "--pairs-overrides",
        default=PAIRS,
        help="pairs rows: overrides over --sweep-overrides (default: %(default)r)",
    )
    s.add_argument(
        "--ray-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for the Ray rows only, e.g. hydra.launcher.ray.remote.max_calls=1 (repeatable)",
    )
    args = p.parse_args(argv)
    for flag, values in (("--set", args.set), ("--ray-set", args.ray_set)):
        bad = [v for v in values if "=" not in v]
        if bad:
            p.error(f"{flag} needs KEY=VALUE, got {bad[0]!r}")
    if args.gpu_fraction is not None and not 0 < args.gpu_fraction <= 1:
        p.error(f"--gpu-fraction {args.gpu_fraction}: a share of one GPU, above 0 and at most 1")
    args.config_list = [c for c in args.configs.split(",") if c]
    for item in args.variant:
        name, _, overrides = item.partition("=")
        if not name or not overrides.strip() or name in VARIANTS:
            p.error(f"--variant {item!r}: give a new NAME=OVERRIDES (known names: {', '.join(VARIANTS)})")
        VARIANTS[name] = overrides.split()
        args.config_list.append(name)
    args.guide_list = [c for c in args.guide_configs.split(",") if c] if args.guide else []
    unknown = [c for c in args.guide_list if c not in GUIDE_CONFIGS]
    if unknown:
        p.error(f"unknown guide config(s) {', '.join(unknown)}; known: {', '.join(GUIDE_CONFIGS)}")
    if args.guide and not (Path(args.guide) / "guide_script.py").is_file():
        p.error(f"--guide {args.guide}: no guide_script.py there")
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    return args


def prepare_weights(args: argparse.Namespace) -> float | None:
    """Build the model's random weights into peftlab's cache before any run is timed, as a pretrained
    model would already sit in the Hugging Face cache; seconds taken, None when the model needs none."""
    from hydra import compose, initialize_config_dir

    from peftlab import modeling

    overrides = [
        o
        for o in merge_overrides([f"model={args.model}"], BASE_OVERRIDES, args.set)
        if not o.startswith("hydra.")
    ]
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if cfg.model.pretrained or not cfg.model.materialize:
        return None
    start = time.perf_counter()
    modeling.random_weights(cfg.model, cfg.seed, len(cfg.dataset.labels), cfg.paths.cache_dir)
    return round(time.perf_counter() - start, 2)


# ----------------------------------------------------------------------------- the sweep benchmark (issue 15)

SWEEP_GPU = "model=bart_large_arch zero=stage3 train.epochs=3 peft.r=4,8,16 peft.lora_alpha=16,32,64"
SWEEP_CPU = "model=tiny_bert train.epochs=1 peft.r=4,8,16,32"
SWEEP_BASE = ["logger=null", "save_adapter=false"]  # under --sweep-overrides and --set
PAIRS = "peft.r=4,8 peft.lora_alpha=16,32"  # the two-process jobs' 2 x 2 sweep, over --sweep-overrides
ROW_KINDS = {
    "basic": "basic launcher: one process, the jobs one after the other",
    "packed": "hydra/launcher=ray: jobs side by side, --gpu-fraction of a GPU each",
    "fresh": "as packed, with a fresh Ray worker per job (hydra.launcher.ray.remote.max_calls=1)",
    "pairs": "hydra/launcher=ray, a 2 x 2 sweep (--pairs-overrides) of launcher.num_processes=2 jobs",
}
SWEEP_COLUMNS = [
    ("row", "row"),
    ("gpus", "GPUs"),
    ("jobs", "jobs"),
    ("wall_s", "wall s"),
    ("jobs_per_hour", "jobs/h"),
    ("ratio_to_basic", "ratio to basic"),
    ("gpu_mem_peak_mb", "GPU memory peak MB (nvidia-smi)"),
    ("job_gpu_peak_mb", "job GPU peak MB (allocated)"),
    ("span_s", "job s (median)"),
    ("s_per_step", "s/step (median job)"),
    ("time_to_first_step_s", "time to first step s (median)"),
    ("startup_share", "start-up share (median)"),
    ("eval_s", "eval s (median)"),
    ("records", "records"),
    ("same_predictions", "same predictions as basic"),
    ("max_logp_gap", "max |log-likelihood gap| to basic"),
]
SWEEP_FORMATS = {
    "wall_s": "{:.1f}",
    "jobs_per_hour": "{:.0f}",
    "ratio_to_basic": "{:.2f}",
    "job_gpu_peak_mb": "{:.0f}",
    "span_s": "{:.1f}",
    "s_per_step": "{:.4g}",
    "time_to_first_step_s": "{:.1f}",
    "startup_share": "{:.0%}",
    "eval_s": "{:.2f}",
    "max_logp_gap": "{:.2g}",
}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (no CUDA context is made)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()] if cuda_available() else []
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def sweep_rows(spec: str, gpus: list[str]) -> list[tuple[str, str, int, float | None]]:
    """``kind[:gpus][@fraction],...`` -> [(row name, kind, GPUs, a job's share of a GPU or None for
    --gpu-fraction)]; SystemExit naming the bad entry. On a machine without GPUs every row runs on the CPU."""
    rows = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        head, _, share = item.partition("@")
        kind, _, count = head.partition(":")
        if kind not in ROW_KINDS:
            raise SystemExit(f"error: --rows {item}: unknown kind {kind!r}; known: {', '.join(ROW_KINDS)}")
        if count and not count.isdigit():
            raise SystemExit(f"error: --rows {item}: the GPU count after ':' must be a whole number")
        try:
            fraction = float(share) if share else None
        except ValueError:
            fraction = -1.0
        if share and (kind not in ("packed", "fresh") or not 0 < fraction <= 1):
            raise SystemExit(
                f"error: --rows {item}: '@' takes a job's share of a GPU (0 < share <= 1), packed and fresh rows only"
            )
        k = (int(count) if count else (2 if kind == "pairs" else 1)) if gpus else 0
        if k > len(gpus):
            raise SystemExit(
                f"error: --rows {item} needs {k} GPUs, {len(gpus)} visible (CUDA_VISIBLE_DEVICES)"
            )
        if gpus and kind == "pairs" and k < 2:
            raise SystemExit(f"error: --rows {item}: two-process jobs need 2 GPUs (pairs:2)")
        if gpus and k < 1:
            raise SystemExit(f"error: --rows {item}: a row on this GPU machine needs at least 1 GPU")
        name = (f"{kind}_{k}gpu" if k else f"{kind}_cpu") + (f"@{share}" if share else "")
        if any(r[0] == name for r in rows):
            raise SystemExit(f"error: --rows names {name} twice")
        rows.append((name, kind, k, fraction))
    return rows


def sweep_overrides(
    kind: str, gpus: int, args: argparse.Namespace, sweep_dir: Path, fraction: float | None = None
) -> list[str]:
    """The ``run.py`` arguments of one row: the sweep (pairs: its 2 x 2 of two-process jobs), then the launcher's."""
    pairs = [*shlex.split(args.pairs_overrides), "launcher.num_processes=2"] if kind == "pairs" else []
    data = [f"dataset.data_dir={args.data_dir}"] if args.data_dir else []
    task = merge_overrides(SWEEP_BASE, shlex.split(args.sweep_overrides), pairs, data, args.set)
    launcher = []
    if kind != "basic":
        launcher.append("hydra/launcher=ray")
        if kind in ("packed", "fresh") and gpus:
            share = fraction or args.gpu_fraction or spread_share(task, gpus)
            launcher.append(f"hydra.launcher.ray.remote.num_gpus={share}")
        if args.cpus_per_job is not None:
            launcher.append(f"hydra.launcher.ray.remote.num_cpus={args.cpus_per_job}")
        if kind == "fresh":
            launcher.append("hydra.launcher.ray.remote.max_calls=1")
        launcher = merge_overrides(launcher, args.ray_set)
    return ["-m", *task, *launcher, f"hydra.sweep.dir={sweep_dir}"]


def job_count(overrides: list[str]) -> int:
    """How many jobs ``run.py -m`` makes of ``overrides``: peftlab's own count (``sweep.sweep_size``), Hydra's
    settings (``hydra.*``, which the launcher takes) left out as Hydra leaves them out of the job's overrides."""
    from peftlab.sweep import sweep_size

    return sweep_size([o for o in overrides if not o.startswith("hydra.")])


def spread_share(overrides: list[str], gpus: int) -> float:
    """A job's share of a GPU so that all jobs run at once, spread evenly over ``gpus``: 1/ceil(jobs/gpus),
    rounded down to 4 digits. Ray's fractional GPUs fill one GPU before the next (measured on 2 x H200: nine
    jobs at 0.1 each all ran on GPU 0, the other idle), so a share too small leaves GPUs unused."""
    per_gpu = math.ceil(job_count(overrides) / gpus)
    return math.floor(10_000 / per_gpu) / 10_000


class GpuMemory:
    """Peak ``memory.used`` per GPU (nvidia-smi: the whole device, every process's CUDA context and allocator
    reserve, MiB) sampled every ``interval_s`` while the ``with`` block runs; ``peaks`` maps the GPU's
    nvidia-smi index and UUID to MiB. Without nvidia-smi ``peaks`` stays empty."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peaks, self.baseline = interval_s, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> dict[str, int]:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,uuid,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        found = {}
        for line in out.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[2].isdigit():
                found[parts[0]] = found[parts[1]] = int(parts[2])
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            for gpu, mb in self.sample().items():
                self.peaks[gpu] = max(mb, self.peaks.get(gpu, 0))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self.baseline = self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def predictions(path: Path) -> tuple[list[str] | None, list[list[float]] | None]:
    """The ``prediction`` column of a job's predictions.csv and its rows' ``logp_<label>`` log-likelihoods
    (None without the file; the second None without logp columns, e.g. generate mode)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        labels = [row["prediction"] for row in rows]
    except (OSError, KeyError):
        return None, None
    columns = [c for c in (rows[0] if rows else {}) if c.startswith("logp_")]
    try:
        logps = [[float(row[c]) for c in columns] for row in rows] if columns else None
    except ValueError:
        logps = None
    return labels, logps


def max_logp_gap(ours: list[list[float]] | None, theirs: list[list[float]] | None) -> float | None:
    """The largest |difference| between two jobs' log-likelihoods of the same rows and labels (None if either lacks them)."""
    if not ours or not theirs or len(ours) != len(theirs):
        return None
    return max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))


def sweep_job(job_dir: Path) -> dict:
    """One job's figures from its run directory. ``span_s``: from the start ``time_to_first_step_s`` counts
    from (its command, or its record's start in a process that already ran a job) to its last phase's end,
    taking the train phase's start as its first step (within one step)."""
    metrics = read_json(job_dir / "metrics.json") or {}
    figures, phases = headline(metrics), metrics.get("phases") or {}
    ends = [p.get("end_time") for p in phases.values() if isinstance(p, dict) and p.get("end_time")]
    train_start, ttfs = _get(phases, "train", "start_time"), figures["time_to_first_step_s"]
    span = round(ttfs + max(ends) - train_start, 2) if ends and train_start and ttfs is not None else None
    labels, logps = predictions(job_dir / "predictions.csv")
    return {
        "job": int(job_dir.name),
        "status": metrics.get("status", "missing"),
        "error": metrics.get("error"),
        "n_eval": (metrics.get("final") or {}).get("n_eval"),
        "predictions": None if labels is None else len(labels),
        "accuracy": figures["accuracy"],
        "s_per_step": figures["s_per_step"],
        "gpu_peak_mb": figures["gpu_peak_mb"],
        "time_to_first_step_s": ttfs,
        "span_s": span,
        "eval_s": _get(phases, "eval", "wall_s"),
        "startup_share": round(ttfs / span, 4) if span else None,
        "labels": labels,
        "logps": logps,
    }


def records_check(jobs: list[dict]) -> tuple[str, bool]:
    """('9/9 finished, 3399 predictions each', True), or what is wrong and False: no job, a job not finished,
    a predictions.csv whose row count is not its record's n_eval, or jobs that scored different numbers of rows."""
    finished = sum(j["status"] == "finished" for j in jobs)
    bad = [f"job {j['job']} {j['status']}" for j in jobs if j["status"] != "finished"]
    bad += [
        f"job {j['job']} {j['predictions']} predictions for n_eval {j['n_eval']}"
        for j in jobs
        if j["status"] == "finished" and (j["predictions"] is None or j["predictions"] != j["n_eval"])
    ]
    counts = sorted({j["predictions"] for j in jobs if j["predictions"] is not None})
    if len(counts) > 1:
        bad.append(f"prediction counts differ between jobs: {counts}")
    head = f"{finished}/{len(jobs)} finished" + (
        f", {counts[0]} predictions each" if len(counts) == 1 else ""
    )
    return "; ".join([head, *bad]), bool(jobs) and not bad


def sweep_row(
    name: str,
    kind: str,
    gpus: int,
    devices: list[str],
    args: argparse.Namespace,
    out: Path,
    fraction: float | None = None,
) -> dict:
    """Run one row's sweep as a subprocess on ``devices`` (CUDA_VISIBLE_DEVICES; none: the CPU); its figures."""
    sweep_dir = out / name
    cmd = [sys.executable, "run.py", *sweep_overrides(kind, gpus, args, sweep_dir, fraction)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(devices))
    with GpuMemory() as memory:
        rc, wall = launch(cmd, out / f"{name}.log", env, args.timeout)
    jobs = [
        sweep_job(d) for d in sorted(sweep_dir.glob("[0-9]*"), key=lambda d: int(d.name)) if d.name.isdigit()
    ]
    done = [j for j in jobs if j["status"] == "finished"]
    records, records_ok = records_check(jobs)
    row = {
        "row": name,
        "kind": kind,
        "gpus": gpus,
        "devices": devices,
        "command": cmd[1:],
        "returncode": rc,
        "wall_s": wall,
        "jobs": len(jobs),
        "finished": len(done),
        "jobs_per_hour": round(len(done) * 3600 / wall, 1) if wall else None,
        "ratio_to_basic": None,
        "gpu_mem_peak_mb": {d: memory.peaks.get(d) for d in devices} if memory.peaks else None,
        "gpu_mem_baseline_mb": {d: memory.baseline.get(d) for d in devices} if memory.baseline else None,
        "job_gpu_peak_mb": _max(j["gpu_peak_mb"] for j in jobs),
        **{
            k: _median(j[k] for j in done)
            for k in ("span_s", "s_per_step", "time_to_first_step_s", "startup_share", "eval_s")
        },
        "records": records,
        "same_predictions": None,
        "max_logp_gap": None,
        "log": str(out / f"{name}.log"),
        "sweep": read_json(sweep_dir / "sweep.json"),
        "jobs_detail": jobs,
    }
    ok = rc == 0 and records_ok
    row["status"] = "finished" if ok else ("timeout" if rc is None else "failed")
    if not ok:
        row["error"] = (
            f"killed after --timeout {args.timeout} s"
            if rc is None
            else records
            if jobs and not records_ok
            else last_error_line(out / f"{name}.log")
        )
    return row


def compare_rows(rows: list[dict]) -> list[dict]:
    """Each row's ratio of wall time to the basic row that ran the same sweep, and how many of its jobs
    predicted exactly what the basic row's job of the same number predicted (None where not comparable)."""
    basic = next((r for r in rows if r["kind"] == "basic" and r["status"] == "finished"), None)
    for r in rows:
        if basic is None or r is basic or r["kind"] == "pairs":
            continue
        r["ratio_to_basic"] = round(r["wall_s"] / basic["wall_s"], 3) if basic["wall_s"] else None
        theirs = {j["job"]: j for j in basic["jobs_detail"]}
        r["same_predictions"] = (
            f"{sum(j['labels'] is not None and j['labels'] == theirs.get(j['job'], {}).get('labels') for j in r['jobs_detail'])}"
            f"/{len(r['jobs_detail'])}"
        )
        gaps = [max_logp_gap(j["logps"], theirs.get(j["job"], {}).get("logps")) for j in r["jobs_detail"]]
        r["max_logp_gap"] = max(gaps) if gaps and None not in gaps else None
    if basic is not None:
        basic["ratio_to_basic"] = 1.0
    for r in rows:
        for j in r["jobs_detail"]:
            j.pop("labels", None)
            j.pop("logps", None)
    return rows


def _sweep_cell(key: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"GPU {d}: {mb}" for d, mb in value.items())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in SWEEP_FORMATS:
        return SWEEP_FORMATS[key].format(value)
    return str(value).replace("|", "\\|")


def sweep_table(rows: list[dict], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines.append("| " + " | ".join(title for _, title in SWEEP_COLUMNS) + " |")
    lines.append("|" + "|".join(" --- " for _ in SWEEP_COLUMNS) + "|")
    lines += [
        "| " + " | ".join(_sweep_cell(key, r.get(key)) for key, _ in SWEEP_COLUMNS) + " |" for r in rows
    ]
    notes = [
        f"- {r['row']}: {r['status']}: {r.get('error') or 'no error line'}"
        for r in rows
        if r["status"] != "finished"
    ]
    notes += [f"- {kind}: {text}" for kind, text in ROW_KINDS.items() if any(r["kind"] == kind for r in rows)]
    return "\n".join(lines + [""] + notes) + "\n"


def sweep_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Two horizontal bar panels per row: the sweep's wall time, and the highest GPU memory of its GPUs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = [
        max((v for v in (r.get("gpu_mem_peak_mb") or {}).values() if v is not None), default=None)
        for r in rows
    ]
    panels = [([r["wall_s"] for r in rows], "sweep wall time (s)", "{:.0f}")]
    if any(m is not None for m in mem):
        panels.append((mem, "GPU memory peak, highest GPU (MiB, nvidia-smi)", "{:.0f}"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 1.2 + 0.5 * max(len(rows), 2)), squeeze=False
    )
    for ax, (values, xlabel, fmt) in zip(axes[0], panels):
        ax.barh(
            range(len(rows)),
            [v or 0 for v in values],
            color=["tab:gray" if r["kind"] == "basic" else "tab:blue" for r in rows],
        )
        top = max([v for v in values if v] or [1])
        for i, v in enumerate(values):
            ax.text(
                (v or 0) + top * 0.01, i, fmt.format(v) if v is not None else "n/a", va="center", fontsize=9
            )
        ax.set_xlim(0, top * 1.25)
        ax.set_xlabel(xlabel)
        ax.set_yticks(range(len(rows)), [r["row"] for r in rows])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_main(args: argparse.Namespace, out: Path) -> int:
    """The same sweep under each ``--rows`` entry, one after the other, each on the first GPUs it names:

    - ``basic:K``  the basic launcher (one process, one job after the other; uses the first of its K GPUs);
    - ``packed:K`` ``hydra/launcher=ray hydra.launcher.ray.remote.num_gpus=--gpu-fraction`` on K GPUs
      (``packed:K@0.25``: that share instead; CPU:
      ``hydra.launcher.ray.remote.num_cpus=--cpus-per-job``), Ray workers as the preset decides;
    - ``fresh:K``  as packed with ``max_calls=1``: a fresh Ray worker per job (what reusing workers saves);
    - ``pairs:K``  ``launcher.num_processes=2`` jobs (2 GPUs each), the 2 x 2 ``--pairs-overrides`` sweep.
    Per row: wall time of the ``run.py -m`` command, jobs per hour, ratio to the basic row's wall time, peak
    ``memory.used`` of each of its GPUs (nvidia-smi, sampled every 0.5 s across the sweep; the device's
    whole use, CUDA contexts included) and the jobs' own allocator peak (highest job), the median job's span (its own wall time,
    :func:`sweep_job`), s/step, time to first step and start-up share (time to first step over the job's span, :func:`sweep_job`), the
    median eval phase, the records (every job finished, predictions.csv rows = its n_eval, the same count
    in every job) and how many jobs predicted exactly as the basic row's job of the same number.
    Exit code 1 when a row did not finish right."""
    gpus = visible_gpus()
    rows_spec = sweep_rows(
        args.rows
        or (
            ("basic:1,packed:1,packed:2,pairs:2" if len(gpus) >= 2 else "basic:1,packed:1")
            if gpus
            else "basic,packed"
        ),
        gpus,
    )
    args.sweep_overrides = args.sweep_overrides or (SWEEP_GPU if gpus else SWEEP_CPU)
    if args.cpus_per_job is None and not gpus:
        args.cpus_per_job = 0.5
    model = next(
        (
            o.split("=", 1)[1]
            for o in reversed(shlex.split(args.sweep_overrides) + args.set)
            if o.startswith("model=")
        ),
        None,
    )
    prepared = prepare_weights(argparse.Namespace(model=model, set=args.set)) if model else None
    if prepared is not None:
        print(
            f"[bench] random weights of {model} built and cached in {prepared} s (before any timed sweep)",
            flush=True,
        )
    rows = []
    for i, (name, kind, k, fraction) in enumerate(rows_spec, 1):
        print(f"[bench {i}/{len(rows_spec)}] {name}: {ROW_KINDS[kind]} ...", flush=True)
        row = sweep_row(name, kind, k, gpus[:k], args, out, fraction)
        print(
            f"[bench {i}/{len(rows_spec)}] {name}: {row['status']}, {row['wall_s']} s, {row['records']}"
            f"{'  -- ' + str(row.get('error')) if row['status'] != 'finished' else ''}",
            flush=True,
        )
        rows.append(row)
    compare_rows(rows)
    env = environment(rows)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("torch", "deepspeed", "ray"))
    header = f"device: {env['device']} x {len(gpus) or 'cpu'} | {env['date']} | {versions} | sweep: {args.sweep_overrides}"
    record = {
        **env,
        "sweep": True,
        "sweep_overrides": args.sweep_overrides,
        "pairs_overrides": args.pairs_overrides,
        "gpu_fraction": args.gpu_fraction,
        "cpus_per_job": args.cpus_per_job,
        "out": str(out),
        "weights_prepared_s": prepared,
        "rows": rows,
    }
    write_report(out, sweep_table(rows, header), record, lambda path: sweep_plot(rows, path, header))
    return 0 if all(r["status"] == "finished" for r in rows) else 1


def write_report(out: Path, md: str, record: dict, draw) -> None:
    """bench.md (the table ``md``), bench.json (``record``), bench.png (``draw(path)``) into ``out``; the table
    is printed last."""
    (out / "bench.md").write_text(md)
    (out / "bench.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    draw(out / "bench.png")
    print(f"\nwritten: {out}/bench.json, bench.md, bench.png (logs: {out}/*.log)\n")
    print(md, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = variants(args.config_list)
    out = Path(args.out or Path("outputs") / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        return sweep_main(args, out)
    prepared = prepare_weights(args)
    if prepared is not None:
        print(
            f"[bench] random weights of {args.model} built and cached in {prepared} s (before any timed run)",
            flush=True,
        )
    rows = []
    jobs = [("guide", c) for c in args.guide_list] + [("peftlab", v) for v in chosen]
    for i, (runner, name) in enumerate(jobs, 1):
        print(f"[bench {i}/{len(jobs)}] {runner} {name} ...", flush=True)
        row = run_guide(name, args, out) if runner == "guide" else run_peftlab(name, args, out)
        print(
            f"[bench {i}/{len(jobs)}] {runner} {name}: {row['status']}, s/step {row.get('s_per_step')}, "
            f"{row.get('wall_s')} s{'  -- ' + str(row.get('error')) if row['status'] != 'finished' else ''}",
            flush=True,
        )
        rows.append(row)
    summarize(rows)
    env = environment(rows)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("torch", "deepspeed"))
    header = (
        f"device: {env['device']} | {env['date']} | {versions} | model {args.model}, {args.epochs} epochs"
    )
    record = {
        **env,
        "model": args.model,
        "epochs": args.epochs,
        "out": str(out),
        "weights_prepared_s": prepared,
        "argv": sys.argv[1:] if argv is None else argv,
        "rows": rows,
    }
    write_report(out, table(rows, header), record, lambda path: plot(rows, path, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
