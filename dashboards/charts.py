"""Altair charts of the dashboard pages; each takes a table from ``dashboards.data``.

Conventions: lifts are relative and shown in percent with their 95% CI as an error bar;
decisions have one colour everywhere (ship green, hold red, inconclusive amber, gated
grey); arms have the colours of ``flywheel.ab_report``'s PNG plots.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from dashboards.data import ALWAYS_VALID_LABEL, NAIVE_LABEL, STANDARD_LABEL, TWIN_LABEL
from flywheel.ab_report import ARM_COLORS

DECISION_COLORS = {
    "ship": "#2a9d4b",
    "hold": "#c0392b",
    "inconclusive": "#e3a21a",
    "gated": "#8c8c8c",
}
DECISION_SCALE = alt.Scale(domain=list(DECISION_COLORS), range=list(DECISION_COLORS.values()))
ARM_SCALE = alt.Scale(domain=list(ARM_COLORS), range=list(ARM_COLORS.values()))
STEERABILITY_SCALE = alt.Scale(
    domain=["instruction_following", "violation_rate"],
    range=[DECISION_COLORS["ship"], DECISION_COLORS["hold"]],
)
METRIC_TITLES = {
    "breadth": "breadth (share of users active per day)",
    "depth": "depth (messages per active user-day)",
    "report_rate": "report rate (per bot reply)",
    "violation_rate": "violation rate (per bot reply)",
    "unsafe_rate": "unsafe rate (per bot reply)",
    "instruction_following": "instruction following",
}


def _percent(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    out = frame.copy()
    for column in columns:
        out[f"{column}_pct"] = out[column] * 100
    return out


def lift_by_generation(lifts: pd.DataFrame) -> alt.FacetChart:
    """Breadth and depth lift per generation with 95% CIs, coloured by the decision."""
    frame = _percent(lifts, ("lift", "ci_low", "ci_high"))
    base = alt.Chart(frame).encode(
        x=alt.X("generation:O", title="generation", axis=alt.Axis(labelAngle=0)),
        color=alt.Color("decision:N", scale=DECISION_SCALE, title="decision"),
        tooltip=[
            "generation:O",
            "candidate:N",
            "metric:N",
            "decision:N",
            alt.Tooltip("lift_pct:Q", format="+.2f", title="lift %"),
            alt.Tooltip("ci_low_pct:Q", format="+.2f", title="CI low %"),
            alt.Tooltip("ci_high_pct:Q", format="+.2f", title="CI high %"),
        ],
    )
    bars = base.mark_rule(strokeWidth=2).encode(
        y=alt.Y("ci_low_pct:Q", title="relative lift, % (95% CI)"), y2="ci_high_pct:Q"
    )
    points = base.mark_point(filled=True, size=90).encode(
        y="lift_pct:Q", shape=alt.Shape("decision:N", title="decision")
    )
    zero = alt.Chart(frame).mark_rule(color="black", strokeDash=[4, 3]).encode(y=alt.datum(0))
    return (
        alt.layer(zero, bars, points)
        .properties(width=320, height=260)
        .facet(column=alt.Column("metric:N", title=None))
    )


def steerability_by_generation(rows: pd.DataFrame) -> alt.Chart:
    """Instruction-following and violation rate per generation, candidate vs its parent."""
    return (
        alt.Chart(rows)
        .mark_line(point=True)
        .encode(
            x=alt.X("generation:O", title="generation", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title="share of replies", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("metric:N", scale=STEERABILITY_SCALE, title="metric"),
            strokeDash=alt.StrokeDash("model:N", title="model"),
            tooltip=["generation:O", "metric:N", "model:N", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(height=260)
    )


def metric_lifts(metrics: pd.DataFrame, grey: str = "without CUPED") -> alt.LayerChart:
    """Every metric's lift with its 95% CI: CUPED (coloured) and unadjusted (grey), with
    the guardrails' non-inferiority margins as black ticks. ``grey`` names what the grey
    intervals (the ``*_unadjusted`` columns) are in the axis title."""
    frame = _percent(
        metrics,
        ("lift", "ci_low", "ci_high", "lift_unadjusted", "ci_low_unadjusted", "ci_high_unadjusted"),
    )
    frame["verdict"] = [
        "no significant change" if not sig else ("better" if good else "worse")
        for sig, good in zip(frame["significant"], _improved(frame), strict=True)
    ]
    # an absolute margin (percentage points) has no place on the relative axis
    relative = frame["noninferiority_scale"] == "relative"
    frame["margin_pct"] = frame["noninferiority_margin"].astype(float).where(relative) * 100
    y = alt.Y("metric:N", title=None, sort=list(frame["metric"]))
    verdicts = alt.Scale(
        domain=["better", "worse", "no significant change"],
        range=[DECISION_COLORS["ship"], DECISION_COLORS["hold"], "#555555"],
    )
    adjusted = alt.Chart(frame).encode(y=y)
    raw = adjusted.mark_rule(color="#bbbbbb", strokeWidth=6, opacity=0.6).encode(
        x=alt.X("ci_low_unadjusted_pct:Q"), x2="ci_high_unadjusted_pct:Q"
    )
    cuped_ci = adjusted.mark_rule(strokeWidth=2).encode(
        x=alt.X("ci_low_pct:Q", title=f"relative lift, % (95% CI; grey: {grey})"),
        x2="ci_high_pct:Q",
        color=alt.Color("verdict:N", scale=verdicts, title="verdict"),
    )
    point = adjusted.mark_point(filled=True, size=80).encode(
        x="lift_pct:Q",
        color=alt.Color("verdict:N", scale=verdicts),
        tooltip=[
            "metric:N",
            "role:N",
            "verdict:N",
            alt.Tooltip("lift_pct:Q", format="+.2f", title="lift %"),
            alt.Tooltip("ci_low_pct:Q", format="+.2f", title="CI low %"),
            alt.Tooltip("ci_high_pct:Q", format="+.2f", title="CI high %"),
            alt.Tooltip("p_value_adjusted:Q", format=".3g", title="adjusted p"),
        ],
    )
    margin = (
        alt.Chart(frame.dropna(subset=["margin_pct"]))
        .mark_tick(color="black", thickness=2, size=18)
        .encode(y=y, x="margin_pct:Q", tooltip=[alt.Tooltip("margin_pct:Q", title="margin %")])
    )
    zero = alt.Chart(frame).mark_rule(color="black", strokeDash=[4, 3]).encode(x=alt.datum(0))
    return alt.layer(zero, raw, cuped_ci, point, margin).properties(height=40 * len(frame) + 40)


def _improved(frame: pd.DataFrame) -> list[bool]:
    # The same rule as flywheel.ab.MetricResult.improved, on the recorded fields.
    return [
        (t > c) == bool(h)
        for t, c, h in zip(
            frame["treatment"], frame["control"], frame["higher_is_better"], strict=True
        )
    ]


def cuped_effect(metrics: pd.DataFrame) -> alt.Chart:
    """Share of each metric's lift variance that CUPED removed."""
    frame = metrics.assign(reduction_pct=metrics["cuped_variance_reduction"].astype(float) * 100)
    return (
        alt.Chart(frame.dropna(subset=["reduction_pct"]))
        .mark_bar()
        .encode(
            x=alt.X("reduction_pct:Q", title="variance removed by CUPED, %"),
            y=alt.Y("metric:N", title=None, sort=list(frame["metric"])),
            tooltip=["metric:N", alt.Tooltip("reduction_pct:Q", format=".1f")],
        )
        .properties(height=30 * len(frame) + 30)
    )


def daily_curve(curves: pd.DataFrame, metric: str) -> alt.LayerChart:
    """One metric per arm and day; day 0 is the first test day, pre-period days negative."""
    line = (
        alt.Chart(curves)
        .mark_line(point=True)
        .encode(
            x=alt.X(
                "day:Q",
                title="day (0 = first test day; negative: pre-period)",
                axis=alt.Axis(tickMinStep=1),
            ),
            y=alt.Y(f"{metric}:Q", title=METRIC_TITLES.get(metric, metric)),
            color=alt.Color("arm:N", scale=ARM_SCALE, title="arm"),
            tooltip=["arm:N", "day:Q", "period:N", alt.Tooltip(f"{metric}:Q", format=".4g")],
        )
    )
    start = (
        alt.Chart(curves).mark_rule(color="#999999", strokeDash=[2, 2]).encode(x=alt.datum(-0.5))
    )
    return alt.layer(start, line).properties(height=280)


def proxy_gold_scatter(frame: pd.DataFrame, color: str) -> alt.LayerChart:
    """Reward-model score (proxy) against gold utility (oracle), with a least-squares line."""
    points = (
        alt.Chart(frame)
        .mark_circle(size=45, opacity=0.6)
        .encode(
            x=alt.X("proxy:Q", title="reward model score (proxy)"),
            y=alt.Y("gold:Q", title="gold utility (oracle)"),
            color=alt.Color(f"{color}:N"),
            tooltip=[
                alt.Tooltip("proxy:Q", format=".3f"),
                alt.Tooltip("gold:Q", format=".3f"),
                f"{color}:N",
            ],
        )
    )
    fit = (
        alt.Chart(frame)
        .transform_regression("proxy", "gold")
        .mark_line(color="black", strokeDash=[5, 3])
        .encode(x="proxy:Q", y="gold:Q")
    )
    return alt.layer(points, fit).properties(height=340)


def style_correlation_bars(rows: pd.DataFrame, band: float = 0.1) -> alt.LayerChart:
    """Pearson r of each reward model's score with each style feature (a dot per model);
    the grey band is |r| <= ``band``, the target of style control."""
    y = alt.Y("feature:N", title=None)
    dots = (
        alt.Chart(rows)
        .mark_point(filled=True, size=110, opacity=0.85)
        .encode(
            x=alt.X(
                "pearson_r:Q",
                title="Pearson r (reward vs style feature)",
                scale=alt.Scale(domain=[-1, 1]),
            ),
            y=y,
            color=alt.Color("model:N", title="reward model"),
            shape=alt.Shape("model:N", title="reward model"),
            tooltip=["model:N", "feature:N", alt.Tooltip("pearson_r:Q", format="+.3f"), "n:Q"],
        )
    )
    shade = (
        alt.Chart(pd.DataFrame({"low": [-band], "high": [band]}))
        .mark_rect(color="#dddddd", opacity=0.6)
        .encode(x="low:Q", x2="high:Q")
    )
    zero = alt.Chart(rows).mark_rule(color="black", strokeDash=[4, 3]).encode(x=alt.datum(0))
    return alt.layer(shade, zero, dots).properties(height=max(120, 45 * rows["feature"].nunique()))


def bon_curve(table: pd.DataFrame) -> alt.LayerChart:
    """Best-of-n: proxy and gold gain over n = 1 against sqrt(KL), with +-1 s.e."""
    rows = []
    for column, label in (("proxy", "proxy reward (reward model)"), ("gold", "gold utility")):
        part = table[["n", "sqrt_kl"]].copy()
        part["curve"] = label
        part["gain"] = table[f"{column}_gain"]
        part["low"] = table[f"{column}_gain_low"]
        part["high"] = table[f"{column}_gain_high"]
        rows.append(part)
    frame = pd.concat(rows, ignore_index=True)
    curves = alt.Scale(
        domain=["proxy reward (reward model)", "gold utility"], range=["#DD8452", "#4C72B0"]
    )
    base = alt.Chart(frame).encode(
        x=alt.X("sqrt_kl:Q", title="sqrt(KL) = sqrt(log n - (n-1)/n)"),
        color=alt.Color("curve:N", scale=curves, title=None),
    )
    line = base.mark_line(point=True).encode(
        y=alt.Y("gain:Q", title="gain over n = 1 (sd of n = 1 samples)"),
        tooltip=["curve:N", "n:Q", alt.Tooltip("gain:Q", format="+.3f")],
    )
    errors = base.mark_rule().encode(y="low:Q", y2="high:Q")
    return alt.layer(errors, line).properties(height=320)


def style_histogram(frame: pd.DataFrame, column: str, group: str) -> alt.Chart:
    """Distribution of a style feature per group, each group's bars summing to 1."""
    return (
        alt.Chart(frame.dropna(subset=[column]))
        .transform_joinaggregate(total="count()", groupby=[group])
        .transform_bin(["bin_start", "bin_end"], field=column, bin=alt.Bin(maxbins=20))
        .transform_aggregate(
            count="count()", total="max(total)", groupby=["bin_start", "bin_end", group]
        )
        .transform_calculate(share="datum.count / datum.total")
        .mark_bar(opacity=0.55)
        .encode(
            x=alt.X("bin_start:Q", title=column, bin="binned"),
            x2="bin_end:Q",
            y=alt.Y("share:Q", title="share of replies", stack=None),
            color=alt.Color(
                f"{group}:N", title=group, scale=ARM_SCALE if group == "arm" else alt.Undefined
            ),
            tooltip=[f"{group}:N", alt.Tooltip("share:Q", format=".2f")],
        )
        .properties(height=260)
    )


def style_comparison(rows: pd.DataFrame) -> alt.FacetChart:
    """Candidate vs parent on each style statistic, side by side, one scale per statistic."""
    models = alt.Scale(domain=["candidate", "parent"], range=["#DD8452", "#4C72B0"])
    return (
        alt.Chart(rows)
        .mark_bar()
        .encode(
            x=alt.X("model:N", title=None, axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title=None, axis=alt.Axis(format="~g")),
            color=alt.Color("model:N", scale=models, title=None),
            tooltip=["statistic:N", "model:N", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=160, height=220)
        .facet(column=alt.Column("statistic:N", title=None))
        .resolve_scale(y="independent")
    )


DESIGN_COLORS = {TWIN_LABEL: "#2a6f97", STANDARD_LABEL: "#9a9a9a"}
DESIGN_SCALE = alt.Scale(domain=list(DESIGN_COLORS), range=list(DESIGN_COLORS.values()))


def twin_vs_standard(rows: pd.DataFrame) -> alt.LayerChart:
    """Every metric's lift with its 95% CI in both designs of one twin run, one above the
    other: the twin (paired) estimate and the standard design's (each user in one arm)."""
    frame = _percent(rows, ("lift", "ci_low", "ci_high"))
    y = alt.Y("metric:N", title=None, sort=list(dict.fromkeys(frame["metric"])))
    base = alt.Chart(frame).encode(
        y=y,
        yOffset=alt.YOffset("design:N", sort=list(DESIGN_COLORS)),
        color=alt.Color("design:N", scale=DESIGN_SCALE, title="design"),
    )
    ci = base.mark_rule(strokeWidth=4).encode(
        x=alt.X("ci_low_pct:Q", title="relative lift, % (95% CI)"), x2="ci_high_pct:Q"
    )
    point = base.mark_point(filled=True, size=70, color="black").encode(
        x="lift_pct:Q",
        tooltip=[
            "metric:N",
            "design:N",
            alt.Tooltip("lift_pct:Q", format="+.2f", title="lift %"),
            alt.Tooltip("ci_low_pct:Q", format="+.2f", title="CI low %"),
            alt.Tooltip("ci_high_pct:Q", format="+.2f", title="CI high %"),
            alt.Tooltip("variance_ratio:Q", format=".2f", title="variance ratio"),
        ],
    )
    zero = alt.Chart(frame).mark_rule(color="black", strokeDash=[4, 3]).encode(x=alt.datum(0))
    return alt.layer(zero, ci, point).properties(height=56 * frame["metric"].nunique() + 40)


INTERVAL_COLORS = {ALWAYS_VALID_LABEL: "#2a6f97", NAIVE_LABEL: "#bbbbbb"}
INTERVAL_SCALE = alt.Scale(domain=list(INTERVAL_COLORS), range=list(INTERVAL_COLORS.values()))
LOOK_OFFSET = 0.12  # days: the two intervals of a look sit side by side around it
# The y axis of the sequential chart reaches this many naive-CI extents beyond the naive
# CIs: an always-valid CI of an early look with little information can be orders of
# magnitude wider, and would flatten every other interval to a dot.
AXIS_MARGIN = 2.0


def sequential_cis(looks: pd.DataFrame, metric: str, stopped_at: int | None) -> alt.LayerChart:
    """One metric's lift at every daily look with two intervals: the always-valid CI (valid
    at every look at once) and the naive fixed-horizon CI (valid for one planned look); a
    dashed line marks the look where the test would have stopped early. Intervals reaching
    beyond ``AXIS_MARGIN`` naive extents from the naive CIs are cut at the axis' edge."""
    rows = looks[looks["metric"] == metric]
    frame = pd.concat(
        [
            rows.assign(interval=label, low=rows[f"{prefix}_low"], high=rows[f"{prefix}_high"])
            .assign(x=rows["day"] + offset)
            .loc[:, ["day", "x", "interval", "lift", "low", "high", "decision"]]
            for prefix, label, offset in (
                ("cs", ALWAYS_VALID_LABEL, -LOOK_OFFSET),
                ("naive", NAIVE_LABEL, LOOK_OFFSET),
            )
        ],
        ignore_index=True,
    )
    frame = _percent(frame, ("lift", "low", "high"))
    x = alt.X(
        "x:Q",
        title="look: test days 0..day",
        axis=alt.Axis(tickMinStep=1, format="d"),
        scale=alt.Scale(padding=20),
    )
    base = alt.Chart(frame).encode(
        x=x, color=alt.Color("interval:N", scale=INTERVAL_SCALE, title=None)
    )
    intervals = base.mark_rule(strokeWidth=4, clip=True).encode(
        y=alt.Y("low_pct:Q", title=f"{metric}: relative lift, %", scale=_naive_scale(frame)),
        y2="high_pct:Q",
    )
    point = base.mark_point(filled=True, size=60, color="black", clip=True).encode(
        y="lift_pct:Q",
        tooltip=[
            "day:Q",
            "interval:N",
            "decision:N",
            alt.Tooltip("lift_pct:Q", format="+.2f", title="lift %"),
            alt.Tooltip("low_pct:Q", format="+.2f", title="low %"),
            alt.Tooltip("high_pct:Q", format="+.2f", title="high %"),
        ],
    )
    zero = alt.Chart(frame).mark_rule(color="black", strokeDash=[4, 3]).encode(y=alt.datum(0))
    layers = [zero, intervals, point]
    if stopped_at is not None:
        stop = pd.DataFrame({"x": [stopped_at], "label": [f"early stop (day {stopped_at})"]})
        rule = alt.Chart(stop).mark_rule(color=DECISION_COLORS["hold"], strokeDash=[6, 3])
        layers.append(rule.encode(x="x:Q", tooltip=["label:N"]))
    return alt.layer(*layers).properties(height=300)


def _naive_scale(frame: pd.DataFrame) -> alt.Scale:
    """A y scale around the naive CIs and the lifts (``AXIS_MARGIN`` extents either side, and
    0), or Altair's own when no naive CI is finite."""
    naive = frame.loc[frame["interval"] == NAIVE_LABEL, ["low_pct", "high_pct", "lift_pct"]]
    values = naive.to_numpy(dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return alt.Scale(zero=True)
    low, high = min(values.min(), 0.0), max(values.max(), 0.0)
    margin = AXIS_MARGIN * max(high - low, 1e-9)
    return alt.Scale(domain=[low - margin, high + margin], nice=False)
