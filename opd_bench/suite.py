"""`opd-bench suite`: every arm of the preset's suite spec under one budget and one protocol, then the report.

The spec (`opd_bench/suites/<preset>.yaml`, or the spec of the preset it `extends:`) names everything this
module, the report and the claims know about methods: the core arms, the sweep groups, the report's tables,
figures and claims. An arm is `{method, params}` (a bare name: no params). A leaderboard row belongs to an arm
when its method is the arm's, every parameter it changed from the method's defaults is among the arm's params,
and its params equal the arm's on every param the arm names (`Arm.matches`).

  plan()     the runs, in a fixed order: the core arms for every seed, then (--full) the sweep groups, then
             `--sweep key=a,b,c` (each core arm at each value). Each run is resolved as `opd-bench run` resolves
             it (`opd_bench.resolve.resolve_run`), so it has its run key and label; duplicates collapse (an arm
             of a sweep that is a core run runs once) and runs whose key is in the leaderboard are marked done,
             so an interrupted suite continues where it stopped (a run cut short resumes: `run --resume`).
  execute()  runs `opd-bench run` subprocesses, `workers` at a time, one torch thread each, with a progress
             display; each run's output goes to <runs_dir>/suite-logs/.
Every run uses the preset's shared learning rate; only `--sweep train.lr=...` changes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd_bench.errors import UserError, did_you_mean

SUITES = Path(__file__).parent / "suites"
ALIASES = {"lr": "train.lr"}  # --sweep lr=... is --sweep train.lr=...


# ----------------------------------------------------------------------------- the spec


@dataclass
class Arm:
    method: str
    params: dict = field(default_factory=dict)

    def matches(self, run) -> bool:
        """`run` has .method, .params (all resolved) and .changed (those that differed from the defaults)."""
        return run.method == self.method and set(run.changed) <= set(self.params) and \
            all(k in run.params and run.params[k] == v for k, v in self.params.items())

    @property
    def name(self) -> str:
        """The arm as the spec names it, e.g. 'tip [rule=q3,loss=reverse-kl]' (rows show their own label)."""
        return self.method + (f" [{','.join(f'{k}={_text(v)}' for k, v in self.params.items())}]"
                              if self.params else "")

    def overrides(self) -> tuple[str, ...]:
        return tuple(f"method.params.{k}={_text(v)}" for k, v in self.params.items())


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def arm(entry) -> Arm:
    """An arm from the spec: a method name, or {method: NAME, params: {...}}."""
    if isinstance(entry, str):
        return Arm(entry)
    if not isinstance(entry, dict) or set(entry) - {"method", "params"} or "method" not in entry:
        raise UserError(f"bad arm {entry!r} in a suite spec: expected a method name or {{method: ..., params: ...}}")
    return Arm(entry["method"], dict(entry.get("params") or {}))


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_spec(preset: str, seen: tuple[str, ...] = ()) -> dict:
    """The preset's suite spec (mappings deep-merged over the spec it `extends:`, lists replaced). A preset
    without a spec of its own uses the spec of the preset it extends."""
    path = SUITES / f"{preset}.yaml"
    if not path.exists():
        from opd_bench.config import PRESET_DIR

        parent = (yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text()) or {}).get("extends") \
            if (PRESET_DIR / f"{preset}.yaml").exists() else None
        if not parent:
            names = sorted(p.stem for p in SUITES.glob("*.yaml"))
            raise UserError(f"no suite spec for preset {preset!r}{did_you_mean(preset, names)}: add "
                            f"opd_bench/suites/{preset}.yaml (it may `extends:` another spec)")
        return load_spec(parent, seen + (preset,))
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("extends", None)
    if parent in seen + (preset,):
        raise UserError(f"suite spec {preset!r} extends itself through {' -> '.join(seen + (preset,))}")
    return _merge(load_spec(parent, seen + (preset,)), data) if parent else data


# ----------------------------------------------------------------------------- the plan


@dataclass
class RunSpec:
    group: str
    method: str
    seed: int
    budget: str | None
    overrides: tuple[str, ...] = ()
    key: str = ""
    done: bool = False
    name: str = ""  # the run's label as resolved (e.g. 'exopd [lam=1.5]')

    @property
    def label(self) -> str:
        extra = ",".join(o.split(".", 1)[-1] for o in self.overrides if not o.startswith("eval.workers"))
        return f"{self.name or self.method + (f' [{extra}]' if extra else '')} s{self.seed}"

    def argv(self, preset: str, common: tuple[str, ...]) -> list[str]:
        sets = [arg for o in (*common, *self.overrides) for arg in ("--set", o)]
        # --resume: a run cut short by an interrupted suite continues from its checkpoint instead of starting over
        return ["run", "--method", self.method, "--budget", str(self.budget), "--preset", preset, "--seed",
                str(self.seed), "--resume", *sets]


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


def resolve(preset: str, method: str, *, seed: int, budget: str | None, overrides: list[str]):
    """What `opd-bench run` resolves for these arguments (tests replace this function)."""
    from opd_bench.resolve import resolve_run

    return resolve_run(preset, method, seed=seed, budget=budget, overrides=overrides)


def plan(preset: str, *, seeds: int, budget: str | None = None, core: bool = False, sweep: dict | None = None,
         common: tuple[str, ...] = (), finished: set[str] = frozenset(),
         methods: tuple[str, ...] = ()) -> tuple[list[RunSpec], list[str]]:
    """The suite's runs (deduplicated by run key, finished ones marked done) and notes on runs left out;
    `methods` keeps only those methods' runs."""
    from opd_bench.config import load_config

    spec = load_spec(preset)
    first = load_config(preset, list(common)).seed
    seed_list = list(range(first, first + seeds))
    core_arms = [arm(a) for a in spec.get("core", [])]
    specs = [RunSpec("core", a.method, s, budget, a.overrides()) for s in seed_list for a in core_arms]
    if not core:
        specs += [RunSpec(group, a.method, s, budget, a.overrides()) for s in seed_list
                  for group, arms in (spec.get("sweeps") or {}).items() for a in map(arm, arms)]
    for key, values in (sweep or {}).items():
        specs += [RunSpec(f"sweep:{key}", a.method, s, budget, (*a.overrides(), f"{key}={v}")) for v in values
                  for s in seed_list for a in core_arms]
    if methods:
        from opd_bench.registry import METHODS

        for m in methods:
            METHODS.get(m)  # an unknown name is a one-line error with a did-you-mean
        specs = [s for s in specs if s.method in methods]
    out, seen, notes = [], set(), []

    def note(text: str) -> None:
        notes.extend([text] if text not in notes else [])

    for run in specs:
        try:
            r = resolve(preset, run.method, seed=run.seed, budget=budget, overrides=[*common, *run.overrides])
        except UserError as exc:
            if not run.group.startswith("sweep:"):
                raise
            note(f"{run.label.rsplit(' s', 1)[0]}: left out of the sweep ({exc})")  # e.g. a param it lacks
            continue
        run.name, run.budget = r.label, r.budget.spec
        if r.uses_teacher_b and r.cfg.world.kind == "hf" and not r.cfg.world.hf.teacher_b:
            note(f"{r.label}: left out, needs a second teacher (--set world.hf.teacher_b=...)")
            continue
        run.key = r.key
        if run.key in seen:
            continue
        seen.add(run.key)
        run.done = run.key in finished
        out.append(run)
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
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_QUIET": "1", "OPD_BENCH_SUITE_COMMAND": suite_command}
    pending, running, outcomes = list(specs), {}, []
    quiet = bool(os.environ.get("OPD_BENCH_QUIET")) or not sys.stderr.isatty()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
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
                    verdict = "done" if proc.returncode == 0 else \
                        f"[red]failed (exit {proc.returncode})[/red], see {log}"
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
