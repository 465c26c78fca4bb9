"""Research probe (not a test): does OPD help a student whose teacher writes in two styles?

The idea: SFT (forward KL) on a two-mode teacher spends the small student's capacity on both notations;
on-policy distillation (reverse KL) could let it settle on one. Here the "teacher" is the exact
sequence-level mixture 0.5 teacher A + 0.5 teacher B of the micro world:
  log p(y_t | s_t) = logaddexp(cA_t, cB_t) - logaddexp(cA_<t, cB_<t),   c = cumulative log-probs.
1. SFT data: the micro world's sft-data with every other completion replaced by teacher B's sample
   (same temperature); the preset's student is trained on it from scratch, exactly like pi_sft.
2. Sampled-token OPD against the mixture teacher, plain PyTorch (as in probe_plain_opd.py).
Prints greedy micro-math accuracy, the share of style-B answers and the held-out sampled reverse KL.

Usage: python probes/probe_two_style_teacher.py --out /tmp/two-style [--minutes 4] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from micro_world import train_from_scratch  # noqa: E402
from probe_plain_opd import accuracy, all_logps, reverse_kl, sample, sampled_opd  # noqa: E402

from opd_bench.config import load_config  # noqa: E402
from opd_bench.micro.problems import eval_problems, train_problems  # noqa: E402
from opd_bench.micro.world import load_sft_data, stage_paths  # noqa: E402


def build_student(out: Path, cfg, paths) -> Path:
    from opd_bench.generation import SamplingParams, generate

    if (out / "student" / "config.json").exists():
        return out / "student"
    w = cfg.world
    data = load_sft_data(paths["sft-data"])
    prompts, completions = list(data["prompt"]), list(data["completion"])
    odd = list(range(1, len(prompts), 2))
    samples = generate(paths["teacher-b"], [prompts[i] for i in odd],
                       SamplingParams(temperature=w.sft_temperature, max_new_tokens=w.max_new_tokens, seed=cfg.seed),
                       desc="teacher B samples")
    for i, s in zip(odd, samples):
        completions[i] = s[0].text
    (out / "student").mkdir(parents=True, exist_ok=True)
    train_from_scratch(out / "student", paths["tokenizer"], w.student, w.student_training, prompts, completions,
                       cfg.seed)
    return out / "student"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="where the two-style student is built (reused)")
    ap.add_argument("--minutes", type=float, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config("micro")
    paths = stage_paths(cfg)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(build_student(args.out, cfg, paths))
    teachers = [AutoModelForCausalLM.from_pretrained(paths[t]).eval() for t in ("teacher-a", "teacher-b")]

    def mixture_logps(out, prompt_mask, comp, mask):
        with torch.no_grad():
            la, lb = (all_logps(t, out, prompt_mask, comp, mask).gather(-1, comp[..., None])[..., 0] * mask
                      for t in teachers)
        ca, cb = la.cumsum(1), lb.cumsum(1)
        return torch.logaddexp(ca, cb) - torch.logaddexp(ca - la, cb - lb)

    def style_b_share(problems):
        _, _, comp, _ = sample(student, tok, [p.prompt for p in problems], True, 64)
        return round(100 * sum(" = " in t for t in tok.batch_decode(comp, skip_special_tokens=True)) / len(problems), 1)

    problems = eval_problems("micro-math", 100)
    held = [p.prompt for p in problems[::3]][:96]
    print("before: acc", accuracy(student, tok, problems), "style-B %", style_b_share(problems[:150]),
          "rKL/token", round(reverse_kl(student, mixture_logps, tok, held), 4), flush=True)
    train = [p.prompt for p in train_problems("micro-math", 200_000, 7)]
    step = sampled_opd(student, tok, mixture_logps, train, args.minutes, args.lr, args.batch)
    print("after", step, "steps: acc", accuracy(student, tok, problems), "style-B %", style_b_share(problems[:150]),
          "rKL/token", round(reverse_kl(student, mixture_logps, tok, held), 4), flush=True)


if __name__ == "__main__":
    main()
