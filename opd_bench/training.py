"""A method's trainer, built from its declarations: the offline stages its `Data` asks for (charged to it), the
models it needs, and the OPD trainer; or the trainer a method supplies itself (`Method.trainer`).

Every trainer built here has `.cost` (a StageCost of this attempt's tokens and FLOPs, kept current), which is
what the budget and the ledger read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opd_bench import offline
from opd_bench.config import RunConfig
from opd_bench.ledger import Ledger, StageCost
from opd_bench.methods.base import PI_SFT, Rollouts, Teacher
from opd_bench.resolve import Resolved
from opd_bench.resume import record_once
from opd_bench.worlds import WorldModels, training_prompts


@dataclass
class TrainContext:
    """What a method's trainer may use: the run's config, world, tokenizer, teacher and working folder."""

    cfg: RunConfig
    world: WorldModels
    tokenizer: object
    teacher: str  # the teacher the method declared (A or B), a folder or hub id
    work: Path  # the trainer's output folder (checkpoints)
    ledger: Ledger
    charged: list[StageCost] = field(default_factory=list)

    def prompts(self, n: int, tag: str) -> list[tuple[str, str]]:
        return training_prompts(self.cfg, n, tag)

    def charge(self, cost: StageCost) -> None:
        """Charge a precompute stage to the method, once per run (a resumed run finds its record in the ledger)."""
        cost.extra = {**cost.extra, "charged": True}
        self.charged.append(record_once(self.ledger, cost))

    def load_model(self, path: str):
        from opd_bench.models import load_model

        return load_model(path, self.cfg)


def teacher_of(r: Resolved, world: WorldModels) -> str | None:
    return world.teacher_b if r.data.teacher == Teacher.INCONSISTENT else world.teacher_a


def reference_of(r: Resolved, world: WorldModels) -> str | None:
    """The reference model's folder or id, when the method reads reference log-probs."""
    if not r.data.reads.reference_logp:
        return None
    return world.student if r.data.reference in (None, PI_SFT) else r.data.reference


def build_trainer(ctx: TrainContext, r: Resolved):
    return r.method.trainer(ctx, r.params) or _opd_trainer(ctx, r)


def _opd_trainer(ctx: TrainContext, r: Resolved):
    from datasets import Dataset

    from opd_bench.logprobs import use_chunked
    from opd_bench.trainer import OPDTrainer, opd_args

    cfg, world, reads = ctx.cfg, ctx.world, r.data.reads
    reference = reference_of(r, world)
    ref_model = teacher_model = n_rows = None
    if r.data.rollouts == Rollouts.OFFLINE:
        prompts = ctx.prompts(cfg.train.rollout_prompts, "rollouts")
        rollouts, cost = offline.build_rollouts(cfg, world.student, world.tokenizer, prompts)
        ctx.charge(cost)
        offline.check_tokenizers(ctx.tokenizer, world.student, (ctx.teacher,), rollouts)
        scored = {}
        for column, model, needed in (("teacher_logps", ctx.teacher, reads.teacher_logp),
                                      ("ref_logps", reference, reads.reference_logp),
                                      ("sampler_logps", world.student, reads.sampler_logp)):
            if needed:
                scored[column], cost = offline.build_logps(cfg, rollouts, model, column.replace("_", "-"))
                ctx.charge(cost)
        dataset = offline.load_offline(rollouts, scored)
        n_rows = len(dataset)
    else:
        prompts = ctx.prompts(cfg.train.prompts, "opd")
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for _, p in prompts]})
        teacher_model = ctx.load_model(ctx.teacher)
        if reference is not None:
            ref_model = ctx.load_model(reference)
    return OPDTrainer(model=ctx.load_model(world.student), teacher_model=teacher_model,
                      args=opd_args(cfg, r.data, ctx.work, n_rows), train_dataset=dataset,
                      processing_class=ctx.tokenizer, method=r.method, params=r.params, data=r.data,
                      ref_model=ref_model, chunked=use_chunked(cfg), rollouts_per_prompt=cfg.train.rollouts_per_prompt)
