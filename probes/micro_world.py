"""Measure the micro world (not a test: minutes of CPU). Prints what issue #2 asks to report.

  1. greedy accuracy of teacher A, teacher B and the SFT student per held-out split;
  2. teacher A's (and B's) per-token NLL of style-A vs style-B ground-truth solutions;
  3. convergence: continue the SFT student's training for --minutes on fresh teacher-A samples and
     compare micro-math accuracy before and after;
  4. after a planted wrong first result, how often a model computes the next step right from it;
  5. with world.corrections > 0: how often each model flags a step as wrong (`!`) after a wrong
     result and after a right one (--flag-models adds trained students, e.g. runs/<id>/model).

Usage: python probes/micro_world.py [--preset micro] [--set key=value] [--minutes 5] [--skip-eval] (--help: all)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from opd_bench.config import Training, load_config
from opd_bench.evaluation import evaluate
from opd_bench.generation import SamplingParams, chat_prompt, generate
from opd_bench.micro.models import new_model
from opd_bench.micro.problems import eval_problems
from opd_bench.micro.world import stage_paths, training_mix
from opd_bench.registry import TASKS
from opd_bench.sft import tokenize_pairs, train_sft


def style_nll(model_dir: Path, problems, style: str) -> float:
    """Mean per-token negative log-likelihood of the style's completions (incl. EOS), given the prompt."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = tokenize_pairs(tok, [p.prompt for p in problems], [p.solutions[style] for p in problems])
    total, count = 0.0, 0
    for row in data:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != -100
        logp = torch.log_softmax(logits[keep], -1).gather(-1, target[keep, None])
        total -= logp.sum().item()
        count += int(keep.sum())
    return total / count


def _planted_mistake(problem, i: int) -> tuple[str, int, int]:
    """(`a op b` of the first step, its right result, a wrong one: off by 1 or 10, cycling with i)."""
    lhs, right = problem.solutions["A"].split("\n")[0].split("=")
    return lhs, int(right), int(right) + (1, -1, 10, -10)[i % 4]


def flag_rates(model_dir: Path, problems) -> dict:
    """Mean probability of `!` right after the first step's result, when that result is wrong vs right."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    flag = tok.convert_tokens_to_ids("!")
    sums = {"after_wrong": 0.0, "after_right": 0.0}
    for i, p in enumerate(problems):
        lhs, right, wrong = _planted_mistake(p, i)
        prompt = chat_prompt(tok, p.prompt)
        for key, value in (("after_wrong", wrong % 100), ("after_right", right)):
            ids = tok(f"{prompt}{lhs}={value}", add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                sums[key] += torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)[flag].item()
    return {k: round(v / len(problems), 4) for k, v in sums.items()}


def next_step_after_mistake(model_dir: Path, problems) -> tuple[int, int]:
    """(next step computed right from a planted wrong first result, cases): is the advice sound off the path?"""
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts, wanted = [], []
    for i, p in enumerate(p for p in problems if p.split != "ops-2"):
        lhs, _, wrong = _planted_mistake(p, i)
        op, rhs = re.match(r"\d+([+*-])(\d+)", p.solutions["A"].split("\n")[1]).groups()
        if 0 <= wrong <= 99:
            texts.append(f"{chat_prompt(tok, p.prompt)}{lhs}={wrong}\n")
            wanted.append(f"{wrong}{op}{rhs}={eval(f'{wrong}{op}{rhs}')}\n")
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    done = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(d.startswith(w) for d, w in zip(done, wanted)), len(wanted)


def train_from_scratch(folder: Path, tokenizer_dir: Path, arch, training: Training, prompts: list[str],
                       completions: list[str], seed: int) -> dict:
    """A new model of `arch` SFT'd on the pairs and saved in `folder`, as the micro world builds its stages
    (the probes' copy of opd_bench.micro.world's private builder, without the stage's cost accounting)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = new_model(tokenizer, seed, **arch.model_dump())
    stats = train_sft(model, tokenizer, tokenize_pairs(tokenizer, prompts, completions), training, folder, seed=seed)
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return stats


def teacher_samples(teacher_dir: Path, problems, cfg, seed: int, desc: str = "teacher samples") -> list[str]:
    """The teacher's completions at the world's SFT-data temperature and length."""
    w = cfg.world
    params = SamplingParams(temperature=w.sft_temperature, max_new_tokens=w.max_new_tokens, seed=seed)
    return [s[0].text for s in generate(teacher_dir, [p.prompt for p in problems], params,
                                        batch_size=cfg.eval.batch_size, workers=cfg.eval.workers, desc=desc)]


def more_sft(model, tok, problems, completions: list[str], cfg, lr: float, minutes: float, work: Path) -> int:
    """Continue the student's SFT for `minutes` at a constant lr (the convergence check); returns the steps."""
    training = Training(steps=10**6, batch_size=cfg.world.student_training.batch_size, lr=lr, warmup_steps=0,
                        examples=1)
    data = tokenize_pairs(tok, [p.prompt for p in problems], completions)
    return train_sft(model, tok, data, training, work, seed=cfg.seed, lr_scheduler="constant",
                     callbacks=[TimeLimit(minutes * 60)])["steps"]


class TimeLimit(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=None, help="continuation lr (default: 1/10 of the student's peak)")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-nll", action="store_true")
    ap.add_argument("--eval-stages", default="teacher-a,teacher-b,sft-student", help="models to evaluate")
    ap.add_argument("--flag-models", default="", help="extra model folders for the `!` rates (comma-separated)")
    ap.add_argument("--skip-convergence", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as in the CLI")
    args = ap.parse_args()
    cfg = load_config(args.preset, args.overrides)
    torch.set_num_threads(cfg.threads)
    paths = stage_paths(cfg)
    report: dict = {}

    if not args.skip_eval:
        for stage in args.eval_stages.split(","):
            for task in cfg.eval.tasks:
                card = TASKS.get(task)
                t0 = time.perf_counter()
                m = evaluate(paths[stage], card, paths[stage] / "eval" / f"{card.name}-v{card.version}",
                             workers=cfg.eval.workers, batch_size=cfg.eval.batch_size)
                report[f"{stage}/{task}"] = {"all": m["avg@k"], **{s: v["avg@k"] for s, v in m["per_split"].items()},
                                             "eval_s": round(time.perf_counter() - t0, 1)}
                print(stage, task, json.dumps(report[f"{stage}/{task}"]), flush=True)

    held_out = eval_problems("micro-math", 100) + eval_problems("micro-code", 15)
    for stage in () if args.skip_nll else ("teacher-a", "teacher-b"):
        nll = {style: round(style_nll(paths[stage], held_out, style), 4) for style in "AB"}
        report[f"{stage}/nll"] = nll
        print(stage, "per-token NLL of style A vs B solutions:", nll, flush=True)

    math_held_out = eval_problems("micro-math", 100)
    for stage in ("teacher-a", "sft-student"):
        right, cases = next_step_after_mistake(paths[stage], math_held_out)
        report[f"{stage}/after_mistake"] = {"next_step_right": right, "cases": cases}
        print(stage, f"after a planted wrong first result, next step right: {right} of {cases}", flush=True)

    if cfg.world.corrections:
        built = [stage for stage in ("teacher-a", "sft-student") if (paths[stage] / "config.json").exists()]
        for model_dir in built + list(filter(None, args.flag_models.split(","))):
            rates = flag_rates(paths.get(model_dir, Path(model_dir)), math_held_out)
            report[f"{model_dir}/flags"] = rates
            print(model_dir, "P(`!`) after a wrong / a right first step:", rates, flush=True)
    if args.skip_convergence:
        print(json.dumps(report, indent=1))
        return

    # Convergence: more SFT on fresh teacher-A samples (prompts the student has never seen).
    w = cfg.world
    problems = training_mix(w.sft_prompts, w.math_fraction, f"convergence-check-{cfg.seed}")
    samples = teacher_samples(paths["teacher-a"], problems, cfg, 99, desc="fresh teacher-A samples")
    work = Path(tempfile.mkdtemp(prefix="converge-"))
    shutil.copytree(paths["sft-student"], work / "model", ignore=shutil.ignore_patterns("eval"))
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    lr = args.lr or w.student_training.lr / 10
    steps = more_sft(model, tok, problems, samples, cfg, lr, args.minutes, work)
    model.save_pretrained(work / "model")
    card = TASKS.get("micro-math")
    before = evaluate(paths["sft-student"], card, work / "before", workers=cfg.eval.workers)["avg@k"]
    after = evaluate(work / "model", card, work / "after", workers=cfg.eval.workers)["avg@k"]
    report["convergence"] = {"minutes": args.minutes, "lr": lr, "steps": steps,
                             "micro_math_before": before, "micro_math_after": after,
                             "gain_points": round(100 * (after - before), 2)}
    print("convergence:", json.dumps(report["convergence"]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
