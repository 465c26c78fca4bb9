"""Teacher-inconsistent offline OPD (Lightning OPD's negative control, arXiv 2604.13010).

As lightning-opd, but teacher B (same architecture, trained on another solution style) scores the rollouts
of a student that was SFT'd on teacher A's data. Lightning OPD predicts an irreducible gradient bias: a
worse fixed point. The online version is `--method standard-opd --set method.params.teacher=inconsistent`.
"""

from opd_bench.methods.base import Teacher, register
from opd_bench.methods.lightning_opd import LightningOPD
from opd_bench.methods.lightning_opd import Params as LightningParams


class Params(LightningParams):
    teacher: Teacher = Teacher.INCONSISTENT
    """inconsistent: teacher B, not the teacher that wrote pi_sft's SFT data"""


class InconsistentOffline(LightningOPD):
    name = "inconsistent-offline"
    paper = "Lightning OPD, arXiv 2604.13010 (its negative control)"
    rule = "as lightning-opd, but teacher B (not the one that wrote the SFT data) scores the rollouts"
    Params = Params


register(InconsistentOffline())
