"""The claims engine: per-seed measurements in, one verdict out. Pure functions, no method names (the claims,
their arms, kinds, metrics and margins are in the suite spec, `opd_bench/suites/<preset>.yaml`).

Interval: d = mean(A) - mean(B) over seeds, 95% interval [lo, hi] = d -+ t(0.975, df) se with
se^2 = sA^2/nA + sB^2/nB and Welch-Satterthwaite df (one sample, A against a threshold: se = sA/sqrt(nA),
df = nA - 1). Margin m >= 0 is stated per claim. Each rule below partitions the position of [lo, hi], so
exactly one of reproduced / not reproduced / inconclusive holds:
  greater  (A beats B by a meaningful amount): not reproduced if hi < m (a gain of m is excluded, even if a
           smaller gain is certain); else reproduced if lo > 0; else inconclusive. (d < m/2 is never reproduced.)
  less     mirrored: not reproduced if lo > -m; else reproduced if hi < 0; else inconclusive.
  matches  non-inferiority: reproduced if lo > -m (A is not worse by m); not reproduced if hi < -m; else
           inconclusive.
  below t  reproduced if hi < t; not reproduced if lo >= t; else inconclusive (`above t` mirrored).
  speedup k  A reaches B's accuracy with k times less total cost (the papers' ratio of GPU-hours): target =
           B's seed-mean final accuracy - m; C_B = the cost at which B's seed-mean curve reaches it; c_i = each
           A seed's cost on its own curve, or "not reached" (censored: never a value or a bound). No A seed
           reached: not reproduced; some not reached: inconclusive; all: R = C_B / mean(c), interval
           [C_B / c_hi, C_B / c_lo] from the t interval of mean(c): reproduced if its low end >= k, not
           reproduced if its high end < k, else inconclusive. (B's curve not above its start + m: inconclusive.)
Before any rule: an arm without rows is inconclusive (not run); one whose rows lack the metric is "not
measured"; fewer than 2 seeds is inconclusive; a guarded claim is "not testable here" unless the spec's guard
(a `greater` claim: standard OPD beats pi_sft in this world) is reproduced.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (df may be fractional: Welch)."""
    from scipy.stats import t  # scipy comes with lm-eval (scikit-learn)

    return float(t.ppf(p, df))


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


@dataclass
class Interval:
    d: float
    lo: float
    hi: float


def interval(a: Stat, b: Stat | None = None, level: float = 0.95) -> Interval:
    """Welch-t interval of mean(A) - mean(B) (of mean(A) alone without B); needs n >= 2 per side."""
    sides = [a] if b is None else [a, b]
    v = [s.std ** 2 / s.n for s in sides]
    d = a.mean - (b.mean if b is not None else 0.0)
    if sum(v) == 0:
        return Interval(d, d, d)
    df = sum(v) ** 2 / sum(vi ** 2 / (s.n - 1) for vi, s in zip(v, sides))
    w = t_quantile(0.5 + level / 2, df) * math.sqrt(sum(v))
    return Interval(d, d - w, d + w)


def decide(kind: str, iv: Interval, margin: float = 0.0) -> str:
    """The verdict of one rule of the module docstring (`below`/`above`: iv is of A - threshold)."""
    lo, hi, m = iv.lo, iv.hi, margin
    if kind == "greater":
        return "not reproduced" if hi < m else "reproduced" if lo > 0 else "inconclusive"
    if kind == "less":
        return "not reproduced" if lo > -m else "reproduced" if hi < 0 else "inconclusive"
    if kind == "matches":
        return "reproduced" if lo > -m else "not reproduced" if hi < -m else "inconclusive"
    if kind in ("below", "above"):
        lo, hi = (lo, hi) if kind == "below" else (-hi, -lo)
        return "reproduced" if hi < 0 else "not reproduced" if lo >= 0 else "inconclusive"
    raise ValueError(f"unknown claim kind {kind!r}")


def verdict(kind: str, a: Stat, b: Stat | None = None, margin: float = 0.0, threshold: float | None = None,
            ran: tuple[bool, bool] = (True, True)) -> tuple[str, str, Interval | None]:
    """(verdict, why, interval) for an A-vs-B claim, or A against `threshold` (kinds below/above)."""
    sides = [a] if b is None else [a, b]
    for s, r in zip(sides, ran):
        if s.n == 0:
            return ("inconclusive", "not run", None) if not r else ("not measured", "the rows lack the metric", None)
    if any(s.n < 2 for s in sides):
        return "inconclusive", "fewer than 2 seeds", None
    iv = interval(a, b) if b is not None else interval(Stat(a.mean - threshold, a.std, a.n))
    result = decide(kind, iv, margin)
    return result, "" if result != "inconclusive" else "the interval spans the margin", iv


# ----------------------------------------------------------------------------- curves and cost to reach


def mean_curve(curves: list[list]) -> list[tuple[float, float, float]]:
    """(mark, mean cost, mean accuracy) per mark over the curves that have it; points are (mark, cost, acc)."""
    marks = sorted({p[0] for c in curves for p in c})
    points = [[p for c in curves for p in c if p[0] == mark] for mark in marks]
    return [(ps[0][0], statistics.fmean(p[1] for p in ps), statistics.fmean(p[2] for p in ps)) for ps in points]


def cost_to_reach(curve, target: float) -> float | None:
    """Cost at which the curve first reaches `target` (linear between points); None: not reached."""
    for (_, x0, y0), (_, x1, y1) in zip(curve, curve[1:]):
        if y0 >= target:
            return x0
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return curve[-1][1] if curve and curve[-1][2] >= target else None


def speedup(reference: list[list], arm: list[list], k: float, margin: float) -> dict:
    """The speedup rule of the module docstring: verdict, why, target, ref_cost, costs, ratio, lo, hi."""
    reference = [c for c in reference if c]
    out = {"costs": [], "ratio": None, "lo": None, "hi": None, "reached": 0, "n": len(arm)}
    if len(reference) < 2 or len([c for c in arm if c]) < 2:
        return {**out, "verdict": "inconclusive", "why": "fewer than 2 seeds with an accuracy curve"}
    ref = mean_curve(reference)
    out["target"] = target = ref[-1][2] - margin
    if ref[0][2] >= target:
        return {**out, "verdict": "inconclusive",
                "why": "the reference's curve gains less than the margin over its start: nothing to reach"}
    out["ref_cost"] = ref_cost = cost_to_reach(ref, target)
    out["costs"] = costs = [cost_to_reach(c, target) for c in arm]
    reached = [c for c in costs if c is not None]
    out["reached"] = len(reached)
    if not reached:
        return {**out, "verdict": "not reproduced", "why": "no seed reached the target within its run"}
    if len(reached) < len(costs):
        return {**out, "verdict": "inconclusive", "why": f"{len(costs) - len(reached)} of {len(costs)} seeds never "
                                                         "reached the target (not reached: no cost to reach)"}
    iv = interval(Stat.of(reached))
    out.update(ratio=ref_cost / iv.d if iv.d > 0 else math.inf, lo=ref_cost / iv.hi if iv.hi > 0 else math.inf,
               hi=ref_cost / iv.lo if iv.lo > 0 else math.inf)
    result = "reproduced" if out["lo"] >= k else "not reproduced" if out["hi"] < k else "inconclusive"
    return {**out, "verdict": result, "why": "" if result != "inconclusive" else "the interval spans the threshold"}
