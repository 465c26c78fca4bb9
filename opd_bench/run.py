"""`opd-bench run`: one method, one budget, one preset -> a run folder and one leaderboard row.

In a straight line: resolve the config (resolve.py) -> build or load the world (worlds.py) -> base evaluation
-> train under the budget (training.py builds the method's trainer) -> evaluate -> build the row once
(row.py) -> publish it to the leaderboard.

  world            micro: built here (cached); paper presets: loaded by id/path       not charged
  base eval        pi_sft on the preset's tasks (cached, shared by every method)    not charged
  rollouts, *-logps, teacher-samples   what the method's declarations ask for (charged even when cached)
  train            the method's trainer until the budget is spent
  eval@25/50/75%   on eval.n_per_split_curve problems per split                     recorded, not charged
  eval             the final model on the preset's tasks                            recorded, not charged
Run folder: config.json (resolved), ledger.json, metrics.json (before/after/curve/spend), train_log.jsonl,
budget_steps.json, eval/<task>/samples.jsonl, model/, row.json (the leaderboard row).
Bad input fails before any work (preflight.py; on paper presets also the memory planner's check of the launch's
layout, planner.check_config). A run killed at any point continues with the same run id or `--resume`
(resume.py): finished phases are reused, training restarts from its last checkpoint, the device time spent
before the crash stays charged, and the leaderboard gets one row.

Under a launcher (`torchrun --nproc_per_node N` / `accelerate launch`, docs/gpu.md) every rank runs this; rank 0
owns the run (resume.Ranks): the checks, the run id and lock, the world and stage builds (the others wait, then
read them), the evaluations, the ledger, curve, metrics, row and leaderboard. All ranks train together; the
stop, checkpoint and curve points are rank 0's, broadcast each step; device time = wall x (processes + teacher
server GPUs). A failed or killed rank stops the job: rank 0 prints one line (tracebacks in the run folder).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

from transformers import TrainerCallback

from opd_bench import preflight
from opd_bench.budget import Budget, BudgetCallback, spend_of
from opd_bench.cache import build_stage
from opd_bench.config import RunConfig
from opd_bench.errors import UserError
from opd_bench.jsonio import read_json, read_jsonl, write_json
from opd_bench.ledger import Ledger, StageCost
from opd_bench.offline import model_key
from opd_bench.resolve import Resolved, resolve
from opd_bench.resume import (Interrupted, JobStopped, RankFailed, Ranks, TrainingProgress, checkpoint_state,
                              choose_run, clock, crash_point, finished_ids, load_checkpoint_weights, locked, note,
                              prune_checkpoints, rank_log, record_once, stop_on_ctrl_c, stopped_by_launcher,
                              weights_finite)
from opd_bench.training import TrainContext, build_trainer, reference_of, teacher_of
from opd_bench.worlds import WorldModels, load_world

# ----------------------------------------------------------------------------- evaluation


def evaluate_tasks(cfg: RunConfig, model_dir, out_dir: Path, n_per_split, cost: StageCost, greedy: bool = True) -> dict:
    """Every task of the preset; `greedy`: also the greedy accuracy where a card asks for it (not on curve points)."""
    from opd_bench.evaluation import evaluate
    from opd_bench.generation import count_params
    from opd_bench.registry import TASKS

    results, n_params = {}, count_params(model_dir)
    cost.devices = cfg.eval.workers
    for name in cfg.eval.tasks:
        card = TASKS.get(name)
        m = evaluate(model_dir, card, out_dir / f"{card.name}-v{card.version}", n_per_split=n_per_split,
                     batch_size=cfg.eval.batch_size, workers=cfg.eval.workers, seed=cfg.seed, backend=cfg.eval.backend,
                     vllm=cfg.vllm, greedy=greedy)
        cost.generate(n_params, m["generated_tokens"])
        results[card.tag] = m
        crash_point(f"{cost.stage}:{card.name}")
    return results


def _timed_eval(cfg, model_dir, out_dir, n_per_split, stage: str, ledger: Ledger, greedy: bool = True) -> dict:
    cost = StageCost(stage=stage, extra={"charged": False})
    start = time.perf_counter()
    results = evaluate_tasks(cfg, model_dir, out_dir, n_per_split, cost, greedy)
    cost.wall_seconds = time.perf_counter() - start
    ledger.stages = [s for s in ledger.stages if s.stage != stage]  # re-run after a crash: the last one counts
    ledger.add(cost)
    return results


def base_eval(cfg: RunConfig, world: WorldModels, ledger: Ledger) -> tuple[dict, Path]:
    """pi_sft's scores, evaluated once per preset (a cached stage) and shared by every run."""
    from opd_bench.registry import TASKS

    inputs = {"model": model_key(world.student), "tasks": [TASKS.get(t).tag for t in cfg.eval.tasks],
              "n_per_split": cfg.eval.n_per_split, "seed": cfg.seed,
              "batch_size": cfg.eval.batch_size}  # sampling on CPU draws per batch: its size changes the samples

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

USAGE = ("tokens_trained", "tokens_generated", "tokens_scored", "flops", "decode_flops", "prefill_flops", "train_flops")


def _train(trainer, budget: Budget, charged: list[StageCost], meter, on_mark, marks, ledger: Ledger | None,
           devices: int, progress: TrainingProgress | None = None, checkpoint: Path | None = None, *,
           ranks: Ranks | None = None, timer=time.perf_counter) -> tuple[BudgetCallback, StageCost]:
    """Train until the budget (or the trainer's own step limit) is spent; the stage is charged. With `progress`
    (as run() does), the spend is recorded at every step, checkpoints are saved, Ctrl-C stops cleanly, and
    training continues from `checkpoint` (an interrupted attempt's). Under a launcher the budget's decisions are
    rank 0's (`ranks.broadcast`)."""
    ranks = ranks or Ranks()
    callback = BudgetCallback(budget, devices=devices, charged=charged, meter=meter, marks=marks, on_mark=on_mark,
                              timer=timer, agree=ranks.broadcast)
    cost = progress.cost if progress else StageCost(stage="train", devices=devices, extra={"charged": True})
    if progress is not None:
        progress.budget = callback
        trainer.add_callback(progress)  # before the budget callback: a diverged step gets no curve evaluation
    trainer.add_callback(callback)
    trainer.add_callback(_RankLog(trainer))
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


class _RankLog(TrainerCallback):
    """Each rank's per-step decisions, for tests (resume.rank_log: OPD_BENCH_RANK_LOG)."""

    def __init__(self, trainer):
        self.trainer, self.rows = trainer, 0

    def on_step_end(self, args, state, control, **kwargs):
        rows = getattr(self.trainer, "rows_trained", 0)
        rank_log({"step": state.global_step, "save": bool(control.should_save),
                  "stop": bool(control.should_training_stop), "rows": rows - self.rows,
                  "processes": args.world_size, "accumulation": args.gradient_accumulation_steps})
        self.rows = rows


class _SumUsage(TrainerCallback):
    """Under a launcher each rank counts its own tokens and FLOPs: at every step end the ranks add them up, so
    the budget, the ledger and the row see the whole batch's (one exchange per step)."""

    def __init__(self, local, ranks: Ranks):
        self.local, self.ranks = local, ranks
        self.totals = local()

    def on_step_end(self, args, state, control, **kwargs):
        parts = self.ranks.gather(self.local())
        self.totals = {k: sum(p[k] for p in parts) for k in USAGE}


# ----------------------------------------------------------------------------- the run


def run(cfg: RunConfig, method_name: str | None = None, budget_spec: str | None = None,
        command: str | None = None, run_id: str | None = None, resume: bool = False) -> dict:
    """One run, from checks to the leaderboard row. A run with this `run_id` that was cut short (SIGKILL, Ctrl-C)
    continues where it stopped; `resume` picks the newest unfinished run of this configuration (resume.py).
    Under a launcher, every rank calls this; rank 0 owns the run (module docstring)."""
    ranks = Ranks.start(cfg.train.rank_wait_s)
    r = resolve(cfg, method_name, budget_spec)
    ranks.on_main(_checks, r)
    world = ranks.main_first(load_world, r.cfg)  # rank 0 builds (micro) while the others wait
    teacher = teacher_of(r, world)
    if not teacher:
        raise UserError(f"{r.label} needs a second teacher (teacher B, which did not write the SFT data): "
                        f"set world.hf.teacher_b")
    tokenizer = preflight.load_checked_tokenizer(world.tokenizer)
    reference = reference_of(r, world)
    ranks.on_main(preflight.check_vocabularies, tokenizer, world.student,
                  (teacher,) + ((reference,) if reference else ()))
    run_dir = Path(ranks.on_main(lambda: str(choose_run(r.cfg, r.method.name, run_id, resume))))
    with ExitStack() as stack:
        ranks.on_main(lambda: stack.enter_context(locked(run_dir)))  # rank 0 holds the run's lock
        try:
            with stopped_by_launcher(ranks):
                return _run_in(run_dir, r, world, tokenizer, teacher, command, ranks)
        except KeyboardInterrupt:
            raise Interrupted(run_dir.name) from None
        except (Exception, JobStopped) as exc:
            if ranks.world == 1 or isinstance(exc, UserError):
                raise
            raise _stopped(ranks, run_dir, exc) from None


def _checks(r: Resolved) -> None:
    """Bad input and layouts that cannot fit fail here, before any work."""
    preflight.check_outputs(r.cfg)
    preflight.check_tasks(r.cfg)
    preflight.check_model_paths(r.cfg, reference=r.data.reference if r.data.reads.reference_logp else None)
    _check_memory(r)


def _check_memory(r: Resolved) -> None:
    """The planner's estimate of every stage on this launch's layout (paper presets; nothing to plan for the micro
    world): a stage that cannot fit is a UserError with the fix (planner.check_config)."""
    from opd_bench.planner import Layout, check_config, needs_for

    if r.cfg.world.kind != "hf":
        return
    t = r.cfg.train
    served = {"teacher": "server", "server_gpus": max(1, t.teacher_server_devices)} if t.teacher_server_url else {}
    needs, reference = needs_for(r.cfg, r.method.name)
    try:
        check_config(r.cfg, needs, Layout.detect(**served), reference=reference)
    except UserError as exc:
        raise UserError(f"{exc} (those are `opd-bench plan` flags; launch commands for them: docs/gpu.md)") from None


class RunStopped(UserError):
    """A multi-rank run stopped because a rank failed, died or was stopped: one line; it resumes by its id."""

    exit_code = 1


def _stopped(ranks: Ranks, run_dir: Path, exc: BaseException) -> RunStopped:
    """The one line a multi-rank run's failure prints (rank 0; the others exit quietly), the traceback kept in the
    run folder."""
    where = run_dir / f"error-rank{ranks.rank}.txt"
    try:
        where.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        pass
    if isinstance(exc, JobStopped):
        why = "the launcher stopped the job (a rank died or failed, or the job was cancelled)"
    elif isinstance(exc, RankFailed):
        why = str(exc)
    else:
        text = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {text[0][:200] if text else ''} (a rank died or failed?)"
    return RunStopped(f"run {run_dir.name} stopped on rank {ranks.rank} of {ranks.world}: {why}; tracebacks in "
                      f"{run_dir}/error-rank*.txt; continue it with --run-id {run_dir.name}")


class _Mirror(Ledger):
    """The ledger as the other ranks see it: read from rank 0's file, never written."""

    def save(self) -> None:
        pass


def _run_in(run_dir: Path, r: Resolved, world: WorldModels, tokenizer, teacher: str, command: str | None,
            ranks: Ranks | None = None) -> dict:
    """The phases; each one a resumed run finds finished (model/, row.json) is skipped."""
    ranks = ranks or Ranks()
    cfg = r.cfg

    def setup() -> dict:
        if (run_dir / "row.json").exists():  # evaluated before: at most the leaderboard row is missing
            return {"done": _publish(cfg, run_dir)}
        if (run_dir / "config.json").exists():
            note(f"resuming run {run_dir.name}")
        else:
            write_json(run_dir / "config.json", json.loads(cfg.model_dump_json()))
        ledger = Ledger(run_dir / "ledger.json")  # a resumed run keeps what it recorded (and spent) before
        for cost in world.costs:  # the shared world: recorded, never charged (SFT is excluded, as in the papers)
            record_once(ledger, StageCost(**{**cost.__dict__, "extra": {**cost.extra, "charged": False}}))
        before, base_dir = base_eval(cfg, world, ledger)
        trained = read_json(run_dir / "train.json") if (run_dir / "model").is_dir() else None
        return {"before": before, "base_dir": str(base_dir), "trained": trained}

    state = ranks.on_main(setup)
    if "done" in state:
        return state["done"]
    trained = state["trained"]
    if trained is None:
        ledger = Ledger(run_dir / "ledger.json") if ranks.main else _Mirror(run_dir / "ledger.json")
        trained = _train_phase(r, world, tokenizer, teacher, ledger, run_dir, Path(state["base_dir"]), ranks)
    return ranks.on_main(_finish, r, run_dir, world, teacher, state["before"], trained, command)


def _finish(r: Resolved, run_dir: Path, world: WorldModels, teacher: str, before: dict, trained: dict,
            command: str | None) -> dict:
    """Rank 0: the final evaluation, metrics, the row, the leaderboard."""
    from opd_bench.row import build_row, log_means

    cfg, budget = r.cfg, r.budget
    ledger = Ledger(run_dir / "ledger.json")
    after = {}
    if trained["status"] != "diverged":  # NaN weights have nothing to evaluate (sampling from them fails)
        after = _timed_eval(cfg, run_dir / "model", run_dir / "eval", cfg.eval.n_per_split, "eval", ledger)
    spent = charged_spend(ledger, budget)
    curve = read_json(run_dir / "curve.json", [])
    if after:
        curve.append({"mark": 1.0, **spent, "step": trained["steps"],
                      "avg@k": subset_scores(run_dir / "eval", cfg.eval.n_per_split_curve or cfg.eval.n_per_split)})

    metrics = {"run_id": run_dir.name, "method": r.method.name, "label": r.label, "teacher": str(teacher),
               "params": r.params.model_dump(mode="json"), "budget": budget.__dict__,
               "status": trained["status"], "spent": spent, "steps": trained["steps"],
               "stopped_by": trained["stopped_by"], "attempts": sum(s.stage == "train" for s in ledger.stages),
               "before": before, "after": after, "curve": curve,
               "ledger": {"all": ledger.total(), "charged": spent},  # all: computed by this run
               "train": log_means(read_jsonl(run_dir / "train_log.jsonl"))}  # means of the logged diagnostics
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "row.json", build_row(r, run_dir.name, ledger, metrics, world, command))
    crash_point("row")
    return _publish(cfg, run_dir)


def charged_spend(ledger: Ledger, budget: Budget) -> dict:
    """What the method was charged: its precompute stages and every training attempt."""
    return spend_of(budget, [s for s in ledger.stages if s.extra.get("charged")])


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


def _tracking(cfg: RunConfig, run_dir: Path) -> None:
    """TensorBoard writes into the run folder (the trainer's own folder is removed when training ends)."""
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))


def _train_phase(r: Resolved, world: WorldModels, tokenizer, teacher: str, ledger: Ledger, run_dir: Path,
                 base_dir: Path, ranks: Ranks | None = None) -> dict:
    """Train (from the newest checkpoint of an interrupted attempt, if any), then save what later phases need
    and the model, atomically: `model/` exists only once training is over. Returns {steps, stopped_by, status}.
    Every rank runs this; rank 0 decides, records and evaluates."""
    ranks = ranks or Ranks()
    cfg, budget = r.cfg, r.budget
    work = run_dir / "trainer"
    _tracking(cfg, run_dir)
    ctx = TrainContext(cfg, world, tokenizer, teacher, work, ledger, ranks=ranks, run_name=run_dir.name)
    trainer = build_trainer(ctx, r)
    charged = ctx.charged
    previous = [s for s in ledger.stages if s.stage == "train"]  # attempts cut short: spent, so charged
    charged += previous
    checkpoint = ranks.on_main(lambda: prune_checkpoints(work) if work.is_dir() else None)
    start = checkpoint_state(checkpoint)

    def local() -> dict:
        """This process's tokens and FLOPs of this attempt so far."""
        return {k: getattr(trainer.cost, k) for k in USAGE}

    summed = _SumUsage(local, ranks)

    def usage() -> dict:
        """This attempt's tokens and FLOPs so far, all ranks together (as of the last step end)."""
        return local() if ranks.world == 1 else dict(summed.totals)

    attempt = len(previous) + 1
    server = getattr(trainer, "teacher_server", None)
    server_devices = server.devices if server is not None else 0
    processes = trainer.accelerator.num_processes
    cost = StageCost(stage="train", devices=processes + server_devices,
                     extra={"charged": True, "attempt": attempt, "resumed_from_step": start.get("global_step", 0),
                            "processes": processes, "server_devices": server_devices,
                            "teacher_server": server.base_url if server is not None else None})
    ledger.add(cost)
    timer = clock(ranks)
    progress = TrainingProgress(ledger, cost, usage, every=cfg.train.checkpoint_seconds,
                                steps_file=run_dir / "budget_steps.jsonl", attempt=attempt, ranks=ranks, timer=timer)
    n_curve = cfg.eval.n_per_split_curve or cfg.eval.n_per_split

    def first_curve() -> list:
        curve = read_json(run_dir / "curve.json") or [{"mark": 0.0, "device_seconds": 0.0, "modeled_seconds": 0.0,
                                                        "flops": 0.0, "step": 0,
                                                        "avg@k": subset_scores(base_dir, n_curve)}]
        write_json(run_dir / "curve.json", curve)
        return curve

    curve = ranks.on_main(first_curve)

    def on_mark(mark: float, spend: dict) -> None:
        if progress.diverged_at is not None:
            return
        folder = run_dir / f"curve-{round(100 * mark)}"
        trainer.save_model(str(folder / "model"))  # every rank: sharded weights are gathered

        def evaluate_point() -> None:
            tokenizer.save_pretrained(str(folder / "model"))
            _timed_eval(cfg, folder / "model", folder, n_curve, f"eval@{round(100 * mark)}%", ledger, greedy=False)
            shutil.rmtree(folder / "model")  # the scores stay; the weights are re-creatable, not needed
            curve.append({"mark": mark, **spend, "step": trainer.state.global_step,
                          "avg@k": subset_scores(folder, n_curve)})
            write_json(run_dir / "curve.json", curve)

        ranks.on_main(evaluate_point)

    # the precompute (or the attempts before a crash) spent the budget
    if ranks.on_main(lambda: spend_of(budget, charged)["fraction"] >= 1):
        if checkpoint is not None:
            load_checkpoint_weights(trainer, checkpoint)
        stopped = "budget" if previous else "budget (precompute)"  # without training, pi_sft is the result
    else:
        marks = tuple(m for m in cfg.eval.curve if m > curve[-1]["mark"])  # a resumed run keeps its earlier points
        trainer.add_callback(summed)  # first: the step's totals before anything reads them
        callback, _ = _train(trainer, budget, charged, usage, on_mark, marks, ledger, cost.devices,
                             progress=progress, checkpoint=checkpoint, ranks=ranks, timer=timer)
        stopped = "budget" if callback.steps and callback.steps[-1]["fraction"] >= 1 else "step limit"
    status = "ok"
    if progress.diverged_at is not None:
        stopped, status = f"diverged at step {progress.diverged_at} (non-finite weights)", "diverged"
    for key, value in usage().items():
        setattr(cost, key, value)
    cost.extra.update(steps=trainer.state.global_step, stopped_by=stopped)
    if getattr(trainer, "approximation", None):
        cost.extra["approximation"] = trainer.approximation
    ledger.save()
    info = {"steps": trainer.state.global_step, "stopped_by": stopped, "status": status}
    _save_training(trainer, tokenizer, run_dir, work, info, ranks)
    return info


def _save_training(trainer, tokenizer, run_dir: Path, work: Path, info: dict, ranks: Ranks | None = None) -> None:
    ranks = ranks or Ranks()
    steps_file = run_dir / "budget_steps.jsonl"
    tmp = run_dir / ".model-tmp"

    def records() -> None:
        write_json(run_dir / "budget_steps.json", read_jsonl(steps_file))  # every attempt's steps
        with (run_dir / "train_log.jsonl").open("w") as f:
            for entry in trainer.state.log_history:
                f.write(json.dumps(entry) + "\n")
        write_json(run_dir / "train.json", info)
        shutil.rmtree(tmp, ignore_errors=True)

    def publish_model() -> None:
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, run_dir / "model")  # the phase marker: training is over once model/ exists
        shutil.rmtree(work, ignore_errors=True)
        steps_file.unlink(missing_ok=True)

    ranks.on_main(records)
    trainer.save_model(str(tmp))  # every rank: FSDP2 / ZeRO-3 gather the full weights; rank 0 writes them
    ranks.on_main(publish_model)
