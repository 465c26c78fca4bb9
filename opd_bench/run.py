"""`opd-bench run`: one method, one budget, one preset -> a run folder and one leaderboard row.

  world            micro: built here (cached); paper presets: loaded by id/path       not charged
  base eval        pi_sft on the preset's tasks (cached, shared by every method)    not charged
  rollouts, teacher-logps, ref-logps   offline methods only (charged even when cached: the method needs them)
  teacher-samples  sft-continue only                                                charged
  train            OPDTrainer (or SFTTrainer for sft-continue) until the budget is spent
  eval@25/50/75%   on eval.n_per_split_curve problems per split                     recorded, not charged
  eval             the final model on the preset's tasks                            recorded, not charged
Run folder: config.json (resolved), ledger.json, metrics.json (before/after/curve/spend), train_log.jsonl,
budget_steps.json, eval/<task>/samples.jsonl, model/, row.json (the leaderboard row).
Bad input fails before any work (preflight.py). A run killed at any point continues with the same run id or
`--resume` (resume.py): finished phases are reused, training restarts from its last checkpoint, the device
time spent before the crash stays charged, and the leaderboard gets one row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from opd_bench import offline, preflight
from opd_bench.budget import Budget, BudgetCallback, parse_budget
from opd_bench.cache import build_stage
from opd_bench.config import RunConfig
from opd_bench.errors import UserError
from opd_bench.hf_world import WorldModels, load_model
from opd_bench.ledger import Ledger, StageCost
from opd_bench.method import resolve
from opd_bench.resume import (Interrupted, TrainingProgress, checkpoint_state, choose_run, crash_point, finished_ids,
                              load_checkpoint_weights, locked, note, prune_checkpoints, read_json, record_once,
                              stop_on_ctrl_c, weights_finite, write_json)

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

        share = cfg.world.math_fraction if cfg.train.math_fraction is None else cfg.train.math_fraction
        return [(p.id, p.prompt) for p in training_mix(n, share, tag)]
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
        crash_point(f"{cost.stage}:{card.name}")
    return results


def _timed_eval(cfg, model_dir, out_dir, n_per_split, stage: str, ledger: Ledger) -> dict:
    cost = StageCost(stage=stage, extra={"charged": False})
    start = time.perf_counter()
    results = evaluate_tasks(cfg, model_dir, out_dir, n_per_split, cost)
    cost.wall_seconds = time.perf_counter() - start
    ledger.stages = [s for s in ledger.stages if s.stage != stage]  # re-run after a crash: the last one counts
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
    record_once(ledger, cost)
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
    """Charge a precompute stage to the method, once per run (a resumed run finds its record in the ledger)."""
    cost.extra = {**cost.extra, "charged": True}
    charged.append(record_once(ledger, cost))


def _train(trainer, budget: Budget, charged: list[StageCost], meter, on_mark, marks, ledger: Ledger | None,
           devices: int, progress: TrainingProgress | None = None,
           checkpoint: Path | None = None) -> tuple[BudgetCallback, StageCost]:
    """Train until the budget (or the trainer's own step limit) is spent; the stage is charged. With `progress`
    (as run() does), the spend is recorded at every step, checkpoints are saved, Ctrl-C stops cleanly, and
    training continues from `checkpoint` (an interrupted attempt's)."""
    callback = BudgetCallback(budget, devices=devices, charged_seconds=sum(c.device_seconds for c in charged),
                              charged_flops=sum(c.flops for c in charged), meter=meter, marks=marks, on_mark=on_mark)
    cost = progress.cost if progress else StageCost(stage="train", devices=devices, extra={"charged": True})
    if progress is not None:
        progress.budget = callback
        trainer.add_callback(progress)  # before the budget callback: a diverged step gets no curve evaluation
    trainer.add_callback(callback)
    with stop_on_ctrl_c(progress):
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except RuntimeError:
            # Online sampling from weights that just blew up fails inside generate(), before any step end
            # could see them: that is divergence too, not a crash.
            if progress is None or weights_finite(trainer.model):
                raise
            progress.diverged_at = trainer.state.global_step
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
        command: str | None = None, run_id: str | None = None, resume: bool = False) -> dict:
    """One run, from checks to the leaderboard row. A run with this `run_id` that was cut short (SIGKILL, Ctrl-C)
    continues where it stopped; `resume` picks the newest unfinished run of this configuration (resume.py)."""
    method, ax = resolve(cfg, method_name)
    budget = parse_budget(budget_spec or cfg.budget)
    cfg = cfg.model_copy(update={"method": ax, "budget": budget.spec})
    preflight.check_outputs(cfg)
    preflight.check_tasks(cfg)
    preflight.check_model_paths(cfg, ax)
    world = load_world(cfg)
    teacher = world.teacher_a if ax.teacher == "consistent" else world.teacher_b
    if not teacher:
        raise UserError("method.teacher=inconsistent needs a second teacher: set world.hf.teacher_b")
    tokenizer = preflight.load_checked_tokenizer(world.tokenizer)
    reference = (ax.reference,) if method.needs_reference(ax) and ax.reference != "pi_sft" else ()
    preflight.check_vocabularies(tokenizer, world.student, (teacher, *reference))

    run_dir = choose_run(cfg, ax, run_id, resume)
    with locked(run_dir):
        try:
            return _run_in(run_dir, cfg, method, ax, budget, world, tokenizer, teacher, command)
        except KeyboardInterrupt:
            raise Interrupted(run_dir.name) from None


def _run_in(run_dir: Path, cfg, method, ax, budget: Budget, world: WorldModels, tokenizer, teacher: str,
            command: str | None) -> dict:
    """The phases; each one a resumed run finds finished (model/, row.json) is skipped."""
    from opd_bench.leaderboard import extra_fields, log_means

    if (run_dir / "row.json").exists():  # evaluated before: at most the leaderboard row is missing
        return _publish(cfg, run_dir)
    if (run_dir / "config.json").exists():
        note(f"resuming run {run_dir.name}")
    else:
        write_json(run_dir / "config.json", json.loads(cfg.model_dump_json()))
    ledger = Ledger(run_dir / "ledger.json")  # a resumed run keeps what it recorded (and spent) before
    for cost in world.costs:  # the shared world: recorded, never charged (SFT is excluded, as in the papers)
        record_once(ledger, StageCost(**{**cost.__dict__, "extra": {**cost.extra, "charged": False}}))
    before, base_dir = base_eval(cfg, world, ledger)

    trained = read_json(run_dir / "train.json") if (run_dir / "model").is_dir() else None
    if trained is None:
        trained = _train_phase(cfg, method, ax, budget, world, tokenizer, teacher, ledger, run_dir, base_dir)
    after = {}
    if trained["status"] != "diverged":  # NaN weights have nothing to evaluate (sampling from them fails)
        after = _timed_eval(cfg, run_dir / "model", run_dir / "eval", cfg.eval.n_per_split, "eval", ledger)
    charged = [s for s in ledger.stages if s.extra.get("charged")]  # precompute + every training attempt
    spent = {"device_seconds": sum(c.device_seconds for c in charged), "flops": sum(c.flops for c in charged)}
    spent["fraction"] = budget.spent(spent["device_seconds"], spent["flops"]) / budget.amount
    curve = read_json(run_dir / "curve.json", [])
    if after:
        curve.append({"mark": 1.0, **spent, "step": trained["steps"],
                      "avg@k": subset_scores(run_dir / "eval", cfg.eval.n_per_split_curve or cfg.eval.n_per_split)})

    metrics = {"run_id": run_dir.name, "method": ax.name, "axes": ax.model_dump(), "budget": budget.__dict__,
               "status": trained["status"], "spent": spent, "steps": trained["steps"],
               "stopped_by": trained["stopped_by"], "attempts": sum(s.stage == "train" for s in ledger.stages),
               "before": before, "after": after, "curve": curve,
               "ledger": {"all": ledger.total(), "charged": spent},  # all: computed by this run
               "train": log_means(_read_jsonl(run_dir / "train_log.jsonl"))}  # means of the logged diagnostics
    write_json(run_dir / "metrics.json", metrics)
    row = leaderboard_row(cfg, run_dir.name, ax, budget, ledger, spent, before, after, metrics)
    row["command"] = command or row["command"]
    row.update({k: v for k, v in extra_fields(cfg, method, ax, budget, ledger, metrics, world).items() if k not in row})
    write_json(run_dir / "row.json", row)
    crash_point("row")
    return _publish(cfg, run_dir)


def _publish(cfg, run_dir: Path) -> dict:
    """Append the run's row unless the leaderboard has it already (a crash right after appending must not
    add a second). Checked outside the leaderboard's lock on purpose: only the process holding this run's
    folder lock ever writes this run id."""
    from opd_bench.leaderboard import append_row

    row = read_json(run_dir / "row.json")
    if row["run_id"] not in finished_ids(cfg.leaderboard):
        append_row(cfg.leaderboard, row)
    crash_point("leaderboard")
    return read_json(run_dir / "metrics.json")


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a last line cut short by a crash is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _train_phase(cfg, method, ax, budget: Budget, world: WorldModels, tokenizer, teacher: str, ledger: Ledger,
                 run_dir: Path, base_dir: Path) -> dict:
    """Train (from the newest checkpoint of an interrupted attempt, if any), then save what later phases need
    and the model, atomically: `model/` exists only once training is over. Returns {steps, stopped_by, status}."""
    from opd_bench.generation import count_params

    charged: list[StageCost] = []
    work = run_dir / "trainer"
    if ax.loss == "sft":
        trainer = _sft_trainer(cfg, world, tokenizer, teacher, charged, ledger, work)
    else:
        trainer = _opd_trainer(cfg, method, ax, world, tokenizer, teacher, charged, ledger, work)
    previous = [s for s in ledger.stages if s.stage == "train"]  # attempts cut short: spent, so charged
    charged += previous
    checkpoint = prune_checkpoints(work) if work.is_dir() else None
    start = checkpoint_state(checkpoint)
    n_student, tokens_before = count_params(world.student), int(start.get("num_input_tokens_seen", 0))

    def usage() -> dict:
        """This attempt's tokens and FLOPs so far (the trainer state of a resumed SFT counts earlier tokens)."""
        if ax.loss == "sft":
            tokens = int(trainer.state.num_input_tokens_seen) - tokens_before
            return {"tokens_trained": tokens, "flops": 6.0 * n_student * tokens}
        return {k: getattr(trainer.cost, k) for k in ("tokens_trained", "tokens_generated", "tokens_scored", "flops")}

    attempt = len(previous) + 1
    cost = StageCost(stage="train", devices=trainer.accelerator.num_processes,
                     extra={"charged": True, "attempt": attempt, "resumed_from_step": start.get("global_step", 0)})
    ledger.add(cost)
    progress = TrainingProgress(ledger, cost, usage, every=cfg.train.checkpoint_seconds,
                                steps_file=run_dir / "budget_steps.jsonl", attempt=attempt)
    n_curve = cfg.eval.n_per_split_curve or cfg.eval.n_per_split
    curve = read_json(run_dir / "curve.json") or [{"mark": 0.0, "device_seconds": 0.0, "flops": 0.0, "step": 0,
                                                    "avg@k": subset_scores(base_dir, n_curve)}]
    write_json(run_dir / "curve.json", curve)

    def on_mark(mark: float, spend: dict) -> None:
        if progress.diverged_at is not None:
            return
        folder = run_dir / f"curve-{round(100 * mark)}"
        trainer.save_model(str(folder / "model"))
        tokenizer.save_pretrained(str(folder / "model"))
        _timed_eval(cfg, folder / "model", folder, n_curve, f"eval@{round(100 * mark)}%", ledger)
        shutil.rmtree(folder / "model")  # the scores stay; the weights are re-creatable, not needed
        curve.append({"mark": mark, **spend, "step": trainer.state.global_step, "avg@k": subset_scores(folder, n_curve)})
        write_json(run_dir / "curve.json", curve)

    precharged = budget.spent(sum(c.device_seconds for c in charged), sum(c.flops for c in charged))
    if precharged >= budget.amount:  # the precompute (or the attempts before a crash) spent the budget
        if checkpoint is not None:
            load_checkpoint_weights(trainer, checkpoint)
        stopped = "budget" if previous else "budget (precompute)"  # without training, pi_sft is the result
    else:
        marks = tuple(m for m in cfg.eval.curve if m > curve[-1]["mark"])  # a resumed run keeps its earlier points
        callback, _ = _train(trainer, budget, charged, lambda: usage()["flops"], on_mark, marks, ledger, cost.devices,
                             progress=progress, checkpoint=checkpoint)
        stopped = "budget" if callback.steps and callback.steps[-1]["fraction"] >= 1 else "step limit"
    status = "ok"
    if progress.diverged_at is not None:
        stopped, status = f"diverged at step {progress.diverged_at} (non-finite weights)", "diverged"
    for key, value in usage().items():
        setattr(cost, key, value)
    cost.extra.update(steps=trainer.state.global_step, stopped_by=stopped)
    ledger.save()
    info = {"steps": trainer.state.global_step, "stopped_by": stopped, "status": status}
    _save_training(trainer, tokenizer, run_dir, work, info)
    return info


def _save_training(trainer, tokenizer, run_dir: Path, work: Path, info: dict) -> None:
    steps_file = run_dir / "budget_steps.jsonl"
    write_json(run_dir / "budget_steps.json", _read_jsonl(steps_file))  # every attempt's steps
    with (run_dir / "train_log.jsonl").open("w") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")
    write_json(run_dir / "train.json", info)
    tmp = run_dir / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, run_dir / "model")  # the phase marker: training is over once model/ exists
    shutil.rmtree(work, ignore_errors=True)
    steps_file.unlink(missing_ok=True)


def leaderboard_row(cfg, run_id, ax, budget, ledger, spent, before, after, metrics) -> dict:
    row = {"run_id": run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "preset": cfg.preset, "method": ax.name, "seed": cfg.seed,
           "budget": budget.spec, "budget_kind": budget.kind}
    row.update({f"axis.{k}": v for k, v in ax.model_dump().items() if k != "name"})
    row.update({"spent_device_s": spent["device_seconds"], "spent_flops": spent["flops"],
                "spent_fraction": spent["fraction"], "steps": metrics["steps"], "stopped_by": metrics["stopped_by"]})
    if metrics.get("status") == "diverged":  # no scores to judge by: the trainer saw non-finite weights
        row["status"] = "diverged"
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
