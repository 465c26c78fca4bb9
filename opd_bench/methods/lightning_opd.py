"""Lightning OPD (arXiv 2604.13010): offline OPD with a consistent teacher.

pi_sft samples the rollouts once; the teacher that wrote the SFT data scores their tokens once
(only log pT(y_t) is stored); training needs no teacher and no generation.
A_t = log pT(y_t) - sg(log pS_theta(y_t)) with pS recomputed by the current model on the fixed tokens;
PPO-clip surrogate (eps 0.2) with one update per batch (ratio 1); no correction for pi_sft -> pi_theta.
"""

from opd_bench.methods.base import Rollouts, register
from opd_bench.methods.standard_opd import Params as StandardParams
from opd_bench.methods.standard_opd import StandardOPD


class Params(StandardParams):
    rollouts: Rollouts = Rollouts.OFFLINE
    """offline: pi_sft's rollouts, sampled and scored once (online: the student samples every step)"""
    clip_eps: float | None = 0.2
    """PPO-clip epsilon of the importance ratio (the paper: 0.2)"""


class LightningOPD(StandardOPD):
    name = "lightning-opd"
    paper = "Lightning OPD, arXiv 2604.13010"
    rule = "offline: pi_sft's rollouts scored once by the consistent teacher; A_t = log pT - log pS; PPO-clip 0.2"
    Params = Params


register(LightningOPD())
