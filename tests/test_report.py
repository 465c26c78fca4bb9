"""`opd-bench report`: deterministic bytes, the claims table, and the rules behind its verdicts.

The fixture (tests/fixtures/report/, written by its make_fixture.py) is a small synthetic leaderboard whose
numbers were constructed so that each verdict has a known answer, plus one old-style row completed from its
run folder.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_bench.claims import Stat, cost_to_reach, speedups, verdict
from opd_bench.report import build

FIXTURE = Path(__file__).parent / "fixtures" / "report"
LEADERBOARD = FIXTURE / "leaderboard.csv"
COMMAND = "opd-bench report --preset micro --leaderboard tests/fixtures/report/leaderboard.csv --out reports"


def _bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-a")
    build(LEADERBOARD, out, preset="micro", command=COMMAND)
    return out


def test_the_report_is_byte_identical_when_rebuilt_in_another_process(built, tmp_path):
    """Another interpreter with another hash seed (set iteration order) writes the same bytes, PNGs included."""
    code = ("import sys; from opd_bench.report import build; "
            "build(sys.argv[1], sys.argv[2], preset='micro', command=sys.argv[3])")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(LEADERBOARD), str(tmp_path), COMMAND], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = _bytes(built), _bytes(tmp_path)
    assert sorted(first) == sorted(second)
    assert {"README.md", "claims.md", "claims.tex", "claims.csv", "main.md", "cost.md", "exopd-lambda.md", "vopd.md",
            "tip.md", "best-lr.md", "accuracy_vs_cost.png", "exopd_lambda.png", "tip_rules.png",
            "vopd_variance.png"} <= set(first)
    changed = [name for name in first if first[name] != second[name]]
    assert not changed, changed


def test_tables_match_the_committed_expected_files(built):
    """Regenerate expected/ with `python tests/fixtures/report/make_fixture.py --expected` after an intended change."""
    for expected in sorted((FIXTURE / "expected").iterdir()):
        assert (built / expected.name).read_text() == expected.read_text(), expected.name


def test_claims_table_has_every_claim_with_the_constructed_verdicts(built):
    rows = {r["claim"]: r for r in csv.DictReader((built / "claims.csv").open())}
    assert len(rows) == 11
    verdicts = {claim: r["verdict"] for claim, r in rows.items()}
    assert verdicts["OPD beats spending the same budget on more SFT"] == "reproduced"  # +10 points
    assert verdicts["Lightning OPD matches standard OPD"] == "reproduced"  # tied, small noise
    assert verdicts["teacher-inconsistent offline OPD is worse than Lightning OPD"] == "reproduced"
    assert verdicts["ExOPD (lambda 1.25) beats standard OPD"] == "not reproduced"  # 1 point below
    assert verdicts["vOPD has lower gradient variance than standard OPD"] == "reproduced"  # half the variance
    assert verdicts["TIP entropy-50% needs less peak memory than all-token OPD"] == "not reproduced"
    assert verdicts["TIP Q3 trains on < 10% of the tokens"] == "reproduced"  # 6%
    assert verdicts["TIP Q3 nearly matches all-token OPD"] == "inconclusive"  # 6-point seed noise
    lightning = rows["Lightning OPD reaches standard OPD's accuracy >= 3.6x cheaper"]
    assert 1.0 < float(lightning["a.mean"]) < 3.6 and lightning["verdict"] == "not reproduced"
    text = (built / "README.md").read_text()
    assert all(claim in text for claim in rows)  # the README embeds the claims table


def test_rows_are_selected_and_completed_as_documented(built):
    main = {r["arm"]: r for r in csv.DictReader((built / "main.csv").open())}
    assert main["full-kl"]["avg.n"] == "3"  # seed 2 is old-style: lr and curve come from its run folder
    assert main["standard-opd"]["avg.n"] == "3"  # the 3e-4 sweep rows are in best-lr, the 1m row nowhere
    assert main["exopd [lam=1.5]"]["avg.n"] == "3"  # a diverged run has no scores: counted, not averaged
    assert "| 3 (+1 diverged) |" in (built / "main.md").read_text()
    cost = {r["arm"]: r for r in csv.DictReader((built / "cost.csv").open())}
    assert cost["full-kl"]["to_reach.device_h"] == ""  # its curve (from metrics.json) ends below the target
    assert float(cost["lightning-opd"]["speedup"]) > 2  # its curve rises 4x faster, after 30 s of rollouts
    readme = (built / "README.md").read_text()
    assert "other budgets in the file, not shown: 1m" in readme and "1 diverged" in readme
    assert "opd-bench suite --preset micro --seeds 3 --workers 2" in readme  # the exact commands
    assert "![" in readme and "accuracy_vs_cost.png" in readme
    best = {r["arm"]: r for r in csv.DictReader((built / "best-lr.csv").open())}
    assert float(best["standard-opd"]["best_lr"]) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- the rules, on constructed numbers


def S(mean, std, n):
    return Stat(mean, std, n)


@pytest.mark.parametrize("kind, a, b, expected", [
    ("greater", S(0.50, 0.01, 3), S(0.40, 0.01, 3), "reproduced"),  # d = 10 points, u ~ 1.6
    ("greater", S(0.40, 0.01, 3), S(0.41, 0.01, 3), "not reproduced"),  # d + u < 1 point
    ("greater", S(0.42, 0.03, 3), S(0.40, 0.03, 3), "inconclusive"),  # d = 2, u ~ 4.9
    ("less", S(0.30, 0.01, 3), S(0.40, 0.01, 3), "reproduced"),
    ("less", S(0.41, 0.001, 3), S(0.40, 0.001, 3), "not reproduced"),
    ("equal", S(0.400, 0.002, 4), S(0.401, 0.002, 4), "reproduced"),  # |d| + u = 0.1 + 0.28 points <= 1
    ("equal", S(0.45, 0.01, 4), S(0.40, 0.01, 4), "not reproduced"),
    ("equal", S(0.405, 0.02, 3), S(0.40, 0.02, 3), "inconclusive"),
    ("at-least", S(0.398, 0.002, 3), S(0.40, 0.002, 3), "reproduced"),  # within the margin below
    ("at-least", S(0.35, 0.005, 3), S(0.40, 0.005, 3), "not reproduced"),
    ("greater", S(0.50, None, 1), S(0.40, 0.01, 3), "inconclusive"),  # one seed
    ("greater", S(None, None, 0), S(0.40, 0.01, 3), "inconclusive"),  # not run
])
def test_verdict_rule(kind, a, b, expected):
    assert verdict(kind, a, b, margin=0.01)[0] == expected


def test_threshold_claims_and_reasons():
    assert verdict("below", S(0.06, 0.01, 3), threshold=0.10)[0] == "reproduced"
    assert verdict("below", S(0.20, 0.01, 3), threshold=0.10)[0] == "not reproduced"
    assert verdict("below", S(0.09, 0.02, 3), threshold=0.10)[0] == "inconclusive"
    assert verdict("at-least", S(4.0, 0.1, 3), threshold=3.6)[0] == "reproduced"
    assert verdict("greater", S(0.5, None, 1), S(0.4, None, 1)) == ("inconclusive", "fewer than 2 seeds")
    assert verdict("greater", S(None, None, 0), S(0.4, 0.1, 2)) == ("inconclusive", "not run")


def test_cost_to_reach_interpolates_and_speedup_compares_with_the_reference():
    curve = [(0.0, 0.0, 0.40), (0.25, 75.0, 0.50), (0.5, 150.0, 0.60)]
    assert cost_to_reach(curve, 0.55) == pytest.approx(112.5)
    assert cost_to_reach(curve, 0.40) == 0.0
    assert cost_to_reach(curve, 0.61) is None

    from opd_bench.report import Run

    def run(points):
        return Run(arm="x", method="x", seed="0", lr=1e-4, status="ok", scores={}, base={}, stages={}, spent_s=300,
                   curve=points, diag={})

    reference = [run([(0.0, 0.0, 0.40), (0.5, 150.0, 0.45), (1.0, 300.0, 0.50)])]  # target 0.50 - 0.01
    fast = [run([(0.0, 30.0, 0.40), (0.25, 75.0, 0.50), (1.0, 300.0, 0.50)])]
    sp = speedups(reference, fast)
    ref_cost = 150 + 150 * (0.49 - 0.45) / 0.05  # 270
    fast_cost = 30 + 45 * (0.49 - 0.40) / 0.10  # 70.5
    assert sp["ref_cost"] == pytest.approx(ref_cost) and sp["cost"] == pytest.approx(fast_cost)
    assert sp["speedup"] == pytest.approx(ref_cost / fast_cost) and sp["per_seed"] == [pytest.approx(ref_cost / fast_cost)]
    flat = [run([(0.0, 0.0, 0.40), (1.0, 300.0, 0.405)])]  # standard OPD gained less than the margin
    assert "why" in speedups(flat, fast)


def test_paper_numbers_sit_beside_ours_for_paper_presets():
    from opd_bench.report import Report, parse

    row = {"run_id": "r", "preset": "lightning-8b", "method": "lightning-opd", "seed": "0", "budget": "30h",
           "train.lr": "2e-06", "aime24@1.avg@k": "0.5", "aime24@1.base_avg@k": "0.4",
           "livecodebench-v5@1.avg@k": "0.3", "livecodebench-v5@1.base_avg@k": "0.2", "spent_device_s": "100"}
    rep = Report([parse(row, 2e-6)], "lightning-8b", "30h", 2e-6, "hf", "Qwen/Qwen3-8B-Base")
    table = rep.main()
    rows = {r[0]: dict(zip(table.header, r)) for r in table.rows}
    assert rows["lightning-opd"]["aime24@1"] == "50.0"
    assert rows["  paper: lightning-opd"]["aime24@1"] == "69.9"  # Qwen3-8B-Base / Qwen3-32B in the paper's table
    assert rows["  paper: lightning-opd"]["livecodebench-v5@1"] == "49.5"
    assert rows["  paper: pi_sft (SFT)"]["math avg"] == "50.8"
    micro = Report([parse(row, 2e-6)], "micro", "30h", 2e-6, "micro", "")
    assert not any(r[0].strip().startswith("paper") for r in micro.main().rows)  # no paper numbers for micro


def test_how_long_it_took_counts_the_union_of_run_intervals_not_the_gaps_between_invocations():
    from opd_bench.report import Run, _duration, _suite_lines

    def run(end_min, wall_min, command="opd-bench suite --core"):
        return Run(arm="a", method="a", seed="0", lr=None, status="ok", scores={}, base={}, stages={}, spent_s=0,
                   curve=[], diag={}, end=f"2026-01-01T{10 + end_min // 60:02d}:{end_min % 60:02d}:00",
                   wall_s=60.0 * wall_min, suite_command=command)

    # one invocation: runs [0, 10] and [5, 20] overlap (two workers); 40 idle minutes; a second one: [60, 70]
    runs = [run(10, 10), run(20, 15), run(70, 10, "opd-bench suite --full")]
    text = _duration(runs)
    assert text.startswith("30.0 minutes with at least one run in progress")
    assert "0.58 hours of run processes" in text  # 35 minutes of processes
    assert _suite_lines(runs) == ["opd-bench suite --core  # 2 runs, 20.0 min",
                                  "opd-bench suite --full  # 1 run, 10.0 min"]
    assert "not counted" not in _duration(runs[:1])
    no_wall = Run(**{**runs[0].__dict__, "wall_s": None})
    assert _duration([no_wall, run(30, 5)]).startswith("5.0 minutes")
    assert "1 rows without their wall time" in _duration([no_wall, run(30, 5)])
    assert _duration([no_wall]).startswith("unknown")
