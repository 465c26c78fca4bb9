"""What a method is: one file in `opd_bench/methods/` that owns its math.

A method file defines a `Method` subclass and registers one instance of it (`register(MyMethod())`):

  name, paper, rule  its name (`--method NAME`), where it comes from, and its rule in one line
  Params             its parameters: a pydantic model whose fields carry a docstring each (the help of
                     `--set method.params.NAME=VALUE`; validated, unknown names get a did-you-mean)
  data(p)            what its training batches are made of (`Data`: online or offline rollouts, which
                     teacher, which per-token signals the loss reads); the trainer, the offline stages and
                     preflight compute exactly what this declares, and never look at the method's name
  loss(s, p)         the loss of one micro-batch from the per-token signals `s` (token_signals.Signals), written
                     with the pinned primitives of `opd_bench.signals`; returns a `Loss`
  check(p)           settings it cannot run, as one-line UserErrors (optional)
  trainer(ctx, p)    a trainer of its own instead of the OPD trainer (optional; sft-continue)

The declarations' vocabulary (Rollouts, Teacher, Reads, PI_SFT) lives here, in the methods folder, so the
machinery branches on declarations, not on names or parameter values (tests/test_layout.py checks it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd_bench import signals as S
from opd_bench.errors import UserError, did_you_mean
from opd_bench.registry import METHODS

PI_SFT = "pi_sft"  # a reference model named by its role: the student's initial checkpoint


class Rollouts(str, Enum):
    ONLINE = "online"  # the student samples a fresh batch every step (the teacher is in memory)
    OFFLINE = "offline"  # pi_sft's rollouts, sampled once and scored once before training (no teacher in training)


class Teacher(str, Enum):
    CONSISTENT = "consistent"  # teacher A, which wrote pi_sft's SFT data
    INCONSISTENT = "inconsistent"  # teacher B, trained on another solution style


@dataclass(frozen=True)
class Reads:
    """The per-token inputs a loss reads; each is computed (online) or precomputed (offline) only if declared."""

    teacher_logp: bool = False  # log pT(y_t) of the sampled tokens (scored after generation, or stored offline)
    teacher_distribution: bool = False  # the teacher's full next-token distribution: the teacher runs in the loss
    reference_logp: bool = False  # log pref(y_t) of `Data.reference` (ExOPD)
    sampler_logp: bool = False  # log q(y_t) of the model that sampled the offline rollouts (pi_sft)
    entropy: bool = False  # the student's per-position entropy (chunked: from the same kernel pass as log pS)


@dataclass(frozen=True)
class Data:
    """Where a method's batches come from and what they carry."""

    rollouts: Rollouts = Rollouts.ONLINE
    teacher: Teacher = Teacher.CONSISTENT
    reads: Reads = field(default_factory=Reads)
    reference: str | None = None  # the reference model (PI_SFT or a model id/path) when reads.reference_logp


@dataclass
class Loss:
    """A micro-batch's loss and what the trainer logs of it."""

    value: torch.Tensor  # scalar; its gradient is the method's update (normalized by the global token count)
    kept: torch.Tensor  # (B, C) bool: the tokens that were trained on
    advantage: torch.Tensor | None = None  # (B, C) per-token advantage, when the loss has one


class Params(BaseModel):
    """A method's parameters; each field's docstring is its help text."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class OPDParams(Params):
    """What every sampled-token OPD method can set: the data source, the teacher, the IS ratio and its clip."""

    rollouts: Rollouts = Rollouts.ONLINE
    """online: the student samples every step; offline: pi_sft's rollouts, sampled and scored once"""
    teacher: Teacher = Teacher.CONSISTENT
    """consistent: teacher A (wrote the SFT data); inconsistent: teacher B (another solution style)"""
    clip_eps: float | None = Field(None, gt=0)
    """PPO-clip epsilon of the importance ratio (None: no clip)"""
    ratio: Literal["current", "sampler"] = "current"
    """IS ratio pS_theta / q: q = the current model (ratio 1, as the papers) or, offline, the sampler pi_sft"""


class Method:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    @property
    def doc(self) -> str:
        return (sys.modules[type(self).__module__].__doc__ or type(self).__doc__ or "").strip()

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    # --- parameters ----------------------------------------------------------------------------------

    def params(self, values: dict[str, Any] | None = None) -> Params:
        """The method's parameters: its defaults, then `values` (preset or --set method.params.*), validated."""
        values = dict(values or {})
        fields = self.Params.model_fields
        for key in values:
            if key not in fields:
                raise UserError(f"{self.name} has no parameter {key!r}{did_you_mean(key, fields)}; "
                                f"`opd-bench list --params` shows each method's parameters")
        try:
            p = self.Params.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(x) for x in err["loc"])
            raise UserError(f"bad value for method.params.{key} of {self.name}: {err['msg']} "
                            f"(got {err.get('input')!r})") from None
        self.check(p)
        return p

    def changed(self, p: Params) -> dict[str, Any]:
        """The parameters that differ from this method's defaults (JSON values), in field order."""
        own, now = self.Params().model_dump(mode="json"), p.model_dump(mode="json")
        return {k: v for k, v in now.items() if own[k] != v}

    def label(self, p: Params) -> str:
        """'tip [rule=q3]': the name plus the changed parameters; recorded with every run."""
        changed = self.changed(p)
        return self.name + (f" [{','.join(f'{k}={v}' for k, v in changed.items())}]" if changed else "")

    # --- what a method declares ----------------------------------------------------------------------

    def data(self, p: Params) -> Data:
        return Data()

    def loss(self, s, p: Params) -> Loss:
        raise NotImplementedError(f"{self.name} defines no loss")

    def check(self, p: Params) -> None:
        """Raise a UserError for settings this method cannot run."""

    def trainer(self, ctx, p: Params):
        """A trainer of the method's own (None: the OPD trainer, driven by data() and loss())."""
        return None


class OPDMethod(Method):
    """A sampled-token OPD method: a per-token advantage on the student's (or pi_sft's) samples, trained with
    the policy gradient -sum_t keep_t sg(A_t) rho_t / N (signals.policy_gradient_loss)."""

    Params = OPDParams

    def reads(self, p) -> Reads:
        return Reads(teacher_logp=True, sampler_logp=p.ratio == "sampler")

    def data(self, p) -> Data:
        return Data(rollouts=p.rollouts, teacher=p.teacher, reads=self.reads(p))

    def check(self, p) -> None:
        if p.ratio == "sampler" and p.rollouts == Rollouts.ONLINE:
            raise UserError(f"{self.name}: online, the sampler is the current model (the ratio is 1); "
                            f"method.params.ratio=sampler is for offline rollouts")
        if self.reads(p).teacher_distribution and p.rollouts == Rollouts.OFFLINE:
            raise UserError(f"{self.name}: these settings read the teacher's full distribution, but offline "
                            f"rollouts store only sampled-token log-probs; use method.params.rollouts=online")

    def policy_gradient(self, s, p, advantage: torch.Tensor, keep: torch.Tensor | None = None,
                        count: torch.Tensor | None = None) -> Loss:
        """The policy-gradient loss on the `keep` tokens (default: all), normalized by `count` (default: the
        batch's global number of completion tokens), with this method's IS ratio and clip."""
        keep = s.mask if keep is None else keep & s.mask
        old = s.sampler_logp if p.ratio == "sampler" else None  # None: ratio 1 (one update per batch)
        value = S.policy_gradient_loss(s.student_logp, advantage, keep, s.num_items if count is None else count,
                                       old_logp=old, clip_eps=p.clip_eps)
        return Loss(value, keep, advantage)


def register(method: Method) -> Method:
    """Register a method under its name; the caller's file is its origin (a name defined twice is an error)."""
    if not method.name:
        raise UserError(f"{type(method).__name__} has no name; set `name = ...` in its class")
    origin = sys._getframe(1).f_code.co_filename
    return METHODS.register(method.name, method, origin=origin)


def get(name: str) -> Method:
    method = METHODS.get(name)
    if not isinstance(method, Method):
        raise UserError(f"plugin {name!r} is a {type(method).__name__}, not an opd_bench.methods.base.Method")
    return method
