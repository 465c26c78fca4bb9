"""`opd-bench report`: rebuild reports/ from leaderboard.csv, deterministically (same rows, same bytes).

Reads the rows of one preset, budget and world, and the preset's suite spec (suite.load_spec); no method is
named here. Rows are grouped and labelled by the `label` each run recorded (never by today's defaults); the
spec's arms select rows by {method, params} (suite.Arm). Writes, each table as Markdown, LaTeX and CSV:
  claims   the spec's claims, what we measured (95% Welch-t intervals) and the verdicts (rules: claims.py)
  main     every label x task avg@k (mean ± std over seeds), the papers' numbers beside ours (spec `paper`)
  cost     device-hours by stage, the cost to reach the spec's reference arm's accuracy, the speedup
  best-lr  each label at its best swept learning rate next to the shared one
and the spec's `tables`, its `figures` (report_figures.py) and README.md indexing all of it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from opd_bench import claims as C
from opd_bench.claims import Stat
from opd_bench.leaderboard import read_rows
from opd_bench.methods.base import PI_SFT  # the spec's name for the base evaluation every row records
from opd_bench.suite import arm, load_spec

PAPER_RESULTS = Path(__file__).parent / "data" / "paper_results.csv"
EXTS = ("md", "tex", "csv")
LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "<": "$<$", ">": "$>$", "≥": r"$\geq$", "±": r"$\pm$", "—": "---"}


@dataclass
class Run:
    """One leaderboard row, parsed."""

    label: str  # what the run recorded, e.g. "exopd [lam=1.5]"
    method: str
    params: dict  # all its resolved parameters
    changed: dict  # those that differed from the method's defaults
    seed: str
    lr: float | None
    status: str
    scores: dict  # task tag -> avg@k
    base: dict  # task tag -> pi_sft's avg@k
    stages: dict  # stage -> device-seconds
    spent_s: float
    curve: list  # (mark, charged device-seconds, accuracy averaged over tasks)
    cells: dict = field(default_factory=dict)  # every numeric column (grad_var, tokens_kept, loss_peak_mb, ...)
    end: str = ""
    wall_s: float | None = None
    suite_command: str = ""

    @property
    def interval(self) -> tuple | None:
        """(start, end) of the run's process as datetimes; None without its end time or wall time."""
        if not self.end or self.wall_s is None:
            return None
        end = datetime.fromisoformat(self.end)
        return end - timedelta(seconds=self.wall_s), end


def _float(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse(row: dict, preset_lr: float) -> Run:
    num = {k: x for k, v in row.items() if (x := _float(v)) is not None}  # every finite numeric cell
    tags = sorted(k[:-len(".avg@k")] for k in num if k.endswith(".avg@k"))
    # pi_sft's point (mark 0) sits at what the method spent before training (offline rollouts and precompute).
    before = max(num.get("spent_device_s", 0.0) - num.get("device_s.train", 0.0), 0.0)
    curve = [(p[0], before if p[0] == 0 else p[1], statistics.fmean(p[3].values()))
             for p in json.loads(row.get("curve") or "[]")]
    return Run(label=row.get("label") or row.get("method", ""), method=row.get("method", ""),
               params=json.loads(row.get("params") or "{}"), changed=json.loads(row.get("params_changed") or "{}"),
               seed=row.get("seed", ""), lr=num.get("train.lr", preset_lr), status=row.get("status") or "ok",
               scores={t: num[f"{t}.avg@k"] for t in tags},
               base={t: num[f"{t}.base_avg@k"] for t in tags if f"{t}.base_avg@k" in num},
               stages={k[len("device_s."):]: v for k, v in num.items() if k.startswith("device_s.") and v},
               spent_s=num.get("spent_device_s", 0.0), curve=curve, cells=num, end=row.get("time", ""),
               wall_s=num.get("process_wall_s"), suite_command=row.get("suite_command", ""))


def task_kind(tag: str) -> str:
    from opd_bench.errors import UserError
    from opd_bench.registry import TASKS

    try:
        return "math" if TASKS.get(tag.split("@")[0]).scorer == "math" else "code"
    except UserError:  # a task no longer registered: guess from its name
        return "math" if any(w in tag for w in ("math", "aime", "hmmt")) else "code"


def metric(run: Run, name: str) -> float | None:
    """A task tag, 'avg' (all tasks), 'math'/'code' (their tasks), 'greedy' (the mean over tasks of the greedy
    accuracy beside a sampled primary metric), or any numeric column of the row."""
    if name == "greedy":
        values = [run.cells[f"{t}.greedy"] for t in run.scores if f"{t}.greedy" in run.cells]
        return statistics.fmean(values) if values else None
    if name in ("avg", "math", "code"):
        values = [v for t, v in run.scores.items() if name == "avg" or task_kind(t) == name]
        return statistics.fmean(values) if values else None
    return run.scores[name] if name in run.scores else run.cells.get(name)


@dataclass
class Table:
    name: str
    title: str
    header: list
    rows: list  # display cells (str)
    raw: list  # dicts of numbers, for the CSV
    note: str = ""
    align: str = ""  # LaTeX column alignment (default: text first column, numbers right-aligned)

    def markdown(self) -> str:
        lines = [f"| {' | '.join(self.header)} |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + [f"| {' | '.join(c.replace('|', '/') for c in row)} |" for row in self.rows]) + "\n"

    def latex(self) -> str:
        def esc(text: str) -> str:
            return "".join(LATEX.get(ch, ch) for ch in text.replace(">=", "≥"))

        lines = [f"% {self.title}", "\\begin{tabular}{" + (self.align or "l" + "r" * (len(self.header) - 1)) + "}",
                 "\\toprule", " & ".join(esc(h) for h in self.header) + " \\\\", "\\midrule"]
        lines += [" & ".join(esc(c) for c in row) + " \\\\" for row in self.rows]
        return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in self.raw for k in r)), restval="",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in self.raw)
        return buf.getvalue()

    def files(self) -> dict:
        return dict(zip(EXTS, (f"## {self.title}\n\n{self.markdown()}\n{self.note}\n", self.latex(), self.csv())))


FORMATS = {"pct": lambda s: f"{100 * s.mean:.1f}" + (f" ± {100 * s.std:.1f}" if s.std is not None else ""),
           "sci": lambda s: f"{s.mean:.3g}" + (f" ± {s.std:.2g}" if s.std is not None else ""),
           "h": lambda s: f"{s.mean / 3600:.3g}"}  # device-seconds as device-hours, the mean only


def show(s: Stat, fmt: str = "pct") -> str:
    return "—" if s.mean is None else FORMATS[fmt](s)


def _raw(prefix: str, s: Stat) -> dict:
    return {f"{prefix}.mean": s.mean, f"{prefix}.std": s.std, f"{prefix}.n": s.n}


class Report:
    def __init__(self, runs: list[Run], spec: dict, preset: str, budget: str, shared_lr: float):
        self.all, self.spec, self.preset, self.budget, self.lr = runs, spec, preset, budget, shared_lr
        self.runs = [r for r in runs if r.lr is not None and math.isclose(r.lr, shared_lr, rel_tol=1e-9)]
        tags = sorted({t for r in self.runs for t in r.scores})
        kinds = {task_kind(t) for t in tags}
        self.metrics = tags + [k for k in ("math", "code") if k in kinds] + (["avg"] if tags else [])
        self.accuracy = [{"metric": m, "label": f"{m} avg" if m in ("math", "code") else m} for m in self.metrics]
        if any(metric(r, "greedy") is not None for r in self.runs):  # reported beside the primary metric
            self.accuracy.append({"metric": "greedy", "label": "greedy (avg over tasks)"})
        self.core = [arm(a) for a in spec.get("core", [])]
        rank = {r.label: min([i for i, a in enumerate(self.core) if a.matches(r)] + [len(self.core)]) for r in runs}
        self.labels = sorted({r.label for r in self.runs}, key=lambda label: (rank[label], label))
        self.groups = [(label, [r for r in self.runs if r.label == label]) for label in self.labels]

    def of(self, a) -> list[Run]:
        """The runs of an arm (a spec entry or suite.Arm); pi_sft: one per seed, its base scores as scores."""
        a = a if hasattr(a, "matches") else arm(a)
        if a.method != PI_SFT:
            return [r for r in self.runs if a.matches(r)]
        per_seed = {r.seed: r for r in sorted(self.runs, key=lambda r: r.seed) if r.base}
        return [Run(**{**r.__dict__, "scores": r.base, "label": PI_SFT,
                       "cells": {**r.cells, **{k[:-len("base_greedy")] + "greedy": v for k, v in r.cells.items()
                                               if k.endswith(".base_greedy")}}}) for r in per_seed.values()]

    def name(self, a) -> str:
        """An arm's display name: the labels its rows recorded (the spec's name if it has none)."""
        return " / ".join(sorted({r.label for r in self.of(a)})) or (a if hasattr(a, "matches") else arm(a)).name

    @staticmethod
    def stat(runs: list[Run], name: str) -> Stat:
        return Stat.of(metric(r, name) for r in runs)

    metric = staticmethod(metric)  # for report_figures, which draws from a Report and imports nothing of this module

    def cells(self, name: str, runs: list[Run], cols: list[dict]) -> tuple[list, dict]:
        """One table row: display cells and CSV values for columns {metric, label, format} or {param, label}."""
        cells, raw = [name], {"arm": name}
        for c in cols:
            if "param" in c:
                values = sorted({json.dumps(r.params[c["param"]]) for r in runs if c["param"] in r.params})
                cells.append(raw.setdefault(c["param"], ", ".join(v.strip('"') for v in values) or "—"))
            else:
                s = self.stat(runs, c["metric"])
                cells.append(show(s, c.get("format", "pct")))
                raw.update(_raw(c["metric"], s))
        return cells, raw

    # --- tables -------------------------------------------------------------------------------

    def main(self) -> Table:
        paper, rows, raw = self.paper_rows(), [], []
        for label, runs in [(PI_SFT, self.of(PI_SFT))] + self.groups:
            cells, values = self.cells(label, runs, self.accuracy)
            diverged = sum(r.status == "diverged" for r in runs)  # no scores: they count here only
            rows.append(cells + [f"{len(runs) - diverged}" + (f" (+{diverged} diverged)" if diverged else "")])
            raw.append(values)
            for method, numbers in paper.get(label, []):
                rows.append([f"  paper: {method}"] + [numbers.get(m, "—") for m in self.metrics] + [""])
                raw.append({"arm": f"paper: {method}", **{f"{m}.mean": numbers.get(m, "") for m in self.metrics}})
        note = (f"avg@k in %, mean ± std over seeds (n runs), at the shared lr {self.lr:g}; pi_sft is the base "
                "evaluation recorded in every row; a diverged run (non-finite weights) has no scores."
                + (" Paper rows: the papers' reported numbers (their protocol, their models), for comparison only."
                   if paper else ""))
        return Table("main", "Main table: accuracy by method and task",
                     ["method"] + [c["label"] for c in self.accuracy] + ["n"], rows, raw, note)

    def paper_rows(self) -> dict:
        """label -> [(the paper's method, {metric: value as text})], from the spec's `paper` block."""
        spec, out = self.spec.get("paper"), {}
        if not spec:
            return out
        with PAPER_RESULTS.open(newline="") as f:
            found = [r for r in csv.DictReader(f) if r["student"] == spec["student"] and r["table"] == spec["table"]]
        names = {m: {"math": "math_avg", "code": "code_avg"}.get(m) or spec.get("benchmarks", {}).get(
            m.split("@")[0], m.split("@")[0]) for m in self.metrics}
        for method, a in spec["arms"].items():
            numbers = {m: r["value"] for r in found for m in self.metrics
                       if r["method"] == method and r["benchmark"] == names[m]}
            label = next((r.label for r in self.of(a)), None)
            if numbers and label:
                out.setdefault(label, []).append((method, numbers))
        return out

    def cost(self) -> Table:
        ref = self.spec.get("cost", {})
        reference, margin = ref.get("reference", ""), ref.get("margin", 0.0)

        def reach(runs: list[Run]) -> dict:
            return C.speedup([r.curve for r in self.of(reference)], [r.curve for r in runs], 1.0, margin)

        def hours(column: str, label: str) -> dict:
            return {"metric": column, "label": label, "format": "h"}

        stages = sorted({s for r in self.runs for s in r.stages}, key=lambda s: (s.startswith("eval"), s != "train", s))
        cols = [hours(f"device_s.{s}", f"{s} (h)") for s in stages if not s.startswith("eval")]
        cols += [hours("spent_device_s", "charged total (h)")]
        cols += [hours(f"device_s.{s}", f"{s}, not charged (h)") for s in stages if s.startswith("eval")]
        rows, raw = [], []
        for label, runs in self.groups:
            (cells, values), sp = self.cells(label, runs, cols), reach(runs)
            costs, ratio = sp["costs"], sp["ratio"]
            to_reach = None if ratio is None else statistics.fmean(costs) / 3600
            rows.append(cells + [f"{to_reach:.3g}" if to_reach is not None else f"not reached ({costs.count(None)}/"
                                 f"{len(costs)})" if None in costs else "—",
                                 "—" if ratio is None else f"{ratio:.2f}x", str(len(runs))])
            raw.append({**values, "to_reach.device_h": to_reach, "speedup": ratio})
        why = reach(self.of(reference))["why"]
        note = ("Device-hours (device-seconds / 3600, mean over seeds) by stage; evaluations are recorded, not "
                "charged. 'To reach': the mean over seeds of the charged device time at which a seed's accuracy curve "
                "(0/25/50/75/100% of the budget, averaged over tasks) first comes within "
                f"{100 * margin:g} point of {self.name(reference)}'s seed-mean final accuracy, linear between points; "
                "'not reached (k/n)': k seeds never did; speedup = the reference's cost (its seed-mean curve) / that "
                "mean." + (f" Not computed: {why}." if "nothing to reach" in why else ""))
        return Table("cost", "Cost table: device-hours by stage and speedup vs the reference", ["method"] + [
            c["label"] for c in cols] + ["to reach the reference (h)", "speedup", "n"], rows, raw, note)

    def table(self, name: str, t: dict) -> Table | None:
        """A table of the spec: its arms (written when at least two have rows) x its columns."""
        arms = [a for a in map(arm, t["arms"]) if self.of(a)]
        cols = [c for col in t["columns"] for c in (self.accuracy if col == "accuracy" else [col])]
        made = [self.cells(self.name(a), self.of(a), cols) for a in arms]
        return Table(name, t["title"], ["arm"] + [c["label"] for c in cols] + ["n"], [
            cells + [str(len(self.of(a)))] for a, (cells, _) in zip(arms, made)], [raw for _, raw in made],
            t.get("note", "")) if len(arms) > 1 else None

    def best_lr(self) -> Table | None:
        """Each label at its best swept learning rate next to the shared one (a rate tuned for one method
        must not judge another)."""
        rows, raw, rank = [], [], {label: i for i, label in enumerate(self.labels)}
        for label in sorted({r.label for r in self.all}, key=lambda x: (rank.get(x, len(rank)), x)):
            runs = [r for r in self.all if r.label == label and r.lr is not None]
            per_lr = {lr: self.stat([r for r in runs if r.lr == lr], "avg") for lr in sorted({r.lr for r in runs})}
            if len(per_lr) < 2:
                continue
            best = max(per_lr, key=lambda lr: (per_lr[lr].mean if per_lr[lr].mean is not None else -1, -lr))
            shared = next((s for lr, s in per_lr.items() if math.isclose(lr, self.lr, rel_tol=1e-9)),
                          Stat(None, None, 0))
            rows.append([label, show(shared), f"{best:g}", show(per_lr[best]),
                         ", ".join(f"{lr:g}: {show(s)}" for lr, s in per_lr.items())])
            raw.append({"arm": label, "shared_lr": self.lr, **_raw("shared", shared), "best_lr": best,
                        **_raw("best", per_lr[best])})
        return Table("best-lr", "Shared learning rate vs each method's best swept rate",
                     ["arm", f"avg at shared lr {self.lr:g} (%)", "best lr", "avg at best lr (%)", "all rates"],
                     rows, raw, "avg accuracy over tasks, mean ± std over seeds.") if rows else None

    def judge(self, c: dict) -> dict:
        """One claim of the spec: verdict, why, the compared stats and interval (the rules of claims.py)."""
        a_runs, b_runs = self.of(c["a"]), self.of(c["b"]) if c.get("b") else []
        a, b = self.stat(a_runs, c["metric"]), self.stat(b_runs, c["metric"]) if c.get("b") else None
        out = {"a": a, "b": b, "iv": None, "ratio": None}
        guard = self.judge(self.spec["guard"]) if c.get("guarded") else {"verdict": "reproduced"}
        if guard["verdict"] != "reproduced":
            return {**out, "verdict": "not testable here", "why": f"needs: {self.spec['guard']['text']} "
                    f"({guard['verdict']}{'; ' + _measured(guard, 'pct') if guard['iv'] else ''})"}
        if c["kind"] == "speedup":
            sp = C.speedup([r.curve for r in b_runs], [r.curve for r in a_runs], c["threshold"], c.get("margin", 0.0))
            return {**out, **sp, "a": Stat.of(x for x in sp["costs"] if x is not None), "b": None}
        margin = c["margin_rel"] * abs(b.mean or 0.0) if "margin_rel" in c and b else c.get("margin", 0.0)
        verdict, why, iv = C.verdict(c["kind"], a, b, margin, c.get("threshold"), (bool(a_runs), bool(b_runs)))
        return {**out, "verdict": verdict, "why": why, "iv": iv}

    def claims(self) -> Table:
        rows, raw = [], []
        for key, c in self.spec.get("claims", {}).items():
            j, fmt = self.judge(c), "pct" if c["metric"] in self.metrics + ["tokens_kept"] else "sci"
            if c["kind"] == "speedup":
                measured = f"{j['ratio']:.2f}x [{j['lo']:.2f}, {j['hi']:.2f}] (n {j['n']}) vs {c['threshold']}x" \
                    if j["ratio"] is not None else f"{j['reached']} of {j['n']} seeds reached it" \
                    if j.get("costs") else "—"
            else:
                measured = _measured(j, fmt) if c.get("b") else \
                    f"{show(j['a'], fmt)} (n {j['a'].n}) vs {show(Stat(c['threshold'], None, 1), fmt)}"
            compared = self.name(c["a"]) + (f" vs {self.name(c['b'])}" if c.get("b") else "")
            rows.append([c["text"], c["paper"], compared, c["metric"], measured, j["verdict"], j["why"]])
            raw.append({"claim": c["text"], "id": key, "paper": c["paper"], "compared": compared, "kind": c["kind"],
                        "metric": c["metric"], **_raw("a", j["a"]), **(_raw("b", j["b"]) if j["b"] else {}),
                        "d.lo": j["iv"] and j["iv"].lo, "d.hi": j["iv"] and j["iv"].hi, "ratio": j["ratio"],
                        "verdict": j["verdict"], "why": j["why"]})
        note = ("Verdicts by the rules of `opd_bench/claims.py`; [lo, hi]: the 95% Welch-t interval of d = A - B "
                "over seeds; m: the claim's margin (`opd_bench/suites/`). greater: not reproduced if hi < m, else "
                "reproduced if lo > 0; less: mirrored; matches (non-inferiority): reproduced if lo > -m, not "
                "reproduced if hi < -m; "
                "speedup: the reference's cost to reach its accuracy / the mean cost of the arm's seeds (a seed that "
                "never reaches it: not reached); otherwise, and with fewer than 2 seeds: inconclusive. Guarded claims "
                f"are 'not testable here' unless {self.spec.get('guard', {}).get('text', 'the guard holds')}.")
        header = ["claim", "paper", "compared", "metric", "measured (mean ± std; d [95% interval])", "verdict", "why"]
        return Table("claims", "Claims: the papers' claims and what we measured", header, rows, raw, note,
                     "p{4.5cm}llllll")


def _measured(j: dict, fmt: str) -> str:
    a, b, iv = j["a"], j["b"], j["iv"]

    def signed(x: float) -> str:
        return ("+" if x >= 0 else "-") + show(Stat(abs(x), None, 1), fmt)

    return f"{show(a, fmt)} vs {show(b, fmt)} (n {a.n}/{b.n})" + (
        f"; d = {signed(iv.d)} [{signed(iv.lo)}, {signed(iv.hi)}]" if iv else "")


# ----------------------------------------------------------------------------- the report folder


def _busy_seconds(runs: list[Run]) -> float | None:
    """Wall time with at least one of these runs in progress: the union of their intervals, so idle gaps
    (between separate suite invocations, or before a suite was continued) do not count."""
    spans = sorted(r.interval for r in runs if r.interval)
    busy, reached = timedelta(0), spans[0][0] if spans else None
    for start, end in spans:  # by start time: count only what runs past the latest end so far
        busy, reached = busy + max(end - max(start, reached), timedelta(0)), max(reached, end)
    return busy.total_seconds() if spans else None


def _duration(runs: list[Run]) -> str:
    busy, timed = _busy_seconds(runs), [r for r in runs if r.interval]
    if busy is None:
        return "unknown (no run has its wall time)"
    missing = len(runs) - len(timed)
    return (f"{busy / 60:.1f} minutes with at least one run in progress, idle gaps between invocations left out "
            f"({sum(r.wall_s for r in timed) / 3600:.2f} hours of run processes in all"
            + (f"; {missing} rows without their wall time, not counted)" if missing else ")"))


def _suite_lines(runs: list[Run]) -> list[str]:
    """Each suite command that produced these rows, with its run count and time (see _busy_seconds)."""
    lines = []
    for command in sorted({r.suite_command for r in runs if r.suite_command}):
        mine = [r for r in runs if r.suite_command == command]
        busy = _busy_seconds(mine)
        took = f", {busy / 60:.1f} min" if busy is not None else ""
        lines.append(f"{command}  # {len(mine)} run{'s' * (len(mine) != 1)}{took}")
    return lines


def _report_of(leaderboard: Path | str, preset: str, budget: str | None):
    """The Report of one preset's rows at one budget (None: the commonest) and world (the latest row's pi_sft);
    also every row of the preset at that budget, the budgets in the file, and the runs of that world."""
    from opd_bench.config import load_config

    cfg, spec = load_config(preset), load_spec(preset)
    rows = sorted((r for r in read_rows(leaderboard) if r.get("preset") == preset), key=lambda r: r["run_id"])
    budgets = sorted({r.get("budget", "") for r in rows})
    if budget is None and budgets:  # the most common budget (ties: the first in sorted order)
        budget = max(budgets, key=lambda b: (sum(r.get("budget") == b for r in rows), -budgets.index(b)))
    rows = [r for r in rows if r.get("budget") == budget]
    # One world per report: the latest row's student (micro: `sft-student-<hash>`); older worlds are left out.
    latest = max(rows, key=lambda r: (r.get("time", ""), r["run_id"]), default={})
    runs = [parse(r, cfg.train.lr) for r in rows if r.get("student", "") == latest.get("student", "")]
    # The shared rate: the preset's, unless no run used it (a suite run with --set train.lr=...): then the commonest.
    lrs = sorted(r.lr for r in runs if r.lr is not None)
    shared = cfg.train.lr if not lrs or any(math.isclose(x, cfg.train.lr, rel_tol=1e-9) for x in lrs) else \
        max(lrs, key=lambda x: (lrs.count(x), -x))
    return Report(runs, spec, preset, budget or "", shared), rows, budgets, runs


def regime_map(leaderboard: Path | str, spec: dict) -> Table | None:
    """The spec's `regime_map` (preset -> what its world is): pi_sft, standard OPD and every claim's verdict in
    each of those presets' own reports, side by side (a preset without rows reads "no runs")."""
    presets = spec.get("regime_map") or {}
    if len(presets) < 2:
        return None
    reports = {p: _report_of(leaderboard, p, None)[0] for p in presets}
    claims = spec.get("claims", {})
    rows = [["world"] + list(presets.values()), ["budget (per run)"] + [r.budget or "—" for r in reports.values()]]
    raw = [{"row": "world", **presets}, {"row": "budget", **{p: r.budget for p, r in reports.items()}}]
    for arm_name in (PI_SFT, spec["guard"]["a"]):
        stats = {p: r.stat(r.of(arm_name), "avg") for p, r in reports.items()}
        rows.append([f"{arm_name}, avg (%)"] + [show(x) + f" (n {x.n})" for x in stats.values()])
        raw.append({"row": arm_name, **{p: x.mean for p, x in stats.items()}})
    for key, c in claims.items():
        verdicts = {p: r.judge(c)["verdict"] if r.runs else "no runs" for p, r in reports.items()}
        rows.append([c["text"]] + list(verdicts.values()))
        raw.append({"row": key, **verdicts})
    note = ("Each column is that preset's own report (its rows, its commonest budget, its latest world), judged by "
            "the same rules; calibration: the instrument's check, the precondition of the guarded claims.")
    return Table("regime-map", "Regime map: which claims hold in which world", ["", *presets], rows, raw, note)


def build(leaderboard: Path | str, out: Path | str, preset: str = "micro", budget: str | None = None,
          command: str = "") -> list[Path]:
    """Write the report folder; returns the files written, sorted."""
    from opd_bench.report_figures import figures as draw_figures

    rep, rows, budgets, runs = _report_of(leaderboard, preset, budget)
    spec, budget, other_worlds = rep.spec, rep.budget, len(rows) - len(runs)
    out, names = Path(out), ["claims", "main", "cost", *spec.get("tables", {}), "best-lr", "regime-map"]
    out.mkdir(parents=True, exist_ok=True)
    for path in [out / f"{t}.{ext}" for t in names for ext in EXTS] + [
            out / f for f in [*spec.get("figures", {}), "README.md"]]:
        path.unlink(missing_ok=True)  # what an earlier report wrote and this one may not (a table without data now)
    tables = [rep.claims(), rep.main(), rep.cost(), *(rep.table(n, t) for n, t in spec.get("tables", {}).items()),
              rep.best_lr(), regime_map(leaderboard, spec)] if rep.runs else []
    tables = [t for t in tables if t is not None]
    for t in tables:
        for ext, text in t.files().items():
            (out / f"{t.name}.{ext}").write_text(text)
    figures = draw_figures(rep, out) if rep.runs else []
    statuses = {s: sum(r.status == s for r in rep.all) for s in sorted({r.status for r in rep.all})}
    lines = [f"# opd-bench report: preset `{preset}`, budget {rep.budget or '—'}", "",
             f"Generated by `{command or 'opd-bench report'}` from `{leaderboard}` and `opd_bench/suites/` (do not "
             "edit by hand: the same leaderboard gives the same bytes).", "",
             f"- runs: {len(runs)} row{'s' * (len(runs) != 1)} of preset `{preset}` at budget {rep.budget} "
             f"({', '.join(f'{n} {s}' for s, n in statuses.items())}); {len(rep.runs)} at the shared learning rate "
             f"{rep.lr:g}" + (f"; other budgets in the file, not shown: {', '.join(b for b in budgets if b != budget)}"
                              if len(budgets) > 1 else "")
             + (f"; {other_worlds} rows of an older world (another pi_sft) left out" if other_worlds else ""),
             f"- charged device time: {sum(r.spent_s for r in runs) / 3600:.3g} device-hours; all recorded stages "
             f"(with evaluations): {sum(sum(r.stages.values()) for r in runs) / 3600:.3g} device-hours",
             f"- how long it took: {_duration(runs)}; per suite command under Commands",
             *(["- the world: its regime card (teacher : student, pi_sft's share of the teacher, the SFT scaling "
                "curve, pi_sft across world seeds) in [regime-card.md](regime-card.md), written by "
                "`scripts/regime_card.py`"] if (out / "regime-card.md").exists() else []),
             "- protocol: " + ", ".join(sorted({t for r in runs for t in r.scores})) +
             " (task@version; k and temperature per task are in leaderboard.csv)", "", "## Commands", "", "```",
             *(_suite_lines(runs) or ["# runs started one by one; each row's `command` column holds its command"]),
             command or "opd-bench report", "```", ""]
    if not rep.runs:
        lines += ["No runs of this preset and budget yet.", ""]
    for t in tables:
        lines += [f"## {t.title}", "", t.markdown(), t.note, "",
                  "Files: " + ", ".join(f"[{t.name}.{ext}]({t.name}.{ext})" for ext in EXTS), ""]
    absent = [n for n in names if n not in {t.name for t in tables}]
    if absent and rep.runs:
        lines += [f"Not in this report (fewer than two of their arms have runs, or no swept learning rate): "
                  f"{', '.join(absent)}.", ""]
    lines += ["## Figures", ""] * bool(figures) + [f"![{c}]({n})\n\n*{c}* ([{n}]({n}))\n" for n, c in figures]
    (out / "README.md").write_text("\n".join(lines))
    return sorted(p for p in out.iterdir() if p.is_file())
