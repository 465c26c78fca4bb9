"""The regime card (scripts/regime_card.py, issue #16) and the old world as the named preset micro-v1.

The card's arithmetic is pinned on a synthetic input (every line, value and verdict, the boundaries included); the
script runs end to end on the smoke world (built in a temp folder), with and without the trained capacity check,
and refuses a world that is not built. micro-v1 resolves to exactly today's micro world (the same stage names).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from opd_bench.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("regime_card", ROOT / "scripts" / "regime_card.py")
rc = sys.modules.setdefault("regime_card", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(rc)


def _facts(**changes):
    facts = {
        "preset": "synthetic", "teacher_params": 60_000, "student_params": 12_000,
        "tasks": {
            "math@1": {"scorer": "math", "k": 4, "temperature": 0.6, "teacher": 0.9, "pi_sft": 0.5, "n_problems": 600,
                       "splits": ["ops-2", "ops-3", "ops-5"]},
            "code@1": {"scorer": "code", "k": 4, "temperature": 0.6, "teacher": 0.7, "pi_sft": 0.3, "n_problems": 500,
                       "splits": ["linear", "map-add"]},
        },
        "batch_size": 64, "mean_completion_tokens": 150.5,
        "capacity": {"teacher_samples": 500, "points": [{"factor": 8.0, "samples": 4000, "score": 0.76},
                                                        {"factor": 2.0, "samples": 1000, "score": 0.6}]},
    }
    facts.update(changes)
    return facts


def _card(facts):
    return {x.name: x for x in rc.card_lines(facts)}


def test_the_cards_arithmetic_on_a_synthetic_world_in_the_regime():
    card = _card(_facts())
    rows = [(x.name, x.value, x.verdict) for x in rc.card_lines(_facts())]
    assert rows == [
        ("teacher : student parameters", "60,000 : 12,000 = 5.00x", "PASS"),
        ("pi_sft / teacher, primary metric", "40.0% / 80.0% = 50.0%", "PASS"),  # means over tasks: .4 / .8
        ("primary metric", "avg@4 at T 0.6", "PASS"),
        ("task families", "math@1 (math), code@1 (code)", "PASS"),
        ("hardest split", "5 steps (math@1: 5)", "PASS"),  # code's families carry no step count
        ("held-out problems", "1,100 (math@1: 600, code@1: 500)", "PASS"),
        ("tokens per OPD step", "64 x 150.5 = 9,632", "info"),
        ("SFT curve, 1x (pi_sft)", "500 samples: 40.0% = 50.0% of teacher", "info"),
        ("SFT curve, 2x", "1,000 samples: 60.0% = 75.0% of teacher", "info"),
        ("SFT curve, 8x", "4,000 samples: 76.0% = 95.0% of teacher", "info"),
        ("not capacity-capped", "8x (4,000 samples): 95.0% of teacher", "PASS"),
    ]
    assert card["teacher : student parameters"].target == "3-8x"
    text = rc.render("synthetic", rc.card_lines(_facts()))
    assert text.splitlines()[0] == "regime card: preset synthetic" and text.endswith("7 of 7 targets pass")


def test_the_cards_boundaries_and_failures():
    assert _card(_facts(teacher_params=36_000))["teacher : student parameters"].verdict == "PASS"  # exactly 3x
    assert _card(_facts(teacher_params=96_000))["teacher : student parameters"].verdict == "PASS"  # exactly 8x
    assert _card(_facts(teacher_params=528_000))["teacher : student parameters"].verdict == "FAIL"  # 44x: micro-v1

    def with_scores(math_pi, code_pi, **task):
        facts = _facts()
        facts["tasks"] = {tag: {**v, **task} for tag, v in facts["tasks"].items()}
        facts["tasks"]["math@1"]["pi_sft"], facts["tasks"]["code@1"]["pi_sft"] = math_pi, code_pi
        return facts

    share = "pi_sft / teacher, primary metric"
    assert _card(with_scores(0.78, 0.58))[share].verdict == "PASS"  # .68 / .8 = 85% exactly
    assert _card(with_scores(0.8, 0.6))[share].verdict == "FAIL"  # 87.5%
    assert _card(with_scores(0.3, 0.3))[share].verdict == "FAIL"  # 37.5%
    zero = _facts()
    zero["tasks"] = {tag: {**v, "teacher": 0.0, "pi_sft": 0.0} for tag, v in zero["tasks"].items()}
    assert (_card(zero)[share].value, _card(zero)[share].verdict) == ("0.0% / 0.0% = n/a", "FAIL")

    greedy = _card(with_scores(0.5, 0.3, k=1, temperature=0.0))["primary metric"]
    assert (greedy.value, greedy.verdict) == ("avg@1 at T 0 (greedy)", "FAIL")
    assert _card(with_scores(0.5, 0.3, k=4, temperature=0.7))["primary metric"].verdict == "FAIL"
    assert _card(with_scores(0.5, 0.3, k=8, temperature=1.0))["primary metric"].verdict == "PASS"

    facts = _facts()
    facts["tasks"]["code@1"]["scorer"] = "math"
    assert _card(facts)["task families"].verdict == "FAIL"
    facts = _facts()
    facts["tasks"]["math@1"]["splits"] = ["ops-2", "ops-3"]
    assert (_card(facts)["hardest split"].value, _card(facts)["hardest split"].verdict) == ("3 steps (math@1: 3)", "FAIL")
    facts["tasks"]["math@1"]["splits"] = ["easy"]
    assert _card(facts)["hardest split"].verdict == "FAIL"
    facts = _facts()
    facts["tasks"]["code@1"]["n_problems"] = 399
    assert _card(facts)["held-out problems"].verdict == "FAIL"  # 999

    capped = "not capacity-capped"
    low = _facts(capacity={"teacher_samples": 500, "points": [{"factor": 8.0, "samples": 4000, "score": 0.71}]})
    assert _card(low)[capped].verdict == "FAIL"  # 88.75% of the teacher
    small = _facts(capacity={"teacher_samples": 500, "points": [{"factor": 4.0, "samples": 2000, "score": 0.8}]})
    assert _card(small)[capped].verdict == "FAIL"  # 100% of the teacher, but only 4x the samples
    assert capped not in _card(_facts(capacity=None))  # opt-in: no line without --capacity


@pytest.mark.slow
def test_the_card_on_the_smoke_world(smoke_world, tmp_path, capsys):
    from opd_bench.generation import count_params

    cfg, world = smoke_world
    out = tmp_path / "card.json"
    assert rc.main(["--preset", "smoke", "--set", f"artifacts_dir={cfg.artifacts_dir}", "--json", str(out),
                    "--length-prompts", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("regime card: preset smoke") and "targets pass" in printed
    result = json.loads(out.read_text())
    facts, card = result["facts"], {x["name"]: x for x in result["card"]}
    assert (facts["teacher_params"], facts["student_params"]) == (count_params(world.teacher_a),
                                                                  count_params(world.sft_student))
    assert set(facts["tasks"]) == {"micro-math@1", "micro-code@1"}
    assert sum(t["n_problems"] for t in facts["tasks"].values()) == 12 + 28  # 4 per split: 3 ops, 7 code families
    assert card["hardest split"]["value"].startswith("4 steps") and card["hardest split"]["verdict"] == "PASS"
    assert card["held-out problems"]["verdict"] == "FAIL" and card["primary metric"]["verdict"] == "FAIL"  # greedy
    assert facts["batch_size"] == 8 and 0 < facts["mean_completion_tokens"] <= 32 + 1
    assert "not capacity-capped" not in card


@pytest.mark.slow
def test_the_capacity_check_trains_the_sft_curve_on_smoke(smoke_world, tmp_path):
    cfg, _ = smoke_world
    out = tmp_path / "card.json"
    args = ["--preset", "smoke", "--set", f"artifacts_dir={cfg.artifacts_dir}", "--json", str(out),
            "--length-prompts", "8", "--capacity", "--curve", "0.5,8", "--max-steps", "6"]
    assert rc.main(args) == 0
    facts = json.loads(out.read_text())["facts"]
    points = facts["capacity"]["points"]
    assert [(p["factor"], p["samples"], p["steps"]) for p in points] == [(0.5, 24, 6), (8.0, 384, 6)]
    assert all(0.0 <= p["score"] <= 1.0 for p in points)
    stages = sorted(p.name.rsplit("-", 1)[0] for p in Path(cfg.artifacts_dir).iterdir() if p.name.startswith("regime-"))
    assert stages == ["regime-samples", "regime-student", "regime-student"]
    assert rc.main(args) == 0  # cached: the second card trains nothing
    assert json.loads(out.read_text())["facts"]["capacity"] == facts["capacity"]


def test_the_card_refuses_a_world_that_is_not_built(tmp_path, capsys):
    assert rc.main(["--preset", "smoke", "--set", f"artifacts_dir={tmp_path}"]) == 2
    assert "not built" in capsys.readouterr().err and not any(tmp_path.iterdir())


# --- micro-v1: the old world, pinned --------------------------------------------------------------------------------

# The micro preset as resolved on 2026-12-01 (commit c39916f): the world, budget and OPD settings micro-v1 keeps.
TODAY = {
    "artifacts_dir": "artifacts", "budget": "2m", "budget_clock": "wall",
    "world": {"kind": "micro", "seed": 0,
              "teacher": {"layers": 3, "hidden": 96, "heads": 4, "intermediate": 288},
              "student": {"layers": 2, "hidden": 16, "heads": 2, "intermediate": 48},
              "teacher_training": {"steps": 2500, "batch_size": 32, "lr": 3.0e-3, "warmup_steps": 50, "examples": 80000},
              "student_training": {"steps": 6000, "batch_size": 32, "lr": 1.0e-2, "warmup_steps": 100,
                                   "examples": 24000},
              "math_fraction": 0.6, "sft_prompts": 24000, "corrections": 0.0, "sft_temperature": 0.7,
              "max_new_tokens": 128},
    "eval": {"tasks": ["micro-math", "micro-code"], "n_per_split": None, "n_per_split_curve": 100},
    "train": {"lr": 3.0e-5, "batch_size": 32, "max_new_tokens": 128, "temperature": 1.0, "prompts": 20000,
              "rollout_prompts": 6400, "sft_prompts": 1600},
}


def _stage_names(cfg: RunConfig) -> dict[str, str]:
    from opd_bench.micro.world import stage_paths

    return {k: v.name for k, v in stage_paths(cfg).items()}


def test_micro_v1_resolves_to_todays_micro_world():
    v1 = load_config("micro-v1")
    today = RunConfig.model_validate(TODAY)
    assert _stage_names(v1) == _stage_names(today)
    assert v1.world == today.world and v1.artifacts_dir == today.artifacts_dir and v1.budget == today.budget
    for section in ("train", "eval"):
        assert {k: getattr(getattr(v1, section), k) for k in TODAY[section]} == TODAY[section], section
    import yaml

    assert "extends" not in yaml.safe_load((ROOT / "opd_bench" / "presets" / "micro-v1.yaml").read_text())


def test_the_new_micro_world_shares_micro_v1s_teachers_and_nothing_after_them():
    """The new micro world (issue #16) reuses the old world's teachers (the same stages) and builds its own SFT data
    and pi_sft; its budget is on the modeled clock (issue #17), micro-v1 keeps its 2-minute wall budget."""
    micro, v1 = _stage_names(load_config("micro")), _stage_names(load_config("micro-v1"))
    assert [micro[k] == v1[k] for k in ("tokenizer", "teacher-a", "teacher-b", "sft-data", "sft-student")] == \
        [True, True, True, False, False]
    micro, v1 = load_config("micro"), load_config("micro-v1")
    assert (micro.budget_clock, v1.budget, v1.budget_clock) == ("modeled", "2m", "wall")


def test_the_card_states_how_much_another_world_seed_moves_pi_sft():
    seeds = [{"seed": 0, "score": 0.70}, {"seed": 1, "score": 0.76}, {"seed": 2, "score": 0.73}]
    line = _card(_facts(student_seeds=seeds))["pi_sft across world seeds"]
    # mean 73.0, sample std 3.0, range 6.0 points
    assert line.value == "seed 0: 70.0%, seed 1: 76.0%, seed 2: 73.0%; 73.0% ± 3.0%, range 6.0%"
    assert line.verdict == "info"
