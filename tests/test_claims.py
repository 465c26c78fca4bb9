"""The claims engine (opd_bench/claims.py): t quantiles, the rules as partitions, and each defect of issue #17's
"Why" as a regression case: constructed numbers (or a synthetic leaderboard) on which the old rule, kept
below as `old_verdict` / `old_speedup`, gives the wrong verdict and the new rule the right one.
"""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from opd_bench.claims import Interval, Stat, cost_to_reach, decide, interval, speedup, t_quantile, verdict
from opd_bench.methods.base import get
from opd_bench.report import Report, parse
from opd_bench.suite import load_spec


def S(mean, std, n):
    return Stat(mean, std, n)


# ----------------------------------------------------------------------------- the old rules, as they were


def _se(s: Stat) -> float:
    return s.std / math.sqrt(s.n)


def old_verdict(kind, a, b=None, margin=0.0, threshold=None):
    """The rule before issue #17: u = 2 standard errors; 'reproduced' tested first."""
    if b is None:
        d, u, kind, margin = a.mean - threshold, 2 * _se(a), "less" if kind == "below" else "at-least", 0.0
    else:
        d, u = a.mean - b.mean, 2 * math.sqrt(_se(a) ** 2 + _se(b) ** 2)
    yes, no = {"greater": (d - u > 0, d + u < margin), "less": (d + u < 0, d - u > -margin),
               "equal": (abs(d) + u <= margin, abs(d) - u > margin),
               "at-least": (d - u >= -margin, d + u < -margin)}[kind]
    return "reproduced" if yes else "not reproduced" if no else "inconclusive"


def old_speedup(reference, arm, k, margin=0.01):
    """Per-seed speedups; a seed that never reached the target counted as ref_cost / its whole spend."""
    from opd_bench.claims import mean_curve

    ref = mean_curve(reference)
    target = ref[-1][2] - margin
    ref_cost = cost_to_reach(ref, target)
    per_seed = [ref_cost / (cost_to_reach(c, target) or c[-1][1]) for c in arm]
    return old_verdict("at-least", Stat.of(per_seed), threshold=k)


# ----------------------------------------------------------------------------- t quantiles and the rules


@pytest.mark.parametrize("p, df, table", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 5, 2.571),
    (0.975, 6, 2.447), (0.975, 8, 2.306), (0.975, 10, 2.228), (0.975, 20, 2.086), (0.975, 30, 2.042),
    (0.975, 120, 1.980), (0.95, 1, 6.314), (0.95, 2, 2.920), (0.95, 4, 2.132), (0.95, 10, 1.812),
    (0.995, 3, 5.841), (0.995, 10, 3.169)])
def test_t_quantiles_match_the_printed_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=6e-4)


def test_welch_interval_uses_welch_satterthwaite_df():
    a, b = S(0.60, 0.02, 3), S(0.50, 0.01, 5)
    va, vb = 0.02 ** 2 / 3, 0.01 ** 2 / 5
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 4)
    iv = interval(a, b)
    assert iv.d == pytest.approx(0.10)
    assert iv.hi - iv.d == pytest.approx(t_quantile(0.975, df) * math.sqrt(va + vb))
    assert 2 < df < 3  # between the smaller sample's n - 1 and the pooled n - 2
    one = interval(S(0.06, 0.01, 3))  # one sample: df = n - 1
    assert one.hi - one.d == pytest.approx(t_quantile(0.975, 2) * 0.01 / math.sqrt(3))
    assert interval(S(0.5, 0.0, 3), S(0.4, 0.0, 3)) == Interval(pytest.approx(0.1), pytest.approx(0.1),
                                                               pytest.approx(0.1))


def test_each_rule_is_a_partition_of_where_the_interval_lies():
    rng = random.Random(0)
    for _ in range(4000):
        lo = rng.uniform(-0.05, 0.05)
        hi, m = lo + rng.uniform(0, 0.05), rng.choice([0.0, 0.01, 0.02])
        iv = Interval((lo + hi) / 2, lo, hi)
        expected = {
            "greater": "not reproduced" if hi < m else "reproduced" if lo > 0 else "inconclusive",
            "less": "not reproduced" if lo > -m else "reproduced" if hi < 0 else "inconclusive",
            "matches": "reproduced" if lo > -m else "not reproduced" if hi < -m else "inconclusive",
            "below": "reproduced" if hi < 0 else "not reproduced" if lo >= 0 else "inconclusive",
            "above": "reproduced" if lo > 0 else "not reproduced" if hi <= 0 else "inconclusive",
        }
        for kind, want in expected.items():
            assert decide(kind, iv, m) == want
        # "reproduced" for greater needs an interval that reaches the margin: never both conditions
        assert not (decide("greater", iv, m) == "reproduced" and hi < m)
        assert not (lo > -m and hi < -m)  # matches: its two conditions exclude each other


def test_fewer_than_two_seeds_not_run_and_not_measured():
    assert verdict("greater", S(0.5, None, 1), S(0.4, 0.01, 3))[:2] == ("inconclusive", "fewer than 2 seeds")
    assert verdict("greater", S(None, None, 0), S(0.4, 0.01, 3), ran=(False, True))[:2] == ("inconclusive", "not run")
    assert verdict("less", S(None, None, 0), S(500, 5, 3), ran=(True, True))[0] == "not measured"
    assert verdict("below", S(0.06, 0.01, 3), threshold=0.10)[0] == "reproduced"
    assert verdict("below", S(0.20, 0.01, 3), threshold=0.10)[0] == "not reproduced"
    assert verdict("below", S(0.09, 0.02, 3), threshold=0.10)[0] == "inconclusive"


# ----------------------------------------------------------------------------- issue #17's defects


def test_defect_two_standard_errors_are_not_a_95_percent_interval_with_three_seeds():
    a, b = S(0.50, 0.02, 3), S(0.46, 0.02, 3)  # d = 4 points, se = 1.6: 2 se = 3.3, t(0.975, 4) se = 4.5
    assert old_verdict("greater", a, b, 0.01) == "reproduced"
    assert verdict("greater", a, b, 0.01)[0] == "inconclusive"
    # coverage of the true difference (0) over 3 + 3 normal seeds: ~89% for 2 se; Welch-t >= 95% (97%: conservative)
    rng, covered_old, covered_new, reps = random.Random(1), 0, 0, 3000
    for _ in range(reps):
        xa, xb = [Stat.of([rng.gauss(0, 1) for _ in range(3)]) for _ in range(2)]
        iv, u = interval(xa, xb), 2 * math.sqrt(_se(xa) ** 2 + _se(xb) ** 2)
        covered_new += iv.lo <= 0 <= iv.hi
        covered_old += abs(iv.d) <= u
    assert 0.85 < covered_old / reps < 0.91 and 0.945 < covered_new / reps < 0.985


def test_defect_a_small_certain_gain_is_not_a_meaningful_gain():
    a, b = S(0.503, 0.001, 3), S(0.500, 0.001, 3)  # +0.3 points, tight: both old tests held, "reproduced" won
    assert old_verdict("greater", a, b, 0.01) == "reproduced"
    assert verdict("greater", a, b, 0.01)[0] == "not reproduced"  # a 1-point gain is excluded
    assert verdict("less", S(0.497, 0.001, 3), b, 0.01)[0] == "not reproduced"  # mirrored


def test_defect_matches_is_non_inferiority_not_equality():
    better, b = S(0.66, 0.008, 3), S(0.63, 0.008, 3)  # 3 points better, 0.8 spread
    assert old_verdict("equal", better, b, 0.01) == "not reproduced"
    assert verdict("matches", better, b, 0.01)[0] == "reproduced"
    assert verdict("matches", S(0.630, 0.002, 3), S(0.631, 0.002, 3), 0.01)[0] == "reproduced"  # a tight tie
    assert verdict("matches", S(0.55, 0.008, 3), b, 0.01)[0] == "not reproduced"  # 8 points worse
    assert verdict("matches", S(0.62, 0.008, 3), b, 0.01)[0] == "inconclusive"


def _curve(points):
    return [(m, x, y) for m, x, y in points]


REFERENCE = [_curve([(0, 0, 0.40), (0.5, 150, 0.45), (1, 300, 0.50 + e)]) for e in (-0.002, 0.0, 0.002)]


def test_defect_a_seed_that_never_reaches_the_target_is_not_a_speedup():
    # stuck 7 points short, and out of data after 55-65 s: the old rule read ref_cost / spend (~4.5x) as its speedup
    stuck = [_curve([(0, 30, 0.40), (0.5, 45, 0.42), (1, spend, 0.43)]) for spend in (55, 60, 65)]
    assert old_speedup(REFERENCE, stuck, 3.6) == "reproduced"
    sp = speedup(REFERENCE, stuck, 3.6, 0.01)
    assert sp["verdict"] == "not reproduced" and sp["reached"] == 0 and sp["ratio"] is None
    partly = stuck[:1] + [_curve([(0, 30, 0.40), (0.25, 45, 0.50), (1, 300, 0.50)])] * 2
    assert speedup(REFERENCE, partly, 3.6, 0.01)["verdict"] == "inconclusive"


def test_speedup_is_the_ratio_of_total_costs_with_an_interval():
    fast = [_curve([(0, 10, 0.40), (0.25, c, 0.50), (1, 300, 0.50)]) for c in (40, 45, 50)]
    sp = speedup(REFERENCE, fast, 3.6, 0.01)
    ref_cost = 150 + 150 * (0.49 - 0.45) / 0.05  # 270: the reference's seed-mean curve reaches 0.49
    costs = [10 + (c - 10) * 0.9 for c in (40, 45, 50)]  # each seed reaches 0.49 at 90% of its rise
    assert sp["ref_cost"] == pytest.approx(ref_cost) and sp["costs"] == pytest.approx(costs)
    assert sp["ratio"] == pytest.approx(ref_cost / statistics.fmean(costs))  # not the mean of per-seed ratios
    assert sp["lo"] < sp["ratio"] < sp["hi"] and sp["lo"] >= 3.6 and sp["verdict"] == "reproduced"
    slow = [_curve([(0, 10, 0.40), (0.5, c, 0.50), (1, 300, 0.50)]) for c in (140, 150, 160)]
    assert speedup(REFERENCE, slow, 3.6, 0.01)["verdict"] == "not reproduced"  # ~2x, interval below 3.6
    flat = [_curve([(0, 0, 0.40), (1, 300, 0.405 + e)]) for e in (0, 0.001)]  # the reference gained < the margin
    assert "nothing to reach" in speedup(flat, fast, 3.6, 0.01)["why"]


# ----------------------------------------------------------------------------- on a synthetic leaderboard


def _row(method: str, seed: int, acc: float, params: dict | None = None, **cells) -> dict:
    m = get(method)
    p = m.params(params or {})
    row = {"run_id": f"r-{method}-{seed}", "method": method, "params": json.dumps(p.model_dump(mode="json")),
           "params_changed": json.dumps(m.changed(p)), "label": m.label(p), "seed": str(seed), "train.lr": "1e-4",
           "micro-math@1.avg@k": str(acc), "micro-math@1.base_avg@k": "0.65"}
    return row | {k: str(v) for k, v in cells.items()}


def _judge(rows: list[dict], claim: str) -> dict:
    spec = load_spec("micro")
    rep = Report([parse(r, 1e-4) for r in rows], spec, "micro", "5m", 1e-4)
    return rep.judge(spec["claims"][claim])


def test_defect_variants_are_compared_only_where_standard_opd_gains_anything():
    noise = (-0.001, 0.0, 0.001)
    exopd = [_row("exopd", s, 0.64 + e) for s, e in enumerate(noise)]
    worse = [_row("standard-opd", s, 0.62 + e) for s, e in enumerate(noise)]  # below pi_sft's 0.65
    old = old_verdict("greater", Stat.of([0.64 + e for e in noise]), Stat.of([0.62 + e for e in noise]), 0.01)
    assert old == "reproduced"
    j = _judge(exopd + worse, "exopd-beats")
    assert j["verdict"] == "not testable here" and "standard OPD beats pi_sft (not reproduced" in j["why"]
    better = [_row("standard-opd", s, 0.70 + e) for s, e in enumerate(noise)]
    assert _judge([_row("exopd", s, 0.72 + e) for s, e in enumerate(noise)] + better, "exopd-beats")["verdict"] \
        == "reproduced"
    # not guarded: the comparison with the control, and the estimator's variance
    assert _judge(worse + [_row("sft-continue", s, 0.60 + e) for s, e in enumerate(noise)], "opd-vs-sft")[
        "verdict"] == "reproduced"


def test_defect_memory_is_the_loss_peak_never_the_process_rss():
    rss = {"tip": (579, 583, 575), "full-kl": (586, 590, 582)}  # the committed rows' shape: -1.3% of a process
    rows = [_row(m, s, 0.70, peak_rss_mb=rss[m][s]) for m in rss for s in range(3)]
    rows += [_row("standard-opd", s, 0.70 + 0.001 * s) for s in range(3)]
    assert old_verdict("less", Stat.of(rss["tip"]), Stat.of(rss["full-kl"]), 0.0) == "reproduced"
    assert _judge(rows, "tip-memory")["verdict"] == "not measured"
    loss = {"tip": (310, 305, 300), "full-kl": (600, 610, 590)}  # measured: half the loss's peak, RSS unchanged
    rows = [r | {"loss_peak_mb": str(loss[r["method"]][int(r["seed"])])} if r["method"] in loss else r for r in rows]
    assert _judge(rows, "tip-memory")["verdict"] == "reproduced"
