"""Conversations: browse transcripts with their signals, features and checker results."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards import data

run_dir = data.require_run()
st.title("Conversations")

experiments = list(data.experiments(run_dir).get("experiment_id", pd.Series(dtype=str)))
if not experiments:
    st.info("The run store holds no experiment yet, so there is no conversation to browse.")
    st.stop()
experiment_id = st.selectbox("Experiment", experiments, key="conv_experiment")
sessions = data.sessions(run_dir, experiment_id)
if sessions.empty:
    st.info("No session of this experiment has been committed yet.")
    st.stop()
sessions = sessions.assign(outcome=data.session_outcomes(sessions))

left, middle, right = st.columns(3)
arms = left.multiselect("Arm", sorted(sessions["arm"].unique()), key="conv_arm")
characters = middle.multiselect(
    "Character", sorted(sessions["character"].unique()), key="conv_character"
)
outcomes = right.multiselect("Outcome", list(data.OUTCOMES), key="conv_outcome")
liked_only = st.checkbox("Only sessions with a like", key="conv_liked")

shown = sessions
if arms:
    shown = shown[shown["arm"].isin(arms)]
if characters:
    shown = shown[shown["character"].isin(characters)]
if outcomes:
    shown = shown[shown["outcome"].isin(outcomes)]
if liked_only:
    shown = shown[shown["likes"] > 0]

st.caption(f"{len(shown)} of {len(sessions)} sessions")
st.dataframe(
    shown[
        [
            "session_id",
            "day",
            "period",
            "arm",
            "policy",
            "character",
            "user_id",
            "n_bot_turns",
            "likes",
            "outcome",
        ]
    ],
    hide_index=True,
    width="stretch",
)
if shown.empty:
    st.info("No session matches these filters.")
    st.stop()

labels = {
    row.session_id: f"{row.session_id} · day {row.day} · {row.character} · {row.arm} · {row.outcome}"
    for row in shown.itertuples(index=False)
}
session_id = st.selectbox("Transcript", list(labels), format_func=labels.get, key="conv_session")
session = shown.set_index("session_id").loc[session_id]
logged = data.turns(run_dir, experiment_id)
transcript = logged[logged["session_id"] == session_id].sort_values("turn_index")

st.markdown(
    f"**{session['character']}** with user `{session['user_id']}`, served by "
    f"`{session['policy']}` ({session['arm']} arm, {session['period']} period); "
    f"ended: {session['outcome']}."
)
for turn in transcript.itertuples(index=False):
    with st.chat_message("user"):
        st.write(turn.user_message)
    with st.chat_message("assistant"):
        st.write(turn.bot_reply)
        signals = [
            ":material/thumb_up: liked" if turn.liked else "",
            ":material/flag: reported" if turn.reported else "",
            "continued" if turn.continued else "user left",
            "follows every instruction" if turn.follows_all else "misses an instruction",
            ":material/warning: violates a prohibition" if turn.violates_any else "",
            ":material/dangerous: unsafe" if turn.unsafe else "",
            f"gold satisfaction {turn.gold_satisfaction:+.2f} (oracle)",
        ]
        st.caption(" · ".join(s for s in signals if s))
        with st.expander("features and checks"):
            checks = pd.DataFrame(
                {"check": list(turn.checks), "passed": list(turn.checks.values())}
            )
            features = pd.DataFrame(
                {"feature": list(turn.features), "value": list(turn.features.values())}
            )
            a, b = st.columns(2)
            a.dataframe(checks, hide_index=True, width="stretch")
            b.dataframe(features, hide_index=True, width="stretch")
