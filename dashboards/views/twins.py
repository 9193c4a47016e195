"""Twins vs standard: a counterfactual-twin experiment read in both designs, per metric.

The twin (paired) estimate compares every user with their own twin: the simulator's truth
about this population. The standard estimate reads the same run as production would, each
user in their hash-assigned arm only (``flywheel.ab.paired.standard_view``).
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboards import charts, data

DECISION_BOX = {"ship": st.success, "hold": st.error}


def decision_box(analysis: dict) -> None:
    """An analysis' decision and reason, coloured by the decision."""
    decision = str(analysis.get("decision", "?"))
    DECISION_BOX.get(decision, st.warning)(f"**{decision.upper()}**: {analysis.get('reason', '')}")


SHOWN_RATIOS = data.SUCCESS_METRICS  # variance ratios shown as big numbers
# Both CIs and the ratios first; widths, ATE and p-values after.
COLUMN_ORDER = [
    "metric",
    "role",
    *(f"{d}_{f}" for d in ("twin", "standard") for f in ("lift", "ci_low", "ci_high")),
    "variance_ratio",
    "width_ratio",
    *(f"{d}_width" for d in ("twin", "standard")),
    *("ate", "ate_ci_low", "ate_ci_high", "twin_p_adjusted", "standard_p_adjusted"),
]

run_dir = data.require_run()
st.title("Twins vs standard")

twin_ids = data.twin_experiments(run_dir)
if not twin_ids:
    st.info(
        "**No twin experiment in this run.** A twin experiment lives every user's test days "
        "twice, once per arm: run one with `flywheel ab SCENARIO --design twins --out "
        'RUN_DIR`, or give a scenario `[traffic] design = "twins"`.'
    )
    st.stop()
experiment_id = st.selectbox("Twin experiment", twin_ids, key="twin_experiment")
arms = data.experiments(run_dir).set_index("experiment_id").loc[experiment_id]
if arms["control"] is not None:
    st.caption(f"control: `{arms['control']}` · treatment: `{arms['treatment']}`")
view = data.ab_view(run_dir, experiment_id)
try:
    comparison = data.twin_comparison(view)
    standard = view.standard
except ValueError as err:
    st.error("**No twin analysis to compare**", icon=":material/block:")
    st.markdown(str(err))
    st.stop()
result = view.result


twin_side, standard_side = st.columns(2)
with twin_side:
    st.markdown(f"#### {data.TWIN_LABEL}")
    decision_box(result)
    st.markdown(
        "**The simulator's truth about this population.** Every user lived the test days "
        "under both policies, on the same random numbers; the difference between a user's "
        "two lives is the treatment's effect on that user. The CI is about the average "
        "effect on these users, free of the between-user noise a split pays for. No "
        "production test can measure this."
    )
with standard_side:
    st.markdown(f"#### {data.STANDARD_LABEL}")
    decision_box(standard)
    st.markdown(
        "**What production would see.** The same run read as a live A/B test: each user "
        "only in the arm their hash assigned, "
        f"CUPED {'on' if standard.get('cuped') else 'off'}. Its CI is what a real test of "
        "this size could claim about the treatment."
    )
st.caption(
    f"{result.get('n_users')} users, {result.get('n_test_days')} test days, "
    f"{result.get('n_pre_days')} pre-period days; alpha {result.get('alpha')}. The twin "
    f"design spent {result.get('cost_twin', float('nan')):,.0f} {result.get('cost_unit', '')}, "
    f"its standard view {result.get('cost_standard', float('nan')):,.0f}. Result {view.source}."
)

st.subheader("Lift per metric, both designs")
st.altair_chart(charts.twin_vs_standard(data.twin_ci_rows(comparison)), width="stretch")
no_lift = sorted(comparison.loc[~np.isfinite(comparison["twin_lift"]), "metric"])
if no_lift:
    st.caption(
        f"No relative lift for {', '.join(no_lift)}: the control value is 0 (or both are), so "
        "only the absolute effect (ATE column) says how far treatment moved it."
    )
percent = ("lift", "ci_low", "ci_high", "width")
st.dataframe(
    comparison,
    hide_index=True,
    width="stretch",
    column_order=COLUMN_ORDER,
    column_config={
        **{
            f"{design}_{field}": st.column_config.NumberColumn(
                f"{design} {field.replace('_', ' ')}", format="percent"
            )
            for design in ("twin", "standard")
            for field in percent
        },
        "width_ratio": st.column_config.NumberColumn("CI width ratio", format="%.2f"),
        "variance_ratio": st.column_config.NumberColumn("variance ratio", format="%.2f"),
        "ate": st.column_config.NumberColumn("ATE", format="%.4g"),
        "ate_ci_low": st.column_config.NumberColumn("ATE CI low", format="%.4g"),
        "ate_ci_high": st.column_config.NumberColumn("ATE CI high", format="%.4g"),
        "twin_p_adjusted": st.column_config.NumberColumn("twin p adj.", format="%.3g"),
        "standard_p_adjusted": st.column_config.NumberColumn("standard p adj.", format="%.3g"),
    },
)

st.subheader("Variance ratio")
shown = comparison.set_index("metric")
columns = st.columns(len(SHOWN_RATIOS))
for column, metric in zip(columns, SHOWN_RATIOS, strict=True):
    ratio = shown.loc[metric, "variance_ratio"] if metric in shown.index else np.nan
    column.metric(
        f"{metric}: variance ratio",
        f"{ratio:.2f}" if np.isfinite(ratio) else "n/a",
        help=f"CI width ratio in this run: {shown.loc[metric, 'width_ratio']:.2f}"
        if metric in shown.index
        else None,
    )
st.markdown(
    "The **variance ratio** is the standard design's lift variance over the twin design's "
    "at equal generated tokens (`flywheel.ab.paired`): above 1, twins buy the same precision "
    "with fewer tokens. The **CI width ratio** compares the two CIs of this run as run, "
    "where the twin design generated tokens for both lives of every test user-day."
)
