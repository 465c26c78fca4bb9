"""Per-token signals that every OPD method is composed of: pure torch, no trainer, no TRL.

Shapes: logits `(B, T, V)`, per-token log-probs / rewards / advantages `(B, T)`, and a boolean
`mask (B, T)` that marks completion tokens (True) versus prompt and padding (False). The caller
aligns logits with tokens (logits at position t predict token t) and divides by the sampling
temperature; pass float32 (or float64) logits, bf16 log-softmax is too coarse for rewards.

Notation (reference/methods.md): s_t = (x, y_<t), pS student, pT teacher, pref reference, sg = stop-grad.

Note on the sampled-token OPD gradient (pinned in tests/test_estimators.py): with the per-token reward
r_t and no discount, E_y[grad -sum_t sg(r_t) log pS(y_t|s_t)] is the gradient of
sum_t E_{s_t ~ sg(pS)}[KL(pS(.|s_t) || pT(.|s_t))] (state distribution held fixed), which is NOT the
gradient of the sequence-level KL(pS || pT) when T > 1. Using the reward-to-go G_t = sum_{t'>=t} r_t'
(`reward_to_go`) instead of r_t gives exactly the gradient of the sequence-level reverse KL.
Both have the same fixed point pS = pT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "token_logps",
    "entropy",
    "normalized_entropy",
    "reverse_kl",
    "topk_reverse_kl",
    "generalized_jsd",
    "opd_reward",
    "reward_to_go",
    "exopd_advantage",
    "vopd_advantage",
    "selection_count",
    "tip_entropy_mask",
    "tip_soft_or_mask",
    "tip_q3_mask",
    "policy_gradient_loss",
]


# --- distributions -----------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(y_t | s_t) of the sampled tokens: log-softmax of `logits (B,T,V)` gathered at `tokens (B,T)`."""
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _plogp_terms(logp: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """p * (logp - other) elementwise with 0 where p == 0 (so -inf logits give 0, not nan)."""
    p = logp.exp()
    diff = logp if other is None else logp - other
    return p * diff.masked_fill(p == 0, 0.0)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Student entropy per position, H_t = -sum_v pS(v|s_t) log pS(v|s_t) (TIP's entropy axis), in nats."""
    return -_plogp_terms(F.log_softmax(logits, dim=-1)).sum(-1)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TIP's h_t = H(pS(.|s_t)) / ln V, in [0, 1]."""
    return entropy(logits) / math.log(logits.shape[-1])


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocab KL_t = sum_v pS(v|s_t) (log pS(v|s_t) - log pT(v|s_t)); vOPD: V(s_t) = -KL_t.

    Differentiable in both inputs (the full-KL arm trains on it; vOPD detaches it as a baseline).
    """
    ls = F.log_softmax(student_logits, dim=-1)
    lt = F.log_softmax(teacher_logits, dim=-1)
    return _plogp_terms(ls, lt).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """TRL's generalized JSD per position: beta 1 = KL(pS || pT), beta 0 = KL(pT || pS), else
    beta KL(pT || M) + (1 - beta) KL(pS || M) with M = (1 - beta) pS + beta pT. Differentiable in both inputs."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    ls = F.log_softmax(student_logits, dim=-1)
    lt = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0.0:
        return _plogp_terms(lt, ls).sum(-1)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
    return beta * _plogp_terms(lt, lm).sum(-1) + (1 - beta) * _plogp_terms(ls, lm).sum(-1)


def topk_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """vOPD top-k KL: K = student's top-k tokens, KL^K_t = sum_{v in K} p~S(v)(log p~S(v) - log p~T(v)).

    Both distributions are renormalized over K (a softmax of the logits restricted to K). k >= V is the
    full KL.
    """
    if k < 1:
        raise ValueError(f"top-k KL needs k >= 1, got {k}")
    k = min(int(k), student_logits.shape[-1])
    idx = student_logits.topk(k, dim=-1).indices
    return reverse_kl(student_logits.gather(-1, idx), teacher_logits.gather(-1, idx))


# --- rewards and advantages --------------------------------------------------------------------


def opd_reward(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Standard OPD per-token reward r_t = log pT(y_t|s_t) - log pS(y_t|s_t) (minus the sampled reverse-KL)."""
    return teacher_logp - student_logp


def reward_to_go(reward: torch.Tensor, mask: torch.Tensor, discount: float = 1.0) -> torch.Tensor:
    """G_t = sum_{t' >= t} discount^(t'-t) * mask_t' * r_t' over the completion; 0 off the mask.

    discount = 1: E[grad -sum_t sg(G_t) log pS(y_t)] = grad of the sequence-level KL(pS || pT) exactly.
    discount = 0: G_t = r_t, the per-token reward the OPD papers (and tinker's default) use.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    r = torch.where(mask.bool(), reward, torch.zeros_like(reward))
    if discount == 0.0:
        return r
    if discount == 1.0:
        out = r.flip(-1).cumsum(-1).flip(-1)
    else:
        acc = torch.zeros_like(r[..., -1])
        cols = []
        for t in range(r.shape[-1] - 1, -1, -1):
            acc = r[..., t] + discount * acc
            cols.append(acc)
        out = torch.stack(cols[::-1], dim=-1)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def exopd_advantage(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    lam: float,
) -> torch.Tensor:
    """G-OPD / ExOPD: A_t = lam*(log pT - log pref) - (log pS - log pref); optimum ∝ pT^lam pref^(1-lam).

    Computed as r_t + (lam - 1)(log pT - log pref), so lam = 1 returns the standard OPD reward bit for
    bit (and `ref_logp` may then be None).
    """
    reward = opd_reward(teacher_logp, student_logp)
    if lam == 1:
        return reward
    if ref_logp is None:
        raise ValueError("exopd_advantage needs ref_logp when lam != 1")
    return reward + (lam - 1.0) * (teacher_logp - ref_logp)


def vopd_advantage(reward: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """vOPD: A_t = r_t - V(s_t) = r_t + KL_t with the baseline V(s_t) = -KL(pS(.|s_t) || pT(.|s_t))."""
    return reward + kl


# --- TIP token selection -----------------------------------------------------------------------


def selection_count(n_valid: int, fraction: float) -> int:
    """Tokens a top-`fraction` rule keeps out of n_valid: round-half-up(fraction * n), at least 1 if n > 0."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"token fraction must be in (0, 1], got {fraction}")
    if n_valid <= 0:
        return 0
    return min(n_valid, max(1, math.floor(fraction * n_valid + 0.5)))


def _valid_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1)[mask.reshape(-1).bool()]


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of a 1-D tensor (numpy's default), with no size limit."""
    s = values.sort().values
    pos = q * (s.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _minmax(values: torch.Tensor) -> torch.Tensor:
    lo, hi = values.min(), values.max()
    if hi > lo:
        return (values - lo) / (hi - lo)
    return torch.zeros_like(values)


def _top_fraction(score: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the `selection_count` highest-scoring valid tokens; ties go to the earlier flat index."""
    flat_mask = mask.reshape(-1).bool()
    idx = flat_mask.nonzero().squeeze(1)
    out = torch.zeros_like(flat_mask)
    k = selection_count(idx.numel(), fraction)
    if k:
        vals = torch.nan_to_num(score.detach().reshape(-1)[idx], nan=-math.inf)
        order = torch.sort(vals, descending=True, stable=True).indices[:k]
        out[idx[order]] = True
    return out.reshape(mask.shape)


def tip_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """TIP entropy rule: keep the top `fraction` of valid tokens of the batch by student entropy h_t.

    Exactly `selection_count(n_valid, fraction)` tokens; ties broken by position (row-major).
    """
    return _top_fraction(entropy, mask, fraction)


def tip_soft_or_mask(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: torch.Tensor,
    fraction: float,
    entropy_clip_quantile: float = 0.98,
) -> torch.Tensor:
    """TIP Soft-OR: keep the top `fraction` by s_t = h^ + d^ - h^ d^ (a soft OR of the two axes).

    h^: entropy clipped at its batch 98th percentile, then min-max normalized over valid tokens;
    d^: divergence min-max normalized over valid tokens. Exact count and ties as in `tip_entropy_mask`.
    """
    valid = mask.bool()
    score = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    if valid.any():
        h = _valid_values(entropy, valid).double()
        d = _valid_values(divergence, valid).double()
        h = _minmax(h.clamp(max=_quantile(h, entropy_clip_quantile)))
        d = _minmax(d)
        score[valid] = h + d - h * d
    return _top_fraction(score, valid, fraction)


def tip_q3_mask(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: torch.Tensor,
    entropy_quantile: float = 0.5,
    divergence_quantile: float = 0.5,
) -> torch.Tensor:
    """TIP Q3 ("overconfident and wrong"): low entropy AND high divergence, thresholds = batch quantiles.

    Low means at or below the quantile, high means strictly above it (ties go to "low" on both axes, so
    a batch where most entropies are exactly 0 still selects them, and zero divergences never count as high).
    """
    valid = mask.bool()
    if not valid.any():
        return valid.clone()
    qh = _quantile(_valid_values(entropy, valid), entropy_quantile)
    qd = _quantile(_valid_values(divergence, valid), divergence_quantile)
    return valid & (entropy.detach() <= qh) & (divergence.detach() > qd)


# --- loss --------------------------------------------------------------------------------------


def policy_gradient_loss(
    student_logp: torch.Tensor,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    num_items: int | float | torch.Tensor,
    old_logp: torch.Tensor | None = None,
    clip_eps: float | None = None,
) -> torch.Tensor:
    """Sampled-token policy gradient L = -sum_t mask_t * sg(A_t) * rho_t / num_items.

    rho_t = exp(log pS(y_t) - sg(old_logp_t)); without `old_logp` it is exp(logp - sg(logp)), which is 1
    in value with gradient grad log pS(y_t), i.e. the tinker loss -sum_t sg(A_t) log pS(y_t) in gradient.
    With `clip_eps`: PPO-clip surrogate min(rho A, clip(rho, 1-eps, 1+eps) A) (Lightning OPD, ExOPD use 0.2).
    `num_items` is the global count of trained tokens (all micro-batches, all processes), so summing the
    micro-batch gradients gives the big-batch gradient exactly. The value is -mean(A) over tokens at rho = 1.
    """
    m = mask.bool()
    zero = torch.zeros_like(student_logp)
    logp = torch.where(m, student_logp, zero)
    ref = (student_logp if old_logp is None else old_logp).detach()
    ref = torch.where(m, ref.to(logp.dtype), zero)
    adv = torch.where(m, advantage.detach().to(logp.dtype), zero)
    ratio = torch.exp(logp - ref)
    surrogate = ratio * adv
    if clip_eps is not None:
        surrogate = torch.minimum(surrogate, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    total = -torch.where(m, surrogate, zero).sum()
    if isinstance(num_items, torch.Tensor):
        denom = num_items.detach().to(total.dtype).clamp(min=1)
    else:
        denom = max(float(num_items), 1.0)
    return total / denom
