"""ExOPD (G-OPD, arXiv 2602.12125): reward extrapolation past the teacher.

A_t = lam * (log pT(y_t) - log pref(y_t)) - (log pS(y_t) - log pref(y_t)), all detached, sampled token only;
the optimum is proportional to pT^lam * pref^(1-lam); lam = 1 is standard OPD for any pref.
ExOPD: lam = 1.25, pref = pi_sft (the student's initial checkpoint); `--set method.params.reference=PATH`
for reward correction with another reference (e.g. the teacher's base model). PPO-clip 0.2, ratio 1.
"""

from pydantic import Field

from opd_bench import signals as S
from opd_bench.errors import UserError
from opd_bench.methods.base import PI_SFT, Data, OPDMethod, OPDParams, Reads, register


class Params(OPDParams):
    lam: float = 1.25
    """lambda: the reward extrapolation factor (1 = standard OPD; ExOPD: 1.25)"""
    reference: str = Field(PI_SFT, min_length=1)
    """pref: pi_sft (the student's initial checkpoint) or a model id/path (reward correction)"""
    clip_eps: float | None = 0.2
    """PPO-clip epsilon of the importance ratio (the paper's code: 0.2)"""


class ExOPD(OPDMethod):
    name = "exopd"
    paper = "G-OPD / ExOPD, arXiv 2602.12125"
    rule = "A_t = lam (log pT - log pref) - (log pS - log pref), lam 1.25, pref = pi_sft; PPO-clip 0.2"
    Params = Params

    def reads(self, p) -> Reads:
        return Reads(teacher_logp=True, reference_logp=p.lam != 1, sampler_logp=p.ratio == "sampler")

    def data(self, p) -> Data:
        return Data(rollouts=p.rollouts, teacher=p.teacher, reads=self.reads(p),
                    reference=p.reference if p.lam != 1 else None)

    def check(self, p) -> None:
        super().check(p)
        if p.lam <= 0:
            raise UserError(f"exopd: method.params.lam must be > 0 (got {p.lam})")

    def loss(self, s, p):
        ref = s.ref_logp if p.lam != 1 else None
        return self.policy_gradient(s, p, S.exopd_advantage(s.teacher_logp, s.student_logp.detach(), ref, p.lam))


register(ExOPD())
