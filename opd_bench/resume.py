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

Under a launcher (`torchrun`, `accelerate launch`: several processes, one per device) rank 0 owns the run
(`Ranks`): it picks the run id, holds the lock, builds the stages (the other ranks wait, then read them from
the cache), writes the ledger, curve, metrics and row, and decides every stop, checkpoint and evaluation point,
which it broadcasts at each step; checkpoints and the final model are saved by all ranks together. When a rank
dies, the launcher stops the others; rank 0 prints one line (`error: ...`) and the run resumes with its id.
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

from datetime import timedelta
from typing import Any, Callable

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


# ----------------------------------------------------------------------------- ranks


class RankFailed(RuntimeError):
    """Rank 0 failed in a step the other ranks were waiting for: they stop quietly (rank 0 reports it)."""


class JobStopped(BaseException):
    """The launcher stopped this process (SIGTERM: another rank died, or the job was cancelled)."""


class Ranks:
    """The processes of one launch: one per device under `torchrun` / `accelerate launch`, else just this one.

    Rank 0 owns the run (see the module docstring). Every step only rank 0 does goes through `on_main`, which
    runs it there and hands its result (or its UserError) to the other ranks, so the ranks stay in step and a
    bad input stops all of them with rank 0's message. The waits use a gloo group of their own with a long
    timeout (`train.rank_wait_s`): the other ranks may wait hours for rank 0's evaluation or precompute, which
    the training collectives' timeout must not cover.
    """

    _current: "Ranks | None" = None

    def __init__(self, world: int = 1, rank: int = 0, group=None):
        self.world, self.rank, self.group = world, rank, group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "Ranks":
        return cls._current or cls()

    @classmethod
    def start(cls, wait_seconds: float = 86400.0) -> "Ranks":
        """Join the launch's process group (accelerate's PartialState: gloo on CPU, NCCL on GPU), once."""
        if cls._current is not None:
            return cls._current
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            cls._current = cls()
            return cls._current
        import torch
        import torch.distributed as dist
        from accelerate import PartialState

        if torch.cuda.is_available():
            state = PartialState(timeout=timedelta(seconds=1800))
        else:
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
            state = PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=1800))
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_seconds))
        cls._current = cls(state.num_processes, state.process_index, group)
        return cls._current

    # --- collectives on the control group ------------------------------------------------------

    def broadcast(self, value: Any = None) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def barrier(self) -> None:
        self.gather(None)

    def on_main(self, fn: Callable, *args, **kwargs) -> Any:
        """fn(*args) on rank 0; its result (or its UserError, raised on every rank) everywhere."""
        if self.world == 1:
            return fn(*args, **kwargs)
        if not self.main:
            kind, value = self.broadcast()
            if kind == "ok":
                return value
            if kind == "user":
                exc = UserError(value[0])
                exc.exit_code = value[1]
                raise exc
            raise RankFailed(value)
        try:
            value = fn(*args, **kwargs)
        except UserError as exc:
            self.broadcast(("user", (str(exc), exc.exit_code)))
            raise
        except BaseException as exc:
            self.broadcast(("error", f"rank 0: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            raise
        self.broadcast(("ok", value))
        return value

    def main_first(self, fn: Callable, *args, **kwargs) -> Any:
        """fn(*args) on rank 0 (which builds what it builds), then on the others (which find it built)."""
        if self.world == 1:
            return fn(*args, **kwargs)
        out = self.on_main(fn, *args, **kwargs)
        return out if self.main else fn(*args, **kwargs)


def clock(ranks: "Ranks | None" = None) -> Callable[[], float]:
    """This process's training clock. Test hook: `OPD_BENCH_CLOCK_SKEW=RANK:FACTOR` makes rank RANK's clock run
    FACTOR times as fast (tests/test_ranks.py: the decisions must follow rank 0's clock, not each rank's)."""
    skew = os.environ.get("OPD_BENCH_CLOCK_SKEW", "")
    rank = (ranks or Ranks.current()).rank
    if skew and int(skew.split(":")[0]) == rank:
        factor = float(skew.split(":")[1])
        return lambda: factor * time.perf_counter()
    return time.perf_counter


def rank_log(entry: dict) -> None:
    """Test hook: `OPD_BENCH_RANK_LOG=DIR` makes every rank append its per-step decisions to DIR/rank-R.jsonl."""
    folder = os.environ.get("OPD_BENCH_RANK_LOG")
    if folder:
        rank = Ranks.current().rank
        Path(folder).mkdir(parents=True, exist_ok=True)
        with (Path(folder) / f"rank-{rank}.jsonl").open("a") as f:
            f.write(json.dumps({"rank": rank, **entry}) + "\n")


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
    """This process's weights are finite (its shards, under FSDP2 / ZeRO-3: the ranks agree in TrainingProgress)."""
    import torch

    def local(p):
        p = p.detach()
        return p.to_local() if hasattr(p, "to_local") else p  # a DTensor's own shard: no collective

    checks = [local(p).isfinite().all() for p in model.parameters() if local(p).numel()]
    return bool(torch.stack(checks).all()) if checks else True


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
                 attempt: int = 1, ranks: Ranks | None = None, timer: Callable[[], float] = time.perf_counter):
        self.ledger, self.cost, self.usage = ledger, cost, usage
        self.every, self.steps_file, self.attempt = every, steps_file, attempt
        self.ranks, self.timer = ranks or Ranks(), timer
        self.budget = None  # the BudgetCallback (its clock), set by run._train
        self.interrupted = False
        self.diverged_at: int | None = None
        self._last_save = 0.0
        self._save_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = self.timer()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._record(state)
        finite = model is None or weights_finite(model)
        due = self.interrupted or self.timer() - self._last_save >= self.every
        # One exchange per step: any rank's shard not finite or any rank interrupted counts; the checkpoint is
        # due when rank 0's clock says so (the ranks save together).
        flags = self.ranks.gather((finite, self.interrupted, due))
        self.interrupted = any(f[1] for f in flags)
        if not all(f[0] for f in flags):
            self.diverged_at = state.global_step
            control.should_training_stop = True
            return control
        if self.interrupted or flags[0][2]:
            control.should_save = True
            self._save_started = self.timer()  # HF saves right after this callback; on_save follows
        if self.interrupted:
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = self.timer()
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


@contextmanager
def stopped_by_launcher(ranks: Ranks):
    """Under a launcher: SIGTERM (torchrun stops the other ranks when one dies) raises JobStopped, so the run ends
    with one line instead of a traceback per rank (run.py). A single process keeps Python's default."""
    if ranks.world == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise JobStopped(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except BaseException:
        # The run is failing (a rank died, or this SIGTERM): the launcher's SIGTERM, which may arrive any moment
        # now, must not kill this process before run.py has printed its one line (torchrun SIGKILLs it later).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    signal.signal(signal.SIGTERM, previous)
