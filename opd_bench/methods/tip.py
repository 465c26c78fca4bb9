"""TIP: Token Importance in OPD (arXiv 2604.14084): train only on the tokens that matter.

Two axes per completion token: the student's entropy h_t and the teacher-student divergence d_t (the
full-vocab KL(pS || pT) online; offline only the sampled-token estimate log pS - log pT exists). A rule keeps
some of the batch's tokens (`--set method.params.rule=...`, `method.params.fraction=...`):
  entropy  the top `fraction` of the tokens by h_t (the paper: 50% and 20%)
  soft-or  the top `fraction` by s_t = h^ + d^ - h^ d^, both min-max normalized over the batch, h clipped
           at its batch 98th percentile first (the paper's Soft-OR)
  q3       low entropy AND high divergence ("overconfident and wrong"); no fraction. The paper defines Q3 as
           a quadrant of the (h, d) plane; the thresholds here, the batch medians of both axes, are ours.
The loss (`loss=reverse-kl`, the paper's base loss) is the full-vocab reverse KL computed only at the kept
positions (the vocabulary projection runs on those rows alone: the source of the paper's "up to 47% less
peak memory"), normalized by the number of kept tokens. `loss=sampled` is an ablation: the sampled-token
policy gradient of standard OPD, masked to the kept tokens.
"""

from typing import Literal

from pydantic import Field

from opd_bench import signals as S
from opd_bench.errors import UserError
from opd_bench.methods.base import Loss, OPDMethod, OPDParams, Reads, Rollouts, register


class Params(OPDParams):
    rule: Literal["entropy", "soft-or", "q3"] = "entropy"
    """which tokens are trained: entropy top-fraction, Soft-OR top-fraction, or Q3 (low entropy, high divergence)"""
    fraction: float = Field(0.5, gt=0, le=1)
    """share of the batch's tokens kept by the entropy and soft-or rules"""
    loss: Literal["reverse-kl", "sampled"] = "reverse-kl"
    """reverse-kl: full-vocab KL(pS || pT) on the kept positions (the paper); sampled: OPD's sampled-token
    policy gradient on the kept tokens (an ablation)"""


class TIP(OPDMethod):
    name = "tip"
    paper = "TIP, arXiv 2604.14084"
    rule = "full-vocab reverse KL only on the tokens a rule keeps (entropy top-p%, Soft-OR, Q3)"
    Params = Params

    def reads(self, p) -> Reads:
        full_divergence = p.rule != "entropy" and p.rollouts == Rollouts.ONLINE
        return Reads(teacher_logp=p.loss == "sampled" or p.rule != "entropy", entropy=True,
                     teacher_distribution=p.loss == "reverse-kl" or full_divergence,
                     sampler_logp=p.ratio == "sampler")

    def check(self, p) -> None:
        if p.loss == "reverse-kl" and p.rollouts == Rollouts.OFFLINE:
            raise UserError("tip: loss=reverse-kl needs the teacher's full distribution, which offline rollouts "
                            "do not store; use method.params.loss=sampled (or rollouts=online)")
        if p.loss == "reverse-kl" and (p.clip_eps is not None or p.ratio != "current"):
            raise UserError("tip: clip_eps and ratio apply to loss=sampled (the policy gradient); "
                            "the reverse-KL loss has no importance ratio")
        super().check(p)

    def divergence(self, s, p):
        """d_t: the full-vocab KL when the teacher's distribution is at hand, else log pS(y_t) - log pT(y_t)."""
        if self.reads(p).teacher_distribution:
            return s.kl
        return (s.student_logp.detach() - s.teacher_logp).masked_fill(~s.mask, 0.0)

    def keep(self, s, p):
        if p.rule == "entropy":
            return S.tip_entropy_mask(s.entropy, s.mask, p.fraction)
        if p.rule == "soft-or":
            return S.tip_soft_or_mask(s.entropy, self.divergence(s, p), s.mask, p.fraction)
        return S.tip_q3_mask(s.entropy, self.divergence(s, p), s.mask)

    def loss(self, s, p):
        keep = self.keep(s, p) & s.mask
        # Normalized by the kept tokens: the batch's global token count times the local share kept (exact
        # without gradient accumulation across micro-batches that keep different shares).
        count = s.num_items * keep.sum() / s.mask.sum().clamp(min=1)
        if p.loss == "sampled":
            return self.policy_gradient(s, p, S.opd_reward(s.teacher_logp, s.student_logp.detach()), keep, count)
        return Loss(s.divergence_on(keep).sum() / count.clamp(min=1), keep)


register(TIP())
