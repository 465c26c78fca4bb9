"""Peak memory of TIP's loss (full-vocab reverse KL on the kept positions) vs all-token training.

Usage: python benchmarks/tip_memory.py [--positions 512] [--hidden 256] [--path dense|chunked|both]

A random-init student and teacher with the real Qwen3 vocabulary (151,936 tokens); their hidden states are made
first (not measured). Measured: the allocator peak (opd_bench.memory.peak_bytes: torch.profiler's CPU memory events,
cumulated in time order; not the process RSS; what the trainer records as loss_peak_mb) of the loss computation
through the real `token_signals.Signals`: the entropy rule's selection (top `fraction` by student entropy) plus
`divergence_on(kept)` plus its backward, for kept fractions 1.0 (all tokens: the full-kl arm), 0.5 and 0.2, in the
dense path (CPU default: logits of the kept rows materialized) and the chunked path (GPU default: TRL's chunked
kernels, never a (rows, V) tensor). The TIP paper reports up to 47% less peak memory at entropy-50% (arXiv
2604.14084).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from opd_bench.ledger import StageCost
from opd_bench.memory import peak_bytes
from opd_bench.methods.base import Data, Reads
from opd_bench.methods.tip import TIP
from opd_bench.token_signals import Signals

VOCAB = 151_936


def model(hidden: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).float()


def frozen(model, fn, *args):
    """OPDTrainer._frozen for an unwrapped model: fn(model, *args) in eval mode, without gradient."""
    model.eval()
    with torch.no_grad():
        return fn(model, *args)


def measure(student, teacher, positions: int, fraction: float, chunked: bool) -> int:
    hidden_s = torch.randn(1, positions, student.config.hidden_size, requires_grad=True)
    hidden_t = torch.randn(1, positions, teacher.config.hidden_size)
    trainer = SimpleNamespace(temperature=1.0, chunked=chunked, cost=StageCost("bench"), n_student=0, n_teacher=0,
                              teacher_model=teacher, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              _frozen=frozen, data=Data(reads=Reads(entropy=True, teacher_distribution=True)))
    inputs = {"completion_ids": torch.randint(VOCAB, (1, positions)),
              "completion_mask": torch.ones(1, positions, dtype=torch.long),
              "prompt_ids": torch.zeros(1, 0, dtype=torch.long), "prompt_mask": torch.zeros(1, 0, dtype=torch.long)}
    tip = TIP()
    params = tip.params({"fraction": fraction})

    def loss():
        s = Signals(trainer, student, inputs, torch.tensor(float(positions)))
        s.__dict__["_hidden"], s.__dict__["_teacher_hidden"] = hidden_s, hidden_t  # made before, not measured
        if fraction < 1:
            value = tip.loss(s, params).value
        else:  # all tokens: the full-kl arm (no selection, no entropy)
            value = s.divergence_on(s.mask).sum() / positions
        value.backward()

    return peak_bytes(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=512, help="completion positions in the micro-batch")
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size (teacher: 2x)")
    parser.add_argument("--path", choices=["dense", "chunked", "both"], default="both",
                        help="which loss path (dense at 4k positions needs ~20 GB)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    student, teacher = model(args.hidden, 0), model(2 * args.hidden, 1)
    print(f"vocabulary {VOCAB:,}, {args.positions} positions, student hidden {args.hidden}, teacher {2 * args.hidden}")
    print(f"{'path':<8} {'kept':>5} {'peak MB':>10} {'vs all tokens':>14}")
    for chunked in {"dense": (False,), "chunked": (True,), "both": (False, True)}[args.path]:
        base = None
        for fraction in (1.0, 0.5, 0.2):
            peak = measure(student, teacher, args.positions, fraction, chunked)
            base = base or peak
            print(f"{'chunked' if chunked else 'dense':<8} {fraction:>5.0%} {peak / 2**20:>10.1f} "
                  f"{peak / base:>13.2f}x")


if __name__ == "__main__":
    main()
