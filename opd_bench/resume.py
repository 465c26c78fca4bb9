"""Crash-safe runs: a run killed at any point (SIGKILL, a lost node, Ctrl-C) continues where it stopped.

What makes it work, phase by phase (`run.py` drives the phases):
  run folder     `runs/<run id>/`, locked by the process working in it; `--run-id ID` continues that run,
                 `--resume` the newest unfinished run of exactly the same configuration
  stages         built atomically by the stage cache (cache.py): a finished stage is reused, a half-built one
                 is built again; each stage is recorded in the ledger once, however often the run resumes
  training       a checkpoint (weights, optimizer, scheduler, RNG, trainer state) every
                 train.checkpoint_seconds, only the newest kept; the attempt's spend is written to the ledger
                 at every step, so the device time spent before a crash stays charged to the budget
  model          saved to a temporary folder and renamed: `model/` exists only when training finished
  eval           re-run when interrupted (its records are rewritten)
  leaderboard    the row is written to `row.json` first, then appended only if its run id is not there yet
Ctrl-C during training stops at the end of the step with a checkpoint; the CLI exits with 130.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout
from transformers import TrainerCallback

from opd_bench.errors import UserError
from opd_bench.jsonio import read_json
from opd_bench.ledger import Ledger, StageCost

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped cleanly and can be resumed (the CLI exits with 130)."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


def crash_point(name: str) -> None:
    """Test hook: `OPD_BENCH_KILL_AT=name` SIGKILLs this process here (tests/test_resume.py)."""
    if os.environ.get("OPD_BENCH_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def record_once(ledger: Ledger, cost: StageCost) -> StageCost:
    """A stage is recorded once per run: a resumed run keeps the record of the attempt that built or reused it."""
    for stage in ledger.stages:
        if stage.stage == cost.stage:
            return stage
    ledger.add(cost)
    return cost


# ----------------------------------------------------------------------------- run folders


def _first_difference(saved, current, prefix: str = "") -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                return _first_difference(saved.get(key), current.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {saved!r} then, {current!r} now"


def _is_locked(run_dir: Path) -> bool:
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def finished_ids(leaderboard: Path | str) -> set[str]:
    from opd_bench.leaderboard import read_rows

    return {r.get("run_id", "") for r in read_rows(leaderboard)}


def _latest_unfinished(runs: Path, config: dict, leaderboard: str) -> str | None:
    """The newest run folder started with exactly this configuration whose row is not in the leaderboard."""
    done = finished_ids(leaderboard)
    candidates = [p for p in runs.iterdir() if (p / "config.json").exists()] if runs.is_dir() else []
    for folder in sorted(candidates, key=lambda p: (p / "config.json").stat().st_mtime, reverse=True):
        if folder.name not in done and read_json(folder / "config.json") == config and not _is_locked(folder):
            return folder.name
    return None


def choose_run(cfg, method_name: str, run_id: str | None, resume: bool) -> Path:
    """The run folder this command works in: the given id (continued if it exists), the newest unfinished run of
    this configuration (--resume), or a new one. Refuses an id that was started with other settings."""
    runs = Path(cfg.runs_dir)
    config = json.loads(cfg.model_dump_json())
    if run_id is None and resume:
        run_id = _latest_unfinished(runs, config, cfg.leaderboard)
        if run_id is None:
            note("nothing to resume for this configuration: starting a new run")
    if run_id is None:
        run_id = f"{datetime.now():%Y%m%d-%H%M%S}-{method_name}-s{cfg.seed}-{os.urandom(2).hex()}"
    if not RUN_ID.fullmatch(run_id):
        raise UserError(f"bad --run-id {run_id!r}: use letters, digits, '.', '_' and '-' (a folder name in "
                        f"{runs}, at most 128 characters)")
    run_dir = runs / run_id
    saved = read_json(run_dir / "config.json")
    if saved is not None and saved != config:
        raise UserError(f"run {run_id} was started with other settings ({_first_difference(saved, config)}); "
                        f"resume it with the same options, or pick another --run-id")
    if saved is None and run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} exists but is not a run folder (no config.json); pick another --run-id")
    return run_dir


@contextmanager
def locked(run_dir: Path):
    """Only one process works in a run folder (the lock dies with its process, so a crash frees it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"run {run_dir.name} is in progress in another process; wait for it to finish, or "
                        f"pick another --run-id") from None
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------- checkpoints


def _step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def last_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint. HF writes trainer_state.json last, so a checkpoint cut short by a crash
    has none, or one that does not parse."""
    folders = sorted((p for p in work.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()), key=_step)
    for folder in reversed(folders):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return folder
        except (OSError, ValueError):
            continue
    return None


def prune_checkpoints(work: Path) -> Path | None:
    """Keep only the newest complete checkpoint (older and half-written ones go)."""
    keep = last_checkpoint(work)
    for folder in work.glob("checkpoint-*"):
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
    return keep


def checkpoint_state(checkpoint: Path | None) -> dict:
    return read_json(checkpoint / "trainer_state.json", {}) if checkpoint else {}


def load_checkpoint_weights(trainer, checkpoint: Path) -> None:
    """Make the trainer hold a checkpoint's weights and state without training (the budget is already spent)."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))  # HF's own loader (handles sharded and PEFT checkpoints)
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


# ----------------------------------------------------------------------------- during training


def weights_finite(model) -> bool:
    import torch

    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


class TrainingProgress(TrainerCallback):
    """Makes training resumable and keeps its cost honest. At every step end:
    - the weights are checked: not finite -> stop, status `diverged` (no checkpoint of NaN weights);
    - this attempt's spend (`usage()` tokens and FLOPs, the budget clock's seconds) is written to the ledger
      and the step to `steps_file`, so a crash loses none of it (the next attempt starts its budget there);
    - every `every` seconds, or after Ctrl-C, a checkpoint is saved (the budget clock paused: saving is not
      the method's cost) and older ones are removed; Ctrl-C then stops training.
    Add it before the BudgetCallback: a step that diverged must not be evaluated as a curve point.
    """

    def __init__(self, ledger: Ledger | None, cost: StageCost, usage, *, every: float, steps_file: Path | None,
                 attempt: int = 1):
        self.ledger, self.cost, self.usage = ledger, cost, usage
        self.every, self.steps_file, self.attempt = every, steps_file, attempt
        self.budget = None  # the BudgetCallback (its clock), set by run._train
        self.interrupted = False
        self.diverged_at: int | None = None
        self._last_save = 0.0
        self._save_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._record(state)
        if model is not None and not weights_finite(model):
            self.diverged_at = state.global_step
            control.should_training_stop = True
            return control
        if self.interrupted or time.perf_counter() - self._last_save >= self.every:
            control.should_save = True
            self._save_started = time.perf_counter()  # HF saves right after this callback; on_save follows
        if self.interrupted:
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = time.perf_counter()
        if self.budget is not None and self._save_started is not None:
            self.budget.paused += self._last_save - self._save_started
            self._save_started = None
        if state.is_world_process_zero:
            prune_checkpoints(Path(args.output_dir))

    def _record(self, state) -> None:
        for key, value in self.usage().items():
            setattr(self.cost, key, value)
        self.cost.wall_seconds = self.budget.train_seconds() if self.budget is not None else 0.0
        self.cost.extra["steps"] = state.global_step
        if self.ledger is not None:
            self.ledger.save()
        if self.steps_file is not None and self.budget is not None:
            with self.steps_file.open("a") as f:
                f.write(json.dumps({"attempt": self.attempt, "step": state.global_step, **self.budget.spend()}) + "\n")


@contextmanager
def stop_on_ctrl_c(progress: TrainingProgress | None):
    """Ctrl-C during training stops at the end of the current step, with a checkpoint, then raises
    KeyboardInterrupt (exit 130; the run resumes from that checkpoint). A second Ctrl-C interrupts at once."""
    if progress is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        progress.interrupted = True
        note("interrupt: stopping after this step (checkpoint saved; Ctrl-C again to stop now)")
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if progress.interrupted:
        raise KeyboardInterrupt
