"""Style artifacts: each generation's length / emoji / question profile against its parent,
the style-artifact regression suite's verdicts, and the logged distributions per arm."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards import charts, data
from flywheel.records import gate_verdict

STATISTICS = ("mean_words", "emoji_rate", "question_rate")
FEATURES = {"words": "words per reply", "emoji": "emoji per reply"}
VERDICT_BOX = {"pass": st.success, "fail": st.error}  # inconclusive: a warning

run_dir = data.require_run()
st.title("Style artifacts")
st.caption(
    "Are we learning to spam emoji? A candidate that wins by getting longer, adding emoji or "
    "asking more questions is winning on style, not content."
)

try:
    generations = data.generations(run_dir)
except data.RunUnavailable as err:
    st.error(f"**{err.title}**")
    st.markdown(str(err))
    generations = None

st.subheader("Candidate vs parent, per generation")
if generations is None or not generations.records:
    st.info("No generations recorded (generations.json): no offline style comparison to show.")
else:
    by_number = {g.generation: g for g in generations.records}
    number = st.selectbox(
        "Generation",
        list(by_number),
        format_func=lambda n: f"{n}: {by_number[n].candidate} vs {by_number[n].parent}",
        key="style_generation",
    )
    gen = by_number[number]
    offline = gen.offline
    style, parent = offline.get("style") or {}, offline.get("parent_style") or {}
    rows = [
        {"statistic": s, "model": who, "value": values[s]}
        for who, values in (("candidate", style), ("parent", parent))
        for s in STATISTICS
        if isinstance(values.get(s), int | float)
    ]
    if rows:
        st.altair_chart(charts.style_comparison(pd.DataFrame(rows)))
    else:
        st.info("This generation recorded no offline style profile.")
    suite = [g for g in gen.gates if "style" in g["name"]]
    if not suite:
        st.info("No style-artifact regression verdict recorded for this generation.")
    for gate in suite:
        verdict = gate_verdict(gate)
        VERDICT_BOX.get(verdict, st.warning)(
            f"**{gate.get('name')}: {verdict.upper()}**: {gate.get('reason', '')}"
        )
        checks = gate.get("checks")
        if isinstance(checks, dict) and checks:
            st.dataframe(pd.DataFrame(checks.values()), hide_index=True, width="stretch")
    win = (offline.get("rm_win_rate"), offline.get("rm_win_rate_style_controlled"))
    if all(isinstance(v, int | float) for v in win):
        left, right = st.columns(2)
        left.metric("RM win rate (raw)", f"{win[0]:.2f}")
        right.metric(
            "RM win rate (style-controlled)", f"{win[1]:.2f}", f"{win[1] - win[0]:+.2f} vs raw"
        )

st.subheader("Logged replies per arm")
experiments = data.ab_experiments(run_dir)
if not experiments:
    st.info("No experiment with a test day yet: no logged replies to compare.")
    st.stop()
experiment_id = st.selectbox("Experiment", experiments, key="style_experiment")
logged = data.turns(run_dir, experiment_id)
if logged.empty:
    st.info("This experiment has no logged replies.")
    st.stop()
frame = data.style_frame(logged)
test = frame[frame["period"] == "test"]
st.dataframe(data.style_profiles(run_dir, experiment_id), hide_index=True, width="stretch")
feature = st.radio(
    "Feature", list(FEATURES), format_func=FEATURES.get, horizontal=True, key="style_feature"
)
st.altair_chart(charts.style_histogram(test, feature, "arm"), width="stretch")
st.caption(
    "Test-period replies; each arm's bars sum to 1. Profiles by "
    "flywheel.style_regression.style_profile."
)
