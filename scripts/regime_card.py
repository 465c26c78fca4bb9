#!/usr/bin/env python
"""The regime card of a preset's world (issue #16): is the world in the OPD papers' regime?

    python scripts/regime_card.py --preset micro [--set key=value ...] [--capacity] [--json card.json] [--check]

Reads the preset's built world (it never builds one: `opd-bench prepare --preset P` first, or `--build`) and
prints one line per quantity, with its target and PASS / FAIL (`info`: stated, no target):
  teacher : student parameters      3-8x (the papers use 2-9x)
  pi_sft / teacher, primary metric  40-85%
  primary metric                    sampled avg@k, k >= 4, at T 0.6 or 1.0 (what the task cards say)
  task families                     math and code both (the cards' scorers)
  hardest split                     >= 4 steps (splits named <family>-<steps>, e.g. micro-math's ops-4)
  held-out problems                 >= 1,000 (over the preset's tasks at eval.n_per_split)
  tokens per OPD step               train.batch_size x pi_sft's mean completion length, sampled on training
                                    prompts at train.temperature, up to train.max_new_tokens (info)
The primary metric of a model is the mean over the preset's tasks of avg@k under each card's protocol, from
`opd-bench eval`'s evaluation (run.evaluate_tasks: the preset's tasks, n_per_split and seed). pi_sft's scores
are the runs' own cached eval-base stage; the teacher's and the capacity students' are cached stages too, so a
second card costs only the length sample.

--capacity trains (micro worlds only; minutes on micro, seconds on smoke): for each factor f of --curve, a fresh
student of pi_sft's architecture SFT'd by pi_sft's recipe (world.student_training, steps scaled by max(f, 1):
the same epochs; with early stopping that is a cap, and pi_sft's own held-out teacher samples decide when it
stops) on f x world.sft_prompts fresh samples of teacher A (at world.sft_temperature). The largest
point must be >= 8x and reach >= 90% of the teacher's primary metric (the student is not capacity-capped); the
SFT scaling curve is printed with pi_sft itself as its 1x point. --check exits 1 when a target fails.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

TARGETS = {
    "ratio": (3.0, 8.0),  # teacher : student parameters
    "share": (0.40, 0.85),  # pi_sft's primary metric as a share of the teacher's
    "k": 4,  # samples per problem of a sampled primary metric
    "temperatures": (0.6, 1.0),  # the papers' sampling temperatures
    "families": ("math", "code"),  # task scorers the world must cover
    "steps": 4,  # the hardest split's step count
    "problems": 1000,  # held-out problems
    "capacity_factor": 8.0,  # the capacity point: >= 8x pi_sft's teacher samples ...
    "capacity_share": 0.90,  # ... reaching >= 90% of the teacher
}
STEP_SPLIT = re.compile(r"-(\d+)$")  # a split named by its step count: ops-4


@dataclass(frozen=True)
class Line:
    name: str
    value: str
    target: str
    verdict: str  # PASS, FAIL or info

    def render(self, widths: tuple[int, int, int] = (34, 40, 28)) -> str:
        a, b, c = widths
        return f"  {self.name:<{a}}  {self.value:<{b}}  {self.target:<{c}}  {self.verdict}"


# ----------------------------------------------------------------------------- the card's arithmetic


def primary(tasks: dict, who: str) -> float:
    """A model's primary metric: the mean over tasks of avg@k (each under its card's protocol)."""
    return sum(t[who] for t in tasks.values()) / len(tasks)


def hardest_steps(splits) -> int | None:
    steps = [int(m.group(1)) for s in splits if (m := STEP_SPLIT.search(s))]
    return max(steps) if steps else None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def card_lines(facts: dict) -> list[Line]:
    """The card from measured facts (pure arithmetic; tests/test_regime_card.py pins it on a synthetic input).

    facts: teacher_params, student_params; tasks {tag: {scorer, k, temperature, teacher, pi_sft (avg@k),
    n_problems, splits}}; batch_size, mean_completion_tokens; optional capacity {teacher_samples,
    points: [{factor, samples, score}]} (score: the primary metric of the student SFT'd on `samples`).
    """
    t, lines = facts["tasks"], []
    lo, hi = TARGETS["ratio"]
    ratio = facts["teacher_params"] / facts["student_params"]
    lines.append(Line("teacher : student parameters",
                      f"{facts['teacher_params']:,} : {facts['student_params']:,} = {ratio:.2f}x",
                      f"{lo:g}-{hi:g}x", _verdict(lo <= ratio <= hi)))

    teacher, student = primary(t, "teacher"), primary(t, "pi_sft")
    lo, hi = TARGETS["share"]
    share = student / teacher if teacher > 0 else math.nan
    lines.append(Line("pi_sft / teacher, primary metric",
                      f"{_pct(student)} / {_pct(teacher)} = {_pct(share)}",
                      f"{_pct(lo)}-{_pct(hi)}", _verdict(lo <= share <= hi)))

    protocols = sorted({(v["k"], v["temperature"]) for v in t.values()})
    sampled = all(k >= TARGETS["k"] and temp in TARGETS["temperatures"] for k, temp in protocols)
    lines.append(Line("primary metric",
                      ", ".join(f"avg@{k} at T {temp:g}" + (" (greedy)" if temp == 0 else "") for k, temp in protocols),
                      f"avg@k, k >= {TARGETS['k']}, T " + " or ".join(f"{x:g}" for x in TARGETS["temperatures"]),
                      _verdict(sampled)))

    scorers = sorted({v["scorer"] for v in t.values()})
    lines.append(Line("task families", ", ".join(f"{tag} ({v['scorer']})" for tag, v in t.items()),
                      " and ".join(TARGETS["families"]) + " both",
                      _verdict(set(TARGETS["families"]) <= set(scorers))))

    steps = {tag: hardest_steps(v["splits"]) for tag, v in t.items()}
    known = {tag: s for tag, s in steps.items() if s is not None}
    hardest = max(known.values()) if known else None
    lines.append(Line("hardest split", "n/a (no split named by its steps)" if hardest is None else
                      f"{hardest} steps ({', '.join(f'{tag}: {s}' for tag, s in known.items())})",
                      f">= {TARGETS['steps']} steps", _verdict(hardest is not None and hardest >= TARGETS["steps"])))

    problems = sum(v["n_problems"] for v in t.values())
    each = ", ".join(f"{tag}: {v['n_problems']:,}" for tag, v in t.items())
    lines.append(Line("held-out problems", f"{problems:,} ({each})",
                      f">= {TARGETS['problems']:,}", _verdict(problems >= TARGETS["problems"])))

    batch, length = facts["batch_size"], facts["mean_completion_tokens"]
    lines.append(Line("tokens per OPD step", f"{batch} x {length:.1f} = {batch * length:,.0f}",
                      "stated (the papers: 10k-1M+)", "info"))

    seeds = facts.get("student_seeds")
    if seeds:  # how much a world built with another seed moves pi_sft (the teachers unchanged)
        scores = [x["score"] for x in seeds]
        mean = sum(scores) / len(scores)
        std = (sum((x - mean) ** 2 for x in scores) / (len(scores) - 1)) ** 0.5 if len(scores) > 1 else math.nan
        lines.append(Line("pi_sft across world seeds", ", ".join(f"seed {x['seed']}: {_pct(x['score'])}" for x in seeds)
                          + f"; {_pct(mean)} ± {_pct(std)}, range {_pct(max(scores) - min(scores))}", "stated", "info"))

    cap = facts.get("capacity")
    if cap:
        n0 = cap["teacher_samples"]
        points = sorted(cap["points"], key=lambda p: p["factor"])
        for p in [{"factor": 1.0, "samples": n0, "score": student, "pi_sft": True}, *points]:
            p_share = p["score"] / teacher if teacher > 0 else math.nan
            lines.append(Line(f"SFT curve, {p['factor']:g}x" + (" (pi_sft)" if p.get("pi_sft") else ""),
                              f"{p['samples']:,} samples: {_pct(p['score'])} = {_pct(p_share)} of teacher",
                              "", "info"))
        top = points[-1] if points else None
        ok = (top is not None and top["factor"] >= TARGETS["capacity_factor"] and teacher > 0
              and top["score"] / teacher >= TARGETS["capacity_share"])
        value = "no point" if top is None else \
            f"{top['factor']:g}x ({top['samples']:,} samples): {_pct(top['score'] / teacher if teacher > 0 else math.nan)} of teacher"
        lines.append(Line("not capacity-capped", value,
                          f">= {_pct(TARGETS['capacity_share'])} at >= {TARGETS['capacity_factor']:g}x",
                          _verdict(ok)))
    return lines


def render(preset: str, lines: list[Line]) -> str:
    judged = [x for x in lines if x.verdict != "info"]
    passed = sum(x.verdict == "PASS" for x in judged)
    widths = tuple(max(len(getattr(x, k)) for x in lines) for k in ("name", "value", "target"))
    out = [f"regime card: preset {preset}", *(x.render(widths) for x in lines),
           f"  {passed} of {len(judged)} targets pass"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- measuring a world


def _world(cfg, build: bool):
    from opd_bench.cache import is_built
    from opd_bench.errors import UserError
    from opd_bench.worlds import load_world

    if cfg.world.kind == "micro" and not build:
        from opd_bench.micro.world import stage_paths

        missing = [name for name, path in stage_paths(cfg.model_copy(update={"seed": cfg.world.seed})).items()
                   if not is_built(path)]
        if missing:
            raise UserError(f"the world of preset {cfg.preset} is not built ({', '.join(missing)} missing); "
                            f"run `opd-bench prepare --preset {cfg.preset}` first (or pass --build)")
    return load_world(cfg)


def _teacher_eval(cfg, world) -> dict:
    """The teacher's scores: a cached stage, keyed like the runs' eval-base stage of pi_sft."""
    from opd_bench.cache import build_stage
    from opd_bench.offline import model_key
    from opd_bench.registry import TASKS
    from opd_bench.run import evaluate_tasks

    inputs = {"model": model_key(world.teacher_a), "tasks": [TASKS.get(t).tag for t in cfg.eval.tasks],
              "n_per_split": cfg.eval.n_per_split, "seed": cfg.seed,
              "batch_size": cfg.eval.batch_size}  # sampling on CPU draws per batch: its size changes the samples

    def build(folder, cost):
        return {"metrics": evaluate_tasks(cfg, world.teacher_a, folder, cfg.eval.n_per_split, cost)}

    folder, _ = build_stage(cfg.artifacts_dir, "eval-teacher", inputs, build)
    return json.loads((folder / "stage.json").read_text())["info"]["metrics"]


def _mean_completion_tokens(cfg, world, n: int) -> float:
    from opd_bench.generation import SamplingParams, generate
    from opd_bench.worlds import training_prompts

    prompts = [p for _, p in training_prompts(cfg, n, "regime-card")]
    params = SamplingParams(n=1, temperature=cfg.train.temperature, max_new_tokens=cfg.train.max_new_tokens,
                            seed=cfg.seed)
    samples = generate(world.student, prompts, params, batch_size=cfg.eval.batch_size, workers=1,
                       threads=cfg.threads, desc="regime card: pi_sft samples")
    return sum(len(s[0].token_ids) for s in samples) / len(samples)


def _capacity_samples(cfg, world, n: int):
    """n fresh samples of teacher A on training prompts, by the sft-data stage's recipe (a cached stage)."""
    from opd_bench.cache import build_stage
    from opd_bench.generation import SamplingParams, count_params, generate
    from opd_bench.micro.world import DATA_VERSION, library_versions, training_mix
    from opd_bench.offline import model_key

    w = cfg.world
    inputs = {"teacher": model_key(world.teacher_a), "prompts": n, "temperature": w.sft_temperature,
              "max_new_tokens": w.max_new_tokens, "math_fraction": w.math_fraction, "data_version": DATA_VERSION,
              "seed": w.seed, "libraries": library_versions()}

    def build(folder, cost):
        from datasets import Dataset

        problems = training_mix(n, w.math_fraction, f"regime-capacity-{w.seed}")  # not the sft-data's draw
        params = SamplingParams(n=1, temperature=w.sft_temperature, max_new_tokens=w.max_new_tokens, seed=w.seed)
        samples = generate(world.teacher_a, [p.prompt for p in problems], params, batch_size=cfg.eval.batch_size,
                           workers=cfg.eval.workers, threads=cfg.threads, desc="regime card: teacher A samples")
        Dataset.from_dict({"prompt": [p.prompt for p in problems],
                           "completion": [s[0].text for s in samples]}).save_to_disk(str(folder / "data"))
        cost.generate(count_params(world.teacher_a), sum(len(s[0].token_ids) for s in samples))
        return {"rows": n}

    return build_stage(cfg.artifacts_dir, "regime-samples", inputs, build)[0]


def _capacity_student(cfg, world, data_dir: Path, rows: int, steps: int) -> dict:
    """A fresh student of pi_sft's architecture, SFT'd by pi_sft's recipe on the first `rows` samples, evaluated."""
    from opd_bench.cache import build_stage
    from opd_bench.micro.world import library_versions, load_sft_data
    from opd_bench.run import evaluate_tasks

    w = cfg.world
    training = w.student_training.model_copy(update={"steps": steps, "examples": rows})
    inputs = {"data": data_dir.name, "rows": rows, "arch": w.student.model_dump(), "training": training.key(),
              "seed": w.seed, "tasks": list(cfg.eval.tasks), "n_per_split": cfg.eval.n_per_split,
              "eval_seed": cfg.seed, "libraries": library_versions()}

    def build(folder, cost):
        import shutil

        import torch
        from transformers import AutoTokenizer

        from opd_bench.micro.models import new_model
        from opd_bench.sft import tokenize_pairs, train_sft

        torch.set_num_threads(cfg.threads)
        tokenizer = AutoTokenizer.from_pretrained(world.tokenizer)
        model = new_model(tokenizer, w.seed, **w.student.model_dump())
        data = load_sft_data(data_dir).select(range(rows))
        # pi_sft's early stopping, on pi_sft's own held-out teacher samples (none: the fixed steps, cosine-annealed)
        heldout = load_sft_data(Path(world.sft_data), heldout=True) if world.sft_data else None
        eval_data = tokenize_pairs(tokenizer, heldout["prompt"], heldout["completion"]) \
            if heldout is not None and len(heldout) else None
        stats = train_sft(model, tokenizer, tokenize_pairs(tokenizer, data["prompt"], data["completion"]),
                          training, folder, seed=w.seed, eval_dataset=eval_data)
        shutil.rmtree(folder / "trainer", ignore_errors=True)
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        n_params = sum(p.numel() for p in model.parameters())
        cost.train(n_params, stats["tokens"])
        metrics = evaluate_tasks(cfg, folder / "model", folder / "eval", cfg.eval.n_per_split, cost)
        return {"params": n_params, **stats, "metrics": metrics}

    folder, _ = build_stage(cfg.artifacts_dir, "regime-student", inputs, build)
    return json.loads((folder / "stage.json").read_text())["info"]


def _pi_sft_score(cfg, tasks) -> float:
    """pi_sft's primary metric in this configuration's world (built if needed: the teachers are shared)."""
    from opd_bench.ledger import Ledger
    from opd_bench.run import base_eval
    from opd_bench.worlds import load_world

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        scores, _ = base_eval(cfg, load_world(cfg), Ledger(Path(tmp) / "ledger.json"))
    return sum(scores[t]["avg@k"] for t in tasks) / len(tasks)


def measure(cfg, *, build: bool = False, length_prompts: int = 64, capacity: bool = False,
            curve: tuple[float, ...] = (0.5, 2.0, 4.0, 8.0), max_steps: int | None = None,
            student_seeds: tuple[int, ...] = ()) -> dict:
    """The facts `card_lines` reads, measured on the preset's world."""
    from opd_bench.errors import UserError
    from opd_bench.generation import count_params
    from opd_bench.ledger import Ledger
    from opd_bench.registry import TASKS
    from opd_bench.run import base_eval

    world = _world(cfg, build)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the runs' shared eval-base stage; its ledger record is dropped
        before, _ = base_eval(cfg, world, Ledger(Path(tmp) / "ledger.json"))
    teacher = _teacher_eval(cfg, world)
    tasks = {}
    for name in cfg.eval.tasks:
        card = TASKS.get(name)
        m, mt = before[card.tag], teacher[card.tag]
        tasks[card.tag] = {"scorer": card.scorer, "k": m["protocol"]["k"], "temperature": m["protocol"]["temperature"],
                           "teacher": mt["avg@k"], "pi_sft": m["avg@k"], "n_problems": m["n_problems"],
                           "splits": sorted(m["per_split"])}
    facts = {"preset": cfg.preset, "teacher_params": count_params(world.teacher_a),
             "student_params": count_params(world.student), "tasks": tasks, "batch_size": cfg.train.batch_size,
             "mean_completion_tokens": _mean_completion_tokens(cfg, world, length_prompts)}
    if student_seeds:
        own = cfg.world.seed if cfg.world.student_seed is None else cfg.world.student_seed
        facts["student_seeds"] = [{"seed": own, "score": tasks and primary(tasks, "pi_sft")}] + [
            {"seed": s, "score": _pi_sft_score(cfg.model_copy(update={"world": cfg.world.model_copy(
                update={"student_seed": s})}), list(tasks))} for s in student_seeds if s != own]
    if capacity:
        if cfg.world.kind != "micro":
            raise UserError("--capacity trains students by the micro world's recipe; this preset's world is "
                            f"{cfg.world.kind!r}")
        n0 = cfg.world.sft_prompts
        factors = sorted(f for f in curve if f != 1.0)  # 1x is pi_sft itself
        data_dir = _capacity_samples(cfg, world, max(round(f * n0) for f in factors)) if factors else None
        points = []
        for f in factors:
            steps = round(cfg.world.student_training.steps * max(f, 1.0))
            info = _capacity_student(cfg, world, data_dir, round(f * n0), min(steps, max_steps or steps))
            points.append({"factor": f, "samples": round(f * n0), "steps": info["steps"],
                           "score": sum(info["metrics"][t]["avg@k"] for t in tasks) / len(tasks)})
        facts["capacity"] = {"teacher_samples": n0, "points": points}
    return facts


def main(argv: list[str] | None = None) -> int:
    from opd_bench.config import load_config
    from opd_bench.errors import UserError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, as `opd-bench run --set`")
    ap.add_argument("--build", action="store_true", help="build the world if it is not built (minutes on micro)")
    ap.add_argument("--capacity", action="store_true", help="train the capacity check and the SFT scaling curve")
    ap.add_argument("--curve", default="0.5,2,4,8", help="the curve's sample factors (x world.sft_prompts)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap each capacity student's SFT steps")
    ap.add_argument("--length-prompts", type=int, default=64, help="training prompts pi_sft samples for the length")
    ap.add_argument("--student-seeds", default="", help="also build pi_sft with these world.student_seed values "
                    "(the teachers unchanged) and state how much pi_sft moves, e.g. 1,2")
    ap.add_argument("--json", type=Path, default=None, help="also write the facts and the card here")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the card as markdown (the report folder "
                    "links regime-card.md when it holds one)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides)
        facts = measure(cfg, build=args.build, length_prompts=args.length_prompts, capacity=args.capacity,
                        curve=tuple(float(x) for x in args.curve.split(",") if x.strip()), max_steps=args.max_steps,
                        student_seeds=tuple(int(x) for x in args.student_seeds.split(",") if x.strip()))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = card_lines(facts)
    print(render(args.preset, lines))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "card": [x.__dict__ for x in lines]}, indent=1))
    if args.markdown:
        command = "python scripts/regime_card.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.write_text(f"# Regime card: preset `{args.preset}`\n\nWritten by `{command}`.\n\n```\n"
                                 f"{render(args.preset, lines)}\n```\n")
    return 1 if args.check and any(x.verdict == "FAIL" for x in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
