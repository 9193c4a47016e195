"""Write an A/B analysis to disk: ``result.json``, ``report.md`` and PNG plots.

``write_report(result, table, out_dir)`` is what both ``flywheel ab`` (a simulated run) and
``flywheel analyze`` (a logged table) call. A twin experiment's ``PairedResult`` gets its
twin estimates first, each beside the standard design's CI, then the standard view's report
(what production would have seen of the same users); its daily curves are the standard view's. Plots are drawn on matplotlib ``Figure`` objects
with the Agg canvas, never through pyplot's global state, so this works headless and in
threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from flywheel.ab import AAResult, ABResult, MetricResult
from flywheel.ab.analysis import margin_label
from flywheel.ab.paired import PairedResult, standard_view
from flywheel.metrics import daily_curves

DAILY_PANELS = (
    ("breadth", "breadth (share of users active)"),
    ("depth", "depth (messages per active user-day)"),
    ("report_rate", "report rate (per bot reply)"),
    ("violation_rate", "violation rate (per bot reply)"),
    ("unsafe_rate", "unsafe rate (per bot reply)"),
    ("active_users", "active users"),
)
ARM_COLORS = {"control": "#4C72B0", "treatment": "#DD8452"}


def plot_daily(curves: pd.DataFrame, path: Path) -> Path:
    """Daily curves per arm (pre-period shaded) from :func:`flywheel.metrics.daily_curves`."""
    curves = curves.assign(active_users=curves["breadth"] * curves["users"])
    pre = curves["period"] == "pre"
    # Pre-period days end at -1 on the x axis whatever their numbering in the table.
    x = curves["day"].where(~pre, curves["day"] - curves.loc[pre, "day"].max() - 1)
    curves = curves.assign(x=x)
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    for ax, (column, title) in zip(axes, DAILY_PANELS, strict=True):
        for arm, rows in curves.groupby("arm"):
            ax.plot(rows["x"], rows[column], marker="o", ms=3, label=arm, color=ARM_COLORS[arm])
        if pre.any():
            ax.axvspan(curves.loc[pre, "x"].min() - 0.5, -0.5, color="0.9", zorder=0)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[3:]:
        ax.set_xlabel("day (shaded: pre-period)")
    axes[0].legend()
    fig.savefig(path, dpi=110)
    return path


def _color(m: MetricResult) -> str:
    if not m.significant:
        return "0.45"
    return "#2a9d4b" if m.improved else "#c0392b"


def plot_lift(result: ABResult | PairedResult, path: Path) -> Path:
    """Relative lift per metric with its 95% CI, margins dashed. In grey: the estimate
    without CUPED, or for twins the standard design's (CUPED) estimate of the same run."""
    metrics = [m for m in result.metrics if math.isfinite(m.lift)]
    twins = isinstance(result, PairedResult)
    fig = Figure(figsize=(8, 1 + 0.6 * max(len(metrics), 1)), layout="constrained")
    ax = fig.subplots()
    for row, m in enumerate(reversed(metrics)):
        s = result.standard[m.name] if twins else m
        grey = (s.lift, s.ci_low, s.ci_high) if twins else (
            m.lift_unadjusted, m.ci_low_unadjusted, m.ci_high_unadjusted
        )  # fmt: skip
        ax.errorbar(
            grey[0] * 100,
            row - 0.18,
            color="0.7",
            fmt="s",
            ms=4,
            capsize=3,
            xerr=[[(grey[0] - grey[1]) * 100], [(grey[2] - grey[0]) * 100]],
        )
        ax.errorbar(
            m.lift * 100,
            row + 0.05,
            color=_color(m),
            fmt="o",
            capsize=4,
            lw=2,
            xerr=[[(m.lift - m.ci_low) * 100], [(m.ci_high - m.lift) * 100]],
        )
        # an absolute margin has no place on the relative axis: the table gives it
        if m.noninferiority_scale == "relative" and m.noninferiority_margin is not None:
            ax.plot([m.noninferiority_margin * 100] * 2, [row - 0.35, row + 0.35], "k--", lw=1)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(metrics)), [m.name for m in reversed(metrics)])
    grey = "standard design" if twins else "without CUPED"
    ax.set_xlabel(f"relative lift, % (95% CI; grey: {grey}; dashed: guardrail margin)")
    ax.set_title(f"decision: {result.decision}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if value is not None and math.isfinite(value) else "n/a"


def markdown(result: ABResult, aa: AAResult | None = None, title: str = "A/B test") -> str:
    """The Markdown report: decision, metric table, SRM, plots, A/A calibration, method."""
    lines = [
        f"# {title}",
        "",
        f"**Decision: {result.decision.upper()}**: {result.reason}",
        "",
        f"{result.n_users} users, {result.n_test_days} test days, {result.n_pre_days} "
        f"pre-period days; alpha {result.alpha}, {result.correction} correction per family, "
        f"CUPED {'on' if result.cuped else 'off'}.",
        "",
        "| metric | role | control | treatment | lift | 95% CI | p | p adj. | CUPED var. red. "
        "| MDE | margin | non-inferior |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for m in result.metrics:
        margin = (
            ""
            if m.noninferiority_margin is None or m.noninferiority_scale is None
            else margin_label(m.noninferiority_margin, m.noninferiority_scale)
        )
        noninferior = {None: "", True: "yes", False: "no"}[m.noninferior]
        lines.append(
            f"| {m.name} | {m.role} | {_fmt(m.control, '.4g')} | {_fmt(m.treatment, '.4g')} "
            f"| {_fmt(m.lift, '+.2%')} | [{_fmt(m.ci_low, '+.2%')}, {_fmt(m.ci_high, '+.2%')}] "
            f"| {_fmt(m.p_value, '.3g')} | {_fmt(m.p_value_adjusted, '.3g')} "
            f"| {_fmt(m.cuped_variance_reduction, '.0%')} | {_fmt(m.mde, '.2%')} | {margin} "
            f"| {noninferior} |"
        )
    srm = result.srm
    lines += [
        "",
        f"Sample ratio: {srm.n_control} control / {srm.n_treatment} treatment users, designed "
        f"treatment share {srm.expected_treatment_share:.1%}, chi-square p = {srm.p_value:.3g}"
        + (" **(mismatch)**" if srm.flagged else " (no mismatch)"),
        "",
        "![daily curves per arm](daily.png)",
        "",
        "![lift with 95% CIs](lift.png)",
        "",
    ]
    if aa is not None:
        lines += [
            "## A/A calibration",
            "",
            f"{aa.n_replicates} re-randomisations of the logged users (seed {aa.seed}), "
            f"alpha {aa.alpha}: false-positive rate should be near {aa.alpha} and p-values "
            "uniform (Kolmogorov-Smirnov).",
            "",
            "| metric | false-positive rate | 95% CI | KS p | calibrated |",
            "|---|---:|---|---:|---|",
        ]
        for m in aa.metrics:
            lines.append(
                f"| {m.name} | {_fmt(m.false_positive_rate, '.3f')} | "
                f"[{_fmt(m.fpr_ci_low, '.3f')}, {_fmt(m.fpr_ci_high, '.3f')}] | "
                f"{_fmt(m.ks_p_value, '.3g')} | {'yes' if m.calibrated else 'no'} |"
            )
        lines.append("")
    lines += [
        "## Method",
        "",
        "Relative lift of the treatment over control with a delta-method 95% CI. p-values: "
        "Welch's t-test for per-user means (breadth, retention), a delta-method z-test for "
        "ratio metrics (depth, guardrail rates per bot reply). CUPED uses each metric's "
        "pre-period value, with theta estimated on both arms pooled. p-values are corrected "
        "within the success metrics and within the guardrails. A guardrail is non-inferior "
        "when its CI upper bound is below its margin: of the relative lift, or, for a margin "
        "in percentage points (pp), of treatment - control. MDE: relative effect detectable with "
        "80% power at this sample. See `flywheel/ab/` for the formulas.",
        "",
    ]
    return "\n".join(lines)


def twin_markdown(result: PairedResult) -> str:
    """The twin section: paired estimates beside the standard design's CIs, and the cost."""
    lines = [
        f"**Twin decision: {result.decision.upper()}**: {result.reason}",
        "",
        f"{result.n_users} users each lived the {result.n_test_days} test days twice, once "
        f"per arm, on common random numbers. The twin design spent {result.cost_twin:.0f} "
        f"{result.cost_unit}, the standard view of the same run {result.cost_standard:.0f}.",
        "",
        "| metric | role | control | treatment | ATE | lift | twin 95% CI | standard 95% CI "
        "| p adj. | variance ratio |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for m in result.metrics:
        s = result.standard[m.name]
        lines.append(
            f"| {m.name} | {m.role} | {_fmt(m.control, '.4g')} | {_fmt(m.treatment, '.4g')} "
            f"| {_fmt(m.ate, '+.3g')} | {_fmt(m.lift, '+.2%')} "
            f"| [{_fmt(m.ci_low, '+.2%')}, {_fmt(m.ci_high, '+.2%')}] "
            f"| [{_fmt(s.ci_low, '+.2%')}, {_fmt(s.ci_high, '+.2%')}] "
            f"| {_fmt(m.p_value_adjusted, '.3g')} | {_fmt(m.variance_ratio, '.2f')} |"
        )
    lines += [
        "",
        "Variance ratio: the standard design's lift variance over the twin design's at equal "
        "generated tokens (above 1: twins buy the same precision with fewer tokens). See "
        "`flywheel/ab/paired.py`.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    result: ABResult | PairedResult,
    table: pd.DataFrame,
    out_dir: str | Path,
    *,
    aa: AAResult | None = None,
    title: str = "A/B test",
) -> dict[str, Path]:
    """Write result.json, report.md, daily.png, lift.png (and aa.json) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    twins = isinstance(result, PairedResult)
    standard = result.standard if twins else result
    paths = {
        "result": out / "result.json",
        "report": out / "report.md",
        "daily": plot_daily(daily_curves(standard_view(table)), out / "daily.png"),
        "lift": plot_lift(result, out / "lift.png"),
    }
    paths["result"].write_text(result.to_json() + "\n")
    if aa is not None:
        paths["aa"] = out / "aa.json"
        paths["aa"].write_text(aa.to_json() + "\n")
    report = markdown(standard, aa, title)
    if twins:  # the twin section goes first, under the title; the standard view follows
        head, rest = report.split("\n", 1)
        report = f"{head}\n\n{twin_markdown(result)}\n## Standard view\n{rest}"
    paths["report"].write_text(report)
    return paths
