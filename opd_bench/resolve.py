"""Run resolution, shared by `opd-bench run` and `opd-bench suite`: from a preset, a method and overrides to
the exact experiment (config with every parameter filled in, method, parameters, budget, run key, label).

The run key identifies the experiment: the resolved config minus where and how fast it runs, the method and
all its parameters, the budget and the world's identity. Same key = same experiment = skipped by a suite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from opd_bench.budget import Budget, parse_budget
from opd_bench.config import MethodChoice, RunConfig, load_config
from opd_bench.errors import UserError
from opd_bench.methods.base import Data, Method, Params, Teacher, get

# Config keys that say where and how fast a run executes, not what it computes: not part of the run key.
EXECUTION_ONLY = {"runs_dir", "leaderboard", "artifacts_dir", "threads"}
EXECUTION_ONLY_EVAL = {"workers"}


@dataclass(frozen=True)
class Resolved:
    cfg: RunConfig  # method.params holds every parameter's value, budget the budget's spec
    method: Method
    params: Params
    budget: Budget
    data: Data

    @property
    def params_changed(self) -> dict[str, Any]:
        return self.method.changed(self.params)

    @property
    def label(self) -> str:
        return self.method.label(self.params)

    @property
    def uses_teacher_b(self) -> bool:
        return self.data.teacher == Teacher.INCONSISTENT

    @property
    def key(self) -> str:
        return run_key(self.cfg)


def resolve(cfg: RunConfig, method_name: str | None = None, budget_spec: str | None = None) -> Resolved:
    """The experiment `cfg` describes (with `method_name` / `budget_spec` taking precedence)."""
    name = method_name or cfg.method.name
    if not name:
        raise UserError("no method: pass --method NAME (`opd-bench list` shows them)")
    method = get(name)
    params = method.params(cfg.method.params)
    budget = parse_budget(budget_spec or cfg.budget, clock=cfg.budget_clock)
    choice = MethodChoice(name=name, params=params.model_dump(mode="json"))
    cfg = cfg.model_copy(update={"method": choice, "budget": budget.spec})
    return Resolved(cfg, method, params, budget, method.data(params))


def resolve_run(preset: str, method: str, *, seed: int | None = None, budget: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Resolved:
    extra = [f"seed={seed}"] if seed is not None else []
    return resolve(load_config(preset, [*overrides, *extra]), method, budget)


def run_key(cfg: RunConfig) -> str:
    """A deterministic key of a resolved config (see the module docstring)."""
    data = cfg.model_dump(mode="json", exclude=EXECUTION_ONLY)
    for key in EXECUTION_ONLY_EVAL:
        data["eval"].pop(key, None)
    if cfg.world.kind == "micro":  # the stage folders' names hash the world's inputs and code versions
        from opd_bench.micro.world import stage_paths

        data["world_stages"] = sorted(p.name for p in stage_paths(cfg).values())
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
