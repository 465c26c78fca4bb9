"""A run's leaderboard row, built once from what the run recorded: identity (method, label, parameters), spend
by stage, scores before and after, the protocol, the training diagnostics and the accuracy-vs-cost curve."""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def build_row(r, run_id: str, ledger, metrics: dict, world, command: str | None) -> dict:
    cfg, budget = r.cfg, r.budget
    row = {"run_id": run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "preset": cfg.preset, "method": r.method.name, "label": r.label,
           "seed": cfg.seed, "budget": budget.spec, "budget_kind": budget.kind, "budget_clock": budget.clock,
           "status": status_of(metrics),
           "run_key": r.key, "params": r.params.model_dump(mode="json"), "params_changed": r.params_changed,
           "spent_device_s": metrics["spent"]["device_seconds"],
           "spent_modeled_s": metrics["spent"].get("modeled_seconds"), "spent_flops": metrics["spent"]["flops"],
           "spent_fraction": metrics["spent"]["fraction"], "steps": metrics["steps"],
           "stopped_by": metrics["stopped_by"]}
    row.update(launch_of(ledger))
    tokens = {"tokens_trained": 0, "tokens_generated": 0, "tokens_scored": 0}
    for stage in ledger.stages:
        if stage.extra.get("charged") or (stage.stage.startswith("eval") and not stage.cached):
            key = "eval" if stage.stage.startswith("eval@") else stage.stage
            row[f"device_s.{key}"] = row.get(f"device_s.{key}", 0.0) + stage.device_seconds
            row[f"modeled_s.{key}"] = row.get(f"modeled_s.{key}", 0.0) + stage.modeled_seconds
    before, after = metrics["before"], metrics["after"]
    for tag, m in after.items():
        row[f"{tag}.avg@k"] = m["avg@k"]
        row[f"{tag}.pass@k"] = m["pass@k"]
        row[f"{tag}.k"] = m["k"]
        if tag in before:
            row[f"{tag}.base_avg@k"] = before[tag]["avg@k"]
        if "greedy" in m:  # beside a sampled primary metric (the card's greedy_beside)
            row[f"{tag}.greedy"] = m["greedy"]["accuracy"]
            if "greedy" in before.get(tag, {}):
                row[f"{tag}.base_greedy"] = before[tag]["greedy"]["accuracy"]
    row["command"] = command or (f"opd-bench run --method {r.method.name} --budget {budget.spec} "
                                 f"--preset {cfg.preset} --seed {cfg.seed}")
    row["run_dir"] = str(Path(cfg.runs_dir) / run_id)
    row["host_cpus"] = os.cpu_count()
    row.update({"train.lr": cfg.train.lr, "train.batch_size": cfg.train.batch_size,
                "student": _model_name(world.student), "teacher": _model_name(metrics.get("teacher") or "")})
    for stage in ledger.stages:
        if stage.extra.get("charged"):
            row[f"flops.{stage.stage}"] = row.get(f"flops.{stage.stage}", 0.0) + stage.flops
            for key in tokens:
                tokens[key] += getattr(stage, key)
    row.update(tokens)
    row.update(peak_memory_mb())
    wall = process_wall_seconds()
    if wall is not None:
        row["process_wall_s"] = wall
    tags = sorted(after)
    row["tasks"] = ";".join(tags)
    for tag in tags:
        row[f"{tag}.temperature"] = after[tag].get("protocol", {}).get("temperature")
        row[f"{tag}.n_problems"] = after[tag].get("n_problems")
    row.update(metrics.get("train", {}))
    # The accuracy-vs-cost curve (25/50/75/100% of the budget): [mark, device-s, FLOPs, {task: avg@k}] per point.
    row["curve"] = [[p["mark"], round(p["device_seconds"], 3), p["flops"], {t: round(v, 6) for t, v in p["avg@k"].items()}]
                    for p in metrics.get("curve", [])]
    suite = os.environ.get("OPD_BENCH_SUITE_COMMAND")
    if suite:
        row["suite_command"] = suite
    return row


def launch_of(ledger) -> dict:
    """Where training ran (its last attempt): processes (the launcher's world size), devices charged (processes +
    a teacher server's GPUs), and, when a server was used, its address and whether its top-k stood for the
    teacher's distribution (an approximation)."""
    attempts = [s for s in ledger.stages if s.stage == "train"]
    if not attempts:
        return {"processes": 1, "devices": 1}
    last = attempts[-1]
    out = {"processes": last.extra.get("processes", last.devices), "devices": last.devices}
    if last.extra.get("teacher_server"):
        out.update({"teacher_server": last.extra["teacher_server"],
                    "teacher_server_devices": last.extra.get("server_devices", 0),
                    "teacher_approximation": last.extra.get("approximation") or "none: sampled-token log-probs"})
    return out


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_means(log_history: list[dict]) -> dict:
    """Means over training of the logged per-step diagnostics (trainer.log_history entries)."""
    keys = {"opd/grad_var": "grad_var", "opd/grad_norm2": "grad_norm2", "opd/tokens_kept": "tokens_kept",
            "opd/advantage_var": "advantage_var", "opd/loss_peak_mb": "loss_peak_mb", "loss": "train_loss"}
    out = {}
    for key, name in keys.items():
        values = [e[key] for e in log_history if isinstance(e.get(key), (int, float))]
        if values:
            finite = [v for v in values if math.isfinite(v)]
            out[name] = sum(finite) / len(finite) if len(finite) == len(values) else float("nan")
    return out


def status_of(metrics: dict) -> str:
    """ok / diverged (a non-finite training loss or score) / budget-exhausted-before-eval (the precompute
    alone spent the budget: nothing was trained, the evaluated model is pi_sft)."""
    scores = [m.get("avg@k") for m in metrics.get("after", {}).values()]
    if metrics.get("status") == "diverged" or not math.isfinite(metrics.get("train", {}).get("train_loss", 0.0)) or \
            any(s is None or not math.isfinite(s) for s in scores):
        return "diverged"
    if str(metrics.get("stopped_by", "")).startswith("budget (precompute)"):
        return "budget-exhausted-before-eval"
    return "ok"


def peak_memory_mb() -> dict:
    """This process's peak resident memory (Linux reports KiB, macOS bytes) and, on GPU, peak allocated (the loss's
    own peak, `loss_peak_mb`, is the trainer's: log_means)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    try:
        import torch

        if torch.cuda.is_available():
            from opd_bench.memory import process_peak_gpu_bytes

            out["peak_gpu_mb"] = process_peak_gpu_bytes() / 2**20  # across the loss measurement's reset
    except ImportError:  # pragma: no cover
        pass
    return out


def process_wall_seconds() -> float | None:
    """Seconds since this process started (a suite runs each run in its own process: the run's wall time)."""
    try:
        import time

        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a missing or failing psutil only loses this column
        return None


def _model_name(model) -> str:
    """A local folder's name (micro stages: `sft-student-<hash of inputs>`), else the hub id as given."""
    return Path(str(model)).name if Path(str(model)).exists() else str(model)
