"""`opd-bench report`: deterministic bytes, tables and claims driven by the suite spec and the rows' own labels,
the papers' numbers beside ours, the suite's time, and the one-time migration of old leaderboards.

The fixture (tests/fixtures/report/, written by its make_fixture.py) is a small synthetic leaderboard whose
numbers were constructed so that each verdict has a known answer.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_bench.report import Report, Run, _duration, _suite_lines, build, parse
from opd_bench.suite import load_spec

FIXTURE = Path(__file__).parent / "fixtures" / "report"
LEADERBOARD = FIXTURE / "leaderboard.csv"
COMMAND = "opd-bench report --preset micro --leaderboard tests/fixtures/report/leaderboard.csv --out reports"
REPO = Path(__file__).resolve().parent.parent


def _bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _csv(path: Path, key: str = "arm") -> dict:
    return {r[key]: r for r in csv.DictReader(path.open())}


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


def test_claims_table_has_every_claim_of_the_spec_with_the_constructed_verdicts(built):
    rows = _csv(built / "claims.csv", "id")
    assert list(rows) == list(load_spec("micro")["claims"])
    verdicts = {claim: r["verdict"] for claim, r in rows.items()}
    assert verdicts == {
        "calibration": "reproduced",  # standard OPD +7.6 points over pi_sft: the guard holds
        "opd-vs-sft": "reproduced",  # +10 points
        "lightning-matches": "inconclusive",  # -0.2 points, interval [-1.4, +1.0] reaches past the 1-point margin
        "lightning-speedup": "not reproduced",  # 2.9x, interval [2.8, 3.0] below 3.6x
        "inconsistent-worse": "reproduced",
        "exopd-beats": "not reproduced",  # 1 point below: a 1-point gain is excluded
        "vopd-variance": "reproduced",  # half the variance
        "vopd-accuracy": "reproduced",  # non-inferior
        "tip-accuracy": "reproduced",
        "tip-memory": "reproduced",  # loss_peak_mb halved (the process RSS is the same and is not read)
        "tip-q3-tokens": "reproduced",  # 6%
        "tip-q3-accuracy": "inconclusive",  # 6-point seed noise
    }
    assert 2.8 < float(rows["lightning-speedup"]["ratio"]) < 3.0
    assert rows["tip-accuracy"]["compared"] == "tip vs full-kl"  # the rows' own labels
    text = (built / "README.md").read_text()
    assert all(r["claim"] in text for r in rows.values())  # the README embeds the claims table


def test_rows_are_grouped_by_their_recorded_label_and_selected_as_documented(built):
    main = _csv(built / "main.csv")
    assert list(main)[:9] == ["pi_sft", "standard-opd", "lightning-opd", "inconsistent-offline", "exopd", "vopd",
                              "tip", "full-kl", "sft-continue"]  # the spec's core order, then the other labels
    assert {"exopd [lam=1.5]", "tip [rule=q3]", "tip [loss=sampled]", "vopd [top_k=10]"} <= set(main)
    assert main["standard-opd"]["avg.n"] == "3"  # the 1e-3 sweep rows are in best-lr, the 1m row nowhere
    assert main["exopd [lam=1.5]"]["avg.n"] == "3"  # a diverged run has no scores: counted, not averaged
    assert "| 3 (+1 diverged) |" in (built / "main.md").read_text()
    cost = _csv(built / "cost.csv")
    assert cost["full-kl"]["to_reach.device_h"] == ""  # it never comes within 1 point of standard-opd
    assert "not reached (3/3)" in (built / "cost.md").read_text()
    assert float(cost["lightning-opd"]["speedup"]) > 2  # its curve rises 4x faster, after 30 s of rollouts
    tip = _csv(built / "tip.csv")
    assert list(tip) == ["full-kl", "tip", "tip [rule=q3]", "standard-opd", "tip [loss=sampled]"]  # spec order
    assert tip["tip [loss=sampled]"]["loss"] == "sampled" and tip["tip"]["loss"] == "reverse-kl"
    assert float(tip["tip"]["loss_peak_mb.mean"]) < 0.6 * float(tip["full-kl"]["loss_peak_mb.mean"])
    assert _csv(built / "exopd-lambda.csv")["exopd [lam=1.5]"]["lam"] == "1.5"
    readme = (built / "README.md").read_text()
    assert "other budgets in the file, not shown: 1m" in readme and "1 diverged" in readme
    assert "opd-bench suite --preset micro --seeds 3 --workers 2  # 39 runs, 148.0 min" in readme  # exact, timed
    assert "![" in readme and "accuracy_vs_cost.png" in readme
    assert float(_csv(built / "best-lr.csv")["standard-opd"]["best_lr"]) == pytest.approx(1e-4)


def _row(**over) -> dict:
    row = {"run_id": "r", "preset": "micro", "method": "exopd", "seed": "0", "budget": "5m", "train.lr": "1e-4",
           "params": json.dumps({"lam": 1.25, "reference": "pi_sft", "rollouts": "online", "teacher": "consistent",
                                 "clip_eps": 0.2, "ratio": "current"}), "params_changed": "{}", "label": "exopd",
           "micro-math@1.avg@k": "0.5", "micro-math@1.base_avg@k": "0.4"}
    return row | over


def test_labels_come_from_the_row_never_from_todays_defaults():
    # a row recorded when lam's default was another value: it changed lam, and says so in its label
    old = _row(seed="1", params_changed=json.dumps({"lam": 1.25}), label="exopd [lam=1.25]")
    rep = Report([parse(_row(), 1e-4), parse(old, 1e-4)], load_spec("micro"), "micro", "5m", 1e-4)
    assert rep.labels == ["exopd", "exopd [lam=1.25]"]  # grouped by what each run recorded
    claim = load_spec("micro")["claims"]["exopd-beats"]  # its arm is {exopd, lam: 1.25}: both rows belong to it
    assert len(rep.of(claim["a"])) == 2 and rep.name(claim["a"]) == "exopd / exopd [lam=1.25]"
    assert rep.of("exopd") == [rep.runs[0]]  # the bare arm: default rows only
    assert rep.name({"method": "tip", "params": {"rule": "q3"}}) == "tip [rule=q3]"  # no rows: the spec's name


def test_paper_numbers_sit_beside_ours_for_paper_presets():
    row = {"run_id": "r", "preset": "lightning-8b", "method": "lightning-opd", "label": "lightning-opd", "seed": "0",
           "budget": "30h", "params": "{}", "params_changed": "{}", "train.lr": "2e-06", "aime24@1.avg@k": "0.5",
           "aime24@1.base_avg@k": "0.4", "livecodebench-v5@1.avg@k": "0.3", "livecodebench-v5@1.base_avg@k": "0.2",
           "spent_device_s": "100"}
    rep = Report([parse(row, 2e-6)], load_spec("lightning-8b"), "lightning-8b", "30h", 2e-6)
    table = rep.main()
    rows = {r[0]: dict(zip(table.header, r)) for r in table.rows}
    assert rows["lightning-opd"]["aime24@1"] == "50.0"
    assert rows["  paper: lightning-opd"]["aime24@1"] == "69.9"  # Qwen3-8B-Base / Qwen3-32B in the paper's table
    assert rows["  paper: lightning-opd"]["livecodebench-v5@1"] == "49.5"
    assert rows["  paper: sft"]["math avg"] == "50.8"
    assert "  paper: standard-opd" not in rows  # no rows of that arm here
    micro = Report([parse(row, 2e-6)], load_spec("micro"), "micro", "30h", 2e-6)
    assert not any(r[0].strip().startswith("paper") for r in micro.main().rows)  # no paper numbers for micro


def test_how_long_it_took_counts_the_union_of_run_intervals_not_the_gaps_between_invocations():
    def run(end_min, wall_min, command="opd-bench suite --core"):
        return Run(label="a", method="a", params={}, changed={}, seed="0", lr=None, status="ok", scores={}, base={},
                   stages={}, spent_s=0, curve=[], end=f"2026-01-01T{10 + end_min // 60:02d}:{end_min % 60:02d}:00",
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


# ----------------------------------------------------------------------------- the migration of old rows


def _migration():
    spec = importlib.util.spec_from_file_location("migrate_leaderboard", REPO / "scripts" / "migrate_leaderboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AXES = {"rollouts": "online", "teacher": "consistent", "reward": "opd", "lam": "1", "reference": "pi_sft",
        "reward_to_go": "False", "baseline": "none", "top_k": "", "tokens": "all", "fraction": "0.5", "loss": "pg",
        "beta": "1", "clip_eps": "", "ratio": "current"}


def _old(method: str, variant: str = "", **axes) -> dict:
    return {"run_id": "old", "method": method, "variant": variant, "seed": "0",
            **{f"axis.{k}": v for k, v in {**AXES, **axes}.items()}, "train.lr": "3e-05", "curve": "[]"}


def test_migration_maps_old_axes_onto_the_methods_parameters(tmp_path):
    m = _migration()
    q3 = m.migrate_row(_old("tip", "tokens=q3", tokens="q3"), "x")
    assert q3["label"] == "tip [rule=q3,loss=sampled]"  # old TIP ran the sampled-token policy gradient
    assert json.loads(q3["params_changed"]) == {"loss": "sampled", "rule": "q3"}
    assert json.loads(q3["params"]) == {"clip_eps": None, "fraction": 0.5, "loss": "sampled", "ratio": "current",
                                        "rollouts": "online", "rule": "q3", "teacher": "consistent"}
    assert list(q3)[:5] == ["run_id", "method", "params", "params_changed", "label"]
    assert not any(k.startswith("axis.") or k == "variant" for k in q3) and q3["train.lr"] == "3e-05"
    lam = m.migrate_row(_old("exopd", "lam=1.0", reward="exopd", lam="1", clip_eps="0.2"), "x")
    assert lam["label"] == "exopd [lam=1.0]"
    assert m.migrate_row(_old("full-kl", loss="full-kl"), "x")["params"] == '{"beta":1.0}'  # its own axes dropped
    assert m.migrate_row(_old("vopd", "top_k=10", baseline="vopd", top_k="10"), "x")["label"] == "vopd [top_k=10]"
    with pytest.raises(SystemExit, match="no parameter for it"):  # set away from the method, with nowhere to go
        m.migrate_row(_old("vopd", "tokens=q3", baseline="vopd", tokens="q3"), "x")
    with pytest.raises(SystemExit, match="do not map"):  # TIP with rule 'all' is not a TIP rule
        m.migrate_row(_old("tip", "tokens=all"), "x")
    old_style = _old("full-kl", loss="full-kl") | {"run_dir": str(FIXTURE / "runs" / "full-kl-s2"), "curve": ""}
    del old_style["train.lr"]
    done = m.migrate_row(old_style, "x")  # written before the curve and lr columns: completed from its run folder
    assert json.loads(done["curve"])[0][0] == 0.0 and done["train.lr"] == "0.0001"
    path = tmp_path / "lb.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(_old("standard-opd")))
        writer.writeheader()
        writer.writerows([_old("tip", tokens="entropy"), _old("standard-opd")])
    assert m.migrate(path) == 2 and m.migrate(path) == 0  # once: a second run finds nothing to migrate
    rows = list(csv.DictReader(path.open()))
    assert [r["label"] for r in rows] == ["tip [loss=sampled]", "standard-opd"]
