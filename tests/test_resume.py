"""Resume after a crash: `opd-bench run` is SIGKILLed at several points (while a precompute stage is built,
during training, during the final evaluation, right after appending its leaderboard row) and interrupted with
Ctrl-C; each time the same command with --resume (or --run-id) continues the run. Checked: one leaderboard
row, the device time spent before each crash stays in the ledger and counts against the budget, training
restarts from a checkpoint (not from pi_sft), and stages are not rebuilt.

Real processes and real signals (subprocesses). A stage and training are killed when their files appear on
disk; the evaluation and the leaderboard points are reached with the `OPD_BENCH_KILL_AT` hook
(resume.crash_point).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd_bench.leaderboard import read_rows

REPO = Path(__file__).resolve().parent.parent
KILLED = -signal.SIGKILL


def settings(cfg, tmp: Path, *extra: str) -> list[str]:
    """lightning-opd on the smoke world: 40 steps of ~0.05 s, a checkpoint after every step (unless `extra`).
    Seed 7 is these tests' own: pi_sft's evaluation for it is built by the first and reused by the second."""
    sets = {"artifacts_dir": cfg.artifacts_dir, "runs_dir": tmp / "runs", "leaderboard": tmp / "lb.csv",
            "seed": 7, "eval.curve": "[]", "eval.n_per_split": 2, "train.max_steps": 40,
            "train.max_passes": 1000, "train.checkpoint_seconds": 0}
    return [f"{key}={value}" for key, value in sets.items()] + list(extra)


def command(sets: list[str], *args: str) -> list[str]:
    return [sys.executable, "-m", "opd_bench.cli", "run", "--method", "lightning-opd", "--preset", "smoke",
            *[x for s in sets for x in ("--set", s)], *args]


def run_in_process(sets: list[str], run_id: str) -> dict:
    """The same run, continued in this process (the attempts that must finish need no fresh interpreter)."""
    from opd_bench.config import load_config
    from opd_bench.run import run

    return run(load_config("smoke", sets + ["method.name=lightning-opd"]), "lightning-opd", run_id=run_id)


def start(cmd: list[str], kill_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_QUIET": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("OPD_BENCH_KILL_AT", None)
    if kill_at:
        env["OPD_BENCH_KILL_AT"] = kill_at
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, finish(proc)[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "trainer").glob("checkpoint-*")
                  if (p / "trainer_state.json").exists())


def ledger(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "ledger.json").read_text())


def charged_seconds(run_dir: Path) -> float:
    return sum(s["device_seconds"] for s in ledger(run_dir) if s["extra"].get("charged"))


def stage_folders(cfg) -> dict:
    return {p.name: (p / "stage.json").stat().st_mtime_ns for p in Path(cfg.artifacts_dir).iterdir()
            if (p / "stage.json").exists()}


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_with_one_row_and_its_spend_kept(smoke_world, tmp_path):
    cfg, _ = smoke_world
    sets = settings(cfg, tmp_path, "train.rollout_prompts=48")  # rollouts of its own: built (and killed) here
    cmd, artifacts = command(sets), Path(cfg.artifacts_dir)

    # 1. SIGKILL while pi_sft samples the rollouts (a stage half built)
    built = set(artifacts.glob("rollouts-*"))
    proc = start(cmd)
    wait_for(lambda: any(artifacts.glob(".tmp-rollouts-*")), proc)
    proc.kill()
    assert finish(proc)[0] == KILLED
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not any(s["extra"].get("charged") for s in ledger(run_dir))
    assert set(artifacts.glob("rollouts-*")) == built  # the half-built stage does not pass for a finished one

    # 2. --resume finds the run and builds the stages; SIGKILL during training, once a checkpoint past step 2
    proc = start(cmd + ["--resume"])
    wait_for(lambda: any(step >= 3 for step in checkpoint_steps(run_dir)), proc)
    proc.kill()
    assert finish(proc)[0] == KILLED
    assert [s["stage"] for s in ledger(run_dir) if s["extra"].get("charged")] == ["rollouts", "teacher-logps", "train"]
    stages = stage_folders(cfg)
    spent_before = charged_seconds(run_dir)  # what the ledger holds after the crash
    (first,) = [s for s in ledger(run_dir) if s["stage"] == "train"]
    assert first["device_seconds"] > 0 and first["extra"]["steps"] >= 3

    # 3. --resume again: training continues from that checkpoint; SIGKILL between the two tasks' evaluations
    code, log = finish(start(cmd + ["--resume"], kill_at="eval:micro-math"))
    assert code == KILLED, log[-3000:]
    assert (run_dir / "model" / "config.json").exists() and not (run_dir / "trainer").exists()
    attempts = [s for s in ledger(run_dir) if s["stage"] == "train"]
    assert len(attempts) == 2 and attempts[0] == first  # the crashed attempt's spend is kept as it was
    resumed_from = attempts[1]["extra"]["resumed_from_step"]
    assert 3 <= resumed_from <= first["extra"]["steps"]  # from the checkpoint, not from pi_sft
    steps = [s for s in json.loads((run_dir / "budget_steps.json").read_text()) if s["attempt"] == 2]
    assert steps[0]["step"] == resumed_from + 1 and steps[-1]["step"] == 40
    assert steps[0]["device_seconds"] >= spent_before  # the budget went on from what was spent before the crash

    # 4. --resume: the evaluation is redone; SIGKILL right after the leaderboard row is appended
    code, log = finish(start(cmd + ["--resume"], kill_at="leaderboard"))
    assert code == KILLED, log[-3000:]
    assert [r["run_id"] for r in read_rows(tmp_path / "lb.csv")] == [run_dir.name]

    # 5. the same run id once more: nothing left to do, and no second row
    assert run_in_process(sets, run_dir.name)["run_id"] == run_dir.name
    rows = read_rows(tmp_path / "lb.csv")
    assert [r["run_id"] for r in rows] == [run_dir.name]
    assert float(rows[0]["spent_device_s"]) >= spent_before
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]  # every attempt used one folder
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["attempts"] == 2 and metrics["steps"] == 40 and set(metrics["after"]) == {"micro-math@1",
                                                                                              "micro-code@1"}
    assert metrics["spent"]["device_seconds"] == sum(s["device_seconds"] for s in ledger(run_dir)
                                                     if s["extra"].get("charged"))
    names = [s["stage"] for s in ledger(run_dir)]
    assert names.count("rollouts") == names.count("teacher-logps") == names.count("eval") == 1
    assert stage_folders(cfg) == stages  # no stage was rebuilt


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_exit_130_and_resumes(smoke_world, tmp_path):
    cfg, _ = smoke_world
    sets = settings(cfg, tmp_path, "train.checkpoint_seconds=3600")  # no periodic checkpoint
    cmd = command(sets, "--run-id", "ctrl-c")
    run_dir = tmp_path / "runs" / "ctrl-c"
    steps = run_dir / "budget_steps.jsonl"
    proc = start(cmd)
    wait_for(lambda: steps.exists() and len(steps.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    code, log = finish(proc)
    assert code == 130, log[-3000:]
    assert "Traceback" not in log and "--run-id ctrl-c" in log
    (saved,) = checkpoint_steps(run_dir)  # the interrupt saved one
    assert saved >= 2 and not read_rows(tmp_path / "lb.csv")

    assert run_in_process(sets, "ctrl-c")["steps"] == 40
    attempts = [s for s in ledger(run_dir) if s["stage"] == "train"]
    assert [a["extra"]["resumed_from_step"] for a in attempts] == [0, saved]
    assert [r["run_id"] for r in read_rows(tmp_path / "lb.csv")] == ["ctrl-c"]
