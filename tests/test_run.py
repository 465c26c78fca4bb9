"""`opd-bench run` end to end on the smoke world: run folder, ledger, leaderboard, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from multiprocessing import get_context
from pathlib import Path

import pytest

from opd_bench.leaderboard import append_row, read_rows

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "opd_bench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_run_writes_a_run_folder_a_balanced_ledger_and_a_leaderboard_row(tmp_path):
    """lightning-opd (offline: rollouts + teacher precompute charged to the budget), with curve evaluations."""
    lb = tmp_path / "lb.csv"
    proc = _cli("run", "--method", "lightning-opd", "--budget", "20s", "--preset", "smoke", "--seed", "3",
                "--set", f"runs_dir={tmp_path}/runs", "--set", f"leaderboard={lb}", "--set", "eval.tasks=[micro-math]",
                "--set", "train.max_passes=1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs").iterdir())
    for name in ("config.json", "ledger.json", "metrics.json", "train_log.jsonl", "budget_steps.json",
                 "model/config.json", "model/tokenizer.json", "eval/micro-math-v1/samples.jsonl"):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"]["params"]["rollouts"] == "offline" and config["seed"] == 3 and config["budget"] == "20s"

    # The ledger sums its stages; the charged ones are exactly what the budget counted.
    ledger = json.loads((run_dir / "ledger.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = {s["stage"] for s in ledger}
    assert {"rollouts", "teacher-logps", "train", "eval-base", "eval", "sft-student"} <= stages
    assert {"eval@25%", "eval@50%", "eval@75%"} <= stages
    charged = [s for s in ledger if s["extra"].get("charged")]
    assert [s["stage"] for s in charged] == ["rollouts", "teacher-logps", "train"]
    for key in ("device_seconds", "flops"):
        assert metrics["spent"][key] == pytest.approx(sum(s[key] for s in charged), rel=1e-9)
        assert metrics["ledger"]["all"][key] == pytest.approx(sum(s[key] for s in ledger if not s["cached"]), rel=1e-9)
    assert all(s["device_seconds"] == pytest.approx(s["wall_seconds"] * s["devices"]) for s in ledger)
    assert 1.0 <= metrics["spent"]["fraction"] < 1.5 or metrics["stopped_by"] == "step limit"
    steps = json.loads((run_dir / "budget_steps.json").read_text())
    assert steps[0]["device_seconds"] > sum(s["device_seconds"] for s in charged[:2])  # precompute charged first
    assert [p["mark"] for p in metrics["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]

    row = read_rows(lb)[0]
    assert row["method"] == "lightning-opd" and row["label"] == "lightning-opd" and row["seed"] == "3"
    assert json.loads(row["params"])["rollouts"] == "offline" and json.loads(row["params_changed"]) == {}
    assert float(row["spent_modeled_s"]) > 0 and row["budget_clock"] == "wall"
    assert row["budget"] == "20s" and row["budget_kind"] == "seconds" and row["git_commit"]
    assert float(row["spent_device_s"]) == pytest.approx(
        sum(float(row[f"device_s.{s}"]) for s in ("rollouts", "teacher-logps", "train")), rel=1e-4)
    assert "micro-math@1.avg@k" in row and "micro-math@1.base_avg@k" in row
    assert "run" in proc.stdout and "micro-math@1" in proc.stdout


@pytest.mark.slow
def test_sft_continue_spends_the_budget_on_sft(tmp_path):
    from opd_bench.config import load_config
    from opd_bench.run import run

    cfg = load_config("smoke", [f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv", "eval.curve=[]",
                                "eval.tasks=[micro-math]", "eval.n_per_split=1", "train.max_steps=5"])
    metrics = run(cfg, "sft-continue", "30s")
    ledger = json.loads((Path(cfg.runs_dir) / metrics["run_id"] / "ledger.json").read_text())
    assert [s["stage"] for s in ledger if s["extra"].get("charged")] == ["teacher-samples", "train"]
    assert metrics["steps"] == 5 and ledger[-2]["tokens_trained"] > 0


def test_bad_budget_and_unknown_method_exit_2_with_one_line():
    from opd_bench import cli

    for argv, text in ((["run", "--method", "standard-opd", "--budget", "30x", "--preset", "smoke"], "bad budget"),
                       (["run", "--method", "standrd-opd", "--budget", "5m", "--preset", "smoke"], "did you mean")):
        proc = _cli(*argv)
        assert proc.returncode == 2, proc.stderr
        assert text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_tokenizer_mismatch_is_a_user_error(tmp_path):
    from transformers import AutoTokenizer

    from opd_bench.config import load_config
    from opd_bench.errors import UserError
    from opd_bench.micro.world import stage_paths
    from opd_bench.offline import check_tokenizers

    paths = stage_paths(load_config("smoke"))
    if not (paths["sft-student"] / "config.json").exists():
        pytest.skip("smoke world not built")
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    check_tokenizers(tokenizer, paths["sft-student"], (paths["teacher-a"],))  # the same tokenizer: fine
    other = AutoTokenizer.from_pretrained(paths["tokenizer"])
    other.add_tokens(["<|extra|>"])
    with pytest.raises(UserError, match="tokenizer|vocab"):
        check_tokenizers(other, paths["sft-student"], (paths["teacher-a"],))


def _append_many(args):
    path, worker = args
    for i in range(10):
        append_row(path, {"run_id": f"{worker}-{i}", f"col{worker}": i})


def test_leaderboard_appends_are_atomic_under_concurrency(tmp_path):
    path = tmp_path / "lb.csv"
    with get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(path, w) for w in range(4)])
    rows = read_rows(path)
    assert sorted(r["run_id"] for r in rows) == sorted(f"{w}-{i}" for w in range(4) for i in range(10))
    header = next(csv.reader(path.open()))
    assert header[0] == "run_id" and {f"col{w}" for w in range(4)} <= set(header)


def test_run_refuses_a_layout_that_cannot_fit_before_any_work(tmp_path, monkeypatch):
    """The planner's check (planner.check_config on the launch's layout: WORLD_SIZE, accelerate's strategy) runs
    before anything is written: standard OPD on lightning-8b does not fit one 80 GB GPU; 8 ZeRO-3 ranks do."""
    from opd_bench.config import load_config
    from opd_bench.errors import UserError
    from opd_bench.resolve import resolve
    from opd_bench.run import _check_memory

    proc = _cli("run", "--method", "standard-opd", "--budget", "1h", "--preset", "lightning-8b",
                "--set", f"runs_dir={tmp_path}/runs", "--set", f"leaderboard={tmp_path}/lb.csv")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit on 1 x" in proc.stderr and "fix:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    r = resolve(load_config("lightning-8b"), "standard-opd", "1h")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    _check_memory(r)  # fits
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="does not fit"):
        _check_memory(r)


def test_report_to_resolves_trackers_and_refuses_missing_ones(monkeypatch):
    import importlib.util

    from opd_bench.errors import UserError
    from opd_bench.trainer import report_to

    have = {"tensorboard": False, "wandb": False, "trackio": True}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if have[name] else None) if name in have else real(name, *a))
    assert report_to("auto") == [] and report_to("none") == [] and report_to(["trackio"]) == ["trackio"]
    have["tensorboard"] = True
    assert report_to("auto") == ["tensorboard"]
    for bad, text in (("wandb", "pip install wandb"), ("neptune-x", "unknown tracker")):
        with pytest.raises(UserError, match=text):
            report_to([bad])


@pytest.mark.slow
def test_the_opd_signals_reach_the_trackers(tmp_path):
    """What `train.report_to`'s integrations receive (their on_log): the OPD signals, every logging step."""
    from transformers import TrainerCallback

    from opd_bench.config import load_config
    from opd_bench.ledger import Ledger
    from opd_bench.models import load_tokenizer
    from opd_bench.resolve import resolve
    from opd_bench.training import TrainContext, build_trainer
    from opd_bench.worlds import load_world

    r = resolve(load_config("smoke", [f"runs_dir={tmp_path}", "train.max_steps=2", "train.logging_steps=1",
                                      "train.report_to=none"]), "standard-opd")
    world = load_world(r.cfg)
    trainer = build_trainer(TrainContext(r.cfg, world, load_tokenizer(world.tokenizer), world.teacher_a,
                                         tmp_path / "work", Ledger(tmp_path / "ledger.json")), r)
    logs = []

    class Tracker(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    seen = logs
    trainer.add_callback(Tracker())
    trainer.train()
    steps = [entry for entry in logs if "opd/reward" in entry]
    assert len(steps) == 2
    for key in ("opd/reward", "opd/advantage_var", "opd/tokens_kept", "opd/grad_var", "loss"):
        assert all(key in entry for entry in steps), key
