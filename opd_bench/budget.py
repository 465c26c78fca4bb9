"""Budgets: `--budget` in device time (`30h`, `90m`, `45s`) or compute (`3e15flop`), and the callback that
stops training when it is spent.

Device time is wall seconds x devices in use; compute is FLOPs counted the ledger's way (6N per token
trained, 2N per token generated or scored). What a method spent before training (its offline rollouts
and teacher precompute) is charged first; SFT stages and evaluations are never charged.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from transformers import TrainerCallback

from opd_bench.errors import UserError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "flop": 1.0}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|m|h|d|flop|flops)\s*$")


@dataclass(frozen=True)
class Budget:
    spec: str
    kind: str  # "seconds" (device-seconds) or "flops"
    amount: float

    def spent(self, device_seconds: float, flops: float) -> float:
        return flops if self.kind == "flops" else device_seconds

    def __str__(self) -> str:
        return self.spec


def parse_budget(text: str | None) -> Budget:
    """'30h' / '90m' / '45s' / '2d' device time, or '3e15flop' compute; anything else is a UserError."""
    if text is None or not str(text).strip():
        raise UserError("no budget: pass --budget (e.g. --budget 5m or --budget 3e15flop) or set `budget:` in the preset")
    match = _PATTERN.match(str(text))
    if not match:
        raise UserError(f"bad budget {text!r}: use device time (30h, 90m, 45s) or compute (3e15flop)")
    value, unit = float(match.group(1)), match.group(2)
    unit = "flop" if unit.startswith("flop") else unit
    amount = value * _UNITS[unit]
    if not math.isfinite(amount) or amount <= 0:
        raise UserError(f"bad budget {text!r}: it must be a positive, finite amount")
    return Budget(spec=str(text).strip(), kind="flops" if unit == "flop" else "seconds", amount=amount)


class BudgetCallback(TrainerCallback):
    """Stops training at the first optimizer step that ends with the budget spent (so it overshoots by less
    than one step), and calls `on_mark(fraction)` when the spend crosses each fraction in `marks`
    (evaluations for accuracy-vs-cost curves; the clock is paused while it runs, so they are not charged).

    `meter()` returns the FLOPs spent in training so far; device time is measured here. A resumed run passes
    what it spent before (precompute and earlier attempts) as `charged_*`, so a crash never refills the budget.
    """

    def __init__(self, budget: Budget, *, devices: int = 1, charged_seconds: float = 0.0, charged_flops: float = 0.0,
                 meter: Callable[[], float] = lambda: 0.0, marks: tuple[float, ...] = (),
                 on_mark: Callable[[float, dict], None] | None = None):
        self.budget, self.devices, self.meter = budget, devices, meter
        self.charged_seconds, self.charged_flops = charged_seconds, charged_flops
        self.marks, self.on_mark = sorted(marks), on_mark
        self.start: float | None = None
        self.paused = 0.0
        self.steps: list[dict] = []  # spend at the end of every step, for tests and the ledger

    def train_seconds(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start - self.paused

    @contextmanager
    def pause(self):
        """Stop the clock for work that is not the method's (curve evaluations, checkpoints): not charged."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def spend(self) -> dict:
        seconds = self.charged_seconds + self.train_seconds() * self.devices
        flops = self.charged_flops + self.meter()
        return {"device_seconds": seconds, "flops": flops, "fraction": self.budget.spent(seconds, flops) / self.budget.amount}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        spend = self.spend()
        self.steps.append({"step": state.global_step, **spend})
        while self.marks and spend["fraction"] >= self.marks[0]:
            mark = self.marks.pop(0)
            if self.on_mark is not None and spend["fraction"] < 1.0:
                with self.pause():
                    self.on_mark(mark, spend)
        if spend["fraction"] >= 1.0:
            control.should_training_stop = True
        return control
