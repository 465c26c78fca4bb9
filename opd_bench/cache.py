"""The artifact cache: each pipeline stage's output lives in `artifacts/<stage>-<key>/`.

The key is a hash of the stage's inputs (its config and the keys of the stages it reads), so a
second `prepare` reuses every stage whose inputs did not change. A stage is built in a temporary
folder and renamed into place only when complete (with its `stage.json`), so a crash never leaves
a half-built stage that looks finished; the next call simply builds it again.

Resumable stages (the offline precompute: rollouts, *-logps, teacher samples) build in a stable folder
`.tmp-<stage>-<key>/` that outlives a crash: their build skips the shards already written there, so a stage
killed after shard k resumes at shard k+1. One process builds it at a time (a lock file in it). Collective
stages are built by every rank of a torch.distributed job: all ranks call `build_stage`, each does its share into
the same folder, and after a barrier rank 0 runs `finish` (the manifest's info, the total cost) and renames the
folder into place; the others wait at a second barrier and return the finished stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from opd_bench.ledger import StageCost

MANIFEST = "stage.json"


def stage_key(name: str, inputs: dict) -> str:
    blob = json.dumps({"stage": name, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_dir(root: Path | str, name: str, inputs: dict) -> Path:
    return Path(root) / f"{name}-{stage_key(name, inputs)}"


def is_built(path: Path) -> bool:
    return (path / MANIFEST).exists()


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


LOCK = ".lock"
ATTEMPTS = "attempts.json"  # in a resumable stage's folder: seconds each attempt worked (crashed ones included)


def _launch_ranks():
    """The run's Ranks (resume.Ranks: a gloo control group with a long timeout) when this is a multi-rank launch."""
    module = sys.modules.get("opd_bench.resume")
    ranks = getattr(getattr(module, "Ranks", None), "_current", None)
    return ranks if ranks is not None and ranks.world > 1 else None


def _default_group():
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the launch this process belongs to (the run's Ranks, else torch.distributed's default
    group), else (0, 1)."""
    ranks = _launch_ranks()
    if ranks is not None:
        return ranks.rank, ranks.world
    dist = _default_group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def barrier() -> None:
    ranks, dist = _launch_ranks(), _default_group()
    if ranks is not None:
        ranks.barrier()
    elif dist is not None:
        dist.barrier()


def broadcast(value):
    """Rank 0's `value` on every rank (a picklable object)."""
    ranks, dist = _launch_ranks(), _default_group()
    if ranks is not None:
        return ranks.broadcast(value)
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _cached(final: Path) -> tuple[Path, StageCost]:
    cost = StageCost.from_dict(read_manifest(final)["cost"])
    cost.cached = True
    return final, cost


@contextmanager
def _lock(path: Path, enabled: bool):
    if not enabled:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a second builder of the same stage waits here, then finds it built
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Attempt:
    """This attempt's start; `note_progress(folder)` records its seconds so far in the folder's attempts.json."""

    def __init__(self, folder: Path):
        self.folder, self.start, self.id = folder, time.perf_counter(), f"{os.getpid()}-{time.time():.3f}"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def previous(self) -> dict:
        path = self.folder / ATTEMPTS
        done = json.loads(path.read_text()) if path.exists() else {}
        return {k: v for k, v in done.items() if k != self.id}

    def save(self) -> None:
        path = self.folder / ATTEMPTS
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**self.previous(), self.id: self.elapsed()}))
        os.replace(tmp, path)


_attempts: dict[str, _Attempt] = {}


def note_progress(folder: Path) -> None:
    """A resumable build calls this after each shard (rank 0 writes): a crash keeps the seconds worked so far."""
    attempt = _attempts.get(str(folder))
    if attempt is not None and dist_info()[0] == 0:
        attempt.save()


def build_stage(root: Path | str, name: str, inputs: dict,
                build: Callable[[Path, StageCost], dict | None], *, resumable: bool = False,
                collective: bool = False, finish: Callable[[Path, StageCost], dict] | None = None
                ) -> tuple[Path, StageCost]:
    """Return (folder, cost). Builds with build(tmp_folder, cost) unless already cached.

    `build` fills the folder and the cost record; what it returns (or, when given, what `finish(tmp_folder, cost)`
    returns, on rank 0 after every rank's build) is stored in the manifest. A cached stage returns its recorded
    cost with `cached=True`. `resumable`: the folder survives a crash (see the module docstring); the cost's wall
    seconds then include the attempts before the crash (up to their last `note_progress`). `collective`: every
    rank of a torch.distributed job calls this (each builds its share).
    """
    final = stage_dir(root, name, inputs)
    rank, world = dist_info() if collective else (0, 1)
    if broadcast(is_built(final)) if world > 1 else is_built(final):
        return _cached(final)
    tmp = final.with_name(f".tmp-{final.name}" if resumable else f".tmp-{final.name}-{os.getpid()}")
    if resumable and rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    with _lock(tmp / LOCK, resumable and rank == 0):
        built = is_built(final)
        if broadcast(built) if world > 1 else built:  # another builder finished it while we waited
            return _cached(final)
        if rank == 0:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        if world > 1:
            barrier()
        cost = StageCost(stage=name, devices=world)
        attempt = _attempts[str(tmp)] = _Attempt(tmp)
        try:
            info = build(tmp, cost) or {}
            if world > 1:
                barrier()
            if rank == 0:
                if finish is not None:
                    info = finish(tmp, cost) or {}
                previous = attempt.previous() if resumable else {}
                cost.wall_seconds = attempt.elapsed() + sum(previous.values())
                if previous:
                    cost.extra = {**cost.extra, "attempts": len(previous) + 1}
                manifest = {"stage": name, "key": final.name, "inputs": inputs, "info": info, "cost": cost.to_dict()}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                (tmp / ATTEMPTS).unlink(missing_ok=True)
                (tmp / LOCK).unlink(missing_ok=True)  # a builder waiting on it wakes to find the stage built
                if final.exists():  # a concurrent builder won the race; keep theirs
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    os.replace(tmp, final)
        finally:
            _attempts.pop(str(tmp), None)
        if world > 1:
            barrier()
            if rank != 0:
                cost = StageCost.from_dict(read_manifest(final)["cost"])
    return final, cost
