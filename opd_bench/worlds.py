"""Which world a run uses: the micro world (built here, cached) or a paper preset's models (loaded by id or
path), and the training prompts each stage draws from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from opd_bench.config import RunConfig
from opd_bench.errors import UserError
from opd_bench.ledger import StageCost


@dataclass
class WorldModels:
    """Where a run's models live (folders or hub ids), and the cost of building them (never charged)."""

    tokenizer: str
    student: str  # pi_sft
    teacher_a: str
    teacher_b: str | None
    costs: list[StageCost] = field(default_factory=list)
    sft_data: str | None = None  # the folder of pi_sft's own SFT data (the micro world's sft-data stage), if known


def load_world(cfg: RunConfig) -> WorldModels:
    if cfg.world.kind == "micro":
        from opd_bench.micro.world import prepare

        # The world is shared by every run of the preset: built with world.seed, never with the run's seed.
        w = prepare(cfg.model_copy(update={"seed": cfg.world.seed}))
        return WorldModels(str(w.tokenizer), str(w.sft_student), str(w.teacher_a), str(w.teacher_b), w.costs,
                           sft_data=str(w.sft_data))
    if cfg.world.kind == "hf":
        hf = cfg.world.hf
        missing = [k for k in ("sft_student", "teacher", "prompts") if not getattr(hf, k)]
        if missing:
            raise UserError(f"this preset needs world.hf.{missing[0]} (a Hugging Face id or a local folder); "
                            f"e.g. --set world.hf.{missing[0]}=PATH. opd-bench does not run the paper SFT stage "
                            f"on GPUs yet: point sft_student at the SFT'd checkpoint (pi_ref)")
        return WorldModels(tokenizer=hf.tokenizer or hf.sft_student, student=hf.sft_student, teacher_a=hf.teacher,
                           teacher_b=hf.teacher_b or None)
    raise UserError(f"unknown world.kind {cfg.world.kind!r} (choose from: micro, hf)")


def training_prompts(cfg: RunConfig, n: int, tag: str) -> list[tuple[str, str]]:
    """n fresh training prompts; each (stage, seed) draws its own."""
    tag = f"{tag}-{cfg.seed}"
    if cfg.world.kind == "micro":
        from opd_bench.micro.world import training_mix

        share = cfg.world.math_fraction if cfg.train.math_fraction is None else cfg.train.math_fraction
        return [(p.id, p.prompt) for p in training_mix(n, share, tag)]
    from opd_bench.hf_world import load_prompts

    return load_prompts(cfg.world.hf, n, tag)
