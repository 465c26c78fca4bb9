"""Standard OPD (Thinking Machines, "On-Policy Distillation"; tinker-cookbook).

The student samples y ~ pS at T = 1; the teacher scores each sampled token;
r_t = log pT(y_t|s_t) - log pS(y_t|s_t) (no discount, no outcome reward);
L = -sum_t sg(r_t) log pS(y_t|s_t) / N (one update per batch, so the IS ratio is 1).
`--set method.params.reward_to_go=true` uses G_t = sum_{t'>=t} r_t', the exact sequence-KL gradient.
"""

from opd_bench import signals as S
from opd_bench.methods.base import OPDMethod, OPDParams, register


class Params(OPDParams):
    reward_to_go: bool = False
    """G_t = sum_{t'>=t} r_t' (the exact sequence-KL gradient) instead of the papers' per-token r_t"""


class StandardOPD(OPDMethod):
    name = "standard-opd"
    paper = 'Thinking Machines, "On-Policy Distillation" (2025)'
    rule = "r_t = log pT(y_t) - log pS(y_t) on the student's own samples; sampled-token policy gradient"
    Params = Params

    def advantage(self, s, p):
        reward = S.opd_reward(s.teacher_logp, s.student_logp.detach())
        return S.reward_to_go(reward, s.mask) if p.reward_to_go else reward

    def loss(self, s, p):
        return self.policy_gradient(s, p, self.advantage(s, p))


register(StandardOPD())
