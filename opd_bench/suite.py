"""`opd-bench suite`: every method under one budget and one protocol, then the report.

  plan()     the runs, in a fixed order: the core arms for every seed (the six methods, the full-KL arm and
             the sft-continue control; pi_sft itself is the base evaluation every row records), then the
             sweeps (ExOPD lambda, TIP rules, vOPD full vs top-k, teacher-inconsistent online and offline),
             then `--sweep key=a,b,c` (each core method at each value). Each run has a run key (the resolved
             experiment, `leaderboard.run_key`); duplicates collapse (TIP "all" is standard-opd, lambda 1.25
             is exopd), and runs whose key is already in the leaderboard are skipped, so an interrupted suite
             continues where it stopped (a run cut short resumes from its checkpoint: `run --resume`).
  execute()  builds the shared world and pi_sft's evaluation once (both cached), then runs `opd-bench run`
             subprocesses, `workers` at a time, one torch thread each, with a progress display; each run's
             output goes to <runs_dir>/suite-logs/.
Every run uses the preset's shared learning rate; only `--sweep train.lr=...` changes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from opd_bench.errors import UserError

CORE = ("standard-opd", "lightning-opd", "inconsistent-offline", "exopd", "vopd", "tip", "full-kl", "sft-continue")
ALIASES = {"lr": "train.lr"}  # --sweep lr=... is --sweep train.lr=...


def sweeps(world_kind: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(group, method, overrides) of the ablations, beyond the core arms."""
    top_k = 10 if world_kind == "micro" else 100  # the paper's k=100 is ~0.1% of a 150k vocabulary; micro has ~100
    return [
        *[("exopd-lambda", "exopd", (f"method.lam={lam}",)) for lam in (1.0, 1.25, 1.5)],
        ("tip-rules", "standard-opd", ()),  # rule "all": TIP's baseline is standard OPD
        *[("tip-rules", "tip", (f"method.tokens={rule}", "method.fraction=0.5")) for rule in ("entropy", "soft-or")],
        ("tip-rules", "tip", ("method.tokens=q3",)),
        ("vopd-baseline", "vopd", ()),
        ("vopd-baseline", "vopd", (f"method.top_k={top_k}",)),
        ("teacher-consistency", "inconsistent-offline", ()),
        ("teacher-consistency", "standard-opd", ("method.teacher=inconsistent",)),
    ]


@dataclass
class RunSpec:
    group: str
    method: str
    seed: int
    budget: str
    overrides: tuple[str, ...] = ()
    key: str = ""
    done: bool = False

    @property
    def label(self) -> str:
        extra = ",".join(o.split(".", 1)[-1] for o in self.overrides if not o.startswith("eval.workers"))
        return f"{self.method}{f'[{extra}]' if extra else ''} s{self.seed}"

    def argv(self, preset: str, common: tuple[str, ...]) -> list[str]:
        sets = [arg for o in (*common, *self.overrides) for arg in ("--set", o)]
        # --resume: a run cut short by an interrupted suite continues from its checkpoint instead of starting over
        return ["run", "--method", self.method, "--budget", self.budget, "--preset", preset, "--seed", str(self.seed),
                "--resume", *sets]


def parse_sweep(texts: list[str] | None) -> dict[str, list[str]]:
    """'lr=1e-4,3e-4' -> {'train.lr': ['1e-4', '3e-4']}."""
    out = {}
    for text in texts or []:
        key, sep, values = text.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not items:
            raise UserError(f"bad --sweep {text!r}: expected KEY=V1,V2,... e.g. --sweep lr=1e-4,3e-4,1e-3")
        out[ALIASES.get(key.strip(), key.strip())] = items
    return out


def resolved(preset: str, spec: RunSpec, common: tuple[str, ...]):
    """The config and axes `opd-bench run` will resolve for this spec (the same calls, in the same order)."""
    from opd_bench.budget import parse_budget
    from opd_bench.config import load_config
    from opd_bench.method import resolve

    cfg = load_config(preset, [*common, *spec.overrides, f"method.name={spec.method}", f"seed={spec.seed}"])
    _, ax = resolve(cfg, spec.method)
    budget = parse_budget(spec.budget)
    return cfg.model_copy(update={"method": ax, "budget": budget.spec}), ax


def plan(preset: str, *, seeds: int, budget: str | None = None, core: bool = False, sweep: dict | None = None,
         common: tuple[str, ...] = (), finished: set[str] = frozenset(),
         methods: tuple[str, ...] = ()) -> tuple[list[RunSpec], list[str]]:
    """The suite's runs (deduplicated by run key, finished ones marked done) and notes on arms left out;
    `methods` keeps only those methods' runs."""
    from opd_bench.budget import parse_budget
    from opd_bench.config import load_config
    from opd_bench.leaderboard import run_key

    base = load_config(preset, list(common))
    spec_budget = parse_budget(budget or base.budget).spec
    first = base.seed
    seed_list = list(range(first, first + seeds))
    specs = [RunSpec("core", m, s, spec_budget) for s in seed_list for m in CORE]
    if not core:
        specs += [RunSpec(g, m, s, spec_budget, o) for s in seed_list for g, m, o in sweeps(base.world.kind)]
    for key, values in (sweep or {}).items():
        specs += [RunSpec(f"sweep:{key}", m, s, spec_budget, (f"{key}={v}",)) for v in values for s in seed_list
                  for m in CORE]
    if methods:
        from opd_bench.registry import METHODS

        for m in methods:
            METHODS.get(m)  # an unknown name is a one-line error with a did-you-mean
        specs = [s for s in specs if s.method in methods]
    out, seen, notes = [], set(), []
    for spec in specs:
        cfg, ax = resolved(preset, spec, common)
        if ax.teacher == "inconsistent" and cfg.world.kind == "hf" and not cfg.world.hf.teacher_b:
            note = f"{spec.label}: left out, needs a second teacher (--set world.hf.teacher_b=...)"
            notes += [note] if note not in notes else []
            continue
        spec.key = run_key(cfg, ax, spec.budget)
        if spec.key in seen:
            continue
        seen.add(spec.key)
        spec.done = spec.key in finished
        out.append(spec)
    return out, notes


# ----------------------------------------------------------------------------- execution


def prepare_shared(preset: str, common: tuple[str, ...], seeds: list[int]) -> None:
    """Build the micro world and evaluate pi_sft for each seed once, before the workers start (both are
    cached stages, so a worker finds them built instead of building them side by side)."""
    import tempfile

    from opd_bench.config import load_config
    from opd_bench.ledger import Ledger
    from opd_bench.run import base_eval, load_world

    cfg = load_config(preset, list(common))
    if cfg.world.kind != "micro":  # paper presets load their models in each run; pi_sft's eval is cached there
        return
    world = load_world(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            base_eval(cfg.model_copy(update={"seed": seed}), world, Ledger(Path(tmp) / f"ledger-{seed}.json"))


@dataclass
class Outcome:
    spec: RunSpec
    returncode: int
    seconds: float
    log: Path
    tail: list[str] = field(default_factory=list)


def execute(specs: list[RunSpec], preset: str, common: tuple[str, ...], *, workers: int, log_dir: Path,
            console=None, suite_command: str = "") -> list[Outcome]:
    """Run the specs as `opd-bench run` subprocesses, `workers` at a time (each in its own process group,
    so Ctrl-C stops exactly the runs this suite started)."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_QUIET": "1", "OPD_BENCH_SUITE_COMMAND": suite_command}
    pending, running, outcomes = list(specs), {}, []
    quiet = bool(os.environ.get("OPD_BENCH_QUIET")) or not sys.stderr.isatty()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        overall = progress.add_task(f"suite ({workers} workers)", total=len(specs))
        try:
            while pending or running:
                while pending and len(running) < workers:
                    spec = pending.pop(0)
                    log = log_dir / f"{spec.method}-s{spec.seed}-{spec.key}.log"
                    with log.open("w") as f:
                        proc = subprocess.Popen([sys.executable, "-m", "opd_bench.cli", *spec.argv(preset, common)],
                                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                    task = progress.add_task(f"  {escape(spec.label)}", total=None)
                    running[proc] = (spec, log, time.perf_counter(), task)
                for proc in [p for p in running if p.poll() is not None]:
                    spec, log, start, task = running.pop(proc)
                    progress.remove_task(task)
                    tail = log.read_text(errors="replace").splitlines()[-5:] if proc.returncode else []
                    outcomes.append(Outcome(spec, proc.returncode, time.perf_counter() - start, log, tail))
                    progress.advance(overall)
                    verdict = "done" if proc.returncode == 0 else f"[red]failed (exit {proc.returncode})[/red], see {log}"
                    progress.console.print(f"{escape(spec.label)}: {verdict} in {outcomes[-1].seconds:.0f} s")
                time.sleep(0.5)
        except KeyboardInterrupt:
            for proc in running:  # only the processes this suite started, by their group id
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            for proc in running:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            raise
    return outcomes


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
