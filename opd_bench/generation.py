"""Generation backends: batched Hugging Face `generate` (default; CPU or GPU) and vLLM (`opd_bench.vllm_backend`).

Prompts are user messages; the tokenizer's chat template turns them into model input (both backends get the same
token ids). HF: batches are formed from the prompts sorted by length (less padding) and each batch is seeded by its
own index (and the `shard` it belongs to), so the samples do not depend on how many worker processes or ranks share
the work. vLLM: each prompt is seeded by its own index (`first_index` + position), for the same reason.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from opd_bench.progress import progress


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # completion tokens, up to and including EOS when the model stopped
    prompt_ids: list[int]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


def chat_prompt(tokenizer, user_message: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                         add_generation_prompt=True, tokenize=False)


def _plan_batches(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    lengths = [len(ids) for ids in tokenizer([chat_prompt(tokenizer, p) for p in prompts],
                                             add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The chat-templated prompts as token ids (no extra special tokens), as both backends see them."""
    return tokenizer([chat_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]


def _generate_batches(model, tokenizer, prompts, batches, params: SamplingParams, batch_ids, desc=None, shard=0):
    import torch

    results: dict[int, list[Completion]] = {}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    for batch_id in progress(batch_ids, desc=desc, total=len(batch_ids)):
        index = batches[batch_id]
        texts = [chat_prompt(tokenizer, prompts[i]) for i in index]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(params.seed * 1_000_003 + shard * 100_003 + batch_id)
        sample = params.temperature > 0
        per_prompt = params.n if sample else 1  # greedy samples are identical: decode once, repeat
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=params.max_new_tokens, do_sample=sample,
                temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                top_k=0 if sample else None, num_return_sequences=per_prompt, pad_token_id=pad, eos_token_id=eos)
        new = out[:, enc["input_ids"].shape[1]:].repeat_interleave(params.n // per_prompt, dim=0).tolist()
        prompt_rows = enc["input_ids"].tolist()
        masks = enc["attention_mask"].tolist()
        for row, ids in enumerate(new):
            i = index[row // params.n]
            ids = ids[: ids.index(eos) + 1] if eos in ids else [t for t in ids if t != pad]
            p_ids = [t for t, m in zip(prompt_rows[row // params.n], masks[row // params.n]) if m]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            results.setdefault(i, []).append(Completion(text, ids, p_ids))
    return results


def _worker(model_dir, prompts, batches, params, batch_ids, threads, shard=0):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _generate_batches(model, tokenizer, prompts, batches, params, batch_ids, shard=shard)


BACKENDS = ("hf", "vllm")


def generate(model_dir: str | Path, prompts: list[str], params: SamplingParams, *, batch_size: int = 128,
             workers: int = 1, threads: int = 1, desc: str = "generate", backend: str = "hf", vllm=None,
             shard: int = 0, first_index: int = 0, info: dict | None = None) -> list[list[Completion]]:
    """n completions per prompt, from a saved model folder (or a hub id), with `workers` processes (HF).

    backend "vllm" (optional extra, GPU only): `opd_bench.vllm_backend.generate` with `vllm` (the config's `vllm`
    section or EngineSettings; None: the configured defaults): the trainer's engine when one is held, else an engine
    in a child process that has ended when this returns. `shard` / `first_index` seed the samples (HF: the
    batches of this shard; vLLM: prompt i gets the seed of index first_index + i). `info`, when given, receives
    where the samples came from (the engine).
    """
    if backend == "vllm":
        from transformers import AutoTokenizer

        from opd_bench import vllm_backend

        vllm_backend.require_vllm()
        ids = prompt_token_ids(AutoTokenizer.from_pretrained(str(model_dir)), prompts)
        sampling = vllm_backend.Sampling(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                         max_tokens=params.max_new_tokens)
        seeds = vllm_backend.prompt_seeds(params.seed, range(first_index, first_index + len(prompts)))
        settings = vllm_backend.EngineSettings.of(vllm, seed=params.seed)
        results, where = vllm_backend.generate(model_dir, ids, sampling, seeds, settings=settings)
        if info is not None:
            info.update(where)
        return [[Completion(text, list(tokens), list(p)) for text, tokens in samples]
                for samples, p in zip(results, ids)]
    if backend != "hf":
        from opd_bench.errors import UserError

        raise UserError(f"unknown generation backend {backend!r} (choose from: {', '.join(BACKENDS)})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = _plan_batches(tokenizer, prompts, batch_size)
    workers = max(1, min(workers, len(batches)))
    if workers == 1:
        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        results = _generate_batches(model, tokenizer, prompts, batches, params, range(len(batches)), desc, shard)
    else:
        # Batches dealt round-robin; the main process shows progress of the first worker's share.
        shares = [list(range(w, len(batches), workers)) for w in range(workers)]
        results = {}
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_worker, str(model_dir), prompts, batches, params, share, threads, shard)
                       for share in shares]
            for fut in progress(futures, desc=f"{desc} ({workers} workers)", total=len(futures)):
                results.update(fut.result())
    if info is not None:
        info.update({"engine": "hf", "workers": workers})
    return [results[i] for i in range(len(prompts))]


def count_params(model_dir: str | Path) -> int:
    """Parameter count from the saved config (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())

