"""Method plugins: a method is a named choice on each axis of DESIGN.md, plus at most a hook or two.

A plugin file in `methods/` (or in a folder on OPD_BENCH_PLUGIN_PATH) registers one instance:

    from opd_bench.method import Method, register
    register(Method("exopd", reward="exopd", lam=1.25, doc=__doc__))

The trainer asks the method for two things per micro-batch, through hooks a subclass may override:
  advantage(s, ax)   A_t, per token (detached by the loss)
  token_mask(s, ax)  which completion tokens are trained
where `s` gives the per-token signals (each computed only when first read, see trainer.Signals) and
`ax` the resolved axes (`config.MethodAxes`). The defaults below compose the axes from the pinned
estimators in `signals.py`, so every combination (lightning + TIP, ExOPD + vOPD, ...) needs no code.
"""

from __future__ import annotations

import sys

import torch

from opd_bench import signals as S
from opd_bench.config import MethodAxes, RunConfig
from opd_bench.errors import UserError, did_you_mean
from opd_bench.registry import METHODS


class Method:
    def __init__(self, name: str, doc: str | None = None, **axes):
        unknown = sorted(set(axes) - set(MethodAxes.model_fields) | ({"name"} & set(axes)))
        if unknown:
            raise UserError(f"method {name!r} names unknown axis {unknown[0]!r}"
                            f"{did_you_mean(unknown[0], MethodAxes.model_fields)}")
        self.name = name
        self.doc = (doc or type(self).__doc__ or "").strip()
        self.axes = MethodAxes(name=name, **axes)  # validated now: a bad plugin fails at discovery

    def __repr__(self) -> str:
        return f"Method({self.name!r}, {self.axes.model_dump(exclude_defaults=True)})"

    # --- what the trainer must compute ----------------------------------------------------------

    def needs_teacher_distribution(self, ax: MethodAxes) -> bool:
        """Whether the teacher's full next-token distribution is read (then the teacher runs in the loss)."""
        return ax.baseline == "vopd" or (ax.tokens in ("soft-or", "q3") and ax.rollouts == "online")

    def needs_reference(self, ax: MethodAxes) -> bool:
        return ax.reward == "exopd" and ax.lam != 1

    def needs_sampler_logps(self, ax: MethodAxes) -> bool:
        return ax.ratio == "sampler" and ax.rollouts == "offline"

    # --- hooks ------------------------------------------------------------------------------------

    def advantage(self, s, ax: MethodAxes) -> torch.Tensor:
        """A_t from the reward, the reward-to-go option and the baseline axes."""
        student = s.student_logp.detach()
        if ax.reward == "exopd":
            adv = S.exopd_advantage(s.teacher_logp, student, s.ref_logp if ax.lam != 1 else None, ax.lam)
        else:
            adv = S.opd_reward(s.teacher_logp, student)
        if ax.reward_to_go:
            adv = S.reward_to_go(adv, s.mask)
        if ax.baseline == "vopd":  # V(s_t) = -KL_t depends on the state only: unbiased with either reward form
            adv = S.vopd_advantage(adv, s.topk_kl(ax.top_k) if ax.top_k else s.kl)
        return adv

    def token_mask(self, s, ax: MethodAxes) -> torch.Tensor:
        """TIP's rules over the micro-batch's completion tokens (all tokens by default)."""
        if ax.tokens == "entropy":
            return S.tip_entropy_mask(s.entropy, s.mask, ax.fraction)
        if ax.tokens == "soft-or":
            return S.tip_soft_or_mask(s.entropy, s.divergence, s.mask, ax.fraction)
        if ax.tokens == "q3":
            return S.tip_q3_mask(s.entropy, s.divergence, s.mask)
        return s.mask


def register(method: Method) -> Method:
    """Register a method under its name; the caller's file is its origin (a name defined twice is an error)."""
    origin = sys._getframe(1).f_code.co_filename
    return METHODS.register(method.name, method, origin=origin)


def resolve(cfg: RunConfig, name: str | None = None) -> tuple[Method, MethodAxes]:
    """The method and its axes: the method's own choices, then every key set in the preset or by --set."""
    name = name or cfg.method.name
    method = METHODS.get(name)
    if not isinstance(method, Method):
        raise UserError(f"plugin {name!r} is a {type(method).__name__}, not an opd_bench.method.Method")
    explicit = {k: getattr(cfg.method, k) for k in cfg.method.model_fields_set if k != "name"}
    ax = MethodAxes.model_validate({**method.axes.model_dump(), **explicit, "name": name})
    check(method, ax)
    return method, ax


def check(method: Method, ax: MethodAxes) -> None:
    """Combinations the trainer cannot run, as one-line errors before any work starts."""
    if ax.rollouts == "offline" and method.needs_teacher_distribution(ax):
        raise UserError(f"{ax.name}: baseline=vopd needs the teacher's full distribution, but offline rollouts "
                        f"store only sampled-token log-probs; use method.rollouts=online")
    if ax.ratio == "sampler" and ax.rollouts == "online":
        raise UserError(f"{ax.name}: online, the sampler is the current model (the ratio is 1); "
                        f"method.ratio=sampler is for offline rollouts")
    if ax.loss == "full-kl" and (ax.tokens != "all" or ax.rollouts != "online"):
        raise UserError(f"{ax.name}: loss=full-kl is TRL's own loss (online, all tokens); "
                        f"set method.tokens=all and method.rollouts=online")
    if ax.reward == "exopd" and ax.lam != 1 and not ax.reference:
        raise UserError(f"{ax.name}: reward=exopd with lam != 1 needs method.reference (pi_sft or a model path)")
