"""The report's seaborn figures (PNG): accuracy vs charged device time with seed bands, the ExOPD lambda
sweep, TIP token-rule bars and vOPD gradient variance. Fixed PNG metadata, so the bytes depend on the data only."""

from __future__ import annotations

from pathlib import Path

from opd_bench.claims import mean_curve
from opd_bench.report import Report, metric, tip_rule
from opd_bench.suite import CORE


def figures(rep: Report, out: Path) -> list[tuple[str, str]]:
    """Seaborn figures as PNG (fixed metadata, so the bytes depend on the data only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    made = []

    def save(fig, name: str, caption: str):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        made.append((name, caption))

    # Accuracy vs charged device time, one line per core arm, band = std over seeds.
    core = [a for a in rep.arms if a in CORE and any(r.curve for r in rep.of(a))]
    if core:
        longest = max(p[1] for a in core for r in rep.of(a) for p in r.curve)
        unit, scale = ("device-hours", 3600) if longest >= 7200 else ("device-minutes", 60)
        data = []
        for arm in core:
            runs = [r for r in rep.of(arm) if r.curve]
            x_by_mark = {m: x for m, x, _ in mean_curve(runs)}  # seeds share the mean x, so the band is vertical
            data += [{"arm": arm, "x": x_by_mark[m] / scale, "acc": 100 * y} for r in runs for m, _, y in r.curve]
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        sns.lineplot(pd.DataFrame(data), x="x", y="acc", hue="arm", hue_order=core, errorbar="sd", marker="o", ax=ax)
        ax.set(xlabel=f"charged device time ({unit})", ylabel="accuracy, mean over tasks (%)",
               title=f"Accuracy vs cost ({rep.preset}, budget {rep.budget}; band: ± 1 std over seeds)")
        ax.legend(title="method", fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
        save(fig, "accuracy_vs_cost.png", "accuracy (curve evaluations) vs charged device time, per method")

    lams = [(float(r.axes.get("lam", "nan")), 100 * metric(r, "avg")) for a in rep.arms if a.startswith("exopd")
            for r in rep.of(a) if metric(r, "avg") is not None]
    if lams:
        fig, ax = plt.subplots(figsize=(7, 4))
        sns.lineplot(pd.DataFrame(lams, columns=["lam", "acc"]), x="lam", y="acc", errorbar="sd", err_style="bars",
                     marker="o", ax=ax, label="ExOPD")
        ref = rep.stat("standard-opd", "avg")
        if ref.mean is not None:
            ax.axhline(100 * ref.mean, color="gray", linestyle="--", label="standard-opd")
        ax.set(xlabel="reward extrapolation lambda (dimensionless)", ylabel="accuracy, mean over tasks (%)",
               title="ExOPD lambda sweep (± 1 std over seeds)")
        ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")  # outside: never over a whisker
        save(fig, "exopd_lambda.png", "ExOPD accuracy vs lambda, standard OPD dashed")

    tip_arms = [a for a in ["standard-opd"] + [a for a in rep.arms if a.startswith("tip")] if rep.of(a)]
    if len(tip_arms) > 1:
        data = [{"rule": tip_rule(rep.of(a)[0]), "acc": 100 * metric(r, "avg"),
                 "mem": r.diag.get("peak_mb"), "kept": 100 * r.diag.get("tokens_kept", 1.0)}
                for a in tip_arms for r in rep.of(a) if metric(r, "avg") is not None]
        df = pd.DataFrame(data)
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        for ax, (col, label) in zip(axes, [("kept", "tokens trained (%)"), ("acc", "accuracy, mean over tasks (%)"),
                                           ("mem", "peak memory (MB)")]):
            sns.barplot(df, x="rule", y=col, errorbar="sd", ax=ax, hue="rule", legend=False)
            ax.set(xlabel="token rule", ylabel=label)
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        fig.suptitle("TIP token selection (bars: mean, whiskers: ± 1 std over seeds)")
        save(fig, "tip_rules.png", "TIP: token fraction, accuracy and peak memory per rule")

    var_arms = [a for a in ["standard-opd"] + [a for a in rep.arms if a.startswith("vopd")] if rep.of(a)]
    data = [{"arm": a, "var": r.diag["grad_var"]} for a in var_arms for r in rep.of(a) if "grad_var" in r.diag]
    if data:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        sns.barplot(pd.DataFrame(data), x="arm", y="var", errorbar="sd", ax=ax, hue="arm", legend=False)
        ax.set(xlabel="method", ylabel="gradient variance, tr Cov (loss units²)")
        ax.set_title("Stochastic-gradient variance per step, mean over training\n(whiskers: ± 1 std over seeds)",
                     fontsize=11)
        save(fig, "vopd_variance.png", "gradient variance per step (mean over training) for OPD and vOPD")
    return made
