"""Log-probabilities of completions under a causal LM, from hidden states: dense logits on CPU, TRL's chunked
kernels on GPU (never the (tokens, V) logits). One home for how a model scores tokens, shared by the trainer
(student and online teacher) and the offline precompute stages, so both give the same numbers.
"""

from __future__ import annotations

import torch
from trl.kernels import ChunkedLogProbFunction

from opd_bench import signals as S
from opd_bench.errors import UserError


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def use_chunked(cfg) -> bool:
    return cfg.train.logits == "chunked" or (cfg.train.logits == "auto" and torch.cuda.is_available())


def check_plain_head(model) -> None:
    """Our head projection is `lm_head(h) / T`; refuse models whose logits are post-processed (Gemma softcap)."""
    text = model.config.get_text_config()
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling"):
        if getattr(text, key, None) not in (None, 1.0):
            raise UserError(f"{text.model_type} sets {key}: opd-bench's scoring assumes plain lm_head logits "
                            f"(logits = lm_head(h) / T); use a model without it")


def hidden_states(model, input_ids, attention_mask, n_completion: int) -> torch.Tensor:
    """Backbone output at the positions that predict the last `n_completion` tokens: (B, C, H)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, -n_completion - 1:-1, :]


def head_logits(model, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits in float32 (bf16 log-softmax is too coarse for rewards), or float64 for exactness tests."""
    logits = model.get_output_embeddings()(hidden)
    return (logits if logits.dtype == torch.float64 else logits.float()) / temperature


def sampled_logps(model, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, chunked: bool,
                  with_entropy: bool = False):
    """log pS(y_t) (and the entropy) from hidden states: dense logits, or TRL's chunked kernel."""
    if not chunked:
        logits = head_logits(model, hidden, temperature)
        return S.token_logps(logits, tokens), (S.entropy(logits.detach()) if with_entropy else None)
    head = model.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.shape[-1])
    logp, ent, *_ = ChunkedLogProbFunction.apply(flat, head.weight, head.bias, tokens.reshape(-1), temperature,
                                                 4096, None, 1.0, ("entropy",) if with_entropy else ())
    return logp.view(tokens.shape), (ent.detach().view(tokens.shape) if with_entropy else None)


EXACT_CHUNK_TOKENS = 256  # float64 chunked scoring: (256, V) logits at a time


def _exact_chunked_logps(model, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 (exactness tests): dense per-token math, on EXACT_CHUNK_TOKENS positions at a time. TRL's kernel
    accumulates in float32, which would cost the float64 tests their 1e-12."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    out = [S.token_logps(head_logits(model, flat_h[i:i + EXACT_CHUNK_TOKENS], temperature),
                         flat_t[i:i + EXACT_CHUNK_TOKENS]) for i in range(0, flat_h.shape[0], EXACT_CHUNK_TOKENS)]
    return torch.cat(out).view(tokens.shape)


@torch.no_grad()
def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, temperature: float = 1.0,
                     chunked: bool = False, rows: int = 8) -> torch.Tensor:
    """Sampled-token log-probs of the completions under `model` (the teacher's score).

    Sequences are scored `rows` at a time, sorted by length with each group's padding trimmed (padding does
    not change a causal LM's outputs, only its cost: ~20% of the teacher's forward on micro batches). One
    function for the online trainer and the offline `teacher_logps` stage, so both give the same numbers.
    chunked: never the (rows, tokens, V) logits: TRL's chunked kernel (float64 models: the dense math on
    EXACT_CHUNK_TOKENS positions at a time); the offline precompute always scores chunked.
    """
    p_len, c_len = prompt_mask.sum(1), completion_mask.sum(1)
    out = torch.zeros(completion_ids.shape, dtype=torch.float64 if model.dtype == torch.float64 else torch.float32,
                      device=completion_ids.device)
    order = torch.argsort(p_len + c_len, stable=True)
    for i in range(0, len(order), rows):
        idx = order[i:i + rows]
        p, c = int(p_len[idx].max()), max(int(c_len[idx].max()), 1)
        ids = torch.cat([prompt_ids[idx, -p:], completion_ids[idx, :c]], 1)
        mask = torch.cat([prompt_mask[idx, -p:], completion_mask[idx, :c]], 1)
        h = hidden_states(model, ids, mask, c)
        if chunked and h.dtype == torch.float64:
            out[idx, :c] = _exact_chunked_logps(model, h, completion_ids[idx, :c], temperature)
        else:
            out[idx, :c] = sampled_logps(model, h, completion_ids[idx, :c], temperature, chunked)[0].to(out.dtype)
    return out.masked_fill(~completion_mask.bool(), 0.0)


@torch.no_grad()
def mean_reverse_kl(student, teacher, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int = 0,
                    batch_size: int = 64) -> float:
    """Sequence-level KL(pS || pT) per completion, on held-out prompts: E_{y~pS}[sum_t KL(pS(.|s_t) || pT(.|s_t))]
    (the chain rule), with the exact per-state KL on the student's own samples (lower variance than log-ratios)."""
    from opd_bench.generation import chat_prompt

    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts[i:i + batch_size]], return_tensors="pt",
                        padding=True, add_special_tokens=False).to(student.device)
        torch.manual_seed(seed * 1_000_003 + i)
        out = student.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completion = out[:, enc["input_ids"].shape[1]:]
        is_eos = (completion == tokenizer.eos_token_id).int()
        mask = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
        attention = torch.cat([enc["attention_mask"], mask.long()], 1)
        logits = [head_logits(m, hidden_states(m, out, attention, completion.shape[1]), 1.0) for m in (student, teacher)]
        total += float((S.reverse_kl(*logits) * mask).sum())
        count += completion.shape[0]
    return total / max(count, 1)
