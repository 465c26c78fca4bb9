"""DAgger-style SFT: on-policy prefixes, the forward direction (an iso-cost control).

The student samples y ~ pS (its own prefixes, as in every online OPD method) and, at every position of its
own samples, is pulled toward the teacher in the forward direction:
  target=forward-kl  L = sum_t KL(pT(.|s_t) || pS(.|s_t)) / N            (GKD's forward KL on student outputs)
  target=argmax      L = -sum_t log pS(a_t|s_t) / N,  a_t = argmax_v pT(v|s_t)
                     (DAgger: the expert labels the learner's states with its own action; cross-entropy)
s_t = (x, y_<t) with y the student's sample, N the batch's completion tokens. Beside `full-kl` (the reverse
KL on the same rollouts) and `sft-continue` (the teacher's own prefixes, forward cross-entropy), it separates
where the prefixes come from from which direction the divergence goes. The forward-KL target is the same
loss as `full-kl` at beta 0, named here as the control. The argmax target runs the teacher's forward in the
loss (charged as scoring) and scores the student at the teacher's token instead of its own sample, from the
same prefixes; logits are divided by the sampling temperature as everywhere (the argmax does not depend on it).
"""

from typing import Literal

import torch

from opd_bench.errors import UserError
from opd_bench.methods.base import Data, Loss, Method, Params, Reads, register

ROWS = 2048  # teacher rows per head projection when taking the argmax (never the (tokens, V) logits at once)


class DaggerParams(Params):
    target: Literal["forward-kl", "argmax"] = "forward-kl"
    """forward-kl: the full-vocab KL(pT || pS) at every position; argmax: cross-entropy on the teacher's
    most likely token at every position (DAgger's expert action)"""


def teacher_argmax(s) -> torch.Tensor:
    """a_t = argmax_v pT(v | s_t) at every completion position of the micro-batch, (B, C) long (no gradient).
    Ties go to the lowest token id (torch.argmax)."""
    from opd_bench.logprobs import head_logits, hidden_states

    tr = s.tr
    if tr.teacher_model is None:
        raise UserError("dagger-sft reads the teacher's distribution, but no teacher is loaded (offline)")
    teacher = tr.accelerator.unwrap_model(tr.teacher_model)
    tr.cost.score(tr.n_teacher, int(s.attention_mask.sum()))
    with torch.no_grad():
        hidden = hidden_states(teacher, s.input_ids, s.attention_mask, s.tokens.shape[1]).flatten(0, 1)
        best = [head_logits(teacher, hidden[i:i + ROWS], 1.0).argmax(-1) for i in range(0, hidden.shape[0], ROWS)]
    return torch.cat(best).view(s.tokens.shape)


def logp_at(s, tokens: torch.Tensor) -> torch.Tensor:
    """log pS(tokens_t | s_t), with its gradient, on the micro-batch's own prefixes: the same Signals (dense or
    chunked, its training FLOPs charged), scored at `tokens` instead of the sampled ones."""
    at = type(s)(s.tr, s.student, s.inputs, s.num_items)  # input_ids are fixed at construction: the samples
    at.tokens = tokens
    return at.student_logp


class DaggerSFT(Method):
    name = "dagger-sft"
    paper = "DAgger (Ross, Gordon & Bagnell, AISTATS 2011); GKD's on-policy forward KL (arXiv 2306.13649)"
    rule = "forward KL(pT || pS), or cross-entropy on the teacher's argmax, at every position of the student's samples"
    Params = DaggerParams

    def data(self, p) -> Data:
        return Data(reads=Reads(teacher_distribution=True))  # both targets run the teacher in the loss

    def loss(self, s, p):
        if p.target == "argmax":
            logp = logp_at(s, teacher_argmax(s))
            return Loss(-logp.masked_fill(~s.mask, 0.0).sum() / s.num_items, s.mask)
        return Loss(s.divergence_on(s.mask, beta=0.0).sum() / s.num_items, s.mask)


register(DaggerSFT())
