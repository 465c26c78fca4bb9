"""The new micro world's machinery (issue #16): pi_sft early-stopped on held-out teacher samples, pi_sft's own seed,
the greedy accuracy beside a sampled primary metric, the old world's rows renamed micro-v1, and the regime map."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from opd_bench.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(root, *extra):
    return load_config("smoke", [f"artifacts_dir={root}", *extra])


def test_the_new_settings_leave_the_old_worlds_stage_keys_alone(tmp_path):
    from opd_bench.micro.world import stage_paths

    plain = stage_paths(_cfg(tmp_path))
    assert stage_paths(_cfg(tmp_path, "world.student_training.patience=9")) == plain  # inert without eval_every
    assert stage_paths(_cfg(tmp_path, f"world.student_seed={_cfg(tmp_path).world.seed}")) == plain
    early = stage_paths(_cfg(tmp_path, "world.sft_heldout=8", "world.student_training.eval_every=2"))
    assert early["teacher-a"] == plain["teacher-a"] and early["sft-data"] != plain["sft-data"]
    resampled = stage_paths(_cfg(tmp_path, "world.sample_batch_size=64"))  # sampling draws per batch: another world
    assert resampled["teacher-a"] == plain["teacher-a"] and resampled["sft-data"] != plain["sft-data"]
    assert stage_paths(_cfg(tmp_path, "eval.batch_size=7")) == plain  # the evaluation's batch is not the world's
    reseeded = stage_paths(_cfg(tmp_path, "world.student_seed=7"))
    assert reseeded["teacher-a"] == plain["teacher-a"] and reseeded["teacher-b"] == plain["teacher-b"]
    assert reseeded["sft-student"] != plain["sft-student"]


def test_early_stopping_keeps_the_best_held_out_checkpoint(smoke_world, tmp_path):
    """pi_sft stops once the held-out loss stops improving and keeps the best weights: their held-out loss, computed
    here independently (mean token NLL of the completions), is the best one the trainer logged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_bench.cache import read_manifest
    from opd_bench.micro.world import load_sft_data, prepare
    from opd_bench.sft import tokenize_pairs

    base, _ = smoke_world
    # the smoke world's teachers (a copy of their folders), a new pi_sft: 300 steps at most, evaluated every 5
    import shutil

    for name in ("tokenizer", "teacher-a", "teacher-b"):
        src = next(Path(base.artifacts_dir).glob(f"{name}-*"))
        shutil.copytree(src, tmp_path / src.name)
    cfg = _cfg(tmp_path, "world.sft_heldout=16", "world.student_training.eval_every=5",
               "world.student_training.patience=2", "world.student_training.steps=300",
               "world.student_training.lr=3e-2")
    world = prepare(cfg)
    info = read_manifest(world.sft_student)["info"]
    assert info["steps"] < 300 and info["best_step"] % 5 == 0 and info["best_step"] <= info["steps"] - 10
    heldout = load_sft_data(world.sft_data, heldout=True)
    assert len(heldout) == 16 and len(load_sft_data(world.sft_data)) == cfg.world.sft_prompts
    tok = AutoTokenizer.from_pretrained(world.sft_student)
    model = AutoModelForCausalLM.from_pretrained(world.sft_student).eval()
    data = tokenize_pairs(tok, heldout["prompt"], heldout["completion"])
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(data["input_ids"], data["labels"]):
            logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != -100
            nll += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            n += int(keep.sum())
    assert nll / n == pytest.approx(info["best_heldout_loss"], rel=2e-3)


def test_greedy_beside_a_sampled_metric_is_the_greedy_evaluation(smoke_world, tmp_path):
    from opd_bench.evaluation import evaluate
    from opd_bench.registry import TASKS

    cfg, world = smoke_world
    card = TASKS.get("micro-math-sampled")
    assert (card.k, card.temperature, card.greedy_beside) == (4, 0.6, True)
    sampled = evaluate(world.sft_student, card, tmp_path / "s", n_per_split=4, seed=3)
    greedy = evaluate(world.sft_student, card, tmp_path / "g", n_per_split=4, seed=3, k=1, temperature=0.0)
    assert sampled["k"] == 4 and "greedy" not in greedy
    assert sampled["greedy"]["accuracy"] == pytest.approx(greedy["avg@k"])
    assert sampled["greedy"]["per_split"] == pytest.approx({s: v["avg@k"] for s, v in greedy["per_split"].items()})
    curve = evaluate(world.sft_student, card, tmp_path / "c", n_per_split=4, seed=3, greedy=False)
    assert "greedy" not in curve


def test_the_new_cards_hold_enough_held_out_problems():
    from opd_bench.registry import TASKS

    cfg = load_config("micro")
    problems = [TASKS.get(t).load_problems(cfg.eval.n_per_split) for t in cfg.eval.tasks]
    assert sum(map(len, problems)) >= 1000
    assert all(len({p.prompt for p in ps}) == len(ps) for ps in problems)  # distinct prompts
    from opd_bench.micro.problems import is_held_out

    assert all(is_held_out(p.prompt) for ps in problems for p in ps)


def _migrate():
    spec = importlib.util.spec_from_file_location("migrate_leaderboard", ROOT / "scripts" / "migrate_leaderboard.py")
    module = sys.modules.setdefault("migrate_leaderboard", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def test_the_old_worlds_rows_are_renamed_micro_v1_and_no_others():
    m = _migrate()
    old = {"preset": "micro", "tasks": "micro-code@1;micro-math@1", "x": "1"}
    new = {"preset": "micro", "tasks": "micro-code-sampled@1;micro-math-sampled@1", "x": "1"}
    assert m.renamed_world(old) == {**old, "preset": "micro-v1"} and m.renamed_world(new) == new
    assert m.renamed_world({**old, "preset": "smoke"})["preset"] == "smoke"


def _row(preset, method, seed, avg, base, run_id):
    tag = "micro-math-sampled@1"
    return {"run_id": run_id, "time": f"2026-12-02T00:00:{seed:02d}+00:00", "preset": preset, "method": method,
            "label": method, "params": "{}", "params_changed": "{}", "seed": seed, "budget": "1ms", "status": "ok",
            "student": "sft-student-x", "train.lr": load_config(preset).train.lr, f"{tag}.avg@k": avg,
            f"{tag}.base_avg@k": base, "spent_device_s": 1.0, "curve": "[]"}


def test_the_regime_map_judges_each_preset_by_its_own_rows(tmp_path):
    """Two worlds: OPD gains in one (calibration reproduced) and not in the other; a third has no rows."""
    from opd_bench.report import regime_map
    from opd_bench.suite import load_spec

    rows = [_row("micro", "standard-opd", s, 0.70 + 0.01 * s, 0.60, f"a{s}") for s in range(3)]
    rows += [_row("micro-v1", "standard-opd", s, 0.58 + 0.005 * s, 0.60, f"b{s}") for s in range(3)]
    path = tmp_path / "lb.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run_id"] + sorted({k for r in rows for k in r} - {"run_id"}))
        writer.writeheader()
        writer.writerows(rows)
    table = regime_map(path, load_spec("micro"))
    assert table.header == ["", "micro", "micro-plateau", "micro-v1"]
    calibration = next(r for r in table.raw if r["row"] == "calibration")
    assert calibration == {"row": "calibration", "micro": "reproduced", "micro-plateau": "no runs",
                           "micro-v1": "not reproduced"}
    opd = next(r for r in table.raw if r["row"] == "standard-opd")
    assert opd["micro"] == pytest.approx(0.71) and opd["micro-v1"] == pytest.approx(0.585)
    guarded = next(r for r in table.raw if r["row"] == "exopd-beats")
    assert guarded["micro-v1"] == "not testable here"
    json.dumps(table.raw)  # the CSV's numbers are plain
