"""`opd-bench suite`: the spec, the planner and the skip of finished runs.

The planner is tested against a stand-in for `opd_bench.resolve.resolve_run` (the methods' own parameters
and labels, a key that hashes the resolved experiment), so it is pinned whatever the state of run resolution;
the tests at the end use the real resolution once it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from opd_bench import suite
from opd_bench.errors import UserError
from opd_bench.methods.base import get
from opd_bench.suite import Arm, RunSpec, arm, load_spec, parse_sweep, plan

REPO = Path(__file__).resolve().parent.parent
EXECUTION = ("runs_dir", "leaderboard", "eval.workers", "threads", "artifacts_dir")


def fake_resolve(kind: str = "micro", teacher_b: str = ""):
    def resolve(preset, method, *, seed, budget, overrides):
        m = get(method)
        params = {o.split("=", 1)[0][len("method.params."):]: yaml.safe_load(o.split("=", 1)[1])
                  for o in overrides if o.startswith("method.params.")}
        p = m.params(params)  # a param the method lacks: a UserError, as in the real resolution
        other = sorted(o for o in overrides if not o.startswith(("method.params.", *EXECUTION)))
        spec = budget or "30s"
        key = hashlib.sha256(json.dumps([method, p.model_dump(mode="json"), other, seed, spec]).encode()).hexdigest()
        cfg = SimpleNamespace(world=SimpleNamespace(kind=kind, hf=SimpleNamespace(teacher_b=teacher_b)))
        return SimpleNamespace(cfg=cfg, key=key[:16], label=m.label(p), budget=SimpleNamespace(spec=spec),
                               uses_teacher_b=m.data(p).teacher.value == "inconsistent", params=p, method=m)
    return resolve


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(suite, "resolve", fake_resolve())


def _core(preset="smoke"):
    return [arm(a) for a in load_spec(preset)["core"]]


# ----------------------------------------------------------------------------- the spec


def test_specs_extend_and_every_arm_names_a_method_and_its_real_params():
    micro, big = load_spec("micro"), load_spec("lightning-8b")
    assert load_spec("smoke") == micro  # smoke.yaml: `extends: micro` and nothing else
    assert big["claims"]["lightning-speedup"]["threshold"] == 4.0 and micro["claims"]["lightning-speedup"][
        "threshold"] == 3.6
    assert big["paper"]["student"] == "Qwen3-8B-Base" and big["paper"]["arms"] == load_spec("lightning-4b")["paper"][
        "arms"]  # deep-merged
    assert [a.params for a in map(arm, big["sweeps"]["vopd-baseline"])] == [{"top_k": None}, {"top_k": 100}]
    for name in ("micro", "lightning-4b", "lightning-8b"):
        spec = load_spec(name)
        entries = [*spec["core"], *[a for g in spec["sweeps"].values() for a in g],
                   *[a for t in spec["tables"].values() for a in t["arms"]],
                   *[a for f in spec["figures"].values() if f["arms"] != "core" for a in f["arms"]],
                   *[c[k] for c in spec["claims"].values() for k in ("a", "b") if k in c]]
        for a in map(arm, entries):
            if a.method != "pi_sft":
                get(a.method).params(a.params)  # the method exists and accepts the params
        for c in spec["claims"].values():
            assert c["kind"] in ("greater", "less", "matches", "below", "above", "speedup") and c["text"] and c["paper"]
    with pytest.raises(UserError, match="no suite spec"):
        load_spec("nonexistent")
    with pytest.raises(UserError, match="bad arm"):
        arm({"method": "tip", "parms": {}})


def test_an_arm_matches_rows_by_method_and_params():
    def run(method, changed, **params):
        return SimpleNamespace(method=method, changed=changed, params={**params, **changed})

    default = run("tip", {}, rule="entropy", loss="reverse-kl")
    q3 = run("tip", {"rule": "q3"}, loss="reverse-kl")
    sampled_q3 = run("tip", {"rule": "q3", "loss": "sampled"})
    assert Arm("tip").matches(default) and not Arm("tip").matches(q3)
    assert Arm("tip", {"rule": "q3"}).matches(q3) and not Arm("tip", {"rule": "q3"}).matches(sampled_q3)
    assert Arm("tip", {"rule": "q3", "loss": "sampled"}).matches(sampled_q3)
    assert Arm("tip", {"rule": "entropy", "loss": "reverse-kl"}).matches(default)  # a default named explicitly
    assert not Arm("vopd").matches(default) and not Arm("tip", {"rule": "soft-or"}).matches(default)
    assert Arm("exopd", {"lam": 1.0}).matches(run("exopd", {"lam": 1.0}))  # YAML 1.0 vs the row's JSON 1.0
    assert Arm("exopd", {"lam": 1.0}).name == "exopd [lam=1.0]"
    assert Arm("vopd", {"top_k": None}).overrides() == ("method.params.top_k=null",)


# ----------------------------------------------------------------------------- the plan


def test_core_plan_is_every_core_arm_for_every_seed_in_order(fake):
    specs, notes = plan("smoke", seeds=2, core=True)
    assert [(s.method, s.seed) for s in specs] == [(a.method, seed) for seed in (0, 1) for a in _core()]
    assert {s.group for s in specs} == {"core"} and not notes
    assert len({s.key for s in specs}) == len(specs) and not any(s.done for s in specs)
    assert all(s.budget == "30s" for s in specs)  # the resolved budget, written out
    assert specs[0].label == "standard-opd s0"


def test_full_plan_adds_each_sweep_once(fake):
    specs, _ = plan("smoke", seeds=1, budget="1m")
    extra = sorted(s.name for s in specs if s.group != "core")
    # lambda 1.25, TIP entropy-50, vOPD full and inconsistent-offline resolve to core runs: not repeated
    assert extra == sorted(["exopd [lam=1.0]", "exopd [lam=1.5]", "tip [rule=soft-or]", "tip [rule=q3]",
                            "tip [loss=sampled]", "vopd [top_k=10]", "dagger-sft [target=argmax]",
                            "standard-opd [teacher=inconsistent]"])
    assert len(specs) == len(_core()) + 8 and all(s.budget == "1m" for s in specs)
    q3 = next(s for s in specs if s.name == "tip [rule=q3]")
    assert q3.argv("smoke", ("eval.workers=1",))[-6:] == ["--set", "eval.workers=1", "--set", "method.params.rule=q3",
                                                          "--set", "method.params.loss=reverse-kl"]


def test_sweeps_run_each_core_arm_at_each_value_and_skip_arms_without_the_param(fake):
    specs, notes = plan("smoke", seeds=1, core=True, sweep=parse_sweep(["lr=1e-2,3e-2"]))
    swept = [s for s in specs if s.group.startswith("sweep")]
    assert [(s.method, s.overrides) for s in swept] == [(a.method, (*a.overrides(), f"train.lr={v}"))
                                                        for v in ("1e-2", "3e-2") for a in _core()]
    specs, notes = plan("smoke", seeds=1, core=True, sweep=parse_sweep(["method.params.clip_eps=0.1"]))
    swept = {s.method for s in specs if s.group.startswith("sweep")}
    assert "full-kl" not in swept and "sft-continue" not in swept and "standard-opd" in swept
    assert any("full-kl" in n and "no parameter 'clip_eps'" in n for n in notes)
    assert parse_sweep(["train.lr=1,2", "method.params.lam=1.5"]) == {"train.lr": ["1", "2"],
                                                                     "method.params.lam": ["1.5"]}
    for bad in ("lr", "lr=", "=1,2"):
        with pytest.raises(UserError, match="bad --sweep"):
            parse_sweep([bad])


def test_finished_runs_are_marked_done_and_methods_filter(fake):
    specs, _ = plan("smoke", seeds=2, core=True)
    key = next(s.key for s in specs if s.method == "vopd" and s.seed == 1)
    specs, _ = plan("smoke", seeds=2, core=True, finished={key}, methods=("vopd", "tip"))
    assert [(s.method, s.seed, s.done) for s in specs] == [("vopd", 0, False), ("tip", 0, False),
                                                           ("vopd", 1, True), ("tip", 1, False)]
    with pytest.raises(UserError, match="did you mean"):
        plan("smoke", seeds=1, methods=("vopdd",))


def test_a_paper_world_without_a_second_teacher_leaves_its_arms_out(monkeypatch):
    monkeypatch.setattr(suite, "resolve", fake_resolve(kind="hf"))
    specs, notes = plan("smoke", seeds=1)
    assert not any(s.method == "inconsistent-offline" or "inconsistent" in s.name for s in specs)
    assert notes == ["inconsistent-offline: left out, needs a second teacher (--set world.hf.teacher_b=...)",
                     "standard-opd [teacher=inconsistent]: left out, needs a second teacher "
                     "(--set world.hf.teacher_b=...)"]
    monkeypatch.setattr(suite, "resolve", fake_resolve(kind="hf", teacher_b="/models/b"))
    assert not plan("smoke", seeds=1)[1]


def test_the_cli_reads_its_plan_from_the_spec(fake, capsys):
    from opd_bench.cli import suite as command

    command(seeds=1, workers=1, budget=None, sweep=None, core=True, method=None, dry_run=True,
            report_out=Path("reports"), make_report=False, preset="smoke", set_=None)
    out = capsys.readouterr().out
    assert "core" in out and "tip s0" in out and f"{len(_core())} runs" in out


# ----------------------------------------------------------------------------- with the real resolution


def _real():
    pytest.importorskip("opd_bench.resolve", reason="run resolution (opd_bench/resolve.py) not there yet")
    from opd_bench.resolve import resolve_run

    return resolve_run


def test_run_key_depends_on_the_experiment_only():
    resolve_run = _real()

    def key(method="standard-opd", seed=0, budget="30s", overrides=()):
        return resolve_run("smoke", method, seed=seed, budget=budget, overrides=list(overrides)).key

    base = key()
    assert key(overrides=("runs_dir=/elsewhere", "leaderboard=x.csv", "eval.workers=1", "threads=2",
                          "artifacts_dir=artifacts/smoke")) == base  # where and how fast: the same experiment
    assert key(overrides=("method.params.rollouts=online",)) == base  # the method's own value, set again
    for different in (key(seed=1), key(budget="31s"), key(overrides=("train.lr=0.02",)), key("exopd"),
                      key(overrides=("method.params.teacher=inconsistent",)),
                      key(overrides=("world.sft_prompts=49",))):  # another world
        assert different != base


@pytest.mark.slow
def test_suite_runs_then_skips_what_is_finished(tmp_path):
    """One smoke run through `opd-bench suite`; the row's run key is the planner's, so a second suite skips it."""
    _real()
    from opd_bench.leaderboard import finished_keys, read_rows

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
    assert rows[0]["label"] == "standard-opd" and json.loads(rows[0]["params_changed"]) == {}
    assert "opd-bench suite --preset smoke" in rows[0]["suite_command"]
    assert float(rows[0]["grad_var"]) == float(rows[0]["grad_var"])  # measured (not NaN) every logging step
    assert (tmp_path / "runs" / "suite-logs").is_dir()
    specs, _ = plan("smoke", seeds=1, core=True, budget="2s", methods=("standard-opd",), common=tuple(sets),
                    finished=finished_keys(tmp_path / "lb.csv"))
    assert [s.done for s in specs] == [True] and rows[0]["run_key"] == specs[0].key
