"""A method's trainer, built from its declarations: the offline stages its `Data` asks for (charged to it), the
models it needs, and the OPD trainer; or the trainer a method supplies itself (`Method.trainer`).

Every trainer built here has `.cost` (a StageCost of this attempt's tokens and FLOPs, kept current), which is
what the budget and the ledger read.

Under a launcher every rank builds the trainer: the offline stages are built by all ranks together, each its share
of the shards (offline.py, `collective`); other cached stages a method builds itself can go through
`TrainContext.stage` (rank 0 builds while the others wait, then read it); the models load after the training arguments exist (so ZeRO-3
partitions them at load) and are left for the trainer to place or shard. With `train.teacher_server_url` an online
method's teacher is not loaded at all: a vLLM server scores the sampled tokens (teacher_server.py), and its GPUs
are charged with the training ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opd_bench import offline
from opd_bench.config import RunConfig
from opd_bench.ledger import Ledger, StageCost
from opd_bench.methods.base import PI_SFT, Rollouts, Teacher
from opd_bench.resolve import Resolved
from opd_bench.resume import Ranks, record_once
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
    ranks: Ranks = field(default_factory=Ranks)
    run_name: str | None = None  # the run id (experiment trackers name their run so)

    def prompts(self, n: int, tag: str) -> list[tuple[str, str]]:
        return training_prompts(self.cfg, n, tag)

    def charge(self, cost: StageCost) -> None:
        """Charge a precompute stage to the method, once per run (a resumed run finds its record in the ledger)."""
        cost.extra = {**cost.extra, "charged": True}
        self.charged.append(record_once(self.ledger, cost))

    def stage(self, build, *args, **kwargs):
        """A cached stage (offline.build_*): built by rank 0 while the other ranks wait, then read by them."""
        return self.ranks.main_first(build, *args, **kwargs)

    def load_model(self, path: str, role: str = "student"):
        """A model for training (role student: fp32 master weights) or scoring (frozen: bf16 on GPU, no gradient),
        left for the trainer to place or shard (models.py)."""
        from opd_bench.models import load_model

        model = load_model(path, self.cfg, role=role, device=None)
        return model if role == "student" else model.eval().requires_grad_(False)

    def teacher_server(self):
        """The teacher server's client when the run points at one (train.teacher_server_url), else None."""
        t = self.cfg.train
        if not t.teacher_server_url:
            return None
        from opd_bench.teacher_server import TeacherServer

        server = TeacherServer(t.teacher_server_url, devices=t.teacher_server_devices)
        server.check()  # unreachable: one line, before any training
        return server


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
    ref_model = teacher_model = server = n_rows = None
    if r.data.rollouts == Rollouts.OFFLINE:
        prompts = ctx.prompts(cfg.train.rollout_prompts, "rollouts")
        collective = ctx.ranks.world > 1  # every rank builds its share of the shards (offline.py)
        rollouts, cost = offline.build_rollouts(cfg, world.student, world.tokenizer, prompts, collective=collective)
        ctx.charge(cost)
        offline.check_tokenizers(ctx.tokenizer, world.student, (ctx.teacher,), rollouts)
        scored = {}
        for column, model, needed in (("teacher_logps", ctx.teacher, reads.teacher_logp),
                                      ("ref_logps", reference, reads.reference_logp),
                                      ("sampler_logps", world.student, reads.sampler_logp)):
            if needed:
                scored[column], cost = offline.build_logps(cfg, rollouts, model, column.replace("_", "-"),
                                                           collective=collective)
                ctx.charge(cost)
        dataset = offline.load_offline(rollouts, scored)
        n_rows = len(dataset)
    else:
        prompts = ctx.prompts(cfg.train.prompts, "opd")
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for _, p in prompts]})
        server = ctx.teacher_server()
    # The arguments first: they set up the launch's distributed state (and ZeRO-3's partitioned loading).
    args = opd_args(cfg, r.data, ctx.work, n_rows, run_name=ctx.run_name)
    if r.data.rollouts != Rollouts.OFFLINE:
        if server is None:
            teacher_model = ctx.load_model(ctx.teacher, role="frozen")
        if reference is not None:
            ref_model = ctx.load_model(reference, role="frozen")
    return OPDTrainer(model=ctx.load_model(world.student), teacher_model=teacher_model,
                      args=args, train_dataset=dataset,
                      processing_class=ctx.tokenizer, method=r.method, params=r.params, data=r.data,
                      ref_model=ref_model, chunked=use_chunked(cfg), rollouts_per_prompt=cfg.train.rollouts_per_prompt,
                      teacher_server=server, teacher_params=_params_of(ctx.teacher) if server else 0,
                      server_topk=cfg.train.teacher_server_topk)


def _params_of(model: str) -> int:
    """The teacher's parameter count from its config (a served teacher is not loaded here): for the FLOPs."""
    from opd_bench.generation import count_params

    try:
        return count_params(model)
    except Exception:  # noqa: BLE001 - a hub id without local files: the planner's shipped shape, else unknown
        try:
            from opd_bench.planner import load_shape

            return load_shape(model).n_params
        except Exception:  # noqa: BLE001
            return 0
