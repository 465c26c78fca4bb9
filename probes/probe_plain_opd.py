"""Independent cross-check of the trainer (not a test): standard OPD in plain PyTorch on the micro world.

Samples from the student at T=1, scores the sampled tokens with the teacher, and minimises
-sum_t sg(log pT - log pS) * log pS / tokens with Adam: the textbook estimator, sharing no code with
opd_bench.trainer / signals (`--loss full`: the exact per-state reverse KL over the vocabulary instead).
Prints micro-math accuracy (exact match of the boxed answer; greedy, and avg@k sampled at
--eval-temperature) and the exact per-token reverse KL on held-out prompts before and after.

--tails prints which sampled tokens carry the sampled-token estimator's variance, and the accuracy and
reverse KL of the student sampled at lower temperatures (what reverse KL's mode-seeking can buy).

Usage: python probes/probe_plain_opd.py [--loss sampled|full] [--minutes 3] [--lr 1e-4] [--tails] (--help: all)
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
from opd_bench.micro.world import stage_paths, training_mix


def encode(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def sample(model, tok, prompts, greedy: bool, max_new: int, temperature: float = 1.0):
    enc = encode(tok, prompts)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=not greedy, temperature=temperature, top_k=0, top_p=1.0,
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


def scored_batch(student, tok, teacher, prompts, temperature: float = 1.0, max_new: int = 64):
    """The student's samples at `temperature` and the teacher's scores of them, without gradient:
    (out, prompt_mask, comp, mask, teacher(out, prompt_mask, comp, mask)). The teacher scorer returns
    log-probs over the vocabulary (teacher_all) or of the sampled tokens only (teacher_logps)."""
    out, prompt_mask, comp, mask = sample(student, tok, prompts, False, max_new, temperature)
    with torch.no_grad():
        return out, prompt_mask, comp, mask, teacher(out, prompt_mask, comp, mask)


def accuracy(model, tok, problems, max_new=64, temperature: float = 0.0, k: int = 1):
    """Greedy accuracy (temperature 0), or avg@k of samples at `temperature`; overall and per split."""
    model.eval()
    right = {}
    with torch.random.fork_rng():  # seeded samples, and the caller's random stream is left as it was
        torch.manual_seed(0)
        for i in range(0, len(problems), 100):
            chunk = [p for p in problems[i:i + 100] for _ in range(k if temperature > 0 else 1)]
            _, _, comp, _ = sample(model, tok, [p.prompt for p in chunk], temperature == 0, max_new, temperature or 1.0)
            for p, c in zip(chunk, tok.batch_decode(comp, skip_special_tokens=True)):
                m = re.findall(r"\\boxed\{(-?\d+)\}", c)
                right.setdefault(p.split, []).append(bool(m) and m[-1] == p.answer)
    model.train()
    per = {split: round(100 * sum(v) / len(v), 1) for split, v in sorted(right.items())}
    return round(100 * sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values()), 1), per


def reverse_kl(student, teacher_logps, tok, prompts, max_new=64):
    """Sampled per-token reverse KL on `prompts`; teacher_logps(out, prompt_mask, comp, mask) scores the tokens."""
    torch.manual_seed(0)
    out, pm, comp, mask, lt = scored_batch(student, tok, teacher_logps, prompts, max_new=max_new)
    with torch.no_grad():
        ls = token_logps(student, out, pm, comp, mask)
    return float(((ls - lt) * mask).sum() / mask.sum())


def sampled_token_loss(lt, ls, mask) -> torch.Tensor:
    """-sg(log pT - log pS) * log pS per trained token, from the sampled tokens' log-probs."""
    return -((lt - ls).detach() * ls * mask).sum() / mask.sum()


def opd_loss(kind: str, ls_all, lt_all, comp, mask) -> torch.Tensor:
    """The batch loss per token, from student / teacher log-probs over the vocabulary: the sampled-token
    policy gradient ("sampled"), or the exact per-state reverse KL ("full")."""
    if kind == "full":
        return ((ls_all.exp() * (ls_all - lt_all)).sum(-1) * mask).sum() / mask.sum()
    return sampled_token_loss(*(x.gather(-1, comp[..., None])[..., 0] for x in (lt_all, ls_all)), mask)


def exact_reverse_kl(student, teacher_all, tok, prompts, temperature: float = 1.0, max_new=64) -> float:
    """Per-token reverse KL summed over the vocabulary, on the states the student visits at `temperature`
    (the student's distribution is its logits / temperature); teacher_all returns full log-probs."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        out, pm, comp, mask, lt = scored_batch(student, tok, teacher_all, prompts, temperature, max_new)
        return float(opd_loss("full", all_logps(student, out, pm, comp, mask, temperature), lt, comp, mask))


def advantage_tails(student, teacher_all, tok, prompts, cut: float = -3.0) -> str:
    """How concentrated the sampled-token advantages A = log pT - log pS are: the share of sampled tokens
    with A < cut and their share of sum A^2 (what sets the estimator's variance)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        out, pm, comp, mask, lt = scored_batch(student, tok, teacher_all, prompts)
        a = (lt - all_logps(student, out, pm, comp, mask)).gather(-1, comp[..., None])[..., 0][mask]
    tail = a < cut
    return (f"{int(mask.sum())} sampled tokens: {100 * float(tail.float().mean()):.1f}% have A < {cut:g} and carry "
            f"{100 * float((a[tail] ** 2).sum() / (a ** 2).sum()):.1f}% of sum A^2 (A quantiles 1% / 50% / 99%: "
            + " / ".join(f"{float(a.quantile(q)):.2f}" for q in (0.01, 0.5, 0.99)) + ")")


def gradient_agreement(student, teacher_all, tok, prompts: list[str], batch: int = 32, reps: int = 64) -> str:
    """Mean cosine between one batch's gradient and a reference (the exact per-state loss over 8 x 256
    fresh samples), for the sampled-token estimator and for the exact per-state reverse KL."""
    rng = random.Random(1)

    def grad(loss_kind: str, n: int) -> torch.Tensor:
        out, pm, comp, mask, lt_all = scored_batch(student, tok, teacher_all, rng.sample(prompts, n))
        loss = opd_loss(loss_kind, all_logps(student, out, pm, comp, mask), lt_all, comp, mask)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(student.parameters()))])

    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = sum(grad("full", 256) for _ in range(8))
        cos = {kind: sum(float(torch.cosine_similarity(grad(kind, batch), ref, 0)) for _ in range(reps)) / reps
               for kind in ("sampled", "full")}
    return f"batch {batch}: sampled-token {cos['sampled']:.3f}, exact per-state {cos['full']:.3f}"


def sampled_opd(student, tok, teacher_logps, prompts: list[str], minutes: float, lr: float, batch: int,
                max_new: int = 64) -> int:
    """Online sampled-token OPD for `minutes` (Adam, grad-norm clip 1); returns the optimizer steps.

    teacher_logps(out, prompt_mask, comp, mask) scores the sampled tokens (no gradient needed).
    """
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    rng, start, step = random.Random(0), time.time(), 0
    while time.time() - start < minutes * 60:
        out, prompt_mask, comp, mask, lt = scored_batch(student, tok, teacher_logps, rng.sample(prompts, batch),
                                                        max_new=max_new)
        loss = sampled_token_loss(lt, token_logps(student, out, prompt_mask, comp, mask), mask)
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
    ap.add_argument("--eval-temperature", type=float, default=0.6, help="also report avg@k sampled at this "
                    "temperature (the real math cards' 0.6; greedy accuracy is blind to sharpening)")
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--math-fraction", type=float, default=1.0, help="share of micro-math among the training "
                    "prompts, the rest micro-code (the trainer uses the world's mix, 0.6)")
    ap.add_argument("--save", help="save the trained student here (for `opd-bench eval --model DIR`)")
    ap.add_argument("--tails", action="store_true", help="before training: the advantage tails, how well one "
                    "batch's gradient agrees with the expected one, and accuracy and exact reverse KL of the "
                    "student sampled at temperatures 1 / 0.7 / 0.5 / 0.3")
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
    train = [p.prompt for p in (training_mix(200_000, args.math_fraction, "probe") if args.math_fraction < 1
                                else train_problems("micro-math", 200_000, 7))]

    def scores() -> str:
        greedy = accuracy(student, tok, problems)
        sampled = accuracy(student, tok, problems, temperature=args.eval_temperature, k=args.eval_k)
        return (f"acc greedy {greedy}, avg@{args.eval_k} T{args.eval_temperature:g} {sampled}; "
                f"rKL/token sampled {reverse_kl(student, teacher_logps, tok, held):.4f}, "
                f"exact {exact_reverse_kl(student, teacher_all, tok, held):.4f}")

    print("before:", scores(), flush=True)
    if args.tails:
        print("advantage tails:", advantage_tails(student, teacher_all, tok, held), flush=True)
        print("cosine to the reference gradient,", gradient_agreement(student, teacher_all, tok, train), flush=True)
        for temperature in (1.0, 0.7, 0.5, 0.3):
            print(f"student sampled at T{temperature:g}: avg@{args.eval_k}",
                  accuracy(student, tok, problems, temperature=temperature, k=args.eval_k),
                  f"exact rKL/token {exact_reverse_kl(student, teacher_all, tok, held, temperature):.4f}", flush=True)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    rng, start, step = random.Random(0), time.time(), 0
    pool = []
    for _ in range(args.offline // args.batch):  # fixed rollouts of pi_sft, scored once
        pool.append(scored_batch(student, tok, teacher_all, rng.sample(train, args.batch)))
    max_steps = int(args.passes * len(pool)) if pool else 10**9
    while time.time() - start < args.minutes * 60 and step < max_steps:
        if pool:
            if step % len(pool) == 0:
                rng.shuffle(pool)
            out, pm, comp, mask, lt_all = pool[step % len(pool)]
        else:
            out, pm, comp, mask, lt_all = scored_batch(student, tok, teacher_all, rng.sample(train, args.batch))
        ls_all = all_logps(student, out, pm, comp, mask)
        loss = opd_loss(args.loss, ls_all, lt_all, comp, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            rkl = (ls_all - lt_all).detach().gather(-1, comp[..., None])[..., 0]
            print(f"step {step} {time.time() - start:.0f}s sampled rKL {float((rkl * mask).sum() / mask.sum()):.4f}",
                  flush=True)
    print(f"after {step} steps:", scores(), flush=True)
    if args.save:
        student.save_pretrained(args.save)
        tok.save_pretrained(args.save)


if __name__ == "__main__":
    main()
