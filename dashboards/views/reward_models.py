"""Reward models: held-out evaluation, proxy vs gold, style correlations, best-of-n curve."""

from __future__ import annotations

import streamlit as st

from dashboards import charts, data

run_dir = data.require_run()
st.title("Reward models")

st.subheader("Held-out evaluation")
evals = data.rm_evals(run_dir)
if not evals:
    st.info(
        "No reward-model evaluation recorded for this run (`flywheel rm train RUN_DIR` writes "
        "rm_eval.json next to each model)."
    )
else:
    st.dataframe(
        data.rm_eval_table(evals),
        hide_index=True,
        width="stretch",
        column_config={
            c: st.column_config.NumberColumn(format="%.3f")
            for c in (
                "pairwise_accuracy",
                "auc",
                "gold_pearson_r",
                "gold_spearman_rho",
                "max_abs_style_r",
            )
        },
    )
    st.caption("flywheel.rm_eval on held-out users: gold correlation = proxy vs oracle.")
    correlations = data.style_correlation_rows(evals)
    if not correlations.dropna(subset=["pearson_r"]).empty:
        st.subheader("Style correlations")
        st.altair_chart(
            charts.style_correlation_bars(correlations.dropna(subset=["pearson_r"])),
            width="stretch",
        )
        flat = sorted(
            set(correlations["feature"]) - set(correlations.dropna(subset=["pearson_r"])["feature"])
        )
        st.caption(
            "Correlation of each model's reward with reply length, emoji, questions and "
            "exclamations on held-out replies; grey band: |r| <= 0.1, what style control aims "
            "for."
            + (
                f" Not shown (no variance in the held-out replies): {', '.join(flat)}."
                if flat
                else ""
            )
        )

st.subheader("Proxy vs gold")
sweeps = data.bon_sweeps(run_dir)
models = data.reward_models(run_dir)
source = st.radio(
    "Replies",
    ["best-of-n samples", "logged replies"],
    horizontal=True,
    key="rm_source",
    help="Best-of-n samples were scored when the sweep ran; logged replies are scored here "
    "with the model you pick.",
)
if source == "best-of-n samples":
    scored = {p: data.bon_candidates(run_dir, p) for p in sweeps}
    scored = {p: frame for p, frame in scored.items() if frame is not None}
    if not scored:
        st.info("No best-of-n samples with proxy and gold scores recorded for this run.")
    else:
        path = st.selectbox("Sweep", list(scored), key="rm_scatter_sweep")
        st.altair_chart(charts.proxy_gold_scatter(scored[path], color="character"), width="stretch")
elif not models:
    st.info("No saved reward model in this run to score logged replies with.")
else:
    experiments = data.ab_experiments(run_dir) or list(data.experiments(run_dir)["experiment_id"])
    left, middle, right = st.columns(3)
    folder = left.selectbox("Reward model", list(models), key="rm_model")
    experiment_id = middle.selectbox("Logged replies of", experiments, key="rm_experiment")
    size = right.slider("Replies to score", 20, 1000, 200, step=20, key="rm_sample")
    if st.button("Score", key="rm_score"):
        st.session_state["rm_scored"] = (folder, experiment_id, size)
    if st.session_state.get("rm_scored") == (folder, experiment_id, size):
        frame, gold, styles = data.proxy_vs_gold(run_dir, folder, experiment_id, size)
        a, b, c = st.columns(3)
        a.metric("Pearson r (proxy, gold)", f"{gold['pearson_r']:.3f}")
        b.metric("Spearman rho", f"{gold['spearman_rho']:.3f}")
        c.metric("replies", gold["n"])
        st.altair_chart(charts.proxy_gold_scatter(frame, color="arm"), width="stretch")
        st.dataframe(styles, hide_index=True, width="stretch")
    else:
        st.caption("Scoring loads the model and embeds the replies: press Score.")

st.subheader("Best-of-n over-optimisation")
if not sweeps:
    st.info(
        "No best-of-n sweep recorded for this run (`flywheel bon RUN_DIR --rm MODEL` records one)."
    )
else:
    path = st.selectbox("Sweep", list(sweeps), key="rm_bon_sweep")
    sweep = sweeps[path]
    table = data.bon_table(sweep)
    st.altair_chart(charts.bon_curve(table), width="stretch")
    st.caption(
        f"{sweep.get('n_contexts', '?')} contexts, reward model {sweep.get('rm', '?')}, policy "
        f"{sweep.get('policy', '?')}. Gao et al. (2022): the proxy keeps rising with n while "
        "the gold utility rises less or falls."
    )
    st.dataframe(
        table[["n", "kl", "proxy", "proxy_se", "gold", "gold_se"]] if "kl" in table else table,
        hide_index=True,
        width="stretch",
    )
