"""Simulated-user fidelity: the run's simulated users against held-out human chat.

The card is ``flywheel.fidelity.fidelity_card`` (the same lines ``flywheel fidelity RUN_DIR``
prints and writes); this page only shows it and never writes ``fidelity.json``.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboards import data
from flywheel.fidelity import FidelityCard, fidelity_card

ALL = "every experiment (pooled)"


@st.cache_data(show_spinner="Comparing the simulated users with held-out human chat ...")
def card_of(source: str, version: str, experiment: str | None) -> FidelityCard:
    """The card of one run version (recomputed when the run's files change)."""
    return fidelity_card(source, experiment_id=experiment)


def qq_chart(card: FidelityCard) -> alt.LayerChart:
    """Simulated against human message-word quantiles, with the line of equal distributions."""
    qq = card.to_dict()["qq"]
    points = pd.DataFrame(
        {"human": qq["human"], "simulated": qq["simulated"], "quantile": qq["probabilities"]}
    )
    top = float(max(points["human"].max(), points["simulated"].max()))
    scatter = (
        alt.Chart(points)
        .mark_circle(size=40)
        .encode(
            x=alt.X("human:Q", title="held-out human message words"),
            y=alt.Y("simulated:Q", title="simulated user message words"),
            tooltip=["quantile", "human", "simulated"],
        )
    )
    diagonal = (
        alt.Chart(pd.DataFrame({"human": [0.0, top], "simulated": [0.0, top]}))
        .mark_line(strokeDash=[4, 4], color="grey")
        .encode(x="human:Q", y="simulated:Q")
    )
    return scatter + diagonal


run_dir = data.require_run()
st.title("Simulated-user fidelity")
st.markdown(
    "How close the simulated users come to people: their messages and sessions against the "
    "held-out split of `chitchat-dataset` (human chat the simulation never drew from), and "
    "their like / continue / return rates against what the run's own response model implies "
    "(the scenarios set no per-segment rate targets). `flywheel fidelity RUN_DIR` writes the "
    "same card to `fidelity.json` and `fidelity.md`."
)
experiments = list(data.experiments(run_dir).get("experiment_id", pd.Series(dtype=str)))
if not experiments:
    st.info("The run store holds no experiment yet, so there are no simulated users to measure.")
    st.stop()
choice = st.selectbox("Experiment", [ALL, *experiments], key="fidelity_experiment")
source = str(data.snapshot_of(run_dir) or run_dir)
try:
    card = card_of(source, data.run_version(run_dir), None if choice == ALL else choice)
except ValueError as err:
    st.error("**No fidelity card for this choice**", icon=":material/block:")
    st.markdown(str(err))
    st.stop()

missed = card.misses
if missed:
    st.error(
        f"**{len(missed)} of {len(card.lines)} lines missed their target**: "
        + ", ".join(line.name for line in missed)
    )
else:
    st.success(f"**All {len(card.lines)} lines met their target**")
table = pd.DataFrame([line.to_dict() for line in card.lines])
st.dataframe(table, hide_index=True, width="stretch")
goodbye = "n/a" if card.goodbye_share is None else f"{card.goodbye_share:.1%}"
st.caption(
    f"Sessions the user LLM closed with a goodbye: {goodbye} (held-out human conversations "
    f"ending with one: {card.human_goodbye_share:.1%})."
)
st.markdown("#### Message words, quantile against quantile")
if len(card.sim_words):
    st.altair_chart(qq_chart(card), width="stretch")
else:
    st.info("The user LLM wrote no message in this run (every session ended at the opener).")
if card.assistant_speak_examples:
    st.markdown("#### Messages that sound like an assistant")
    for text in card.assistant_speak_examples:
        st.markdown(f"> {text}")
