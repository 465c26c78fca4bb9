"""leaderboard.csv: one row per finished run, appended atomically under a file lock.

Runs write different columns (each task adds its metrics, stages differ by method), so a row with a
column the file lacks rewrites the file with the union of the columns (old rows get empty cells).
Every write goes to a temporary file that replaces the CSV, under `<csv>.lock`: concurrent runs
(a suite, two terminals) never interleave or lose rows, and a crash mid-write leaves the old file.

A row carries everything the report needs (scores, costs, the accuracy-vs-cost curve, gradient
variance, token fraction, peak memory; built by row.py), so `opd-bench report` works from the CSV alone;
run folders (with model weights) need not be kept or committed. `run_key` identifies the experiment
(resolve.run_key), so `opd-bench suite` can skip what is already finished.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from filelock import FileLock

from opd_bench.errors import UserError

# The first columns, in this order; the rest follow in order of first appearance.
LEAD = ["run_id", "time", "git_commit", "preset", "method", "label", "seed", "budget", "budget_kind", "status",
        "run_key", "params", "params_changed"]
STATUSES = ("ok", "diverged", "budget-exhausted-before-eval")


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
