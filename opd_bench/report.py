"""`opd-bench report`: rebuild reports/ from leaderboard.csv, deterministically (same rows, same bytes).

Reads the rows of one preset at one budget. A row holds everything needed (scores, per-stage device time,
the 0/25/50/75/100% accuracy curve, gradient variance, token fraction, peak memory); rows written before
those columns existed are completed from their run folder when it is still there. Writes, each table as
Markdown, LaTeX and CSV:
  main          method x task avg@k (mean +- std over seeds), math avg, code avg; the papers' numbers beside ours
  cost          device-hours by stage, cost to reach standard OPD's final accuracy, speedup
  claims        each paper claim, our measurement with its spread, and a verdict by the rule below
  exopd-lambda, vopd, tip, best-lr   the ablations
figures (PNG, `report_figures.py`): accuracy vs device time with seed bands, the lambda sweep, TIP bars,
vOPD variance; and README.md indexing all of it.
The claims, their rule and the cost-to-reach computation are in `claims.py`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from opd_bench.claims import ACC_MARGIN, CLAIMS, REL_MARGIN, Stat, speedups, verdict
from opd_bench.leaderboard import read_rows
from opd_bench.suite import CORE

PAPER_RESULTS = Path(__file__).parent / "data" / "paper_results.csv"
PAPER_BENCHMARKS = {"livecodebench-v5": "lcb_v5", "livecodebench-v6": "lcb_v6"}  # our task -> the papers' name
PAPER_METHODS = {"sft": "pi_sft (SFT)", "all-tokens": "standard-opd", "entropy-50": "tip",
                 "soft-or-50": "tip [tokens=soft-or]"}
PI_SFT = "pi_sft (SFT)"
# The files a report writes (and only these are removed before it writes again; the folder may hold others).
GENERATED = [f"{t}.{ext}" for t in ("claims", "main", "cost", "exopd-lambda", "vopd", "tip", "best-lr")
             for ext in ("md", "tex", "csv")] + ["accuracy_vs_cost.png", "exopd_lambda.png", "tip_rules.png",
                                                 "vopd_variance.png", "README.md"]
LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "<": "$<$", ">": "$>$", "≥": r"$\geq$", "±": r"$\pm$", "—": "---"}


# ----------------------------------------------------------------------------- rows


@dataclass
class Run:
    """One leaderboard row, parsed."""

    arm: str  # method, plus the axes it sets differently from the plugin, e.g. "exopd [lam=1.5]"
    method: str
    seed: str
    lr: float | None
    status: str
    scores: dict  # task tag -> avg@k
    base: dict  # task tag -> pi_sft's avg@k
    stages: dict  # stage -> device-seconds
    spent_s: float
    curve: list  # (mark, charged device-seconds, accuracy averaged over tasks)
    diag: dict  # grad_var, advantage_var, tokens_kept, peak_mb
    axes: dict = field(default_factory=dict)
    end: str = ""
    wall_s: float | None = None
    suite_command: str = ""

    @property
    def interval(self) -> tuple | None:
        """(start, end) of the run's process as datetimes; None without its end time or wall time."""
        from datetime import datetime, timedelta

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


def _norm(value) -> str:
    """Cell and Python values on one footing: '1' == 1.0, '' == None."""
    if value in (None, "", "None"):
        return ""
    x = _float(value)
    return f"{x:.6g}" if x is not None and str(value) not in ("True", "False") else str(value)


def arm_of(row: dict) -> str:
    from opd_bench.errors import UserError
    from opd_bench.registry import METHODS

    method = row.get("method", "")
    try:
        own = METHODS.get(method).axes.model_dump()
    except (UserError, AttributeError):  # a plugin that is not installed here: trust the row
        return f"{method} [{row['variant']}]" if row.get("variant") else method
    diff = [f"{k}={row[f'axis.{k}']}" for k in own if k != "name" and f"axis.{k}" in row
            and _norm(row[f"axis.{k}"]) != _norm(own[k])]
    return f"{method} [{','.join(diff)}]" if diff else method


def _run_dir(row: dict, root: Path) -> Path | None:
    """The row's run folder if it still exists (a relative path: from here, or from the leaderboard's folder)."""
    if not row.get("run_dir"):
        return None
    for path in (Path(row["run_dir"]), root / row["run_dir"]):
        if path.is_dir():
            return path
    return None


def _lr(row: dict, preset_lr: float, run_dir: Path | None) -> float | None:
    if _float(row.get("train.lr")) is not None:
        return _float(row["train.lr"])
    if run_dir and (run_dir / "config.json").exists():
        return json.loads((run_dir / "config.json").read_text())["train"]["lr"]
    match = re.search(r"train\.lr=(\S+)", row.get("command", ""))
    return _float(match.group(1)) if match else preset_lr  # no override: the preset's rate


def _curve(row: dict, run_dir: Path | None) -> list:
    if row.get("curve"):
        points = [(p[0], p[1], p[3]) for p in json.loads(row["curve"])]
    elif run_dir and (run_dir / "metrics.json").exists():  # a row written before the curve column existed
        curve = json.loads((run_dir / "metrics.json").read_text())["curve"]
        points = [(p["mark"], p["device_seconds"], p["avg@k"]) for p in curve]
    else:
        return []
    spent, train = _float(row.get("spent_device_s")) or 0.0, _float(row.get("device_s.train")) or 0.0
    out = []
    for mark, seconds, scores in points:
        # pi_sft's point sits at what the method spent before training (offline rollouts and precompute).
        x = max(spent - train, 0.0) if mark == 0 else seconds
        out.append((mark, x, statistics.fmean(scores.values())))
    return out


def parse(row: dict, preset_lr: float, root: Path = Path(".")) -> Run:
    run_dir = _run_dir(row, root)
    tags = sorted(k[:-len(".avg@k")] for k in row if k.endswith(".avg@k") and _float(row[k]) is not None)
    stages = {k[len("device_s."):]: _float(v) for k, v in row.items() if k.startswith("device_s.") and _float(v)}
    diag = {k: _float(row.get(k)) for k in ("grad_var", "advantage_var", "tokens_kept", "peak_rss_mb", "peak_gpu_mb")}
    gpu, rss = diag.pop("peak_gpu_mb"), diag.pop("peak_rss_mb")
    diag["peak_mb"] = gpu if gpu is not None else rss  # the GPU's when there is one
    return Run(arm=arm_of(row), method=row.get("method", ""), seed=row.get("seed", ""), lr=_lr(row, preset_lr, run_dir),
               status=row.get("status") or "ok", scores={t: float(row[f"{t}.avg@k"]) for t in tags},
               base={t: float(row[f"{t}.base_avg@k"]) for t in tags if _float(row.get(f"{t}.base_avg@k")) is not None},
               stages=stages, spent_s=_float(row.get("spent_device_s")) or 0.0, curve=_curve(row, run_dir),
               diag={k: v for k, v in diag.items() if v is not None},
               axes={k[5:]: v for k, v in row.items() if k.startswith("axis.")}, end=row.get("time", ""),
               wall_s=_float(row.get("process_wall_s")), suite_command=row.get("suite_command", ""))


def task_kind(tag: str) -> str:
    from opd_bench.errors import UserError
    from opd_bench.registry import TASKS

    try:
        return "math" if TASKS.get(tag.split("@")[0]).scorer == "math" else "code"
    except UserError:
        return "math" if re.search(r"math|aime|hmmt", tag) else "code"


def metric(run: Run, name: str) -> float | None:
    """A run's value of a named metric: a task tag, 'avg' (all tasks), 'math'/'code' (their tasks), or a diagnostic."""
    if name in run.scores:
        return run.scores[name]
    if name in ("avg", "math", "code"):
        values = [v for t, v in run.scores.items() if name == "avg" or task_kind(t) == name]
        return statistics.fmean(values) if values else None
    return run.diag.get(name)


# ----------------------------------------------------------------------------- tables


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
        lines += [f"| {' | '.join(c.replace('|', '/') for c in row)} |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        def esc(text: str) -> str:
            return "".join(LATEX.get(ch, ch) for ch in text.replace(">=", "≥"))

        lines = [f"% {self.title}", "\\begin{tabular}{" + (self.align or "l" + "r" * (len(self.header) - 1)) + "}", "\\toprule",
                 " & ".join(esc(h) for h in self.header) + " \\\\", "\\midrule"]
        lines += [" & ".join(esc(c) for c in row) + " \\\\" for row in self.rows]
        return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"

    def csv(self) -> str:
        keys = []
        for r in self.raw:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in self.raw)
        return buf.getvalue()


def pct(s: Stat) -> str:
    if s.mean is None:
        return "—"
    return f"{100 * s.mean:.1f}" + (f" ± {100 * s.std:.1f}" if s.std is not None else "")


def sci(s: Stat, unit: str = "") -> str:
    if s.mean is None:
        return "—"
    return f"{s.mean:.3g}" + (f" ± {s.std:.2g}" if s.std is not None else "") + unit


def _raw(prefix: str, s: Stat) -> dict:
    return {f"{prefix}.mean": s.mean, f"{prefix}.std": s.std, f"{prefix}.n": s.n}


class Report:
    def __init__(self, runs: list[Run], preset: str, budget: str, shared_lr: float, world_kind: str, student: str):
        self.all, self.preset, self.budget, self.world_kind, self.student = runs, preset, budget, world_kind, student
        self.lr, self.other_worlds = shared_lr, 0
        self.runs = [r for r in runs if r.lr is not None and math.isclose(r.lr, shared_lr, rel_tol=1e-9)]
        self.tags = sorted({t for r in self.runs for t in r.scores})
        kinds = {task_kind(t) for t in self.tags}
        self.metrics = self.tags + [k for k in ("math", "code") if k in kinds] + (["avg"] if self.tags else [])
        order = {m: i for i, m in enumerate(CORE)}
        self.arms = sorted({r.arm for r in self.runs}, key=lambda a: (order.get(a, len(order)), a))

    def of(self, arm: str, runs: list[Run] | None = None) -> list[Run]:
        return [r for r in (self.runs if runs is None else runs) if r.arm == arm]

    def stat(self, arm: str, name: str) -> Stat:
        return Stat.of(metric(r, name) for r in self.of(arm))

    def pi_sft(self) -> dict:
        """pi_sft's scores: the base evaluation every row records (one value per seed)."""
        per_seed = {r.seed: r for r in sorted(self.runs, key=lambda r: r.seed) if r.base}
        return {m: Stat.of(metric(Run(**{**r.__dict__, "scores": r.base}), m) for r in per_seed.values())
                for m in self.metrics}

    # --- tables -------------------------------------------------------------------------------

    def _metric_header(self) -> list:
        names = {"math": "math avg", "code": "code avg", "avg": "avg"}
        return [names.get(m, m) for m in self.metrics]

    def main(self) -> Table:
        paper = self.paper_rows()
        rows, raw = [], []
        base = self.pi_sft()
        entries = [(PI_SFT, base)] + [(a, {m: self.stat(a, m) for m in self.metrics}) for a in self.arms]
        for arm, stats in entries:
            n = max((s.n for s in stats.values()), default=0)
            diverged = sum(r.status == "diverged" for r in self.of(arm))  # no scores: they count here only
            rows.append([arm] + [pct(stats[m]) for m in self.metrics] + [f"{n}" + (f" (+{diverged} diverged)" if diverged else "")])
            raw.append({"arm": arm, **{k: v for m in self.metrics for k, v in _raw(m, stats[m]).items()}})
            if arm in paper:
                rows.append([f"  paper: {arm}"] + [paper[arm].get(m, "—") for m in self.metrics] + [""])
                raw.append({"arm": f"paper: {arm}", **{f"{m}.mean": paper[arm].get(m, "") for m in self.metrics}})
        note = (f"avg@k in %, mean ± std over seeds (n runs), at the shared lr {self.lr:g}; pi_sft is the base "
                f"evaluation recorded in every row; a diverged run (non-finite weights) has no scores.")
        if paper:
            note += " Paper rows: the papers' reported numbers (their protocol, their models), for comparison only."
        return Table("main", "Main table: accuracy by method and task", ["method"] + self._metric_header() + ["n"],
                     rows, raw, note)

    def paper_rows(self) -> dict:
        """The papers' numbers for this preset's student, keyed by our arm and metric name (as text)."""
        if self.world_kind != "hf" or not self.student:
            return {}
        student = self.student.rsplit("/", 1)[-1]
        out = {}
        with PAPER_RESULTS.open(newline="") as f:
            for r in csv.DictReader(f):
                if r["student"] != student or r["table"] != "main":
                    continue
                arm = PAPER_METHODS.get(r["method"], r["method"])
                for m in self.metrics:
                    name = {"math": "math_avg", "code": "code_avg"}.get(m) or PAPER_BENCHMARKS.get(m.split("@")[0],
                                                                                                  m.split("@")[0])
                    if r["benchmark"] == name:
                        out.setdefault(arm, {})[m] = r["value"]
        return out

    def cost(self) -> Table:
        stages = sorted({s for r in self.runs for s in r.stages}, key=lambda s: (s.startswith("eval"), s != "train", s))
        charged = [s for s in stages if not s.startswith("eval")]
        reference = self.of("standard-opd")
        header = ["method"] + [f"{s} (h)" for s in charged] + ["charged total (h)", "eval, not charged (h)",
                                                                 "to reach std-OPD acc (h)", "speedup", "n"]
        rows, raw = [], []
        for arm in self.arms:
            runs = self.of(arm)
            per_stage = {s: Stat.of(r.stages.get(s, 0.0) / 3600 for r in runs) for s in charged}
            total = Stat.of(r.spent_s / 3600 for r in runs)
            evals = Stat.of(sum(v for k, v in r.stages.items() if k.startswith("eval")) / 3600 for r in runs)
            hours = lambda s: f"{s.mean:.3g}" if s.mean else "—"  # noqa: E731
            sp = speedups(reference, runs) if reference else {"why": "no standard-opd runs"}
            reach = f"{sp['cost'] / 3600:.3g}" if sp.get("cost") else "—" if "why" in sp else "not reached"
            speed = f"{sp['speedup']:.2f}x" if sp.get("speedup") else "—"
            rows.append([arm] + [hours(per_stage[s]) for s in charged] + [hours(total), hours(evals), reach, speed,
                                                                          str(len(runs))])
            raw.append({"arm": arm, **{f"{s}.device_h.mean": per_stage[s].mean for s in charged},
                        "charged.device_h.mean": total.mean, "eval.device_h.mean": evals.mean,
                        "to_reach.device_h": sp["cost"] / 3600 if sp.get("cost") else "",
                        "speedup": sp.get("speedup") or "", "n": len(runs)})
        why = speedups(reference, reference).get("why", "") if reference else "no standard-opd runs"
        note = ("Device-hours (device-seconds / 3600, mean over seeds) by charged stage; evaluations are recorded, "
                "not charged. 'To reach': charged device time at which the seed-mean accuracy curve (evaluations at "
                "0/25/50/75/100% of the budget on the curve subset, averaged over tasks) first comes within "
                f"{100 * ACC_MARGIN:g} point of standard-opd's final accuracy, linear between points; speedup = "
                "standard-opd's own cost to get there / the method's.") + (f" Not computed: {why}." if why else "")
        return Table("cost", "Cost table: device-hours by stage and speedup vs standard OPD", header, rows, raw, note)

    def ablation(self, name: str, title: str, arms: list[str], columns: list[tuple[str, str, callable]], note: str,
                 label=lambda arm: arm):
        present = [a for a in arms if self.of(a)]
        if not [a for a in present if a not in ("standard-opd", "full-kl")]:  # nothing but the references
            return None
        rows, raw = [], []
        for arm in present:
            stats = {key: self.stat(arm, key) for key, _, _ in columns}
            rows.append([label(arm)] + [fmt(stats[key]) for key, _, fmt in columns] + [str(len(self.of(arm)))])
            raw.append({"arm": label(arm), **{k: v for key, _, _ in columns for k, v in _raw(key, stats[key]).items()}})
        return Table(name, title, ["arm"] + [label for _, label, _ in columns] + ["n"], rows, raw, note)

    def ablations(self) -> list[Table]:
        acc = [(m, {"avg": "avg (%)"}.get(m, f"{m} (%)"), pct) for m in self.metrics]
        lam = lambda a: _float(self.of(a)[0].axes.get("lam")) or 0.0  # noqa: E731
        lams = sorted((a for a in self.arms if a.split(" ")[0] == "exopd"), key=lam)
        tables = [
            self.ablation("exopd-lambda", "ExOPD: the lambda sweep", ["standard-opd"] + lams, acc,
                          "ExOPD arms differ only in lambda (PPO-clip 0.2, reference pi_sft); standard-opd "
                          "(lambda 1, no clip) for reference.",
                          label=lambda a: a if a == "standard-opd" else f"exopd, lambda {lam(a):g}"),
            self.ablation("vopd", "vOPD: gradient variance and accuracy",
                          ["standard-opd"] + [a for a in self.arms if a.startswith("vopd")] + ["full-kl"],
                          [("grad_var", "grad variance", sci), ("advantage_var", "advantage variance", sci),
                           ("avg", "avg (%)", pct)],
                          "grad variance: tr Cov of the step's stochastic gradient, estimated from 4 row groups every "
                          "logging step (mean over training); advantage variance: of A_t over trained tokens."),
            self.ablation("tip", "TIP: token fraction, accuracy and peak memory",
                          ["standard-opd"] + [a for a in self.arms if a.startswith("tip")],
                          [("tokens_kept", "tokens trained (%)", pct), ("avg", "avg (%)", pct),
                           ("peak_mb", "peak memory (MB)", lambda s: sci(s))],
                          "standard-opd trains on all tokens; peak memory: the run process's peak resident set "
                          "(GPU: peak allocated), which on CPU includes the runtime and evaluation.",
                          label=lambda a: f"{a} ({tip_rule(self.of(a)[0])})"),
        ]
        best = self.best_lr()
        return [t for t in tables + [best] if t is not None]

    def best_lr(self) -> Table | None:
        """Each method at its best swept learning rate next to the shared one (a rate tuned for one method
        must not judge another)."""
        rows, raw = [], []
        for arm in sorted({r.arm for r in self.all}, key=lambda a: (a not in CORE, a)):
            runs = [r for r in self.all if r.arm == arm and r.lr is not None]
            lrs = sorted({r.lr for r in runs})
            if len(lrs) < 2:
                continue
            per_lr = {lr: Stat.of(metric(r, "avg") for r in runs if r.lr == lr) for lr in lrs}
            best = max(lrs, key=lambda lr: (per_lr[lr].mean if per_lr[lr].mean is not None else -1, -lr))
            shared = per_lr.get(next((lr for lr in lrs if math.isclose(lr, self.lr, rel_tol=1e-9)), None), Stat(None, None, 0))
            rows.append([arm, pct(shared), f"{best:g}", pct(per_lr[best]), ", ".join(f"{lr:g}: {pct(per_lr[lr])}" for lr in lrs)])
            raw.append({"arm": arm, "shared_lr": self.lr, **_raw("shared", shared), "best_lr": best,
                        **_raw("best", per_lr[best])})
        if not rows:
            return None
        return Table("best-lr", "Shared learning rate vs each method's best swept rate",
                     ["arm", f"avg at shared lr {self.lr:g} (%)", "best lr", "avg at best lr (%)", "all rates"],
                     rows, raw, "avg accuracy over tasks, mean ± std over seeds.")

    def claims(self) -> Table:
        rows, raw = [], []
        for c in CLAIMS:
            a = self.stat(c.a, c.metric)
            fmt = pct if c.metric in self.metrics or c.metric == "tokens_kept" else \
                (lambda s: sci(s, " MB")) if c.metric == "peak_mb" else sci
            if c.kind == "speedup":
                sp = speedups(self.of(c.b), self.of(c.a)) if self.of(c.b) and self.of(c.a) else {"why": "not run"}
                s = Stat.of(sp.get("per_seed", []))
                if "why" in sp:
                    result, why = "inconclusive", sp["why"]
                else:
                    result, why = verdict("at-least", s, None, threshold=c.threshold)
                    if sp["reached"] < len(self.of(c.a)):
                        why = (why + "; " if why else "") + f"{len(self.of(c.a)) - sp['reached']} run(s) never reached " \
                              "the target (their speedup is an upper bound)"
                measured = "—" if s.mean is None else f"{s.mean:.2f}x" + (f" ± {s.std:.2f}" if s.std is not None else "") + \
                    f" (n {s.n}) vs {c.threshold}x"
                a, b = s, None  # the judged numbers are the per-seed speedups
            elif c.b is None:
                result, why = verdict(c.kind, a, None, threshold=c.threshold)
                measured, b = f"{fmt(a)} (n {a.n}) vs {fmt(Stat(c.threshold, None, 1))}", None
            else:
                b = self.stat(c.b, c.metric)
                margin = ACC_MARGIN if c.metric in self.metrics else REL_MARGIN * abs(b.mean or 0.0)
                result, why = verdict(c.kind, a, b, margin)
                d = "" if a.mean is None or b.mean is None else f"; d = {_signed(a.mean - b.mean, fmt)}"
                measured = f"{fmt(a)} vs {fmt(b)} (n {a.n}/{b.n}){d}"
            versus = f"{c.a} vs {c.b}" if c.b else c.a
            rows.append([c.text, c.paper, versus, f"{c.metric}", measured, result, why])
            raw.append({"claim": c.text, "paper": c.paper, "a": c.a, "b": c.b or "", "kind": c.kind, "metric": c.metric,
                        **_raw("a", a), **(_raw("b", b) if b else {}), "verdict": result, "why": why})
        note = ("Verdicts follow the rule in `opd_bench/claims.py`: d = difference of seed means, u = 2 standard errors; "
                f"margin {100 * ACC_MARGIN:g} accuracy point (10% of the reference for variance and memory). "
                "A > B: reproduced if d - u > 0, not reproduced if d + u < margin; A ~ B: reproduced if |d| + u <= margin, "
                "not if |d| - u > margin; A >= B: reproduced if d - u >= -margin, not if d + u < -margin; fewer than "
                "2 seeds: inconclusive.")
        return Table("claims", "Claims: the papers' claims and what we measured",
                     ["claim", "paper", "compared", "metric", "measured (mean ± std)", "verdict", "why"], rows, raw, note,
                     align="p{4.5cm}llllll")


def _signed(d: float, fmt) -> str:
    text = fmt(Stat(abs(d), None, 1))  # the format of the compared values, sign in front
    return ("+" if d >= 0 else "-") + text


def tip_rule(run: Run) -> str:
    """TIP's rule in the paper's words, from the run's axes: all / entropy-50% / soft-or-50% / q3."""
    tokens, fraction = run.axes.get("tokens", "all"), _float(run.axes.get("fraction")) or 0.0
    return {"all": "all tokens", "q3": "q3"}.get(tokens, f"{tokens}-{100 * fraction:g}%")


# ----------------------------------------------------------------------------- the report folder


def _busy_seconds(runs: list[Run]) -> float | None:
    """Wall time with at least one of these runs in progress: the union of their intervals, so idle gaps
    (between separate suite invocations, or before a suite was continued) do not count."""
    spans = sorted(r.interval for r in runs if r.interval)
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > hi:  # nothing was running in between: close the interval
            busy, lo = busy + (hi - lo).total_seconds(), start
        hi = max(hi, end)
    return busy + (hi - lo).total_seconds()


def _duration(runs: list[Run]) -> str:
    busy = _busy_seconds(runs)
    if busy is None:
        return "unknown (no run has its wall time)"
    timed = [r for r in runs if r.interval]
    text = (f"{busy / 60:.1f} minutes with at least one run in progress, idle gaps between invocations left out "
            f"({sum(r.wall_s for r in timed) / 3600:.2f} hours of run processes in all")
    missing = len(runs) - len(timed)
    return text + (f"; {missing} rows without their wall time, not counted)" if missing else ")")


def _suite_lines(runs: list[Run]) -> list[str]:
    """Each suite command that produced these rows, with its run count and time (see _busy_seconds)."""
    lines = []
    for command in sorted({r.suite_command for r in runs if r.suite_command}):
        mine = [r for r in runs if r.suite_command == command]
        busy = _busy_seconds(mine)
        took = "" if busy is None else f", {busy / 60:.1f} min"
        lines.append(f"{command}  # {len(mine)} run{'s' * (len(mine) != 1)}{took}")
    return lines


def build(leaderboard: Path | str, out: Path | str, preset: str = "micro", budget: str | None = None,
          command: str = "") -> list[Path]:
    """Write the report folder; returns the files written, sorted."""
    from opd_bench.config import load_config

    cfg = load_config(preset)
    rows = sorted((r for r in read_rows(leaderboard) if r.get("preset") == preset), key=lambda r: r["run_id"])
    budgets = sorted({r.get("budget", "") for r in rows})
    if budget is None and budgets:  # the most common budget (ties: the first in sorted order)
        budget = max(budgets, key=lambda b: (sum(r.get("budget") == b for r in rows), -budgets.index(b)))
    rows = [r for r in rows if r.get("budget") == budget]
    # One world per report: the latest row's student (micro: `sft-student-<hash>`); older worlds are left out.
    latest = max(rows, key=lambda r: (r.get("time", ""), r["run_id"]), default={})
    world = [r for r in rows if r.get("student", "") == latest.get("student", "")]
    runs = [parse(r, cfg.train.lr, Path(leaderboard).parent) for r in world]
    # The shared rate: the preset's, unless no run used it (a suite run with --set train.lr=...): then the commonest.
    lrs = sorted(r.lr for r in runs if r.lr is not None)
    shared = cfg.train.lr if not lrs or any(math.isclose(x, cfg.train.lr, rel_tol=1e-9) for x in lrs) else \
        max(lrs, key=lambda x: (lrs.count(x), -x))
    rep = Report(runs, preset, budget or "", shared, cfg.world.kind, cfg.world.hf.student)
    rep.other_worlds = len(rows) - len(world)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in GENERATED:  # what an earlier report wrote and this one may not (a table without data now)
        for path in out.glob(name):
            path.unlink()
    tables = [rep.claims(), rep.main(), rep.cost(), *rep.ablations()] if rep.runs else []
    for t in tables:
        (out / f"{t.name}.md").write_text(f"## {t.title}\n\n{t.markdown()}\n{t.note}\n")
        (out / f"{t.name}.tex").write_text(t.latex())
        (out / f"{t.name}.csv").write_text(t.csv())
    from opd_bench.report_figures import figures as draw_figures

    figures = draw_figures(rep, out) if rep.runs else []
    (out / "README.md").write_text(_readme(rep, tables, figures, leaderboard, budgets, command))
    return sorted(p for p in out.iterdir() if p.is_file())


def _readme(rep: Report, tables: list[Table], figures, leaderboard, budgets, command: str) -> str:
    statuses = {}
    for r in rep.all:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    suites = _suite_lines(rep.all)
    lines = [f"# opd-bench report: preset `{rep.preset}`, budget {rep.budget or '—'}", "",
             f"Generated by `{command or 'opd-bench report'}` from `{leaderboard}` (do not edit by hand: "
             "the same leaderboard gives the same bytes).", "",
             f"- runs: {len(rep.all)} row{'s' * (len(rep.all) != 1)} of preset `{rep.preset}` at budget {rep.budget} "
             f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); "
             f"{len(rep.runs)} at the shared learning rate {rep.lr:g}"
             + (f"; other budgets in the file, not shown: {', '.join(b for b in budgets if b != rep.budget)}"
                if len(budgets) > 1 else "")
             + (f"; {rep.other_worlds} rows of an older world (another pi_sft) left out" if rep.other_worlds else ""),
             f"- charged device time: {sum(r.spent_s for r in rep.all) / 3600:.3g} device-hours; all recorded stages "
             f"(with evaluations): {sum(sum(r.stages.values()) for r in rep.all) / 3600:.3g} device-hours",
             f"- how long it took: {_duration(rep.all)}; per suite command under Commands",
             "- protocol: " + ", ".join(sorted({t for r in rep.all for t in r.scores})) +
             " (task@version; k and temperature per task are in leaderboard.csv)", "",
             "## Commands", "", "```"]
    lines += suites or ["# runs started one by one; each row's `command` column holds its exact command"]
    lines += [command or "opd-bench report", "```", ""]
    if not rep.runs:
        return "\n".join(lines + ["No runs of this preset and budget yet.", ""])
    for t in tables:
        lines += [f"## {t.title}", "", t.markdown(), t.note, "",
                  f"Files: [{t.name}.md]({t.name}.md), [{t.name}.tex]({t.name}.tex), [{t.name}.csv]({t.name}.csv)", ""]
    absent = [t for t in ("exopd-lambda", "vopd", "tip", "best-lr") if t not in {x.name for x in tables}]
    if absent:
        lines += [f"Not in this report (no runs of their arms, or no swept learning rate): {', '.join(absent)}.", ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{caption}]({name})\n\n*{caption}* ([{name}]({name}))\n" for name, caption in figures]
    return "\n".join(lines)
