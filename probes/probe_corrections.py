"""Research probe (not a test): does OPD help a converged student when the teacher can repair mistakes?

The micro world's student fails by arithmetic mistakes it cannot recover from, and its teacher (trained
on ground truth only) has never seen a mistake either, so OPD has nothing to teach it. Here teacher A
is trained with `world.corrections`: some steps are first written wrong, then corrected
(`46*2=93!92`), the wrong result kept out of the loss, so the teacher never makes such a mistake but
flags one it reads. The teacher's own samples (the SFT data) then almost never contain a correction,
and only on-policy distillation shows the student the states its own mistakes lead to.

Steps (each cached in --out): the teacher, unless --teacher names one: teacher A of
`opd-bench prepare --set world.corrections=0.2` (built by that command), trained --teacher-steps more
on micro-math at --rate corrections (constant lr 1e-3): 2,500 steps at 0.2 taught it the rate, not
to flag (P(`!`) 0.18 after a wrong step, 0.19 after a right one); then SFT data from the teacher (the
world's prompts and temperature), the preset's student trained on it exactly like pi_sft, then, for
--minutes each (one arm per call, two calls side by side on two cores):
  opd:  sampled-token OPD against --teacher, plain PyTorch (probe_plain_opd.py's loop);
  sft:  more SFT on fresh teacher samples (probes/micro_world.py's convergence check).
Prints greedy micro-math accuracy and P(`!`) after a wrong / a right first step, before and after.

Usage: python probes/probe_corrections.py --out /tmp/corr [--arm opd|sft] [--minutes 5] [--teacher DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from micro_world import flag_rates, more_sft, teacher_samples, train_from_scratch  # noqa: E402
from probe_plain_opd import accuracy, sampled_opd, token_logps  # noqa: E402

from opd_bench.config import Training, load_config  # noqa: E402
from opd_bench.micro.problems import eval_problems, train_problems, with_corrections  # noqa: E402
from opd_bench.micro.world import stage_paths, training_mix  # noqa: E402
from opd_bench.sft import tokenize_pairs, train_sft  # noqa: E402


def continue_teacher(out: Path, steps: int, rate: float) -> Path:
    if (out / "teacher" / "config.json").exists():
        return out / "teacher"
    start = stage_paths(load_config("micro", ["world.corrections=0.2"]))["teacher-a"]
    tok = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start)
    problems = [p for p in training_mix(60000, 1.0, "cont") if p.task == "micro-math"]
    rng = random.Random(0)
    texts, spans = zip(*(with_corrections(p.solutions["A"], "A", rng, rate) for p in problems))
    data = tokenize_pairs(tok, [p.prompt for p in problems], list(texts), list(spans))
    flagged = eval_problems("micro-math", 60)
    for chunk in range(steps // 500):  # reshuffled every 500 steps; each chunk restarts Adam
        train_sft(model, tok, data.shuffle(seed=chunk), Training(steps=500, batch_size=32, lr=1e-3, warmup_steps=0,
                  examples=1), out / "teacher", seed=chunk, lr_scheduler="constant")
        model.save_pretrained(out / "teacher-partial")
        tok.save_pretrained(out / "teacher-partial")
        print((chunk + 1) * 500, "teacher steps, flags", flag_rates(out / "teacher-partial", flagged), flush=True)
    shutil.rmtree(out / "teacher", ignore_errors=True)
    (out / "teacher-partial").rename(out / "teacher")
    return out / "teacher"


def build_student(out: Path, teacher: Path, cfg, tokenizer: Path) -> Path:
    if (out / "student" / "config.json").exists():
        return out / "student"
    w = cfg.world
    problems = training_mix(w.sft_prompts, w.math_fraction, f"sft-data-{cfg.seed}")
    completions = teacher_samples(teacher, problems, cfg, cfg.seed)
    print("corrections in the SFT data:", sum("!" in c for c in completions), "of", len(completions), flush=True)
    (out / "student").mkdir(parents=True, exist_ok=True)
    train_from_scratch(out / "student", tokenizer, w.student, w.student_training, [p.prompt for p in problems],
                       completions, cfg.seed)
    return out / "student"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, help="a teacher folder (default: build it, see above)")
    ap.add_argument("--teacher-steps", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=0.5, help="share of corrected steps in the teacher's extra data")
    ap.add_argument("--out", type=Path, required=True, help="where the student is built (reused)")
    ap.add_argument("--arm", choices=["opd", "sft", "none"], default="none")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config("micro")
    tokenizer = stage_paths(cfg)["tokenizer"]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    args.teacher = args.teacher or continue_teacher(args.out, args.teacher_steps, args.rate)
    student_dir = build_student(args.out, args.teacher, cfg, tokenizer)
    problems, flagged = eval_problems("micro-math", 100), eval_problems("micro-math", 60)
    print("teacher flags", flag_rates(args.teacher, flagged), flush=True)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    print("before: acc", accuracy(student, tok, problems, 96), "flags", flag_rates(student_dir, flagged), flush=True)
    if args.arm == "none":
        return
    work = args.out / args.arm
    shutil.rmtree(work, ignore_errors=True)
    if args.arm == "opd":
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
        train = [p.prompt for p in train_problems("micro-math", 200_000, 7)]
        step = sampled_opd(student, tok, lambda *batch: token_logps(teacher, *batch), train, args.minutes, args.lr,
                           args.batch, max_new=96)
    else:  # more SFT on fresh teacher samples, constant lr = the student's peak / 10
        w = cfg.world
        fresh = training_mix(w.sft_prompts, w.math_fraction, f"convergence-check-{cfg.seed}")
        step = more_sft(student, tok, fresh, teacher_samples(args.teacher, fresh, cfg, 99), cfg,
                        w.student_training.lr / 10, args.minutes, work)
    student.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    print(f"after {args.arm}, {step} steps: acc", accuracy(student, tok, problems, 96), "flags",
          flag_rates(work / "model", flagged), flush=True)


if __name__ == "__main__":
    main()
