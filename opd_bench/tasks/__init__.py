"""Task cards: one YAML file per task in `opd_bench/tasks/` (shipped in the package), and the problems they load.

A card fixes the evaluation protocol (k samples, temperature, top-p, max tokens) and names a loader
(`module:function`, called with `loader_args` and returning a list of `Problem`) and a scorer. The
card's version is recorded with every result, so numbers from different protocols never mix.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd_bench.errors import UserError


@dataclass(frozen=True)
class Problem:
    id: str
    task: str
    split: str  # difficulty split or category; metrics are also reported per split
    prompt: str  # the user message
    answer: str  # math: the gold answer; code: hidden test code
    solutions: dict[str, str] = field(default_factory=dict)  # style -> ground-truth completion


class TaskCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = Field(description="bump when the data, prompt or scoring changes")
    description: str = ""
    source: str = Field(description="where the data comes from")
    license: str = ""
    loader: str = Field(description="module:function returning list[Problem]")
    loader_args: dict = Field(default_factory=dict)
    prompt_template: str = "{prompt}"
    scorer: str = Field(description="a key of opd_bench.scoring.SCORERS")
    k: int = Field(1, ge=1, description="samples per problem")
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    greedy_beside: bool = Field(False, description="a sampled protocol: also decode each problem greedily and "
                                "report its accuracy beside avg@k (`greedy`; never the primary metric)")

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"

    def protocol(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}

    def load_problems(self, n_per_split: int | None = None) -> list[Problem]:
        module_name, _, func_name = self.loader.partition(":")
        loader = getattr(importlib.import_module(module_name), func_name)
        problems = loader(**self.loader_args)
        if n_per_split is not None:
            kept, counts = [], {}
            for problem in problems:
                if counts.get(problem.split, 0) < n_per_split:
                    counts[problem.split] = counts.get(problem.split, 0) + 1
                    kept.append(problem)
            problems = kept
        return problems

    def render_prompt(self, problem: Problem) -> str:
        return self.prompt_template.format(prompt=problem.prompt)


def load_card(path: Path) -> TaskCard:
    try:
        data = yaml.safe_load(Path(path).read_text())
        return TaskCard.model_validate(data)
    except (yaml.YAMLError, ValidationError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"bad task card {path}: {first}; fix the YAML (see opd_bench/tasks/micro-math.yaml)") from None
