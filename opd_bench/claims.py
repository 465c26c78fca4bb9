"""The papers' claims, the rule that turns our measurements into verdicts, and cost-to-reach.

Claim rule. d = mean(A) - mean(B) over seeds, u = 2 x the standard error of d. With margin delta (1 accuracy
point; 10% of B for variance and memory): "A > B" is reproduced if d - u > 0, not reproduced if d + u < delta
(a meaningful gain is excluded), else inconclusive; "A < B" mirrors it; "A ~ B" is reproduced if |d| + u <=
delta, not if |d| - u > delta; "A >= B" is reproduced if d - u >= -delta, not if d + u < -delta; a threshold
claim compares mean +- u with the threshold. Fewer than 2 seeds on either side: inconclusive.

Cost to reach: the charged device time at which a seed-mean accuracy curve (0/25/50/75/100% of the budget)
first comes within ACC_MARGIN of standard OPD's final accuracy, linear between points.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

ACC_MARGIN = 0.01  # 1 accuracy point: the smallest difference a claim about accuracy counts as meaningful
REL_MARGIN = 0.10  # 10% of the reference, for gradient variance and peak memory


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values) -> "Stat":
        values = [v for v in values if v is not None]
        if not values:
            return cls(None, None, 0)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    @property
    def se(self) -> float | None:
        return None if self.std is None else self.std / math.sqrt(self.n)


def verdict(kind: str, a: Stat, b: Stat | None = None, margin: float = 0.0, threshold: float | None = None) -> tuple[str, str]:
    """(reproduced / not reproduced / inconclusive, why) by the rule in the module docstring."""
    sides = [a] if b is None else [a, b]
    if any(s.n == 0 for s in sides):
        return "inconclusive", "not run"
    if any(s.n < 2 for s in sides):
        return "inconclusive", "fewer than 2 seeds"
    if b is None:  # a threshold claim: "A below t" or "A at least t"
        d, u = a.mean - threshold, 2 * a.se
        kind = "less" if kind == "below" else "at-least"
        margin = 0.0
    else:
        d, u = a.mean - b.mean, 2 * math.sqrt(a.se ** 2 + b.se ** 2)
    rules = {
        "greater": (d - u > 0, d + u < margin),
        "less": (d + u < 0, d - u > -margin),
        "equal": (abs(d) + u <= margin, abs(d) - u > margin),
        "at-least": (d - u >= -margin, d + u < -margin),
    }
    yes, no = rules[kind]
    if yes:
        return "reproduced", ""
    if no:
        return "not reproduced", ""
    return "inconclusive", "the difference is within the seed spread"


@dataclass
class Claim:
    text: str
    paper: str
    a: str
    b: str | None
    kind: str  # greater / less / equal / at-least / below / speedup
    metric: str = "avg"
    threshold: float | None = None


CLAIMS = [
    Claim("OPD beats spending the same budget on more SFT", "Thinking Machines", "standard-opd", "sft-continue", "greater"),
    Claim("Lightning OPD matches standard OPD", "Lightning OPD", "lightning-opd", "standard-opd", "equal"),
    Claim("Lightning OPD reaches standard OPD's accuracy >= 3.6x cheaper", "Lightning OPD", "lightning-opd",
          "standard-opd", "speedup", threshold=3.6),
    Claim("teacher-inconsistent offline OPD is worse than Lightning OPD", "Lightning OPD", "inconsistent-offline",
          "lightning-opd", "less"),
    Claim("ExOPD (lambda 1.25) beats standard OPD", "G-OPD", "exopd", "standard-opd", "greater"),
    Claim("vOPD has lower gradient variance than standard OPD", "vOPD", "vopd", "standard-opd", "less", "grad_var"),
    Claim("vOPD matches or beats standard OPD", "vOPD", "vopd", "standard-opd", "at-least"),
    Claim("TIP entropy-50% matches or beats all-token OPD", "TIP", "tip", "standard-opd", "at-least"),
    Claim("TIP entropy-50% needs less peak memory than all-token OPD", "TIP", "tip", "standard-opd", "less", "peak_mb"),
    Claim("TIP Q3 trains on < 10% of the tokens", "TIP", "tip [tokens=q3]", None, "below", "tokens_kept", 0.10),
    Claim("TIP Q3 nearly matches all-token OPD", "TIP", "tip [tokens=q3]", "standard-opd", "equal"),
]


# ----------------------------------------------------------------------------- curves and cost


def mean_curve(runs: list) -> list[tuple[float, float, float]]:
    """(mark, mean device-seconds, mean accuracy) per budget mark, over the runs that have it."""
    marks = sorted({p[0] for r in runs for p in r.curve})
    out = []
    for mark in marks:
        points = [p for r in runs for p in r.curve if p[0] == mark]
        out.append((mark, statistics.fmean(p[1] for p in points), statistics.fmean(p[2] for p in points)))
    return out


def cost_to_reach(curve, target: float) -> float | None:
    """Device-seconds at which the curve first reaches `target` (linear between points); None if never."""
    for (_, x0, y0), (_, x1, y1) in zip(curve, curve[1:]):
        if y0 >= target:
            return x0
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return curve[-1][1] if curve and curve[-1][2] >= target else None


def speedups(reference: list, arm: list) -> dict:
    """Cost of `arm` to come within ACC_MARGIN of the reference's final accuracy (seed-mean curves), vs the
    reference's own cost to get there. (Without the margin, a method tied with the reference but a hair
    below it would never 'reach' it.)"""
    ref = mean_curve(reference)
    if len(ref) < 2:
        return {"why": "no accuracy curve for standard-opd"}
    target = ref[-1][2] - ACC_MARGIN
    if target <= ref[0][2]:
        return {"target": target, "why": f"standard-opd ends less than {100 * ACC_MARGIN:g} point above pi_sft, "
                                          "so there is no gain to reach"}
    ref_cost = cost_to_reach(ref, target)
    out = {"target": target, "ref_cost": ref_cost, "cost": cost_to_reach(mean_curve(arm), target) if arm else None}
    out["speedup"] = ref_cost / out["cost"] if out["cost"] else None
    per_seed = []  # a run that never reaches the target is at most ref_cost / its whole spend faster
    for r in arm:
        c = cost_to_reach(r.curve, target) if r.curve else None
        per_seed.append(ref_cost / c if c else ref_cost / max(r.curve[-1][1], 1e-9) if r.curve else None)
    out["per_seed"] = [s for s in per_seed if s is not None]
    out["reached"] = sum(1 for r in arm if r.curve and cost_to_reach(r.curve, target) is not None)
    return out
