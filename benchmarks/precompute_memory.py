"""Peak memory of the offline teacher scoring (the teacher-logps stage): chunked (what the stage does) vs dense.

Usage: python benchmarks/precompute_memory.py [--rows 1] [--prompt 256] [--completion 3840] [--hidden 256]

A random-init Qwen3 with the real Qwen3 vocabulary (151,936 tokens) scores `rows` sequences of prompt + completion
tokens (4,096 by default: lightning-8b's rows). Measured: the allocator peak (torch.profiler's CPU memory events,
cumulated in time order, as benchmarks/tip_memory.py does; not the process RSS) of
  dense    completion_logps(..., chunked=False): the (rows, tokens, V) logits and their log-softmax materialized;
  chunked  the stage's own scoring (offline._score_rows -> completion_logps(..., chunked=True): TRL's chunked
           kernel, never more than a (tokens, 4096) tile of logits).
The target (issue 15): chunked <= 0.1 of dense. The inputs (token ids) and the model are made before, not measured.
Dense grows with rows x tokens x V (8 rows x 4.2k tokens of a 32B teacher: ~51 GB); chunked with the hidden states.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

VOCAB = 151_936


def model(hidden: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4, tie_word_embeddings=False,
                         max_position_embeddings=8192)
    return Qwen3ForCausalLM(config).float().eval()


def peak_bytes(fn) -> tuple[int, object]:
    """Max over time of the cumulated allocations minus frees that torch's CPU allocator reports during fn()."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="sequences scored (dense needs ~4.7 GB per 4k-token row)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=3840)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the 1-layer random teacher")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from opd_bench.logprobs import completion_logps
    from opd_bench.offline import _score_rows

    net = model(args.hidden)
    generator = torch.Generator().manual_seed(0)
    p_ids = torch.randint(VOCAB, (args.rows, args.prompt), generator=generator)
    c_ids = torch.randint(VOCAB, (args.rows, args.completion), generator=generator)
    ones_p, ones_c = torch.ones_like(p_ids), torch.ones_like(c_ids)
    tokens = args.rows * (args.prompt + args.completion)
    print(f"vocabulary {VOCAB:,}, {args.rows} row(s) x {args.prompt + args.completion} tokens "
          f"({args.completion} scored), 1-layer Qwen3 hidden {args.hidden}, float32, 1 thread")

    results = {}
    for name, fn in (
            ("dense", lambda: completion_logps(net, p_ids, ones_p, c_ids, ones_c, chunked=False)),
            ("chunked", lambda: _score_rows(net, p_ids.tolist(), c_ids.tolist(), batch_size=64, temperature=1.0))):
        start = time.perf_counter()
        peak, out = peak_bytes(fn)
        results[name] = (peak, time.perf_counter() - start, out)
    dense_out = results["dense"][2]
    chunked_out = torch.tensor(results["chunked"][2], dtype=dense_out.dtype)
    err = float((dense_out - chunked_out).abs().max())
    print(f"{'path':<8} {'peak MB':>10} {'seconds':>8} {'tokens/s':>9}")
    for name, (peak, seconds, _) in results.items():
        print(f"{name:<8} {peak / 2**20:>10.1f} {seconds:>8.1f} {tokens / seconds:>9.0f}")
    ratio = results["chunked"][0] / results["dense"][0]
    print(f"chunked / dense peak: {ratio:.3f} (target <= 0.1: {'met' if ratio <= 0.1 else 'NOT met'}); "
          f"max |logp difference| {err:.2e}")


if __name__ == "__main__":
    main()
