"""Determinism: the same seed on the same CPU gives the same run, number for number.

Two smoke runs of standard-opd (online: the student samples every step, the teacher scores) under a FLOP
budget, so that where training stops and where the curve evaluation falls do not depend on the clock.
Everything but timings must be identical: scores before/after and on the curve, steps, FLOPs and tokens,
the logged training losses and signals, the per-sample completions, and the trained weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TIMING = ("seconds", "fraction", "runtime", "per_second", "step_time", "run_id")


def untimed(data):
    """`data` without the wall-clock numbers (device-seconds, budget fraction of a time budget, step times)."""
    if isinstance(data, dict):
        return {k: untimed(v) for k, v in data.items() if not any(t in k for t in TIMING)}
    if isinstance(data, list):
        return [untimed(v) for v in data]
    return data


def _run(cfg, tmp: Path, name: str) -> Path:
    from opd_bench.config import load_config
    from opd_bench.run import run

    # ~2.1e7 FLOPs per step: stops at step 5; the 50% curve point falls on a fixed step, evaluated on 2 problems
    cfg = load_config("smoke", [f"artifacts_dir={cfg.artifacts_dir}", f"runs_dir={tmp}/{name}",
                                f"leaderboard={tmp}/{name}.csv", "eval.curve=[0.5]", "train.max_steps=50"])
    metrics = run(cfg, "standard-opd", "1e8flop")
    assert metrics["stopped_by"] == "budget" and metrics["steps"] >= 3
    return Path(cfg.runs_dir) / metrics["run_id"]


@pytest.mark.slow
def test_same_seed_same_cpu_gives_identical_metrics(smoke_world, tmp_path):
    from safetensors.torch import load_file

    cfg, _ = smoke_world
    a, b = _run(cfg, tmp_path, "a"), _run(cfg, tmp_path, "b")
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (a, b)]
    assert [p["mark"] for p in metrics[0]["curve"]] == [0.0, 0.5, 1.0]
    assert metrics[0]["spent"]["flops"] > 0 and metrics[0]["after"]
    for m in metrics:  # what this process built: the first run also builds the shared pi_sft evaluation
        del m["ledger"]["all"]
    assert untimed(metrics[0]) == untimed(metrics[1])  # exact: floats compared bit for bit
    logs = [[untimed(json.loads(line)) for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert logs[0] == logs[1] and any("loss" in entry for entry in logs[0])
    for task in ("micro-math-v1", "micro-code-v1"):
        assert (a / "eval" / task / "samples.jsonl").read_bytes() == (b / "eval" / task / "samples.jsonl").read_bytes()
    weights = [load_file(str(d / "model" / "model.safetensors")) for d in (a, b)]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])
