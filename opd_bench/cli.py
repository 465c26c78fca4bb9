"""The `opd-bench` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opd_bench.config import RunConfig, available_presets, load_config
from opd_bench.errors import UserError, did_you_mean

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="opd-bench: a benchmark for on-policy distillation methods.")
console = Console()

PresetOpt = typer.Option("micro", "--preset", "-p", help="configuration preset (see `opd-bench list`)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key: --set world.sft_prompts=8000")
SeedOpt = typer.Option(None, "--seed", help="seed (default: the preset's)")


def _config(preset: str, overrides: Optional[list[str]], seed: Optional[int] = None) -> RunConfig:
    overrides = list(overrides or [])
    if seed is not None:
        overrides.append(f"seed={seed}")
    cfg = load_config(preset, overrides)
    _set_threads(cfg.threads)
    return cfg


def _set_threads(n: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)


@app.command()
def prepare(preset: str = PresetOpt, set_: Optional[list[str]] = SetOpt, seed: Optional[int] = SeedOpt):
    """Build (or reuse) the preset's shared stages: tokenizer, teachers, SFT data, SFT student."""
    from opd_bench.micro.world import prepare as prepare_world

    cfg = _config(preset, set_, seed)
    if cfg.world.kind != "micro":
        raise UserError(f"preset {preset!r} loads its models; nothing to prepare (use `opd-bench run`)")
    world = prepare_world(cfg)
    table = Table(title=f"prepare --preset {preset}")
    for col in ("stage", "folder", "wall s", "device s", "tokens", "cached"):
        table.add_column(col)
    for name, cost in zip(world.stages(), world.costs):
        tokens = cost.tokens_trained + cost.tokens_generated
        table.add_row(name, str(world.stages()[name]), f"{cost.wall_seconds:.1f}", f"{cost.device_seconds:.1f}",
                      f"{tokens:,}", "yes" if cost.cached else "no")
    console.print(table)


def resolve_model(model: str, cfg: RunConfig) -> Path:
    """A saved model folder, or the name of a built stage of this preset."""
    from opd_bench.micro.world import stage_paths

    path = Path(model)
    if (path / "config.json").exists():
        return path
    stages = {k: v for k, v in stage_paths(cfg).items() if k not in ("tokenizer", "sft-data")}
    if model in stages:
        if not (stages[model] / "config.json").exists():
            raise UserError(f"stage {model!r} is not built yet; run `opd-bench prepare --preset {cfg.preset}` first")
        return stages[model]
    if path.exists():
        raise UserError(f"{model} has no config.json: not a saved model folder (save it with save_pretrained)")
    raise UserError(f"no model folder or stage {model!r}{did_you_mean(model, stages)}")


@app.command("eval")
def eval_(model: str = typer.Option(..., "--model", "-m", help="model folder or stage (teacher-a, sft-student, ...)"),
          task: list[str] = typer.Option(None, "--task", "-t", help="task card name; repeat for several (default: the preset's)"),
          n_per_split: Optional[int] = typer.Option(None, help="evaluate only the first N problems of each split"),
          k: Optional[int] = typer.Option(None, help="samples per problem (default: the card's)"),
          out: Optional[Path] = typer.Option(None, help="output folder (default: next to the model, eval/<task>)"),
          max_new_tokens: Optional[int] = typer.Option(None, help="generation limit (default: the card's)"),
          temperature: Optional[float] = typer.Option(None, min=0, help="sampling temperature, 0 = greedy "
                                                      "(default: the card's); recorded in metrics.json's protocol"),
          backend: str = typer.Option("hf", help="generation backend: hf (default) or vllm (extra, GPU)"),
          preset: str = PresetOpt, set_: Optional[list[str]] = SetOpt, seed: Optional[int] = SeedOpt):
    """Evaluate a saved model on task cards; writes samples.jsonl and metrics.json."""
    from opd_bench.evaluation import evaluate
    from opd_bench.registry import TASKS

    cfg = _config(preset, set_, seed)
    if backend == "vllm":  # fail before loading data and models
        from opd_bench.vllm_backend import require_vllm

        require_vllm()
    model_dir = resolve_model(model, cfg)
    cards = [TASKS.get(name) for name in (task or cfg.eval.tasks)]
    n = n_per_split or cfg.eval.n_per_split
    table = Table(title=f"eval {model}")
    for col in ("task", "split", "problems", "avg@k", "pass@k", "k"):
        table.add_column(col)
    for card in cards:
        folder = out / card.name if out else model_dir / "eval" / f"{card.name}-v{card.version}"
        metrics = evaluate(model_dir, card, folder, n_per_split=n, batch_size=cfg.eval.batch_size,
                           workers=cfg.eval.workers, seed=cfg.seed, k=k, max_new_tokens=max_new_tokens,
                           temperature=temperature, backend=backend, vllm=cfg.vllm)
        for split, m in sorted(metrics["per_split"].items()):
            table.add_row(card.tag, split, str(m["n_problems"]), f"{100 * m['avg@k']:.1f}",
                          f"{100 * m['pass@k']:.1f}", str(metrics["k"]))
        table.add_row(card.tag, "[b]all[/b]", str(metrics["n_problems"]), f"[b]{100 * metrics['avg@k']:.1f}[/b]",
                      f"{100 * metrics['pass@k']:.1f}", str(metrics["k"]))
        console.print(f"{card.tag}: samples and metrics in {folder}")
    console.print(table)


@app.command("export-lm-eval")
def export_lm_eval(out_dir: Path = typer.Argument(..., help="folder for the task YAMLs (lm_eval --include_path)"),
                   task: list[str] = typer.Option(None, "--task", "-t", help="task card name; repeat (default: all)")):
    """Write our task cards as lm-eval tasks (same data, prompts and scorers); see docs/lm-eval.md."""
    from opd_bench.lm_eval_export import export_tasks

    paths = export_tasks(out_dir, task or None)
    names = " ".join(p.stem for p in paths)
    console.print(f"wrote {len(paths)} lm-eval tasks to {out_dir}: {names}")
    console.print(f"run: lm-eval run --model hf --model_args pretrained=MODEL --device cpu --include_path {out_dir} "
                  f"--tasks {paths[0].stem if paths else 'opd-NAME'} --apply_chat_template --confirm_run_unsafe_code")


@app.command()
def run(method: str = typer.Option(..., "--method", "-M", help="method plugin (see `opd-bench list`)"),
        budget: Optional[str] = typer.Option(None, "--budget", "-b", help="device time (30h, 90m, 45s) or 3e15flop"),
        preset: str = PresetOpt, set_: Optional[list[str]] = SetOpt, seed: Optional[int] = SeedOpt,
        run_id: Optional[str] = typer.Option(None, "--run-id", help="name of the run folder; a run of that id "
                                             "that was cut short (crash, Ctrl-C) continues where it stopped"),
        resume: bool = typer.Option(False, "--resume", help="continue the newest unfinished run of exactly this "
                                    "configuration (else start one)")):
    """Train pi_sft with a method under a budget, evaluate, write runs/<id>/ and a leaderboard row.
    Under `torchrun` / `accelerate launch` every rank runs it; rank 0 owns the run and prints (docs/gpu.md)."""
    from opd_bench.resume import Interrupted, Ranks
    from opd_bench.run import run as run_method

    cfg = _config(preset, list(set_ or []), seed)
    try:
        m = run_method(cfg, method, budget, command=" ".join(["opd-bench", *sys.argv[1:]]), run_id=run_id,
                       resume=resume)
    except Interrupted as exc:
        if Ranks.current().main:
            print(f"interrupted: continue with the same command and --run-id {exc.run_id}", file=sys.stderr)
        sys.exit(130)  # not typer.Exit: main() runs the app with standalone_mode=False, which returns its code
    except UserError as exc:
        if not Ranks.current().main:  # rank 0 prints the one line
            sys.exit(exc.exit_code)
        raise
    if not Ranks.current().main:
        return
    table = Table(title=f"run {m['run_id']}")
    for col in ("task", "pi_sft avg@k", "after avg@k", "k"):
        table.add_column(col)
    for tag, after in m["after"].items():
        before = m["before"].get(tag, {}).get("avg@k", float("nan"))
        table.add_row(tag, f"{100 * before:.1f}", f"[b]{100 * after['avg@k']:.1f}[/b]", str(after["k"]))
    console.print(table)
    if m.get("status") == "diverged":
        console.print(f"[b]diverged[/b]: {m['stopped_by']}; not evaluated, leaderboard status 'diverged' "
                      f"(lower train.lr or train.max_grad_norm)")
    console.print(f"spent {m['spent']['device_seconds']:.1f} device-s, {m['spent']['flops']:.3g} FLOPs "
                  f"({100 * m['spent']['fraction']:.0f}% of {budget or cfg.budget}); {m['steps']} steps, "
                  f"stopped by {m['stopped_by']}; run folder: {Path(cfg.runs_dir) / m['run_id']}")


@app.command()
def plan(method: str = typer.Option(..., "--method", "-M", help="method (see `opd-bench list`)"),
         gpus: int = typer.Option(1, "--gpus", min=1, help="training GPUs, all nodes together"),
         gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="usable memory per GPU in GB (10^9 bytes)"),
         layout: str = typer.Option("ddp", "--layout", help="ddp, zero3 or fsdp2 (the accelerate config)"),
         teacher: str = typer.Option("colocated", "--teacher", help="colocated (in the training processes) or "
                                     "server (a vLLM server on its own GPUs)"),
         server_gpus: int = typer.Option(0, "--server-gpus", min=0, help="the teacher server's GPUs"),
         server_tp: Optional[int] = typer.Option(None, "--server-tp", help="its tensor parallel (default: all of them)"),
         eval_tp: int = typer.Option(1, "--eval-tp", min=1, help="tensor parallel of evaluation/rollout engines"),
         vllm_memory: float = typer.Option(0.3, "--vllm-memory", help="colocated rollout engine's GPU share"),
         vllm_sleep: bool = typer.Option(False, "--vllm-sleep", help="the colocated engine sleeps during the step"),
         prompt_tokens: int = typer.Option(256, "--prompt-tokens", min=1, help="longest prompt in tokens"),
         preset: str = PresetOpt, set_: Optional[list[str]] = SetOpt):
    """Estimate every stage's per-GPU memory for a layout; exit 2 with the fix when a stage cannot fit."""
    from opd_bench.planner import Layout, plan_report

    cfg = _config(preset, set_)
    lay = Layout(gpus=gpus, gpu_memory_gb=gpu_memory, strategy=layout, teacher=teacher, server_gpus=server_gpus,
                 server_tp=server_tp, eval_tp=eval_tp, vllm_memory=vllm_memory, vllm_sleep=vllm_sleep)
    table, problem = plan_report(cfg, method, lay, prompt_tokens=prompt_tokens)
    (console if console.is_terminal else Console(width=200)).print(table)
    if problem:
        raise UserError(problem)


@app.command()
def suite(seeds: int = typer.Option(3, "--seeds", help="seeds per run (the preset's seed, +1, ...)"),
          workers: Optional[int] = typer.Option(None, "--workers", "-w", help="runs in parallel, one torch thread "
                                                "each (default: the CPU count)"),
          budget: Optional[str] = typer.Option(None, "--budget", "-b", help="budget of every run (default: the preset's)"),
          sweep: Optional[list[str]] = typer.Option(None, "--sweep", help="also run each core arm at each value: "
                                                    "--sweep lr=1e-4,3e-4 (repeatable; any config key, e.g. "
                                                    "method.params.clip_eps=0.1,0.3: arms without it are left out)"),
          core: bool = typer.Option(False, "--core/--full", help="core arms only, or also every ablation sweep"),
          method: Optional[list[str]] = typer.Option(None, "--method", "-M", help="only this method's runs (repeatable)"),
          dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and stop"),
          report_out: Path = typer.Option(Path("reports"), "--out", help="report folder written at the end"),
          make_report: bool = typer.Option(True, "--report/--no-report", help="write the report at the end"),
          preset: str = PresetOpt, set_: Optional[list[str]] = SetOpt):
    """The preset's suite spec (opd_bench/suites/): its core arms (and, with --full, its sweeps) x seeds under one
    budget, skipping finished runs; then the report."""
    import time as _time

    from opd_bench import suite as S
    from opd_bench.leaderboard import finished_keys
    from opd_bench.report import build

    common = tuple(set_ or [])
    cfg = _config(preset, list(common))
    workers = workers or S.default_workers()
    specs, notes = S.plan(preset, seeds=seeds, budget=budget, core=core, sweep=S.parse_sweep(sweep), common=common,
                          finished=finished_keys(cfg.leaderboard), methods=tuple(method or ()))
    todo = [s for s in specs if not s.done]
    table = Table(title=f"suite --preset {preset}: {len(specs)} runs, {len(specs) - len(todo)} already finished")
    for col in ("group", "run", "budget", "status"):
        table.add_column(col)
    for s in specs:
        table.add_row(s.group, escape(s.label), s.budget, "[green]finished[/green]" if s.done else "to run")
    console.print(table)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    if dry_run:
        return
    # One core per run: each run's evaluations use the cores left per worker (not part of the run key).
    per_run = () if any(o.startswith("eval.workers=") for o in common) else \
        (f"eval.workers={max(1, (os.cpu_count() or 1) // workers)}",)
    if todo:
        console.print("preparing the shared world and pi_sft's evaluation (cached) ...")
        S.prepare_shared(preset, common, sorted({s.seed for s in todo}))
    start = _time.perf_counter()
    outcomes = S.execute(todo, preset, common + per_run, workers=workers, console=console,
                         log_dir=Path(cfg.runs_dir) / "suite-logs", suite_command=" ".join(["opd-bench", *sys.argv[1:]]))
    failed = [o for o in outcomes if o.returncode != 0]
    console.print(f"suite: {len(outcomes) - len(failed)} runs finished, {len(failed)} failed, "
                  f"{len(specs) - len(todo)} skipped, in {(_time.perf_counter() - start) / 60:.1f} minutes")
    for o in failed:
        console.print(f"[red]failed[/red] {escape(o.spec.label)} (exit {o.returncode}): {o.log}\n  "
                      + escape("\n  ".join(o.tail)))
    if make_report:
        files = build(cfg.leaderboard, report_out, preset=preset, budget=budget,
                      command=f"opd-bench report --preset {preset} --leaderboard {cfg.leaderboard} --out {report_out}")
        console.print(f"report: {len(files)} files in {report_out}/ (README.md indexes them)")
    if failed:
        raise typer.Exit(1)


@app.command()
def report(leaderboard: Optional[Path] = typer.Option(None, "--leaderboard", "-l", help="the CSV (default: the "
                                                      "preset's `leaderboard` setting)"),
           out: Path = typer.Option(Path("reports"), "--out", "-o", help="report folder (rewritten)"),
           budget: Optional[str] = typer.Option(None, "--budget", "-b", help="report runs of this budget (default: "
                                                "the most common in the file)"),
           preset: str = PresetOpt, set_: Optional[list[str]] = SetOpt):
    """Rebuild the report folder (tables as Markdown/LaTeX/CSV, figures, claims, README) from leaderboard.csv."""
    from opd_bench.report import build

    cfg = _config(preset, set_)
    path = leaderboard or Path(cfg.leaderboard)
    if not path.exists():
        raise UserError(f"no leaderboard at {path}: run `opd-bench suite --preset {preset}` first, or pass --leaderboard")
    command = f"opd-bench report --preset {preset} --leaderboard {path} --out {out}" + (f" --budget {budget}" if budget else "")
    files = build(path, out, preset=preset, budget=budget, command=command)
    console.print(f"wrote {len(files)} files to {out}/: " + ", ".join(p.name for p in files))


DEFAULT_COLUMNS = ("run_id", "method", "variant", "seed", "train.lr", "budget", "status", "spent_device_s", "*.avg@k")


@app.command("leaderboard")
def leaderboard_(method: Optional[str] = typer.Option(None, "--method", "-M", help="only this method"),
                 seed: Optional[int] = typer.Option(None, "--seed", help="only this seed"),
                 status: Optional[str] = typer.Option(None, "--status", help="only this status (ok, diverged, ...)"),
                 budget: Optional[str] = typer.Option(None, "--budget", "-b", help="only this budget"),
                 columns: Optional[str] = typer.Option(None, "--columns", "-c", help="comma-separated columns; a "
                                                       "'*' matches any text, e.g. 'run_id,method,*avg@k'"),
                 last: Optional[int] = typer.Option(None, "--last", "-n", help="only the last N rows"),
                 file: Optional[Path] = typer.Option(None, "--file", "-f", help="the CSV (default: the preset's)"),
                 preset: str = PresetOpt, set_: Optional[list[str]] = SetOpt):
    """Print leaderboard.csv as a table, filtered by preset, method, seed, status and budget."""
    from fnmatch import fnmatchcase

    from opd_bench.leaderboard import filter_rows, read_rows

    cfg = _config(preset, set_)
    path = file or Path(cfg.leaderboard)
    rows = filter_rows(read_rows(path), preset=preset, method=method, seed=seed, status=status, budget=budget)
    rows = rows[-last:] if last else rows
    present = list(dict.fromkeys(k for r in rows for k in r))
    wanted = [c.strip() for c in columns.split(",")] if columns else list(DEFAULT_COLUMNS)
    shown = [c for pattern in wanted for c in ([pattern] if pattern in present else
                                                [k for k in present if "*" in pattern and fnmatchcase(k, pattern)])]
    unknown = [p for p in wanted if "*" not in p and p not in present]
    if columns and unknown and rows:
        raise UserError(f"no column {unknown[0]!r} in {path}{did_you_mean(unknown[0], present)}")
    table = Table(title=f"{path}: {len(rows)} rows (preset {preset})")
    for col in shown:
        table.add_column(col, no_wrap=col == "run_id")
    for r in rows:
        table.add_row(*[_short(r.get(c, "")) for c in shown])
    # Piped output is not cut to 80 columns: a table of runs is wide.
    (console if console.is_terminal else Console(width=240)).print(table)


def _short(cell: str) -> str:
    """Floats to 4 significant digits (integers as they are), long text cut."""
    try:
        return cell if cell.lstrip("-").isdigit() else f"{float(cell):.4g}"
    except ValueError:
        return cell if len(cell) <= 40 else cell[:37] + "..."


@app.command("list")
def list_(config: bool = typer.Option(False, "--config", help="also list every config key with its default"),
          params: bool = typer.Option(False, "--params", help="also list each method's parameters")):
    """List methods (with their paper and rule), tasks and presets."""
    from opd_bench.methods.base import get
    from opd_bench.registry import METHODS, TASKS

    console.print("[b]methods[/b]:" + ("" if METHODS.names() else " (none yet)"))
    for name in METHODS.names():
        method = get(name)
        console.print(f"  {name:<22} {method.rule}  [dim]({method.paper})[/dim]")
        if params:
            for key, info in method.Params.model_fields.items():
                default = json.dumps(method.Params().model_dump(mode="json")[key])
                console.print(f"      method.params.{key} = {default}  [dim]{info.description or ''}[/dim]")
    console.print("[b]tasks[/b]:")
    for name in TASKS.names():
        card = TASKS.get(name)
        console.print(f"  {card.tag:<18} scorer={card.scorer} k={card.k} T={card.temperature}  {card.source}")
    console.print("[b]presets[/b]: " + ", ".join(available_presets()))
    if config:
        for key, value in _flatten(RunConfig().model_dump()):
            console.print(f"  {key} = {json.dumps(value)}")


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
