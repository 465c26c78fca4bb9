"""leaderboard.csv: one row per finished run, appended atomically under a file lock.

Runs write different columns (each task adds its metrics, stages differ by method), so a row with a
column the file lacks rewrites the file with the union of the columns (old rows get empty cells).
Every write goes to a temporary file that replaces the CSV, under `<csv>.lock`: concurrent runs
(a suite, two terminals) never interleave or lose rows, and a crash mid-write leaves the old file.

A row carries everything the report needs (scores, costs, the accuracy-vs-cost curve, gradient
variance, token fraction, peak memory), so `opd-bench report` works from the CSV alone; run folders
(with model weights) need not be kept or committed. `run_key` identifies the experiment (resolved
config, method axes, budget, world), so `opd-bench suite` can skip what is already finished.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import resource
import sys
from pathlib import Path

from filelock import FileLock

from opd_bench.errors import UserError

# The first columns, in this order; the rest follow in order of first appearance.
LEAD = ["run_id", "time", "git_commit", "preset", "method", "variant", "seed", "budget", "budget_kind", "status",
        "run_key"]
STATUSES = ("ok", "diverged", "budget-exhausted-before-eval")
# Config keys that say where and how fast a run executes, not what it computes: not part of the run key.
EXECUTION_ONLY = {"runs_dir", "leaderboard", "artifacts_dir", "threads"}
EXECUTION_ONLY_EVAL = {"workers"}


# ----------------------------------------------------------------------------- reading and appending


def read_rows(path: Path | str) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and reader.fieldnames[0] != "run_id":
            raise UserError(f"{path} is not an opd-bench leaderboard (its header starts with "
                            f"{reader.fieldnames[0]!r}, not 'run_id'); move it away or point --set leaderboard=... "
                            f"at another file")
        return list(reader)


def append_row(path: Path | str, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {k: _cell(v) for k, v in row.items()}
    with FileLock(str(path) + ".lock", timeout=120):
        rows = read_rows(path) + [row]
        columns = [c for c in LEAD if any(c in r for r in rows)]
        for r in rows:
            columns += [c for c in r if c not in columns]
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose a file whose data is not on disk yet
        os.replace(tmp, path)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return value


def finished_keys(path: Path | str) -> set[str]:
    """Run keys already in the leaderboard: a run with a row finished (ok, diverged or out of budget)."""
    return {r["run_key"] for r in read_rows(path) if r.get("run_key")}


def filter_rows(rows: list[dict], **equal: str | None) -> list[dict]:
    """Rows whose column equals the given value (None: no filter)."""
    out = rows
    for key, value in equal.items():
        if value is not None:
            out = [r for r in out if str(r.get(key, "")) == str(value)]
    return out


# ----------------------------------------------------------------------------- what a run's row holds


def run_key(cfg, ax, budget_spec: str) -> str:
    """A deterministic key of the experiment: the resolved config (minus where/how fast it runs), the
    method's axes, the budget and the world's identity. Same key = same experiment = skip in a suite."""
    data = cfg.model_dump(exclude=EXECUTION_ONLY)
    for key in EXECUTION_ONLY_EVAL:
        data["eval"].pop(key, None)
    data["method"], data["budget"] = ax.model_dump(), budget_spec
    if cfg.world.kind == "micro":  # the stage folders' names hash the world's inputs and code versions
        from opd_bench.micro.world import stage_paths

        data["world_stages"] = sorted(p.name for p in stage_paths(cfg).values())
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def variant(method, ax) -> str:
    """The axes this run sets differently from the method plugin's own choices, e.g. 'lam=1.5,tokens=q3'."""
    own = method.axes.model_dump()
    return ",".join(f"{k}={v}" for k, v in ax.model_dump().items() if k != "name" and own.get(k) != v)


def log_means(log_history: list[dict]) -> dict:
    """Means over training of the logged per-step diagnostics (trainer.log_history entries)."""
    keys = {"opd/grad_var": "grad_var", "opd/grad_norm2": "grad_norm2", "opd/tokens_kept": "tokens_kept",
            "opd/advantage_var": "advantage_var", "loss": "train_loss"}
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
    """This process's peak resident memory (Linux reports KiB, macOS bytes) and, on GPU, peak allocated."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
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


def extra_fields(cfg, method, ax, budget, ledger, metrics: dict, world) -> dict:
    """Columns beyond run.py's basic row: identity, status, cost per stage, protocol, diagnostics, curve."""
    row = {"run_key": run_key(cfg, ax, budget.spec), "variant": variant(method, ax), "status": status_of(metrics),
           "train.lr": cfg.train.lr, "train.batch_size": cfg.train.batch_size,
           "student": _model_name(world.student),
           "teacher": _model_name(world.teacher_a if ax.teacher == "consistent" else world.teacher_b)}
    tokens = {"tokens_trained": 0, "tokens_generated": 0, "tokens_scored": 0}
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
    tags = sorted(metrics.get("after", {}))
    row["tasks"] = ";".join(tags)
    for tag in tags:
        m = metrics["after"][tag]
        row[f"{tag}.temperature"] = m.get("protocol", {}).get("temperature")
        row[f"{tag}.n_problems"] = m.get("n_problems")
    for key, value in metrics.get("train", {}).items():
        row[key] = value
    # The accuracy-vs-cost curve (25/50/75/100% of the budget): [mark, device-s, FLOPs, {task: avg@k}] per point.
    row["curve"] = [[p["mark"], round(p["device_seconds"], 3), p["flops"], {t: round(v, 6) for t, v in p["avg@k"].items()}]
                    for p in metrics.get("curve", [])]
    suite = os.environ.get("OPD_BENCH_SUITE_COMMAND")
    if suite:
        row["suite_command"] = suite
    return row
