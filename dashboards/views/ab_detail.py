"""A/B detail: daily curves per arm, lift with CIs per metric, CUPED, SRM, guardrails.

A twin experiment shows its paired estimates here; SRM, CUPED and the daily curves are its
standard view's (each user in their hash-assigned arm), and the Twins vs standard page sets
both designs' CIs side by side.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboards import charts, data
from flywheel.ab.analysis import margin_label, on_scale
from flywheel.store import fallback_text

DAILY_METRICS = ("breadth", "depth", "report_rate", "violation_rate", "unsafe_rate")
DECISION_BOX = {"ship": st.success, "hold": st.error}

run_dir = data.require_run()
st.title("A/B detail")

experiments = data.ab_experiments(run_dir)
if not experiments:
    st.info(
        "No experiment in this run has a committed test day yet, so there is no A/B test to "
        "show. Days appear here as the traffic model commits them."
    )
    st.stop()
stored = data.experiments(run_dir).set_index("experiment_id")
# A/B tests first: production-traffic experiments serve one model in both arms.
experiments = sorted(experiments, key=lambda e: (bool(stored.loc[e, "same_policy"]), e))
experiment_id = st.selectbox(
    "Experiment",
    experiments,
    format_func=lambda e: (
        f"{e} (A/A: same policy in both arms)" if stored.loc[e, "same_policy"] else e
    ),
    key="ab_experiment",
)
arms = stored.loc[experiment_id]
if arms["control"] is not None:
    st.caption(f"control: `{arms['control']}` · treatment: `{arms['treatment']}`")
if arms["same_policy"]:
    st.info(
        "Both arms were served by the same policy (production traffic or an A/A test): any "
        "significant lift here is a false positive, about alpha of the time."
    )
view = data.ab_view(run_dir, experiment_id)
result = view.result
metrics = view.metrics
twins = view.design == data.TWINS
try:
    standard = view.standard
except ValueError as err:
    st.error("**Twin analysis without its standard view**", icon=":material/block:")
    st.markdown(str(err))
    st.stop()

decision = str(result.get("decision", "?"))
DECISION_BOX.get(decision, st.warning)(
    f"**Decision: {decision.upper()}**: {result.get('reason', '')}"
)
if twins:
    st.info(
        "**Twin experiment**: every user lived the test days twice, once per arm, on common "
        "random numbers. The lifts below are the paired (twin) estimates, the simulator's "
        "truth about this population; the Twins vs standard page shows them beside the "
        "standard design's, what production would see."
    )
adjustment = (
    "paired analysis (no CUPED: both lives share the pre-period)"
    if twins
    else f"CUPED {'on' if standard.get('cuped') else 'off'}"
)
st.caption(
    f"{result.get('n_users')} users, {result.get('n_test_days')} test days, "
    f"{result.get('n_pre_days')} pre-period days; alpha {result.get('alpha')}, "
    f"{result.get('correction')} correction per metric family, {adjustment}. "
    f"Result {view.source}."
)
fallbacks = data.user_fallbacks(run_dir, experiment_id)
if len(fallbacks):
    st.caption(
        f"Simulated-user fallbacks: {fallback_text(fallbacks.iloc[0])} were a real human "
        "message put in because the user LLM's output was unusable (sim.user_llm)."
    )

st.subheader("Sample ratio")
srm = standard.get("srm") or {}
srm_p = standard.get("srm_p_value")
srm_text = (
    f"{srm.get('n_control')} control / {srm.get('n_treatment')} treatment users; designed "
    f"treatment share {srm.get('expected_treatment_share', float('nan')):.1%}; chi-square "
    f"p = {float('nan') if srm_p is None else srm_p:.3g}"
)
if srm.get("flagged"):
    st.error(f"**Sample ratio mismatch**: {srm_text}. Find the assignment or logging bug first.")
elif twins:
    st.success(
        "The twin design has no sample ratio to check: every user lived both arms. Its "
        f"standard view's hash assignment shows no mismatch: {srm_text}."
    )
else:
    st.success(f"No sample ratio mismatch: {srm_text}.")

st.subheader("Lift per metric")
st.altair_chart(charts.metric_lifts(*view.lift_chart()), width="stretch")
st.dataframe(
    metrics[
        [
            "metric",
            "role",
            "control",
            "treatment",
            "lift",
            "ci_low",
            "ci_high",
            "p_value",
            "p_value_adjusted",
            "significant",
            "cuped_variance_reduction",
            "mde",
        ]
    ],
    hide_index=True,
    width="stretch",
    column_config={
        **{
            c: st.column_config.NumberColumn(c, format="percent")
            for c in ("lift", "ci_low", "ci_high", "cuped_variance_reduction", "mde")
        },
        "control": st.column_config.NumberColumn(format="%.4g"),
        "treatment": st.column_config.NumberColumn(format="%.4g"),
        "p_value": st.column_config.NumberColumn("p", format="%.3g"),
        "p_value_adjusted": st.column_config.NumberColumn("p adj.", format="%.3g"),
    },
)

st.subheader("CUPED" + (" (standard view)" if twins else ""))
cuped_metrics = view.standard_metrics
left, right = st.columns(2)
with left:
    st.altair_chart(charts.cuped_effect(cuped_metrics), width="stretch")
with right:
    cuped = cuped_metrics[
        [
            "metric",
            "lift_unadjusted",
            "ci_low_unadjusted",
            "ci_high_unadjusted",
            "lift",
            "ci_low",
            "ci_high",
            "cuped_theta",
        ]
    ]
    st.dataframe(
        cuped,
        hide_index=True,
        width="stretch",
        column_config={
            c: st.column_config.NumberColumn(c, format="percent")
            for c in cuped.columns
            if c not in ("metric", "cuped_theta")
        },
    )
    st.caption(
        "CUPED adjusts each metric with its own pre-period value (theta pooled over both "
        "arms); the narrower CI is the variance it removed."
        + (
            " The paired twin estimate needs none: both lives of a user share the "
            "pre-period, so an adjustment would cancel in their difference."
            if twins
            else ""
        )
    )

st.subheader("Guardrails")
guardrails = metrics[metrics["role"] == "guardrail"]
if guardrails.empty:
    st.info("This analysis has no guardrail metrics.")
else:
    columns = st.columns(len(guardrails))
    for column, row in zip(columns, guardrails.itertuples(index=False), strict=True):
        measured = row.lift is not None and np.isfinite(row.lift)
        verdict = "non-inferior" if row.noninferior else "NOT shown non-inferior"
        column.metric(
            row.metric,
            f"{row.treatment:.4f}",
            f"{row.lift:+.1%} vs control" if measured else None,
            delta_color="inverse",
            help=f"control {row.control:.4f}; "
            + (
                f"CI up to {on_scale(row.noninferiority_bound, row.noninferiority_scale)}; "
                if np.isfinite(row.noninferiority_bound)
                else "no events in either arm; "
            )
            + f"margin {margin_label(row.noninferiority_margin, row.noninferiority_scale)}",
        )
        (column.success if row.noninferior else column.error)(verdict)

st.subheader("Daily curves per arm")
curves = data.daily(run_dir, experiment_id)
metric = st.selectbox(
    "Metric", DAILY_METRICS, format_func=lambda m: charts.METRIC_TITLES.get(m, m), key="ab_daily"
)
st.altair_chart(charts.daily_curve(curves, metric), width="stretch")
st.caption(
    "flywheel.metrics.daily_curves; the dashed line separates pre-period and test."
    + (
        " Twin experiment: its standard view, each user in their hash-assigned arm."
        if twins
        else ""
    )
)

st.subheader("Logged steerability per arm")
st.dataframe(data.steerability_by_policy(run_dir, experiment_id), hide_index=True, width="stretch")
