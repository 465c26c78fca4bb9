"""`opd-bench run`: one method, one budget, one preset -> a run folder and one leaderboard row.

  world            micro: built here (cached); paper presets: loaded by id/path       not charged
  base eval        pi_sft on the preset's tasks (cached, shared by every method)    not charged
  rollouts, teacher-logps, ref-logps   offline methods only (charged even when cached: the method needs them)
  teacher-samples  sft-continue only                                                charged
  train            OPDTrainer (or SFTTrainer for sft-continue) until the budget is spent
  eval@25/50/75%   on eval.n_per_split_curve problems per split                     recorded, not charged
  eval             the final model on the preset's tasks                            recorded, not charged
Run folder: config.json (resolved), ledger.json, metrics.json (before/after/curve/spend), train_log.jsonl,
budget_steps.json, eval/<task>/samples.jsonl, model/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from opd_bench import offline
from opd_bench.budget import Budget, BudgetCallback, parse_budget
from opd_bench.cache import build_stage
from opd_bench.config import RunConfig
from opd_bench.errors import UserError
from opd_bench.hf_world import WorldModels, load_model, load_tokenizer
from opd_bench.ledger import Ledger, StageCost
from opd_bench.method import resolve

# ----------------------------------------------------------------------------- world and prompts


def load_world(cfg: RunConfig) -> WorldModels:
    if cfg.world.kind == "micro":
        from opd_bench.micro.world import prepare

        # The world is shared by every run of the preset: built with world.seed, never with the run's seed.
        w = prepare(cfg.model_copy(update={"seed": cfg.world.seed}))
        return WorldModels(str(w.tokenizer), str(w.sft_student), str(w.teacher_a), str(w.teacher_b), w.costs)
    if cfg.world.kind == "hf":
        from opd_bench.hf_world import load_world as load_hf

        return load_hf(cfg.world.hf)
    raise UserError(f"unknown world.kind {cfg.world.kind!r} (choose from: micro, hf)")


def training_prompts(cfg: RunConfig, n: int, tag: str) -> list[tuple[str, str]]:
    """n fresh training prompts; each (stage, seed) draws its own."""
    tag = f"{tag}-{cfg.seed}"
    if cfg.world.kind == "micro":
        from opd_bench.micro.world import training_mix

        return [(p.id, p.prompt) for p in training_mix(n, cfg.world.math_fraction, tag)]
    from opd_bench.hf_world import load_prompts

    return load_prompts(cfg.world.hf, n, tag)


# ----------------------------------------------------------------------------- evaluation


def evaluate_tasks(cfg: RunConfig, model_dir, out_dir: Path, n_per_split, cost: StageCost) -> dict:
    from opd_bench.evaluation import evaluate
    from opd_bench.generation import count_params
    from opd_bench.registry import TASKS

    results, n_params = {}, count_params(model_dir)
    cost.devices = cfg.eval.workers
    for name in cfg.eval.tasks:
        card = TASKS.get(name)
        m = evaluate(model_dir, card, out_dir / f"{card.name}-v{card.version}", n_per_split=n_per_split,
                     batch_size=cfg.eval.batch_size, workers=cfg.eval.workers, seed=cfg.seed, backend=cfg.eval.backend)
        cost.generate(n_params, m["generated_tokens"])
        results[card.tag] = m
    return results


def _timed_eval(cfg, model_dir, out_dir, n_per_split, stage: str, ledger: Ledger) -> dict:
    cost = StageCost(stage=stage, extra={"charged": False})
    start = time.perf_counter()
    results = evaluate_tasks(cfg, model_dir, out_dir, n_per_split, cost)
    cost.wall_seconds = time.perf_counter() - start
    ledger.add(cost)
    return results


def base_eval(cfg: RunConfig, world: WorldModels, ledger: Ledger) -> tuple[dict, Path]:
    """pi_sft's scores, evaluated once per preset (a cached stage) and shared by every run."""
    from opd_bench.registry import TASKS

    inputs = {"model": offline.model_key(world.student), "tasks": [TASKS.get(t).tag for t in cfg.eval.tasks],
              "n_per_split": cfg.eval.n_per_split, "seed": cfg.seed}

    def build(folder: Path, cost: StageCost) -> dict:
        return {"metrics": evaluate_tasks(cfg, world.student, folder, cfg.eval.n_per_split, cost)}

    folder, cost = build_stage(cfg.artifacts_dir, "eval-base", inputs, build)
    cost.stage, cost.extra = "eval-base", {"charged": False}
    ledger.add(cost)
    return json.loads((folder / "stage.json").read_text())["info"]["metrics"], folder


def subset_scores(eval_dir: Path, n_per_split: int | None) -> dict:
    """avg@k per task on the first n problems of each split, from an evaluation's samples (curve points)."""
    from opd_bench.metrics import aggregate

    out = {}
    for task_dir in sorted(p for p in eval_dir.iterdir() if (p / "samples.jsonl").exists()):
        records = [json.loads(line) for line in (task_dir / "samples.jsonl").read_text().splitlines()]
        kept, per_split = set(), {}
        for r in records:
            ids = per_split.setdefault(r["split"], [])
            if r["problem_id"] not in ids and (n_per_split is None or len(ids) < n_per_split):
                ids.append(r["problem_id"])
            kept.update(ids)
        tag = json.loads((task_dir / "metrics.json").read_text())["task"]
        out[tag] = aggregate([r for r in records if r["problem_id"] in kept])["avg@k"]
    return out


# ----------------------------------------------------------------------------- training


def _charge(ledger: Ledger, cost: StageCost, charged: list[StageCost]) -> None:
    cost.extra = {**cost.extra, "charged": True}
    ledger.add(cost)
    charged.append(cost)


def _train(trainer, budget: Budget, charged: list[StageCost], meter, on_mark, marks, ledger: Ledger,
           devices: int) -> tuple[BudgetCallback, StageCost]:
    """Train until the budget (or the trainer's own step limit) is spent; the stage is charged."""
    callback = BudgetCallback(budget, devices=devices, charged_seconds=sum(c.device_seconds for c in charged),
                              charged_flops=sum(c.flops for c in charged), meter=meter, marks=marks, on_mark=on_mark)
    trainer.add_callback(callback)
    cost = StageCost(stage="train", devices=devices, extra={"charged": True})
    trainer.train()
    cost.wall_seconds = callback.train_seconds()
    return callback, cost


def _opd_trainer(cfg, method, ax, world: WorldModels, tokenizer, teacher: str, charged, ledger, work: Path):
    from datasets import Dataset

    from opd_bench.trainer import OPDTrainer, opd_args, use_chunked

    reference = world.student if ax.reference == "pi_sft" else ax.reference
    ref_model, n_rows = None, None
    if ax.rollouts == "offline":
        prompts = training_prompts(cfg, cfg.train.rollout_prompts, "rollouts")
        rollouts, cost = offline.build_rollouts(cfg, world.student, world.tokenizer, prompts)
        _charge(ledger, cost, charged)
        offline.check_tokenizers(tokenizer, world.student, (teacher,), rollouts)
        scored, cost = offline.build_logps(cfg, rollouts, teacher, "teacher-logps")
        _charge(ledger, cost, charged)
        ref_scored = sampler_scored = None
        if method.needs_reference(ax):
            ref_scored, cost = offline.build_logps(cfg, rollouts, reference, "ref-logps")
            _charge(ledger, cost, charged)
        if method.needs_sampler_logps(ax):
            sampler_scored, cost = offline.build_logps(cfg, rollouts, world.student, "sampler-logps")
            _charge(ledger, cost, charged)
        dataset = offline.load_offline(rollouts, scored, ref_scored, sampler_scored)
        teacher_model, n_rows = None, len(dataset)
    else:
        refs = (reference,) if method.needs_reference(ax) and ax.reference != "pi_sft" else ()
        offline.check_tokenizers(tokenizer, world.student, (teacher, *refs))
        prompts = training_prompts(cfg, cfg.train.prompts, "opd")
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for _, p in prompts]})
        teacher_model = load_model(teacher, cfg)
        if method.needs_reference(ax):
            ref_model = load_model(reference, cfg)
    return OPDTrainer(model=load_model(world.student, cfg), teacher_model=teacher_model,
                      args=opd_args(cfg, ax, work, n_rows), train_dataset=dataset, processing_class=tokenizer,
                      method=method, axes=ax, ref_model=ref_model, chunked=use_chunked(cfg),
                      rollouts_per_prompt=cfg.train.rollouts_per_prompt)


def _sft_trainer(cfg, world: WorldModels, tokenizer, teacher: str, charged, ledger, work: Path):
    """The control: the same budget spent on more SFT, on fresh samples of the consistent teacher."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from opd_bench.sft import tokenize_pairs

    t = cfg.train
    prompts = training_prompts(cfg, t.sft_prompts, "sft-continue")
    folder, cost = offline.build_teacher_samples(cfg, teacher, world.tokenizer, prompts)
    _charge(ledger, cost, charged)
    data = offline.load_samples(folder)
    micro = t.micro_batch_size or t.batch_size
    gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(work), per_device_train_batch_size=micro, gradient_accumulation_steps=t.batch_size // micro,
        learning_rate=t.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=t.max_grad_norm,
        max_steps=t.max_steps or 10**9,  # the budget stops it (SFT on teacher samples does not memorise them)
        max_length=4 * t.max_new_tokens + 512, use_cpu=not gpu, bf16=gpu, gradient_checkpointing=False,
        save_strategy="no", report_to=[], logging_steps=t.logging_steps, seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    return SFTTrainer(model=load_model(world.student, cfg), args=args, processing_class=tokenizer,
                      train_dataset=tokenize_pairs(tokenizer, data["prompt"], data["completion"]))


# ----------------------------------------------------------------------------- the run


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(cfg: RunConfig, method_name: str | None = None, budget_spec: str | None = None,
        command: str | None = None) -> dict:
    from opd_bench.generation import count_params
    from opd_bench.leaderboard import append_row

    method, ax = resolve(cfg, method_name)
    budget = parse_budget(budget_spec or cfg.budget)
    cfg = cfg.model_copy(update={"method": ax, "budget": budget.spec})
    world = load_world(cfg)
    teacher = world.teacher_a if ax.teacher == "consistent" else world.teacher_b
    if not teacher:
        raise UserError("method.teacher=inconsistent needs a second teacher: set world.hf.teacher_b")

    run_id = f"{datetime.now():%Y%m%d-%H%M%S}-{ax.name}-s{cfg.seed}-{uuid.uuid4().hex[:4]}"
    run_dir = Path(cfg.runs_dir) / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
    ledger = Ledger(run_dir / "ledger.json")
    for cost in world.costs:  # the shared world: recorded, never charged (SFT is excluded, as in the papers)
        ledger.add(StageCost(**{**cost.__dict__, "extra": {**cost.extra, "charged": False}}))
    before, base_dir = base_eval(cfg, world, ledger)

    tokenizer = load_tokenizer(world.tokenizer)
    charged: list[StageCost] = []
    work = run_dir / "trainer"
    if ax.loss == "sft":
        trainer = _sft_trainer(cfg, world, tokenizer, teacher, charged, ledger, work)
        n_student = count_params(world.student)
        meter = lambda: 6.0 * n_student * trainer.state.num_input_tokens_seen  # noqa: E731
    else:
        trainer = _opd_trainer(cfg, method, ax, world, tokenizer, teacher, charged, ledger, work)
        meter = lambda: trainer.cost.flops  # noqa: E731

    curve = [{"mark": 0.0, "device_seconds": 0.0, "flops": 0.0, "step": 0,
              "avg@k": subset_scores(base_dir, cfg.eval.n_per_split_curve or cfg.eval.n_per_split)}]

    def on_mark(mark: float, spend: dict) -> None:
        folder = run_dir / f"curve-{round(100 * mark)}"
        trainer.save_model(str(folder / "model"))
        tokenizer.save_pretrained(str(folder / "model"))
        _timed_eval(cfg, folder / "model", folder, cfg.eval.n_per_split_curve or cfg.eval.n_per_split,
                    f"eval@{round(100 * mark)}%", ledger)
        shutil.rmtree(folder / "model")  # the scores stay; the weights are re-creatable, not needed
        curve.append({"mark": mark, **spend, "step": trainer.state.global_step,
                      "avg@k": subset_scores(folder, cfg.eval.n_per_split_curve or cfg.eval.n_per_split)})

    precharged = budget.spent(sum(c.device_seconds for c in charged), sum(c.flops for c in charged))
    devices = trainer.accelerator.num_processes
    if precharged >= budget.amount:  # the precompute alone spent the budget: pi_sft is the result
        callback, train_cost, stopped = None, StageCost(stage="train", extra={"charged": True}), "budget (precompute)"
    else:
        callback, train_cost = _train(trainer, budget, charged, meter, on_mark, tuple(cfg.eval.curve), ledger,
                                      devices)
        stopped = "budget" if callback.steps and callback.steps[-1]["fraction"] >= 1 else "step limit"
    if ax.loss == "sft":
        train_cost.train(count_params(world.student), int(trainer.state.num_input_tokens_seen))
    else:
        for key in ("tokens_trained", "tokens_generated", "tokens_scored", "flops"):
            setattr(train_cost, key, getattr(trainer.cost, key))
    train_cost.extra.update(steps=trainer.state.global_step, stopped_by=stopped)
    ledger.add(train_cost)
    charged.append(train_cost)

    model_dir = run_dir / "model"
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    shutil.rmtree(work, ignore_errors=True)
    after = _timed_eval(cfg, model_dir, run_dir / "eval", cfg.eval.n_per_split, "eval", ledger)
    spent = {"device_seconds": sum(c.device_seconds for c in charged), "flops": sum(c.flops for c in charged)}
    spent["fraction"] = budget.spent(spent["device_seconds"], spent["flops"]) / budget.amount
    curve.append({"mark": 1.0, **spent, "step": trainer.state.global_step,
                  "avg@k": subset_scores(run_dir / "eval", cfg.eval.n_per_split_curve or cfg.eval.n_per_split)})

    metrics = {"run_id": run_id, "method": ax.name, "axes": ax.model_dump(), "budget": budget.__dict__,
               "spent": spent, "steps": trainer.state.global_step, "stopped_by": stopped,
               "before": before, "after": after, "curve": curve,
               "ledger": {"all": ledger.total(), "charged": spent}}  # all: computed by this run
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    with (run_dir / "train_log.jsonl").open("w") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")
    (run_dir / "budget_steps.json").write_text(json.dumps(callback.steps if callback else [], indent=1))
    row = leaderboard_row(cfg, run_id, ax, budget, ledger, spent, before, after, metrics)
    row["command"] = command or row["command"]
    append_row(cfg.leaderboard, row)
    return metrics


def leaderboard_row(cfg, run_id, ax, budget, ledger, spent, before, after, metrics) -> dict:
    row = {"run_id": run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "preset": cfg.preset, "method": ax.name, "seed": cfg.seed,
           "budget": budget.spec, "budget_kind": budget.kind}
    row.update({f"axis.{k}": v for k, v in ax.model_dump().items() if k != "name"})
    row.update({"spent_device_s": spent["device_seconds"], "spent_flops": spent["flops"],
                "spent_fraction": spent["fraction"], "steps": metrics["steps"], "stopped_by": metrics["stopped_by"]})
    for stage in ledger.stages:
        if stage.extra.get("charged") or (stage.stage.startswith("eval") and not stage.cached):
            key = "eval" if stage.stage.startswith("eval@") else stage.stage
            row[f"device_s.{key}"] = row.get(f"device_s.{key}", 0.0) + stage.device_seconds
    for tag, m in after.items():
        row[f"{tag}.avg@k"] = m["avg@k"]
        row[f"{tag}.pass@k"] = m["pass@k"]
        row[f"{tag}.k"] = m["k"]
        if tag in before:
            row[f"{tag}.base_avg@k"] = before[tag]["avg@k"]
    row["command"] = f"opd-bench run --method {ax.name} --budget {budget.spec} --preset {cfg.preset} --seed {cfg.seed}"
    row["run_dir"] = str(Path(cfg.runs_dir) / run_id)
    row["host_cpus"] = os.cpu_count()
    return row
