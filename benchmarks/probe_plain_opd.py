"""Independent cross-check of the trainer (not a test): standard OPD in plain PyTorch on the micro world.

Samples from the student at T=1, scores the sampled tokens with the teacher, and minimises
-sum_t sg(log pT - log pS) * log pS / tokens with Adam: the textbook estimator, sharing no code with
opd_bench.trainer / signals. Prints greedy micro-math accuracy (exact match of the boxed answer) and the
sampled per-token reverse KL on held-out prompts before and after.

Usage: python benchmarks/probe_plain_opd.py [--student DIR] [--teacher DIR] [--minutes 3] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_bench.config import load_config
from opd_bench.micro.problems import eval_problems, train_problems
from opd_bench.micro.world import stage_paths


def encode(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def sample(model, tok, prompts, greedy: bool, max_new: int):
    enc = encode(tok, prompts)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    comp = out[:, enc["input_ids"].shape[1]:]
    eos = (comp == tok.eos_token_id).int()
    mask = (eos.cumsum(1) - eos) == 0  # up to and including the first EOS
    return out, enc["attention_mask"], comp, mask


def all_logps(model, out, prompt_mask, comp, mask, temperature: float = 1.0):
    attn = torch.cat([prompt_mask, mask.long()], 1)
    logits = model(input_ids=out, attention_mask=attn).logits[:, -comp.shape[1] - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1)


def token_logps(model, out, prompt_mask, comp, mask):
    return all_logps(model, out, prompt_mask, comp, mask).gather(-1, comp[..., None])[..., 0]


def accuracy(model, tok, problems, max_new=64):
    model.eval()
    right = {}
    for i in range(0, len(problems), 100):
        chunk = problems[i:i + 100]
        _, _, comp, _ = sample(model, tok, [p.prompt for p in chunk], True, max_new)
        for p, c in zip(chunk, tok.batch_decode(comp, skip_special_tokens=True)):
            m = re.findall(r"\\boxed\{(-?\d+)\}", c)
            right.setdefault(p.split, []).append(bool(m) and m[-1] == p.answer)
    model.train()
    per = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(right.items())}
    return round(100 * sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values()), 1), per


def reverse_kl(student, teacher_logps, tok, prompts, max_new=64):
    """Sampled per-token reverse KL on `prompts`; teacher_logps(out, prompt_mask, comp, mask) scores the tokens."""
    torch.manual_seed(0)
    out, pm, comp, mask = sample(student, tok, prompts, False, max_new)
    with torch.no_grad():
        ls, lt = token_logps(student, out, pm, comp, mask), teacher_logps(out, pm, comp, mask)
    return float(((ls - lt) * mask).sum() / mask.sum())


def sampled_opd(student, tok, teacher_logps, prompts: list[str], minutes: float, lr: float, batch: int,
                max_new: int = 64) -> int:
    """Online sampled-token OPD for `minutes` (Adam, grad-norm clip 1); returns the optimizer steps.

    teacher_logps(out, prompt_mask, comp, mask) scores the sampled tokens (no gradient needed).
    """
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    rng, start, step = random.Random(0), time.time(), 0
    while time.time() - start < minutes * 60:
        out, prompt_mask, comp, mask = sample(student, tok, rng.sample(prompts, batch), False, max_new)
        with torch.no_grad():
            lt = teacher_logps(out, prompt_mask, comp, mask)
        ls = token_logps(student, out, prompt_mask, comp, mask)
        loss = -((lt - ls).detach() * ls * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student")
    ap.add_argument("--teacher")
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loss", choices=["sampled", "full"], default="sampled",
                    help="sampled-token policy gradient, or the exact per-state reverse KL (full vocabulary)")
    ap.add_argument("--n-eval", type=int, default=100, help="problems per split")
    ap.add_argument("--offline", type=int, default=0, help="Lightning-style: pi_sft samples this many rollouts "
                    "once, the teacher scores them once, then --passes passes over them (0: online)")
    ap.add_argument("--passes", type=float, default=2.0)
    ap.add_argument("--teacher-temperature", type=float, default=1.0, help="score with the teacher's logits / T "
                    "(T > 1 softens a near-deterministic teacher; 1: standard OPD)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = stage_paths(load_config("micro"))
    student_dir, teacher_dir = args.student or paths["sft-student"], args.teacher or paths["teacher-a"]
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    teacher_all = lambda *batch: all_logps(teacher, *batch, temperature=args.teacher_temperature)  # noqa: E731
    teacher_logps = lambda out, pm, comp, mask: (  # noqa: E731
        teacher_all(out, pm, comp, mask).gather(-1, comp[..., None])[..., 0])
    problems = eval_problems("micro-math", args.n_eval)
    held = [p.prompt for p in problems[::3]][:96]
    print("before: acc", accuracy(student, tok, problems), "rKL/token", round(reverse_kl(student, teacher_logps, tok, held), 4))
    train = [p.prompt for p in train_problems("micro-math", 200_000, 7)]
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    rng, start, step = random.Random(0), time.time(), 0
    pool = []
    for _ in range(args.offline // args.batch):  # fixed rollouts of pi_sft, scored once
        batch = sample(student, tok, rng.sample(train, args.batch), False, 64)
        with torch.no_grad():
            pool.append((*batch, teacher_all(*batch)))
    max_steps = int(args.passes * len(pool)) if pool else 10**9
    while time.time() - start < args.minutes * 60 and step < max_steps:
        if pool:
            if step % len(pool) == 0:
                rng.shuffle(pool)
            out, pm, comp, mask, lt_all = pool[step % len(pool)]
        else:
            out, pm, comp, mask = sample(student, tok, rng.sample(train, args.batch), False, 64)
            with torch.no_grad():
                lt_all = teacher_all(out, pm, comp, mask)
        ls_all = all_logps(student, out, pm, comp, mask)
        lt, ls = (x.gather(-1, comp[..., None])[..., 0] for x in (lt_all, ls_all))
        adv = (lt - ls).detach()
        if args.loss == "sampled":
            loss = -(adv * ls * mask).sum() / mask.sum()
        else:
            loss = ((ls_all.exp() * (ls_all - lt_all)).sum(-1) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} {time.time() - start:.0f}s sampled rKL {float(-(adv * mask).sum() / mask.sum()):.4f}",
                  flush=True)
    print("after", step, "steps: acc", accuracy(student, tok, problems), "rKL/token",
          round(reverse_kl(student, teacher_logps, tok, held), 4))


if __name__ == "__main__":
    main()
