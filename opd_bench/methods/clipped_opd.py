"""Clipped OPD: standard OPD with each per-token reward clipped to [-c, c].

r_t = clip(log pT(y_t) - log pS(y_t), -c, c), then the sampled-token policy gradient of standard OPD.
A stabiliser: one token the teacher finds very unlikely (r_t of -10 nats or less) otherwise dominates its
sequence's update. The vOPD authors added reward clipping in a later revision; c = 2 nats is our default,
not a published value.
"""

from pydantic import Field

from opd_bench import signals as S
from opd_bench.methods.base import OPDMethod, OPDParams, register


class Params(OPDParams):
    c: float = Field(2.0, gt=0)
    """each per-token reward is clipped to [-c, c] (nats)"""


class ClippedOPD(OPDMethod):
    name = "clipped-opd"
    paper = "standard OPD with reward clipping (a stabiliser from vOPD's later revision)"
    rule = "r_t = clip(log pT - log pS, -c, c); sampled-token policy gradient"
    Params = Params

    def loss(self, s, p):
        reward = S.opd_reward(s.teacher_logp, s.student_logp.detach()).clamp(-p.c, p.c)
        return self.policy_gradient(s, p, reward)


register(ClippedOPD())
