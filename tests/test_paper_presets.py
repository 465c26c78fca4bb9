"""The paper presets validate, carry the papers' hyperparameters, and their loaders work on tiny local
stand-ins saved in the same format (save_pretrained of a tiny Qwen3 + tokenizer, DAPO-style prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_bench.config import load_config
from opd_bench.errors import UserError

PAPER_TASKS = ["aime24", "aime25", "hmmt25", "livecodebench-v5", "livecodebench-v6"]


@pytest.mark.parametrize("preset, student, teacher, budget", [
    ("lightning-4b", "Qwen/Qwen3-4B-Base", "Qwen/Qwen3-8B", "20h"),
    ("lightning-8b", "Qwen/Qwen3-8B-Base", "Qwen/Qwen3-32B", "30h"),
])
def test_paper_presets_validate_with_the_papers_hyperparameters(preset, student, teacher, budget):
    cfg = load_config(preset)
    assert cfg.world.kind == "hf" and cfg.budget == budget
    assert (cfg.world.hf.student, cfg.world.hf.teacher) == (student, teacher)
    assert cfg.world.hf.prompts == "BytedTsinghua-SIA/DAPO-Math-17k"
    t = cfg.train
    assert (t.lr, t.batch_size, t.rollouts_per_prompt, t.max_new_tokens, t.temperature) == (2e-6, 256, 1, 4096, 1.0)
    assert round(t.max_passes * t.rollout_prompts / t.batch_size) in range(140, 160)  # ~150 steps
    assert cfg.eval.tasks == PAPER_TASKS and cfg.eval.backend == "vllm" and t.vllm
    from opd_bench.resolve import resolve

    assert resolve(cfg, "lightning-opd").params.clip_eps == 0.2


def test_a_paper_preset_without_its_sft_checkpoint_says_what_to_set():
    from opd_bench.worlds import load_world

    with pytest.raises(UserError, match="world.hf.sft_student"):
        load_world(load_config("lightning-8b"))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny Qwen3 student and teacher + tokenizer saved like hub checkpoints, and DAPO-format prompts."""
    from opd_bench.micro.models import new_model
    from opd_bench.micro.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("standins")
    tokenizer = build_char_tokenizer()
    for name, hidden, seed in (("student", 16, 0), ("teacher", 32, 1)):
        model = new_model(tokenizer, seed, layers=1, hidden=hidden, heads=2, intermediate=2 * hidden)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with (root / "dapo.jsonl").open("w") as f:
        for i in range(12):
            f.write(json.dumps({"data_source": "math_dapo", "ability": "MATH",
                                "prompt": [{"role": "user", "content": f"What is {i} + {i}? Answer: $Answer"}],
                                "reward_model": {"ground_truth": str(2 * i), "style": "rule-lm"}}) + "\n")
    return root


def _overrides(root: Path, tmp: Path) -> list[str]:
    return [f"world.hf.sft_student={root}/student", f"world.hf.teacher={root}/teacher",
            f"world.hf.teacher_b={root}/teacher", f"world.hf.prompts={root}/dapo.jsonl",
            f"artifacts_dir={tmp}/artifacts", f"runs_dir={tmp}/runs", f"leaderboard={tmp}/lb.csv",
            "eval.backend=hf", "train.vllm=false"]  # CPU stand-ins: no vLLM


def test_hf_loaders_work_on_local_stand_ins(stand_ins, tmp_path):
    from opd_bench.hf_world import load_prompts
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.offline import check_tokenizers
    from opd_bench.worlds import load_world

    cfg = load_config("lightning-8b", _overrides(stand_ins, tmp_path))
    world = load_world(cfg)
    assert world.student == f"{stand_ins}/student" and world.tokenizer == world.student
    tokenizer = load_tokenizer(world.tokenizer)
    assert tokenizer.padding_side == "left"
    model = load_model(world.student, cfg)
    assert model.config.model_type == "qwen3"
    check_tokenizers(tokenizer, world.student, (world.teacher_a,))
    prompts = load_prompts(cfg.world.hf, 5, "test")
    assert len(prompts) == 5 and all(p.startswith("What is") for _, p in prompts)
    assert load_prompts(cfg.world.hf, 5, "test") == prompts != load_prompts(cfg.world.hf, 5, "other")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lightning-opd", "standard-opd"])
def test_a_paper_preset_runs_end_to_end_on_stand_ins(stand_ins, tmp_path, method):
    from opd_bench.run import run

    cfg = load_config("lightning-8b", _overrides(stand_ins, tmp_path) + [
        "train.batch_size=4", "train.micro_batch_size=2", "train.max_new_tokens=8", "train.rollout_prompts=8",
        "train.prompts=8", "train.max_steps=2", "eval.tasks=[micro-math]", "eval.n_per_split=1", "eval.curve=[]"])
    metrics = run(cfg, method, "60s")
    assert metrics["steps"] == 2 and "micro-math@1" in metrics["after"]
