"""Config, registry, tokenizer, micro-task generators and the stage cache."""

import json
import subprocess
import sys
import textwrap

import pytest

from opd_bench.cache import build_stage, is_built
from opd_bench.config import load_config
from opd_bench.errors import UserError
from opd_bench.micro import problems as P
from opd_bench.micro.tokenizer import CHARACTERS, build_char_tokenizer
from opd_bench.registry import TASKS, Registry


# ----------------------------------------------------------------------------- config

def test_preset_and_overrides_are_typed():
    cfg = load_config("smoke", ["seed=7", "world.sft_prompts=12", "world.sft_temperature=0.5"])
    assert (cfg.seed, cfg.world.sft_prompts, cfg.world.sft_temperature) == (7, 12, 0.5)
    assert cfg.world.teacher.layers == 1  # smoke overrides micro
    assert cfg.world.kind == "micro"  # inherited through `extends: micro`


def test_training_prompt_mix_defaults_to_the_worlds_and_can_be_overridden():
    from opd_bench.worlds import training_prompts

    def math_share(overrides):
        prompts = training_prompts(load_config("smoke", overrides), 200, "mix")
        return sum(pid.startswith("math-") for pid, _ in prompts) / len(prompts)

    assert math_share(["world.math_fraction=0.25"]) == 0.25  # the mix pi_sft learned
    assert math_share(["world.math_fraction=0.25", "train.math_fraction=1"]) == 1.0
    assert math_share(["train.math_fraction=0"]) == 0.0


@pytest.mark.parametrize("preset, overrides, message", [
    ("smok", [], "did you mean 'smoke'"),
    ("micro", ["world.sft_prompt=3"], "did you mean 'sft_prompts'"),
    ("micro", ["wrld.sft_prompts=3"], "did you mean 'world'"),
    ("micro", ["world.sft_prompts=abc"], "valid integer"),
    ("micro", ["world.sft_prompts=-1"], "greater than or equal"),
    ("micro", ["seed"], "expected KEY=VALUE"),
    ("micro", ["seed.x=1"], "is a value, not a section"),
])
def test_config_errors_are_one_line_with_a_fix(preset, overrides, message):
    with pytest.raises(UserError) as err:
        load_config(preset, overrides)
    text = str(err.value)
    assert message in text and "\n" not in text


# ----------------------------------------------------------------------------- registry

def test_registry_did_you_mean_and_duplicates():
    reg = Registry("widget")
    reg.register("standard-opd", 1, origin="a")
    assert reg.get("standard-opd") == 1
    with pytest.raises(UserError, match="did you mean 'standard-opd'"):
        reg.get("standrd-opd")
    with pytest.raises(UserError, match="defined twice"):
        reg.register("standard-opd", 2, origin="b")


def test_task_cards_are_discovered_and_unknown_task_suggests():
    assert {"micro-math", "micro-code"} <= set(TASKS.names())
    assert TASKS.get("micro-math").tag == "micro-math@1"
    with pytest.raises(UserError, match="did you mean 'micro-math'"):
        TASKS.get("micro-mth")


def test_plugin_folder_and_cli_list(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy-task.yaml").write_text(textwrap.dedent("""
        name: toy-task
        version: 3
        source: test
        loader: opd_bench.micro.problems:eval_problems
        loader_args: {task: micro-math, n_per_split: 1}
        scorer: math
    """))
    env = {**__import__("os").environ, "OPD_BENCH_PLUGIN_PATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "opd_bench.cli", "list"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "toy-task@3" in out.stdout and "micro-math@1" in out.stdout and "smoke" in out.stdout


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_every_task_character(tmp_path):
    from transformers import AutoTokenizer

    build_char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    samples = P.train_problems("micro-math", 200, 0) + P.train_problems("micro-code", 200, 0)
    texts = [t for p in samples for t in (p.prompt, p.answer, *p.solutions.values())]
    used = set("".join(texts))
    assert used <= set(CHARACTERS)
    for text in texts + ["".join(CHARACTERS)]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}],
                                   tokenize=False)
    assert chat == "<|user|>1+2<|assistant|>3<|endoftext|>"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.padding_side == "left"


# ----------------------------------------------------------------------------- micro tasks

def test_eval_split_sizes_and_no_train_eval_overlap():
    math_eval = P.eval_problems("micro-math", 400)
    code_eval = P.eval_problems("micro-code", 40)
    assert len(math_eval) >= 1000 and len(code_eval) >= 200
    assert len({p.prompt for p in math_eval}) == len(math_eval)
    train = P.train_problems("micro-math", 5000, 0) + P.train_problems("micro-code", 5000, 0)
    assert not {p.prompt for p in train} & {p.prompt for p in math_eval + code_eval}


def test_ground_truth_solutions_are_correct_in_both_styles():
    from opd_bench.scoring import score_code, score_math

    for p in P.eval_problems("micro-math", 5):
        assert all(score_math(p.solutions[s], p.answer).correct for s in "AB")
        assert p.solutions["A"] != p.solutions["B"]
    for p in P.eval_problems("micro-code", 2):
        assert all(score_code(p.solutions[s], p.answer).correct for s in "AB"), p


def test_corrected_solutions_mask_exactly_the_wrong_results(tmp_path):
    import random

    from transformers import AutoTokenizer

    from opd_bench.sft import tokenize_pairs

    build_char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    rng, steps, fixed = random.Random(0), 0, 0
    for p in P.train_problems("micro-math", 300, 0):
        for style, fix in (("A", "!"), ("B", " ! ")):
            assert P.with_corrections(p.solutions[style], style, rng, 0.0) == (p.solutions[style], [])
            text, spans = P.with_corrections(p.solutions[style], style, rng, 0.3)
            # Cutting each `wrong!` out gives back the ground truth; each cut value differs from the right one.
            restored = text
            for start, end in reversed(spans):
                assert text[end:end + len(fix)] == fix
                right = text[end + len(fix):].split("\n" if style == "A" else ";")[0]
                assert text[start:end] != right and 0 <= int(text[start:end]) <= 99
                restored = restored[:start] + restored[end + len(fix):]
            assert restored == p.solutions[style]
            steps, fixed = steps + int(p.split[-1]), fixed + len(spans)
            labels = tokenize_pairs(tok, [p.prompt], [text], [spans])[0]["labels"]
            learned = tok.decode([t for t in labels if t != -100], skip_special_tokens=True)
            assert learned == "".join(c for i, c in enumerate(text) if not any(s <= i < e for s, e in spans))
    assert 0.25 < fixed / steps < 0.35


def test_generators_are_seeded():
    a = P.train_problems("micro-code", 50, 3)
    assert a == P.train_problems("micro-code", 50, 3) and a != P.train_problems("micro-code", 50, 4)


# ----------------------------------------------------------------------------- cache

def test_stage_cache_builds_once_and_never_leaves_half_stages(tmp_path):
    calls = []

    def build(folder, cost):
        calls.append(folder)
        (folder / "out.txt").write_text("x")
        cost.generate(10, 5)
        return {"n": 1}

    path, cost = build_stage(tmp_path, "demo", {"a": 1}, build)
    assert is_built(path) and not cost.cached and cost.flops == 100
    path2, cost2 = build_stage(tmp_path, "demo", {"a": 1}, build)
    assert path2 == path and cost2.cached and len(calls) == 1
    assert json.loads((path / "stage.json").read_text())["info"] == {"n": 1}

    def crash(folder, cost):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_stage(tmp_path, "demo", {"a": 2}, crash)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("demo")] == [path.name]
