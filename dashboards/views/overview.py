"""Overview: the generation table, lift per generation with CIs, steerability per generation."""

from __future__ import annotations

import streamlit as st

from dashboards import charts, data

run_dir = data.require_run()
st.title("Overview")
st.caption(f"Run `{run_dir}`")

try:
    generations = data.generations(run_dir)
except data.RunUnavailable as err:
    st.error(f"**{err.title}**")
    st.markdown(str(err))
    generations = None
    unreadable = True
else:
    unreadable = False

if generations is not None:
    table = data.generation_table(generations)
    st.markdown(
        f"Scenario **{generations.scenario}**, seed {generations.seed}: "
        f"{len(table)} generation(s), "
        f"{int((table['decision'] == 'ship').sum()) if len(table) else 0} shipped."
    )
    st.subheader("Generations")
    if table.empty:
        st.info("generations.json lists no generation yet.")
    else:
        # A static table: at most a few dozen rows, and its text stays in the page's DOM.
        st.table(data.generation_display(table).set_index("gen"))
        st.caption(
            "Offline figures on held-out prompts (RM win rate vs the parent, raw and "
            "style-controlled; steerability); lifts from the generation's A/B test."
        )

        st.subheader("Engagement lift per generation")
        lifts = data.lift_rows(table)
        if lifts.empty:
            st.info("No generation has reached an A/B test yet: no lift to show.")
        else:
            st.altair_chart(charts.lift_by_generation(lifts))
            st.caption(
                "Relative lift of the candidate over its parent with the 95% CI (delta method, "
                "CUPED-adjusted; flywheel.ab). Colour and shape: the generation's decision."
            )

        st.subheader("Steerability per generation")
        steer = data.steerability_rows(generations)
        if steer.empty:
            st.info("No offline steerability recorded in generations.json.")
        else:
            st.altair_chart(charts.steerability_by_generation(steer), width="stretch")
            st.caption(
                "Held-out steerability benchmark (rewards.steerability): solid = candidate, "
                "dashed = the deployed parent it was compared with."
            )

        st.subheader("Decisions")
        for gen in generations.records:
            with st.expander(
                f"Generation {gen.generation}: {gen.candidate} "
                f"({gen.recipe}) -> {gen.decision.upper()}"
            ):
                st.markdown(f"**Why:** {gen.reason}")
                gates = data.gates_table(gen)
                if gates.empty:
                    st.caption("No offline gates recorded.")
                else:
                    st.dataframe(gates, hide_index=True, width="stretch")
elif not unreadable:
    st.info(
        "No generations.json in this run: the generation loop has not finished a generation "
        "here (a run of `flywheel ab` writes none). Showing the experiments in the run store."
    )

st.subheader("Experiments in the run store")
experiments = data.experiments(run_dir)
if experiments.empty:
    st.info("The run store holds no experiment yet.")
else:
    rows = experiments[
        ["experiment_id", "control", "treatment", "design", "days_committed", "finished",
         "treatment_share", "user_fallback_share", "started_at"]
    ].copy()  # fmt: skip
    same = dict(zip(experiments["experiment_id"], experiments["same_policy"], strict=True))
    decisions = {}
    for experiment_id in data.ab_experiments(run_dir):
        if same[experiment_id]:
            # Production traffic (or an A/A test): one model in both arms, nothing to decide.
            decisions[experiment_id] = "A/A (same policy)"
        else:
            decisions[experiment_id] = data.ab_view(run_dir, experiment_id).result.get("decision")
    rows["A/B decision"] = rows["experiment_id"].map(decisions)
    st.dataframe(
        rows,
        hide_index=True,
        width="stretch",
        column_config={
            "user_fallback_share": st.column_config.NumberColumn(
                "user fallbacks",
                format="percent",
                help="Share of simulated users' messages that are a real human message put in "
                "because the user LLM's output was unusable (sim.user_llm).",
            )
        },
    )
    if generations is None:
        for experiment_id in data.ab_experiments(run_dir):
            st.markdown(f"**{experiment_id}**: logged steerability per arm and policy")
            st.dataframe(
                data.steerability_by_policy(run_dir, experiment_id),
                hide_index=True,
                width="stretch",
                column_config=data.RATE_COLUMNS,
            )
