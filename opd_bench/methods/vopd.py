"""vOPD (arXiv 2605.07865): OPD with the value baseline V(s_t) = -KL(pS(.|s_t) || pT(.|s_t)).

A_t = sg(r_t - V(s_t)) = sg(log pT(y_t) - log pS(y_t) + KL_t): unbiased (the baseline depends on s_t only).
KL_t over the full vocabulary; `--set method.params.top_k=100` uses the student's top-k tokens with both
distributions renormalized over them. The variance reduction is not guaranteed in general (it is for a
uniform student), so the trainer logs the gradient variance: measured, not assumed.
"""

from pydantic import Field

from opd_bench import signals as S
from opd_bench.methods.base import OPDMethod, OPDParams, Reads, register


class Params(OPDParams):
    top_k: int | None = Field(None, ge=1)
    """the baseline's KL over the student's top-k tokens, both renormalized (None: the full vocabulary)"""


class VOPD(OPDMethod):
    name = "vopd"
    paper = "vOPD, arXiv 2605.07865"
    rule = "A_t = r_t + KL(pS || pT)(s_t): the per-state reverse KL as a control-variate baseline"
    Params = Params

    def reads(self, p) -> Reads:
        return Reads(teacher_logp=True, teacher_distribution=True, sampler_logp=p.ratio == "sampler")

    def loss(self, s, p):
        reward = S.opd_reward(s.teacher_logp, s.student_logp.detach())
        kl = s.topk_kl(p.top_k) if p.top_k else s.kl  # V(s_t) = -KL_t depends on the state only: unbiased
        return self.policy_gradient(s, p, S.vopd_advantage(reward, kl))


register(VOPD())
