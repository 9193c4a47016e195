"""Sequential: daily looks at a test, always-valid CIs beside the naive ones, the early stop.

``flywheel.ab.sequential_monitor`` gives each look (test days 0..k) a confidence sequence
that covers the true lift at every look at once, so a test may stop at the first look that
excludes 0. The naive fixed-horizon CI of each look is valid for one planned look only:
peeking at it daily inflates the false-positive rate.
"""

from __future__ import annotations

import streamlit as st

from dashboards import charts, data

DECISION_BOX = {"ship": st.success, "hold": st.error}
DESIGN_LABELS = {data.TWINS: data.TWIN_LABEL, data.STANDARD: data.STANDARD_LABEL}

run_dir = data.require_run()
st.title("Sequential monitoring")

experiments = data.ab_experiments(run_dir)
if not experiments:
    st.info(
        "No experiment in this run has a committed test day yet, so there is no look to "
        "show. Days appear here as the traffic model commits them."
    )
    st.stop()
stored = data.experiments(run_dir).set_index("experiment_id")
experiment_id = st.selectbox(
    "Experiment",
    experiments,
    format_func=lambda e: f"{e} (twins)" if stored.loc[e, "design"] == data.TWINS else e,
    key="seq_experiment",
)
design = data.STANDARD
if stored.loc[experiment_id, "design"] == data.TWINS:
    design = st.radio(
        "Design",
        [data.TWINS, data.STANDARD],
        format_func=DESIGN_LABELS.get,
        horizontal=True,
        key="seq_design",
        help="A twin experiment can be monitored paired, or as production would see it.",
    )
try:
    view = data.sequential_view(run_dir, experiment_id, design)
except ValueError as err:
    st.error("**This experiment cannot be monitored**", icon=":material/block:")
    st.markdown(f"`flywheel.ab.sequential_monitor` refused its user-day table: {err}")
    st.stop()

last_day = int(view.looks["day"].max())
if view.stopped_at is not None:
    DECISION_BOX[view.decision](
        f"**Early stop at day {view.stopped_at}: {view.decision.upper()}**: {view.reason}"
    )
else:
    st.info(f"**No early stop** by day {last_day}: {view.reason}")
st.caption(
    f"{DESIGN_LABELS[view.design]}; {last_day + 1} daily looks of a {view.horizon_days}-day "
    f"test (the horizon where the always-valid CI is tightest); {1 - view.alpha:.0%} "
    "intervals; p-values corrected per metric family at each look."
)
ahead = view.naive_ahead()
if ahead:
    st.warning(
        "**Peeking**: the naive fixed-horizon CI, read every day, excluded 0 before the "
        "always-valid CI did: "
        + "; ".join(
            f"{m} at day {naive} (always-valid: {'never' if valid is None else f'day {valid}'})"
            for m, (naive, valid) in ahead.items()
        )
        + ". Each naive look risks a false positive of its own; the always-valid CI pays "
        "for all looks at once."
    )

names = list(dict.fromkeys(view.looks["metric"]))
metric = st.selectbox(
    "Metric", names, format_func=lambda m: charts.METRIC_TITLES.get(m, m), key="seq_metric"
)
st.altair_chart(charts.sequential_cis(view.looks, metric, view.stopped_at), width="stretch")
st.caption(
    "Each look: the always-valid CI (left) and the naive fixed-horizon CI (right), both "
    "around the same lift. An interval running off the chart is cut at its edge; the table "
    "holds every value."
)
percent = ("lift", "cs_low", "cs_high", "naive_low", "naive_high")
st.dataframe(
    view.looks,
    hide_index=True,
    width="stretch",
    column_config={
        **{
            c: st.column_config.NumberColumn(
                c.replace("cs_", "always-valid ").replace("_", " "), format="percent"
            )
            for c in percent
        },
        "p_value": st.column_config.NumberColumn("always-valid p", format="%.3g"),
        "p_value_adjusted": st.column_config.NumberColumn("always-valid p adj.", format="%.3g"),
        "naive_p_value": st.column_config.NumberColumn("naive p", format="%.3g"),
    },
)
if len(view.srm):
    st.subheader("Sequential sample-ratio check")
    st.dataframe(view.srm, hide_index=True, width="stretch")
    st.caption(
        "Users assigned by each look and the always-valid SRM p-value (a mixture Bayes "
        "factor): a mismatch found at any look stops the reading of the test."
    )
