"""The report's seaborn figures (PNG), one per entry of the suite spec's `figures`: `curve` (accuracy vs charged
device time, band = std over seeds), `param` (a metric vs one param of the arms, a reference arm dashed) and
`bars` (one panel per column, whiskers = std over seeds). Fixed PNG metadata: the bytes depend on the data only."""

from __future__ import annotations

import textwrap
from pathlib import Path

from opd_bench.claims import mean_curve
from opd_bench.suite import arm


def figures(rep, out: Path) -> list[tuple[str, str]]:
    """`rep`: a report.Report (passed in, so this module does not import report.py, which calls it)."""
    metric = rep.metric
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    made = []
    for name, f in rep.spec.get("figures", {}).items():
        arms = rep.core if f["arms"] == "core" else [arm(a) for a in f["arms"]]
        groups = [(rep.name(a), rep.of(a)) for a in arms if rep.of(a)]
        fig = None
        if f["kind"] == "curve" and any(r.curve for _, runs in groups for r in runs):
            groups = [(label, [r for r in runs if r.curve]) for label, runs in groups if any(r.curve for r in runs)]
            longest = max(p[1] for _, runs in groups for r in runs for p in r.curve)
            unit, scale = ("device-hours", 3600) if longest >= 7200 else ("device-minutes", 60)
            data = []
            for label, runs in groups:
                x_by_mark = {m: x for m, x, _ in mean_curve([r.curve for r in runs])}  # seeds share the mean x
                data += [{"arm": label, "x": x_by_mark[m] / scale, "acc": 100 * y} for r in runs for m, _, y in r.curve]
            fig, ax = plt.subplots(figsize=(8.5, 4.5))
            sns.lineplot(pd.DataFrame(data), x="x", y="acc", hue="arm", hue_order=[g for g, _ in groups], errorbar="sd",
                         marker="o", ax=ax)
            ax.set(xlabel=f"charged device time ({unit})", ylabel="accuracy, mean over tasks (%)",
                   title=f"Accuracy vs cost ({rep.preset}, budget {rep.budget}; band: ± 1 std over seeds)")
            ax.legend(title="method", fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
        y = f.get("metric", "avg")
        data = [(r.params[f["param"]], 100 * metric(r, y)) for _, runs in groups for r in runs
                if metric(r, y) is not None and r.params.get(f.get("param")) is not None]
        if f["kind"] == "param" and data:
            fig, ax = plt.subplots(figsize=(7, 4))
            sns.lineplot(pd.DataFrame(data, columns=["x", "acc"]), x="x", y="acc", errorbar="sd", err_style="bars",
                         marker="o", ax=ax, label=groups[0][1][0].method)
            ref = rep.stat(rep.of(f["reference"]), y) if f.get("reference") else None
            if ref and ref.mean is not None:
                ax.axhline(100 * ref.mean, color="gray", linestyle="--", label=rep.name(f["reference"]))
            ax.set(xlabel=f.get("xlabel", f["param"]), ylabel="accuracy, mean over tasks (%)", title=f.get("title", ""))
            ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")  # outside: never over a whisker
        cols = [c for c in f.get("columns", [])
                if any(metric(r, c["metric"]) is not None for _, runs in groups for r in runs)]
        if f["kind"] == "bars" and len(groups) > 1 and cols:
            scale = {c["metric"]: 1 if c.get("format") == "sci" else 100 for c in cols}
            df = pd.DataFrame([{"arm": label, **{c["metric"]: None if metric(r, c["metric"]) is None else
                                                 scale[c["metric"]] * metric(r, c["metric"]) for c in cols}}
                               for label, runs in groups for r in runs])
            fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols) + 2.3, 4.4), squeeze=False)
            for ax, c in zip(axes[0], cols):
                sns.barplot(df, x="arm", y=c["metric"], errorbar="sd", ax=ax, hue="arm", legend=False)
                ax.set(xlabel="", ylabel=c["label"])
                ax.tick_params(axis="x", labelrotation=30, labelsize=7)
            fig.suptitle(textwrap.fill(f.get("title", ""), int(10 * fig.get_figwidth())), fontsize=11)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110, metadata={"Software": None})
            plt.close(fig)
            made.append((name, f.get("caption", name)))
    return made
