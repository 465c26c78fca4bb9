"""Full-vocab reverse KL on every token: TRL DistillationTrainer's loss (beta = 1), the reference arm.

L = sum_t sum_v pS(v|s_t) (log pS(v|s_t) - log pT(v|s_t)) / N on the student's own samples; on GPU through
TRL's chunked divergence kernel (never the (tokens, V) logits). `--set method.params.beta=0.5` gives TRL's
generalized JSD, `beta=0` the forward KL.
"""

from pydantic import Field

from opd_bench.methods.base import Data, Loss, Method, Params, Reads, register


class FullKLParams(Params):
    beta: float = Field(1.0, ge=0, le=1)
    """TRL's generalized JSD beta: 1 = reverse KL(pS || pT), 0 = forward KL(pT || pS)"""


class FullKL(Method):
    name = "full-kl"
    paper = "TRL DistillationTrainer (GKD, arXiv 2306.13649, fully on-policy)"
    rule = "full-vocab reverse KL(pS || pT) at every position of the student's own samples"
    Params = FullKLParams

    def data(self, p) -> Data:
        return Data(reads=Reads(teacher_distribution=True))

    def loss(self, s, p):
        return Loss(s.divergence_on(s.mask, beta=p.beta).sum() / s.num_items, s.mask)


register(FullKL())
