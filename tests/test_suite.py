"""`opd-bench suite`: the planner builds the documented run list, keys identify experiments (and only
them), finished runs are skipped; end to end on the smoke world, a second suite runs nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_bench.errors import UserError
from opd_bench.leaderboard import finished_keys, read_rows, run_key
from opd_bench.suite import CORE, RunSpec, parse_sweep, plan, resolved

REPO = Path(__file__).resolve().parent.parent


def _key(preset, method, seed=0, budget="30s", overrides=()):
    cfg, ax = resolved(preset, RunSpec("t", method, seed, budget, tuple(overrides)), ())
    return run_key(cfg, ax, budget)


def test_core_plan_is_every_core_method_for_every_seed_in_order():
    specs, notes = plan("smoke", seeds=2, core=True)
    assert [(s.method, s.seed) for s in specs] == [(m, seed) for seed in (0, 1) for m in CORE]
    assert {s.group for s in specs} == {"core"} and not notes
    assert len({s.key for s in specs}) == len(specs) and not any(s.done for s in specs)
    assert all(s.budget == "30s" for s in specs)  # the preset's budget, written out explicitly


def test_full_plan_adds_each_sweep_once():
    specs, _ = plan("smoke", seeds=1, budget="1m")
    extra = [(s.method, s.overrides) for s in specs if s.group != "core"]
    # lambda 1.25, TIP entropy-50 / all, vOPD full and inconsistent-offline are core runs already: not repeated
    assert sorted(extra) == sorted([
        ("exopd", ("method.lam=1.0",)), ("exopd", ("method.lam=1.5",)),
        ("tip", ("method.tokens=soft-or", "method.fraction=0.5")), ("tip", ("method.tokens=q3",)),
        ("vopd", ("method.top_k=10",)), ("standard-opd", ("method.teacher=inconsistent",))])
    assert len(specs) == len(CORE) + 6 and all(s.budget == "1m" for s in specs)


def test_lr_sweep_runs_each_core_method_at_each_new_rate():
    specs, _ = plan("smoke", seeds=1, core=True, sweep=parse_sweep(["lr=1e-2,3e-2"]))  # 1e-2 is smoke's shared lr
    swept = [s for s in specs if s.group.startswith("sweep")]
    assert [(s.method, s.overrides) for s in swept] == [(m, ("train.lr=3e-2",)) for m in CORE]
    assert parse_sweep(["train.lr=1,2", "method.lam=1.5"]) == {"train.lr": ["1", "2"], "method.lam": ["1.5"]}
    for bad in ("lr", "lr=", "=1,2"):
        with pytest.raises(UserError, match="bad --sweep"):
            parse_sweep([bad])


def test_finished_runs_are_marked_done_and_methods_filter():
    key = _key("smoke", "vopd", seed=1)
    specs, _ = plan("smoke", seeds=2, core=True, finished={key}, methods=("vopd", "tip"))
    assert [(s.method, s.seed, s.done) for s in specs] == [("vopd", 0, False), ("tip", 0, False),
                                                           ("vopd", 1, True), ("tip", 1, False)]
    with pytest.raises(UserError, match="did you mean"):
        plan("smoke", seeds=1, methods=("vopdd",))


def test_run_key_depends_on_the_experiment_only():
    base = _key("smoke", "standard-opd")
    # where and how fast a run executes: the same experiment
    assert _key("smoke", "standard-opd", overrides=("runs_dir=/elsewhere", "leaderboard=x.csv", "eval.workers=1",
                                                    "threads=2", "artifacts_dir=artifacts/smoke")) == base
    assert _key("smoke", "standard-opd", overrides=("method.lam=1",)) == base  # the method's own value, set again
    for different in (_key("smoke", "standard-opd", seed=1), _key("smoke", "standard-opd", budget="31s"),
                      _key("smoke", "standard-opd", overrides=("train.lr=0.02",)), _key("smoke", "exopd"),
                      _key("smoke", "standard-opd", overrides=("method.teacher=inconsistent",)),
                      _key("smoke", "standard-opd", overrides=("world.sft_prompts=49",))):  # another world
        assert different != base


@pytest.mark.slow
def test_suite_runs_then_skips_what_is_finished(tmp_path):
    """One smoke run through `opd-bench suite`; the row's run key is the planner's, so a second suite skips it."""
    sets = [f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv", "eval.curve=[0.5]", "eval.n_per_split=1",
            "train.logging_steps=1"]
    args = [sys.executable, "-m", "opd_bench.cli", "suite", "--preset", "smoke", "--seeds", "1", "--core",
            "--method", "standard-opd", "--budget", "2s", "--workers", "1", "--no-report",
            *[arg for s in sets for arg in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_QUIET": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "suite: 1 runs finished, 0 failed, 0 skipped" in proc.stdout
    rows = read_rows(tmp_path / "lb.csv")
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["method"] == "standard-opd"
    assert "opd-bench suite --preset smoke" in rows[0]["suite_command"]
    assert float(rows[0]["grad_var"]) == float(rows[0]["grad_var"])  # measured (not NaN) every logging step
    assert (tmp_path / "runs" / "suite-logs").is_dir()

    # What a second `opd-bench suite` would plan: the run is finished (the suite and `opd-bench run` agree on
    # the key), so nothing is left to run.
    specs, _ = plan("smoke", seeds=1, core=True, budget="2s", methods=("standard-opd",), common=tuple(sets),
                    finished=finished_keys(tmp_path / "lb.csv"))
    assert [s.done for s in specs] == [True] and rows[0]["run_key"] == specs[0].key
