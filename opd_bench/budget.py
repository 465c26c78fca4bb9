"""Budgets: `--budget` in device time (`30h`, `90m`, `45s`, `750ms`) or compute (`3e15flop`), and the callback that
stops training when it is spent.

A device-time budget runs on one of two clocks:
  wall     measured device-seconds (wall seconds x devices in use): what this machine took, so it moves with its load;
  modeled  modeled GPU-seconds (ledger.PRICE, docs/budget.md): what the stage's FLOPs would take on GPUs, training and
           prefill at one efficiency, decode at a lower one. FLOPs depend only on the (seeded) tokens, so the same
           budget gives the same steps whatever the load.
The clock is chosen by the preset (`budget_clock`, passed to `parse_budget(..., clock=)`) or inline (`5m:modeled`,
`5m:wall`, which wins); a modeled (or explicitly wall) budget's spec reads `<amount><unit>:<clock>`, so it survives a
round trip through the config, the run key and the row's command. Compute is FLOPs counted the ledger's way (6N per
token trained, 2N per token generated or scored). Every spend reports all three (device_seconds, modeled_seconds,
flops); the budget charges the one its clock names (`Budget.meter`).

What a method spent before training (its offline rollouts and teacher precompute) is charged first; SFT stages and
evaluations are never charged.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

from transformers import TrainerCallback

from opd_bench.errors import UserError
from opd_bench.ledger import PRICE, GpuPrice, StageCost, modeled_seconds

CLOCKS = ("wall", "modeled")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "flop": 1.0}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ms|s|m|h|d|flops|flop)(?:(?::|\s+)(\w+))?\s*$")


@dataclass(frozen=True)
class Budget:
    spec: str
    kind: str  # "seconds" (device time) or "flops"
    amount: float
    clock: str = "wall"  # seconds only: "wall" (measured device-seconds) or "modeled" (modeled GPU-seconds)

    @property
    def meter(self) -> str:
        """The key of a spend dict that this budget charges."""
        if self.kind == "flops":
            return "flops"
        return "modeled_seconds" if self.clock == "modeled" else "device_seconds"

    def spent(self, device_seconds: float, flops: float, modeled_seconds: float | None = None) -> float:
        if self.meter == "modeled_seconds" and modeled_seconds is None:
            raise ValueError(f"budget {self.spec} is on the modeled clock: pass modeled_seconds")
        return {"flops": flops, "device_seconds": device_seconds, "modeled_seconds": modeled_seconds}[self.meter]

    def fraction(self, spend: dict) -> float:
        """The fraction of this budget a spend dict (device_seconds, modeled_seconds, flops) has used."""
        return spend[self.meter] / self.amount

    def __str__(self) -> str:
        return self.spec


def parse_budget(text: str | None, clock: str = "wall") -> Budget:
    """'30h' / '90m' / '45s' / '750ms' / '2d' device time, or '3e15flop' compute; anything else is a UserError.
    `clock` (the preset's `budget_clock`) says how device time is counted; a ':wall' / ':modeled' suffix overrides it.
    A FLOP budget has no clock (the preset's is ignored; a suffix is an error)."""
    if text is None or not str(text).strip():
        raise UserError("no budget: pass --budget (e.g. --budget 5m or --budget 3e15flop) or set `budget:` in the preset")
    if clock not in CLOCKS:
        raise UserError(f"bad budget clock {clock!r}: use one of {', '.join(CLOCKS)}")
    match = _PATTERN.match(str(text))
    if not match or (match.group(3) is not None and match.group(3) not in CLOCKS):
        raise UserError(f"bad budget {text!r}: use device time (30h, 90m, 45s, 750ms; optionally :modeled or :wall) "
                        "or compute (3e15flop)")
    value, unit, inline = float(match.group(1)), match.group(2), match.group(3)
    unit = "flop" if unit.startswith("flop") else unit
    amount = value * _UNITS[unit]
    if not math.isfinite(amount) or amount <= 0:
        raise UserError(f"bad budget {text!r}: it must be a positive, finite amount")
    if unit == "flop":
        if inline is not None:
            raise UserError(f"bad budget {text!r}: a FLOP budget has no clock (drop :{inline})")
        return Budget(spec=str(text).strip(), kind="flops", amount=amount)
    clock = inline or clock
    # a modeled or explicitly wall budget names its clock, so re-parsing the spec under any preset gives it back
    spec = f"{match.group(1)}{unit}:{clock}" if clock == "modeled" or inline else str(text).strip()
    return Budget(spec=spec, kind="seconds", amount=amount, clock=clock)


def spend_of(budget: Budget, stages: Iterable[StageCost], price: GpuPrice = PRICE) -> dict:
    """What the charged stages spent, under every accounting, and the fraction of `budget` that is."""
    stages = list(stages)
    spend = {"device_seconds": sum(s.device_seconds for s in stages),
             "modeled_seconds": sum(price.seconds(s.flops, s.decode_flops) for s in stages),
             "flops": sum(s.flops for s in stages)}
    return {**spend, "fraction": budget.fraction(spend)}


class BudgetCallback(TrainerCallback):
    """Stops training at the first optimizer step that ends with the budget spent (so it overshoots by less
    than one step), and calls `on_mark(fraction, spend)` when the spend crosses each fraction in `marks`
    (evaluations for accuracy-vs-cost curves; the wall clock is paused while it runs, so they are not charged).

    `meter()` returns what training has spent so far: the training stage's StageCost, a dict with `flops` and
    `decode_flops` (like run.py's usage()), or a bare FLOP count (priced as prefill/training). Device time is
    measured here (`timer`, default time.perf_counter); modeled seconds are priced by `price`. A resumed run passes
    what it spent before (precompute and earlier attempts) as `charged` stages (or the `charged_*` sums), so a crash
    never refills the budget.

    `devices` is every device the training holds: its processes' (the launch's world size) plus a teacher server's.
    Under a launcher each rank runs this callback; `agree(spend)` returns rank 0's spend on every rank (a
    broadcast, resume.Ranks.broadcast), so the stop and evaluation points are rank 0's whatever the other ranks'
    clocks say.
    """

    def __init__(self, budget: Budget, *, devices: int = 1, charged: Iterable[StageCost] = (),
                 charged_seconds: float = 0.0, charged_flops: float = 0.0, charged_modeled_seconds: float = 0.0,
                 meter: Callable[[], StageCost | dict | float] = lambda: 0.0, price: GpuPrice = PRICE,
                 marks: tuple[float, ...] = (), on_mark: Callable[[float, dict], None] | None = None,
                 timer: Callable[[], float] = time.perf_counter, agree: Callable[[dict], dict] | None = None):
        self.budget, self.devices, self.meter, self.price, self.timer = budget, devices, meter, price, timer
        self.agree = agree or (lambda spend: spend)
        before = spend_of(budget, charged, price)
        self.charged_seconds = charged_seconds + before["device_seconds"]
        self.charged_flops = charged_flops + before["flops"]
        self.charged_modeled_seconds = charged_modeled_seconds + before["modeled_seconds"]
        self.marks, self.on_mark = sorted(marks), on_mark
        self.start: float | None = None
        self.paused = 0.0
        self.steps: list[dict] = []  # spend at the end of every step, for tests and the ledger

    def train_seconds(self) -> float:
        return 0.0 if self.start is None else self.timer() - self.start - self.paused

    @contextmanager
    def pause(self):
        """Stop the wall clock for work that is not the method's (curve evaluations, checkpoints): not charged.
        (The modeled clock counts only the meter's FLOPs, which such work does not add to.)"""
        start = self.timer()
        try:
            yield
        finally:
            self.paused += self.timer() - start

    def _metered(self) -> tuple[float, float]:
        """(FLOPs, modeled seconds) of training so far."""
        used = self.meter()
        if isinstance(used, StageCost):
            return used.flops, modeled_seconds(used, self.price)
        if isinstance(used, dict):
            return float(used.get("flops", 0.0)), modeled_seconds(used, self.price)
        return float(used), modeled_seconds(float(used), self.price)

    def spend(self) -> dict:
        flops, modeled = self._metered()
        spend = {"device_seconds": self.charged_seconds + self.train_seconds() * self.devices,
                 "modeled_seconds": self.charged_modeled_seconds + modeled,
                 "flops": self.charged_flops + flops}
        return {**spend, "fraction": self.budget.fraction(spend)}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.timer()

    def on_step_end(self, args, state, control, **kwargs):
        spend = self.agree(self.spend())
        self.steps.append({"step": state.global_step, **spend})
        while self.marks and spend["fraction"] >= self.marks[0]:
            mark = self.marks.pop(0)
            if self.on_mark is not None and spend["fraction"] < 1.0:
                with self.pause():
                    self.on_mark(mark, spend)
        if spend["fraction"] >= 1.0:
            control.should_training_stop = True
        return control
