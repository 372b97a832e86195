"""Speed and memory of the PEFT guide's comparison on whatever device is here: ``python -m peftlab.bench``.

Usage::

    python -m peftlab.bench                                   # defaults for this device (GPU or CPU)
    python -m peftlab.bench --configs none,stage3_cpu --epochs 3
    python -m peftlab.bench --guide .bench_guide --data-dir ../shared/data/twitter_complaints
    python -m peftlab.bench --eval-both --set save_adapter=false --out outputs/bench/try1
    make bench ARGS="--configs stage3,stage3_cpu"

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
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
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
    "stage3_cpu_guide": ["zero=stage3_cpu_guide"],      # the guide's DeepSpeed settings, untuned
    "stage3_cpu": ["zero=stage3_cpu"],
    "stage3_cpu_bf16": ["zero=stage3_cpu", "train.mixed_precision=bf16"],
    # the capacity run (--model bloomz_7b1_arch): bf16, activations recomputed in backward
    "stage3_cpu_bf16_ckpt": ["zero=stage3_cpu", "train.mixed_precision=bf16", "train.gradient_checkpointing=true"],
}
# The guide's script under its two accelerate configs: name -> (config file in assets/, TRACKER).
GUIDE_CONFIGS: dict[str, tuple[str, str]] = {
    "zero3_cpu": ("ds_zero3_cpu.yaml", "busy"),  # the guide as written
    "zero3": ("ds_zero3.yaml", "off"),
}
# The guide's hyper-parameters; the model, epochs and variant come on top.
BASE_OVERRIDES = ["peft=lora", "peft.r=8", "peft.lora_alpha=32", "train.lr=3e-3", "train.batch_size=8", "eval.mode=score"]

COLUMNS = [("runner", "runner"), ("config", "config"), ("s_per_step", "s/step"), ("tokens_per_s", "tokens/s"),
           ("gpu_peak_mb", "GPU peak MB"), ("cpu_peak_mb", "CPU peak MB"), ("eval_s_score", "eval s (score)"),
           ("eval_s_generate", "eval s (generate)"), ("eval_rows", "eval rows"),
           ("time_to_first_step_s", "time to first step s"), ("ratio_to_guide", "ratio to guide"), ("status", "status")]
FORMATS = {"s_per_step": "{:.4g}", "tokens_per_s": "{:.0f}", "gpu_peak_mb": "{:.0f}", "cpu_peak_mb": "{:.0f}",
           "eval_s_score": "{:.2f}", "eval_s_generate": "{:.2f}", "time_to_first_step_s": "{:.1f}",
           "ratio_to_guide": "{:.2f}"}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def repo_root() -> Path:
    """The checkout holding run.py and conf/: above this package (src layout), else the working directory."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "run.py").is_file() and (candidate / "conf").is_dir():
            return candidate
    raise SystemExit("error: run.py and conf/ not found above the peftlab package nor in the working directory")


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
    return merge_overrides([f"model={args.model}"], BASE_OVERRIDES, [f"train.epochs={args.epochs}"],
                           VARIANTS[variant], extra, args.set, [f"hydra.run.dir={run_dir}"])


def launch(cmd: list[str], log_path: Path, env: dict, timeout: float | None) -> tuple[int | None, float]:
    """Run ``cmd`` from the repo root, output into ``log_path``; (exit code or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a timeout ends launcher and workers
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
    rc, wall = launch([sys.executable, "run.py", *overrides], out / f"{variant}.log", dict(os.environ), args.timeout)
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
        "runner": "peftlab", "config": variant, "guide_config": guide_config_for(variant),
        "status": metrics.get("status", "missing"), "error": metrics.get("error"),
        **{k: figures[k] for k in ("s_per_step", "tokens_per_s", "gpu_peak_mb", "gpu_peak_reserved_mb", "cpu_peak_mb",
                                   "accuracy", "time_to_first_step_s")},
        "eval_s_score": final.get("eval_s_score", eval_wall if eval_mode == "score" else None),
        "eval_s_generate": final.get("eval_s_generate", eval_wall if eval_mode == "generate" else None),
        "eval_rows": final.get("n_eval"),
        "agreement": final.get("agreement"), "generate_exact": final.get("generate_exact"),
        "phase_wall_s": {k: p.get("wall_s") for k, p in phases.items()},
        "run_wall_s": metrics.get("wall_s"),
        "epochs": [{k: e.get(k) for k in ("epoch", "s_per_step", "tokens_per_s", "loss")} for e in metrics.get("epochs") or []],
        "ratio_to_guide": None,
    }


def guide_row(result: dict | None, config: str, eval_rows: int | None = None) -> dict:
    """The figures of the guide script's result JSON; steady state = epochs after the first."""
    epochs = (result or {}).get("epochs") or []
    steady = epochs[1:] or epochs
    return {
        "runner": "guide", "config": config, "status": "finished" if epochs else "failed", "error": None,
        "tracker": (result or {}).get("tracker"), "zero3": (result or {}).get("zero3"),
        "s_per_step": _median(e.get("s_per_it") for e in steady),
        "tokens_per_s": None,
        "gpu_peak_mb": _max([e.get("gpu_peak_mb") for e in epochs] + [e.get("eval_gpu_peak_mb") for e in epochs]),
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
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(guide / "assets" / assets_cfg),
           str(guide / "guide_script.py")]
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
            r["ratio_to_guide"] = round(r["s_per_step"] / base, 3) if base and r.get("s_per_step") is not None else None
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
    notes = [f"- {r['runner']} {r['config']}: {r['status']}: {r.get('error') or 'no error line'}"
             for r in rows if r["status"] != "finished"]
    notes += [f"- {r['config']}: score vs generate agreement {_or_na(r.get('agreement'))} (rows where generate gave a label), "
              f"generate exact {_or_na(r.get('generate_exact'))}"
              for r in rows if r.get("agreement") is not None or r.get("generate_exact") is not None]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Two horizontal bar panels, s/step and GPU peak MB per run; guide and peftlab in different colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"guide": "tab:orange", "peftlab": "tab:blue"}
    labels = [f"{r['runner']} {r['config']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * max(len(rows), 2)), sharey=True)
    for ax, key, xlabel in ((axes[0], "s_per_step", "seconds per step (median, steady state)"),
                            (axes[1], "gpu_peak_mb", "GPU peak allocated (MB)")):
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
    for name in ("torch", "deepspeed", "transformers", "peft", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"device": device, "date": datetime.now().astimezone().isoformat(timespec="seconds"), "versions": found}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = cuda_available()
    p = argparse.ArgumentParser(prog="python -m peftlab.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bart_large_arch" if gpu else "tiny_bart", help="conf/model/<name> (default: %(default)s)")
    p.add_argument("--configs", default="none,stage2,stage3,stage3_cpu,stage3_cpu_bf16" if gpu else "none,stage2,stage3_cpu",
                   help=f"comma list of {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4 if gpu else 2, help="epochs per run, peftlab and guide (default: %(default)s)")
    p.add_argument("--guide", help="folder with guide_script.py and assets/: also run the guide's script")
    p.add_argument("--guide-configs", default=",".join(GUIDE_CONFIGS), help="with --guide: comma list of %(default)s")
    p.add_argument("--data-dir", help="RAFT-layout twitter_complaints folder (train.csv, test.csv) for every run")
    p.add_argument("--out", help="output folder (default: outputs/bench/<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override for every peftlab run (repeatable)")
    p.add_argument("--eval-both", action="store_true", help="eval.mode=both in the stage3_cpu run: score and generate timed on one model")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is killed (default: none)")
    args = p.parse_args(argv)
    bad = [s for s in args.set if "=" not in s]
    if bad:
        p.error(f"--set needs KEY=VALUE, got {bad[0]!r}")
    args.config_list = [c for c in args.configs.split(",") if c]
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

    overrides = [o for o in merge_overrides([f"model={args.model}"], BASE_OVERRIDES, args.set) if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if cfg.model.pretrained or not cfg.model.get("materialize", True):
        return None
    start = time.perf_counter()
    modeling.random_weights(cfg, len(cfg.dataset.labels))
    return round(time.perf_counter() - start, 2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = variants(args.config_list)
    out = Path(args.out or Path("outputs") / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_weights(args)
    if prepared is not None:
        print(f"[bench] random weights of {args.model} built and cached in {prepared} s (before any timed run)", flush=True)
    rows = []
    jobs = [("guide", c) for c in args.guide_list] + [("peftlab", v) for v in chosen]
    for i, (runner, name) in enumerate(jobs, 1):
        print(f"[bench {i}/{len(jobs)}] {runner} {name} ...", flush=True)
        row = run_guide(name, args, out) if runner == "guide" else run_peftlab(name, args, out)
        print(f"[bench {i}/{len(jobs)}] {runner} {name}: {row['status']}, s/step {row.get('s_per_step')}, "
              f"{row.get('wall_s')} s{'  -- ' + str(row.get('error')) if row['status'] != 'finished' else ''}", flush=True)
        rows.append(row)
    summarize(rows)
    env = environment(rows)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("torch", "deepspeed"))
    header = f"device: {env['device']} | {env['date']} | {versions} | model {args.model}, {args.epochs} epochs"
    md = table(rows, header)
    (out / "bench.md").write_text(md)
    (out / "bench.json").write_text(json.dumps({**env, "model": args.model, "epochs": args.epochs, "out": str(out),
                                                "weights_prepared_s": prepared,
                                                "argv": sys.argv[1:] if argv is None else argv, "rows": rows},
                                               indent=2, default=str) + "\n")
    plot(rows, out / "bench.png", header)
    print(f"\nwritten: {out}/bench.json, bench.md, bench.png (logs: {out}/*.log)\n")
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
