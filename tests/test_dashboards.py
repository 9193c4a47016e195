"""Every dashboard page under Streamlit's AppTest, on the recorded run and on broken runs.

The recorded run (``tests/fixtures/dashboard_run``, copied into a fresh folder per test) is
what ``flywheel run`` wrote for a two-generation tiny scenario, plus a ``flywheel bon``
sweep and a ``flywheel ab --design twins`` experiment (``ab``): re-record it with ``python -m tests.fixtures.record_dashboard_run``. Expected figures
are read from the recording's own files or recomputed here with the packages, never typed
in, so the tests hold for whatever the loop decided when it was recorded.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from dashboard_replay import replay_run

from dashboards import APP_PATH
from flywheel.store import RunStore, fallback_text

TWIN_EXPERIMENT = "ab"  # the recording's `flywheel ab --design twins` run (record_dashboard_run)

PAGES = {
    "Overview": "views/overview.py",
    "A/B detail": "views/ab_detail.py",
    "Twins vs standard": "views/twins.py",
    "Sequential monitoring": "views/sequential.py",
    "Reward models": "views/reward_models.py",
    "Style artifacts": "views/style_artifacts.py",
    "Conversations": "views/conversations.py",
    "Simulated-user fidelity": "views/fidelity.py",
}
TIMEOUT_S = 180  # a cold page imports statsmodels and friends on a busy 2-core machine


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return replay_run(tmp_path_factory.mktemp("recorded") / "run")


@pytest.fixture(scope="module")
def generations(run_dir: Path) -> dict:
    return json.loads((run_dir / "generations.json").read_text())


def open_page(run_dir: Path | str, page: str = "Overview") -> AppTest:
    """Run the app on ``run_dir`` and show ``page``; fail on any exception in the page."""
    app = AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT_S)
    app.session_state["run_dir"] = str(run_dir)
    app.run()
    if page != "Overview":
        app.switch_page(PAGES[page])
        app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert [t.value for t in app.title] == [page]
    return app


def texts(app: AppTest) -> str:
    """Every message, markdown and caption on the page, joined (for ``in`` checks)."""
    parts = [
        e.value
        for kind in ("markdown", "caption", "info", "error", "success", "warning")
        for e in app.get(kind)
    ]
    return "\n".join(str(p) for p in parts)


def charts(app: AppTest) -> list:
    return app.get("vega_lite_chart")


# ---------------------------------------------------------------------------- the recorded run
def test_overview_shows_the_generation_table(run_dir: Path, generations: dict) -> None:
    app = open_page(run_dir)
    table = app.table[0].value
    recorded = generations["generations"]
    assert list(table["candidate"]) == [g["candidate"] for g in recorded]
    assert list(table["decision"]) == [g["decision"].upper() for g in recorded]
    for (_, row), gen in zip(table.iterrows(), recorded, strict=True):
        breadth = (gen["ab"] or {}).get("metrics", {}).get("breadth")
        assert row["breadth lift [95% CI]"] == (
            "n/a"
            if breadth is None
            else (f"{breadth['lift']:+.1%} [{breadth['ci_low']:+.1%}, {breadth['ci_high']:+.1%}]")
        )
        assert row["violations"] == f"{gen['offline']['violation_rate']:.3f}"
        gold = (gen.get("oracle") or {}).get("gold")
        assert row["gold vs parent (oracle)"] == (
            "n/a"
            if gold is None
            else f"{gold['diff']:+.2f} [{gold['ci_low']:+.2f}, {gold['ci_high']:+.2f}]"
        )
        not_passed = [g["name"] for g in gen["gates"] if verdict_of(g) != "pass"]
        assert [n.split(" (")[0] for n in filter(None, row["failed gates"].split(", "))] == (
            not_passed
        )
    assert any(g["ab"] for g in recorded), "re-record: no generation reached an A/B test"
    assert all(g["ab"] is None for g in recorded if g["decision"] == "gated")
    # lift with CIs and steerability, plus the expander per generation with its gates
    assert len(charts(app)) == 2
    assert len(app.expander) == len(recorded)
    assert all(g["reason"] in texts(app) for g in recorded)


def verdict_of(gate: dict) -> str:
    """The gate's recorded verdict (records without one: pass / fail from ``passed``)."""
    return gate.get("verdict") or ("pass" if gate["passed"] else "fail")


def test_overview_shows_every_recorded_gate(run_dir: Path, generations: dict) -> None:
    """Each generation's expander lists its gates as the loop recorded them: name, verdict,
    value and threshold, every other scalar field (power, sample sizes ...), the reason."""
    app = open_page(run_dir)
    tables = [d.value for d in app.dataframe if "verdict" in d.value.columns]
    recorded = generations["generations"]
    assert len(tables) == len(recorded)
    for table, gen in zip(tables, recorded, strict=True):
        gates = gen["gates"]
        assert list(table["name"]) == [g["name"] for g in gates]
        assert list(table["verdict"]) == [verdict_of(g) for g in gates]
        assert list(table["reason"]) == [g["reason"] for g in gates]
        for column in set(table.columns) - {"name", "verdict", "reason"}:
            shown = [None if pd.isna(v) else v for v in table[column]]
            assert shown == pytest.approx([g.get(column) for g in gates], nan_ok=True)
    assert {"steerability", "style_artifacts"} <= {g["name"] for g in recorded[0]["gates"]}


def test_fallback_share_per_experiment(run_dir: Path, generations: dict) -> None:
    """The run store's simulated-user fallbacks reach the Overview's experiments table, the
    A/B page and the Markdown report of the generations."""
    from flywheel.report import markdown

    with RunStore(run_dir, read_only=True) as store:
        stored = store.user_fallbacks().set_index("experiment_id")
        experiments = store.experiments()["experiment_id"]
    assert set(stored.index) == set(experiments) and (stored["user_messages"] > 0).all()
    app = open_page(run_dir)
    table = next(d.value for d in app.dataframe if "user_fallback_share" in d.value.columns)
    shown = table.set_index("experiment_id")["user_fallback_share"]
    assert shown.to_dict() == pytest.approx(stored["fallback_share"].to_dict())

    experiment = ab_experiment(generations)
    app = open_page(run_dir, "A/B detail")
    app.selectbox(key="ab_experiment").set_value(experiment).run()
    totals = stored.loc[experiment].to_dict()
    assert f"Simulated-user fallbacks: {fallback_text(totals)}" in texts(app)

    report = markdown(generations["scenario"], generations["generations"])
    for gen in generations["generations"]:
        if gen["ab"]:
            ab = stored.loc[gen["ab_experiment_id"]].to_dict()
            assert f"A/B {fallback_text(ab)}" in report
            assert gen["ab"]["user_fallbacks"]["user_fallbacks"] == ab["user_fallbacks"]
        traffic = stored.loc[gen["traffic_experiment_id"]].to_dict()
        assert f"traffic {fallback_text(traffic)}" in report


def ab_experiment(generations: dict) -> str:
    """The first generation's A/B experiment (the loop and the recording name it)."""
    return next(g["ab_experiment_id"] for g in generations["generations"] if g["ab"])


def test_ab_detail_shows_the_recorded_analysis(run_dir: Path, generations: dict) -> None:
    app = open_page(run_dir, "A/B detail")
    experiment = ab_experiment(generations)
    app.selectbox(key="ab_experiment").set_value(experiment).run()
    with RunStore(run_dir, read_only=True) as store:
        recorded = store.read_analysis(experiment, "ab")
    assert recorded is not None
    shown = app.dataframe[0].value.set_index("metric")
    for name, metric in recorded["metrics"].items():
        # result JSON stores NaN (no events in either arm) as null
        for field in ("lift", "ci_high"):
            expected = np.nan if metric[field] is None else metric[field]
            assert shown.loc[name, field] == pytest.approx(expected, nan_ok=True)
    page = texts(app)
    assert f"Decision: {recorded['decision'].upper()}" in page
    assert f"p = {recorded['srm_p_value']:.3g}" in page
    assert "recorded in the run store (ab)" in page
    guardrails = [m for m in recorded["metrics"].values() if m["role"] == "guardrail"]
    assert len(app.metric) == len(guardrails)
    before = len(charts(app))
    app.selectbox(key="ab_daily").set_value("violation_rate").run()
    assert not app.exception and len(charts(app)) == before


def test_ab_detail_computes_the_analysis_when_none_was_recorded(
    tmp_path: Path, generations: dict
) -> None:
    from flywheel.ab import AnalysisConfig, analyze

    run = replay_run(tmp_path / "run", analyses=False, generations=False, artifacts=False)
    app = open_page(run, "A/B detail")
    experiment = ab_experiment(generations)  # a standard A/B test of the loop
    app.selectbox(key="ab_experiment").set_value(experiment).run()
    with RunStore(run, read_only=True) as store:
        config = store.experiments().set_index("experiment_id").loc[experiment, "config"]
        traffic = config.get("traffic") or config["scenario"]["traffic"]
        table = store.analysis_table(experiment)
    expected = analyze(table, AnalysisConfig(treatment_share=traffic["treatment_share"]))
    shown = app.dataframe[0].value.set_index("metric")
    for metric in expected.metrics:
        assert shown.loc[metric.name, "lift"] == pytest.approx(metric.lift, nan_ok=True)
    assert "computed by the dashboard with flywheel.ab.analyze" in texts(app)


def test_reward_models_page(run_dir: Path) -> None:
    app = open_page(run_dir, "Reward models")
    evals = app.dataframe[0].value
    recorded = {
        p.relative_to(run_dir).as_posix(): json.loads(p.read_text())
        for p in run_dir.rglob("rm_eval.json")
    }
    assert sorted(evals["file"]) == sorted(recorded)
    for row in evals.itertuples(index=False):
        gold = recorded[row.file]["gold_correlation"]["turns"]["pearson_r"]
        assert row.gold_pearson_r == pytest.approx(gold, nan_ok=True)
    sweep_path = next(run_dir.rglob("sweep.json"))
    sweep = json.loads(sweep_path.read_text())
    bon = app.dataframe[-1].value
    assert list(bon["n"]) == [row["n"] for row in sweep["table"]]
    assert list(bon["gold"]) == pytest.approx([row["gold"] for row in sweep["table"]])
    # style correlations, proxy-vs-gold of the best-of-n samples, the best-of-n curve
    assert len(charts(app)) == 3
    assert "No best-of-n sweep recorded" not in texts(app)


def test_reward_models_scores_logged_replies(run_dir: Path) -> None:
    from dashboards import data
    from rewards.rm.base import load_reward_model

    app = open_page(run_dir, "Reward models")
    app.radio(key="rm_source").set_value("logged replies").run()
    folder = app.selectbox(key="rm_model").value
    experiment = app.selectbox(key="rm_experiment").value
    app.slider(key="rm_sample").set_value(40).run()
    app.button(key="rm_score").click().run()
    assert not app.exception, [e.value for e in app.exception]
    shown = {m.label: m.value for m in app.metric}
    frame, gold, _ = data.proxy_vs_gold(str(run_dir), folder, experiment, 40)
    with RunStore(run_dir, read_only=True) as store:
        turns = store.read_turns(experiment)
    logged = frame.merge(
        turns, left_on=["context", "reply"], right_on=["user_message", "bot_reply"]
    )
    assert len(logged) >= len(frame)
    assert set(logged["gold"] - logged["gold_satisfaction"]) == {0.0}
    model = load_reward_model(run_dir / folder)
    assert frame["proxy"].to_numpy() == pytest.approx(
        model.score(list(frame["context"]), list(frame["reply"]))
    )
    reference = np.corrcoef(frame["proxy"], frame["gold"])[0, 1]
    assert shown["Pearson r (proxy, gold)"] == f"{reference:.3f}" == f"{gold['pearson_r']:.3f}"
    assert shown["replies"] == "40"


def test_style_artifacts_page(run_dir: Path, generations: dict) -> None:
    app = open_page(run_dir, "Style artifacts")
    first = generations["generations"][0]
    suite = next(g for g in first["gates"] if g["name"] == "style_artifacts")
    box = {"pass": app.success, "fail": app.error}.get(verdict_of(suite), app.warning)
    assert any(suite["reason"] in m.value for m in box)
    assert any(f"style_artifacts: {verdict_of(suite).upper()}" in m.value for m in box)
    profiles = app.dataframe[-1].value
    with RunStore(run_dir, read_only=True) as store:
        turns = store.read_turns(app.selectbox(key="style_experiment").value)
    words = turns.assign(words=[f["words"] for f in turns["features"]])
    expected = words.groupby(["period", "arm", "policy"])["words"].mean()
    got = profiles.set_index(["period", "arm", "policy"])["mean_words"]
    assert got.sort_index().to_numpy() == pytest.approx(expected.sort_index().to_numpy())
    assert len(charts(app)) == 2  # candidate vs parent, logged distribution per arm
    app.selectbox(key="style_generation").set_value(generations["generations"][1]["generation"])
    app.radio(key="style_feature").set_value("emoji").run()
    assert not app.exception


def test_conversations_filter_and_transcript(run_dir: Path) -> None:
    app = open_page(run_dir, "Conversations")
    experiment = app.selectbox(key="conv_experiment").value
    with RunStore(run_dir, read_only=True) as store:
        sessions = store.read_sessions(experiment)
        turns = store.read_turns(experiment)
    assert len(app.dataframe[0].value) == len(sessions)
    app.multiselect(key="conv_arm").set_value(["treatment"]).run()
    listed = app.dataframe[0].value
    assert len(listed) == int((sessions["arm"] == "treatment").sum())
    assert set(listed["arm"]) == {"treatment"}
    session_id = app.selectbox(key="conv_session").value
    n_turns = int((turns["session_id"] == session_id).sum())
    assert len(app.chat_message) == 2 * n_turns
    assert texts(app).count("(oracle)") == n_turns
    app.multiselect(key="conv_outcome").set_value(["reported"]).run()
    reported = int(((sessions["arm"] == "treatment") & sessions["reported"]).sum())
    assert not app.exception and len(app.dataframe[0].value) == reported


# ---------------------------------------------------------------------------- twins, sequential
def recorded_analysis(run_dir: Path | str, experiment: str) -> dict:
    with RunStore(run_dir, read_only=True) as store:
        recorded = store.read_analysis(experiment, "ab")
    assert recorded is not None, f"re-record: experiment {experiment!r} has no A/B analysis"
    return recorded


def as_float(value: float | None) -> float:
    """A result JSON value as a float (JSON stores NaN as null)."""
    return np.nan if value is None else float(value)


def open_twin_page(run_dir: Path | str) -> AppTest:
    app = open_page(run_dir, "Twins vs standard")
    app.selectbox(key="twin_experiment").set_value(TWIN_EXPERIMENT).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def test_fidelity_page_shows_the_card_of_each_choice(run_dir: Path) -> None:
    """The page shows ``flywheel.fidelity``'s card, line by line with target and status, for
    the pooled run and for one experiment (the twin experiment: both lives replayed)."""
    from flywheel.fidelity import fidelity_card

    app = open_page(run_dir, "Simulated-user fidelity")
    for choice, experiment in (
        ("every experiment (pooled)", None),
        (TWIN_EXPERIMENT, TWIN_EXPERIMENT),
    ):
        app.selectbox(key="fidelity_experiment").set_value(choice).run()
        assert not app.exception, [e.value for e in app.exception]
        card = fidelity_card(run_dir, experiment_id=experiment)
        shown = app.dataframe[0].value
        assert list(shown["name"]) == [line.name for line in card.lines]
        assert list(shown["status"]) == [line.status for line in card.lines]
        assert list(shown["target"]) == [line.target for line in card.lines]
        headline = f"{len(card.misses)} of {len(card.lines)} lines missed their target"
        assert (headline if card.misses else "lines met their target") in texts(app)
        assert len(charts(app)) == 1  # the QQ plot


def test_twin_view_shows_both_cis_and_the_variance_ratio(run_dir: Path) -> None:
    """Per metric, the twin (paired) and the standard design's lift and CI, and the variance
    ratio, exactly as `flywheel ab --design twins` recorded them."""
    recorded = recorded_analysis(run_dir, TWIN_EXPERIMENT)
    assert recorded["design"] == "twins", "re-record: the twin experiment was not analysed paired"
    app = open_twin_page(run_dir)
    shown = app.dataframe[0].value.set_index("metric")
    assert set(shown.index) == set(recorded["metrics"])
    for name, twin in recorded["metrics"].items():
        standard = recorded["standard"]["metrics"][name]
        for field in ("lift", "ci_low", "ci_high"):
            assert shown.loc[name, f"twin_{field}"] == pytest.approx(
                as_float(twin[field]), nan_ok=True
            )
            assert shown.loc[name, f"standard_{field}"] == pytest.approx(
                as_float(standard[field]), nan_ok=True
            )
        assert shown.loc[name, "variance_ratio"] == pytest.approx(
            as_float(twin["variance_ratio"]), nan_ok=True
        )
        assert shown.loc[name, "ate"] == pytest.approx(as_float(twin["ate"]), nan_ok=True)
    ratios = {m.label: m.value for m in app.metric}
    for name in ("breadth", "depth"):
        assert (
            ratios[f"{name}: variance ratio"]
            == f"{recorded['metrics'][name]['variance_ratio']:.2f}"
        )
    page = texts(app)
    assert f"**{recorded['decision'].upper()}**: {recorded['reason']}" in page
    assert f"**{recorded['standard']['decision'].upper()}**" in page
    assert "The simulator's truth about this population" in page
    assert "What production would see" in page
    assert f"{recorded['cost_twin']:,.0f} {recorded['cost_unit']}" in page
    (chart,) = charts(app)
    plotted = chart_data(chart, "design").set_index(["design", "metric"])
    for name, twin in recorded["metrics"].items():
        standard = recorded["standard"]["metrics"][name]
        for design, values in (("twin (paired)", twin), ("standard (production view)", standard)):
            for field in ("ci_low", "ci_high"):
                assert plotted.loc[(design, name), f"{field}_pct"] == pytest.approx(
                    100 * as_float(values[field]), nan_ok=True
                )
    no_lift = [name for name, twin in recorded["metrics"].items() if twin["lift"] is None]
    if no_lift:
        assert f"No relative lift for {', '.join(sorted(no_lift))}" in page


def chart_data(chart: object, column: str) -> pd.DataFrame:
    """The rows an Altair chart sent to the page in its dataset with ``column`` (Streamlit
    ships each dataset of the spec as Arrow)."""
    import pyarrow as pa

    frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in chart.proto.datasets]
    return next(frame for frame in frames if column in frame.columns)


def test_twin_view_computes_the_paired_analysis_when_none_was_recorded(tmp_path: Path) -> None:
    from flywheel.ab import AnalysisConfig, analyze_paired

    run = replay_run(tmp_path / "run", analyses=False, generations=False, artifacts=False)
    app = open_twin_page(run)
    with RunStore(run, read_only=True) as store:
        table = store.analysis_table(TWIN_EXPERIMENT)
    expected = analyze_paired(table, AnalysisConfig(treatment_share=0.5))
    shown = app.dataframe[0].value.set_index("metric")
    for metric in expected.metrics:
        standard = expected.standard[metric.name]
        assert shown.loc[metric.name, "twin_ci_low"] == pytest.approx(metric.ci_low, nan_ok=True)
        assert shown.loc[metric.name, "standard_ci_high"] == pytest.approx(
            standard.ci_high, nan_ok=True
        )
        assert shown.loc[metric.name, "variance_ratio"] == pytest.approx(
            metric.variance_ratio, nan_ok=True
        )
    assert "computed by the dashboard with flywheel.ab.analyze_paired" in texts(app)


def test_ab_detail_reads_a_twin_result(run_dir: Path) -> None:
    """A twin result has its SRM check and CUPED under 'standard': the A/B page shows the
    paired lifts, the standard view's SRM and CUPED, and says which is which."""
    recorded = recorded_analysis(run_dir, TWIN_EXPERIMENT)
    app = open_page(run_dir, "A/B detail")
    app.selectbox(key="ab_experiment").set_value(TWIN_EXPERIMENT).run()
    assert not app.exception, [e.value for e in app.exception]
    shown = app.dataframe[0].value.set_index("metric")
    for name, metric in recorded["metrics"].items():
        assert shown.loc[name, "ci_low"] == pytest.approx(as_float(metric["ci_low"]), nan_ok=True)
    cuped = app.dataframe[1].value.set_index("metric")
    lifts = chart_data(charts(app)[0], "ci_low_unadjusted_pct").set_index("metric")
    for name, metric in recorded["standard"]["metrics"].items():
        assert cuped.loc[name, "ci_low"] == pytest.approx(as_float(metric["ci_low"]), nan_ok=True)
        # the lift chart's grey intervals: the standard design's CIs
        assert lifts.loc[name, "ci_low_unadjusted_pct"] == pytest.approx(
            100 * as_float(metric["ci_low"]), nan_ok=True
        )
    page = texts(app)
    standard_srm = recorded["standard"]["srm"]
    assert f"{standard_srm['n_control']} control / {standard_srm['n_treatment']} treatment" in page
    assert f"p = {recorded['standard']['srm_p_value']:.3g}" in page
    assert "**Twin experiment**" in page and "paired analysis (no CUPED" in page
    assert "The twin design has no sample ratio to check" in page
    assert f"Decision: {recorded['decision'].upper()}" in page


def test_twin_pages_explain_a_twin_result_without_its_standard_view(
    run_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    recorded = recorded_analysis(broken, TWIN_EXPERIMENT)
    del recorded["standard"]
    with RunStore(broken) as store:
        store.write_analysis(TWIN_EXPERIMENT, "ab", recorded)
    app = open_twin_page(broken)
    assert [e.value for e in app.error] == ["**No twin analysis to compare**"]
    assert "has no standard view" in texts(app) and "--design twins" in texts(app)
    assert not app.dataframe
    app = open_page(broken, "A/B detail")
    app.selectbox(key="ab_experiment").set_value(TWIN_EXPERIMENT).run()
    assert [e.value for e in app.error] == ["**Twin analysis without its standard view**"]


def test_twin_page_without_a_twin_experiment(run_dir: Path, tmp_path: Path) -> None:
    standard_only = tmp_path / "standard"
    shutil.copytree(run_dir, standard_only)
    con = duckdb.connect(str(standard_only / "run.duckdb"))
    tables = con.execute(
        "SELECT table_name FROM information_schema.columns WHERE column_name = 'experiment_id'"
    ).fetchall()
    for (table,) in tables:
        con.execute(f'DELETE FROM "{table}" WHERE experiment_id = ?', [TWIN_EXPERIMENT])
    con.close()
    app = open_page(standard_only, "Twins vs standard")
    (info,) = app.info
    assert info.value.startswith("**No twin experiment in this run.**")
    assert "flywheel ab SCENARIO --design twins" in texts(app)
    assert not app.dataframe and not charts(app)


def shown_looks(app: AppTest) -> pd.DataFrame:
    return app.dataframe[0].value.set_index(["day", "metric"])


def assert_looks_match(shown: pd.DataFrame, monitor: object, fixed: dict) -> None:
    """The page's looks are ``monitor``'s always-valid CIs; the naive CI of the last look is
    the fixed-horizon analysis ``fixed`` recorded for the whole test."""
    for look in monitor.looks:
        for metric in look.metrics:
            row = shown.loc[(look.day, metric.name)]
            assert row["cs_low"] == pytest.approx(metric.ci_low, nan_ok=True)
            assert row["cs_high"] == pytest.approx(metric.ci_high, nan_ok=True)
            assert row["p_value"] == pytest.approx(metric.p_value, nan_ok=True)
            assert row["decision"] == look.decision
    last = monitor.looks[-1].day
    for name, metric in fixed["metrics"].items():
        for field in ("low", "high"):
            assert shown.loc[(last, name), f"naive_{field}"] == pytest.approx(
                as_float(metric[f"ci_{field}"]), rel=1e-6, nan_ok=True
            )
        # an always-valid CI is never narrower than the fixed one at the same look; it has
        # none where there is no spread to bound (an arm without events, or twin
        # differences all zero), and then the fixed one has none or a width of rounding
        row = shown.loc[(last, name)]
        naive_width = row["naive_high"] - row["naive_low"]
        if np.isfinite(row["cs_low"]):
            assert row["cs_high"] - row["cs_low"] >= naive_width or not np.isfinite(naive_width)
        else:
            assert not np.isfinite(naive_width) or naive_width < 1e-12


def stop_text(monitor: object) -> str:
    if monitor.stopped_at is None:
        return "**No early stop**"
    return f"**Early stop at day {monitor.stopped_at}: {monitor.decision.upper()}**"


def test_sequential_view_of_a_standard_test(run_dir: Path, generations: dict) -> None:
    from flywheel.ab import AnalysisConfig, sequential_monitor

    experiment = ab_experiment(generations)
    app = open_page(run_dir, "Sequential monitoring")
    app.selectbox(key="seq_experiment").set_value(experiment).run()
    assert not app.exception and not app.radio  # a standard test has one design
    with RunStore(run_dir, read_only=True) as store:
        config = store.experiments().set_index("experiment_id").loc[experiment, "config"]
        table = store.analysis_table(experiment)
    traffic = config["traffic"]
    monitor = sequential_monitor(
        table,
        AnalysisConfig(treatment_share=traffic["treatment_share"]),
        horizon_days=traffic["test_days"],
    )
    assert monitor.design == "standard" and len(monitor.looks) == traffic["test_days"]
    assert_looks_match(shown_looks(app), monitor, recorded_analysis(run_dir, experiment))
    assert stop_text(monitor) in texts(app)
    srm = app.dataframe[1].value
    assert list(srm["p_value"]) == pytest.approx([look.srm.p_value for look in monitor.looks])
    assert len(charts(app)) == 1
    app.selectbox(key="seq_metric").set_value("violation_rate").run()
    assert not app.exception and len(charts(app)) == 1


def test_sequential_view_of_a_twin_test_in_both_designs(run_dir: Path) -> None:
    from flywheel.ab import AnalysisConfig, sequential_monitor

    recorded = recorded_analysis(run_dir, TWIN_EXPERIMENT)
    with RunStore(run_dir, read_only=True) as store:
        table = store.analysis_table(TWIN_EXPERIMENT)
    config = AnalysisConfig(treatment_share=0.5)
    app = open_page(run_dir, "Sequential monitoring")
    app.selectbox(key="seq_experiment").set_value(TWIN_EXPERIMENT).run()
    assert app.radio(key="seq_design").value == "twins"
    twins = sequential_monitor(table, config)
    assert twins.design == "twins"
    assert_looks_match(shown_looks(app), twins, recorded)
    assert stop_text(twins) in texts(app)
    assert len(app.dataframe) == 1  # no SRM check: every user lived both arms
    app.radio(key="seq_design").set_value("standard").run()
    assert not app.exception, [e.value for e in app.exception]
    standard = sequential_monitor(table, config, design="standard")
    assert_looks_match(shown_looks(app), standard, recorded["standard"])
    assert stop_text(standard) in texts(app)


def test_sequential_view_explains_an_incomplete_twin_table(run_dir: Path, tmp_path: Path) -> None:
    """A twin user-day lived by one policy only is refused with the monitor's own message."""
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    con = duckdb.connect(str(broken / "run.duckdb"))
    user, day = con.execute(
        "SELECT user_id, day FROM user_days WHERE experiment_id = ? AND period = 'test' "
        "AND life = 'treatment' ORDER BY user_id, day LIMIT 1",
        [TWIN_EXPERIMENT],
    ).fetchone()
    con.execute(
        "DELETE FROM user_days WHERE experiment_id = ? AND user_id = ? AND day = ? "
        "AND life = 'treatment'",
        [TWIN_EXPERIMENT, user, day],
    )
    con.close()
    app = open_page(broken, "Sequential monitoring")
    app.selectbox(key="seq_experiment").set_value(TWIN_EXPERIMENT).run()
    assert not app.exception, [e.value for e in app.exception]
    assert [e.value for e in app.error] == ["**This experiment cannot be monitored**"]
    assert "lived by one policy only" in texts(app) and repr(user) in texts(app)
    assert not charts(app)


def test_peeking_lists_metrics_whose_naive_ci_excluded_zero_first() -> None:
    """The Sequential page's peeking warning: metrics whose naive CI excluded 0 at an earlier
    look than the always-valid CI (or at a look where it never did)."""
    from dashboards.data import SequentialView

    intervals = {  # metric -> per look (cs_low, cs_high, naive_low, naive_high)
        "breadth": [(-2, 2, 0.1, 1), (-1, 3, 0.2, 1), (0.1, 2, 0.3, 1)],  # naive day 0, CS day 2
        "depth": [(-2, 2, -1, 1), (0.1, 2, 0.2, 1), (0.2, 2, 0.3, 1)],  # both at day 1
        "report_rate": [(-2, 2, -1, -0.1), (-2, 2, -1, 1), (-2, 2, -1, 1)],  # CS never
    }
    looks = pd.DataFrame(
        [
            {
                "day": day,
                "metric": metric,
                "cs_low": a,
                "cs_high": b,
                "naive_low": c,
                "naive_high": d,
            }
            for metric, rows in intervals.items()
            for day, (a, b, c, d) in enumerate(rows)
        ]
    )
    view = SequentialView("x", "standard", 0.05, 3, None, "inconclusive", "", looks, pd.DataFrame())
    assert view.first_excluding_zero("cs") == {"breadth": 2, "depth": 1}
    assert view.naive_ahead() == {"breadth": (0, 2), "report_rate": (0, None)}


# ---------------------------------------------------------------------------- broken runs
def run_view(run_dir: Path | str, page: str) -> AppTest:
    """Run one page script on its own (as a bookmark to the page would)."""
    app = AppTest.from_file(str(APP_PATH.parent / PAGES[page]), default_timeout=TIMEOUT_S)
    app.session_state["run_dir"] = str(run_dir)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_explains_a_missing_run(tmp_path: Path, page: str) -> None:
    app = run_view(tmp_path / "nowhere", page)
    assert [e.value for e in app.error] == ["**Run directory not found**"]
    assert not app.title  # the page stopped before drawing anything
    (tmp_path / "empty").mkdir()
    app = run_view(tmp_path / "empty", page)
    assert [e.value for e in app.error] == ["**No run store in this directory**"]
    assert "flywheel run SCENARIO --out RUN_DIR" in texts(app)


def test_an_older_schema_version_gets_a_clear_page(run_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    con = duckdb.connect(str(old / "run.duckdb"))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    for page in PAGES:
        app = run_view(old, page)
        assert [e.value for e in app.error] == ["**Run store from another version**"]
        assert "schema version 0" in texts(app)


def test_generations_json_of_another_version(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    document = json.loads((other / "generations.json").read_text())
    (other / "generations.json").write_text(json.dumps({**document, "schema_version": 2}))
    app = open_page(other)
    assert [e.value for e in app.error] == ["**generations.json from another version**"]
    assert not app.table  # no generation table from a file it cannot read ...
    assert ab_experiment(document) in list(app.dataframe[0].value["experiment_id"])  # store


@pytest.mark.parametrize("page", list(PAGES))
def test_pages_degrade_without_optional_artifacts(tmp_path: Path, page: str) -> None:
    run = replay_run(tmp_path / "run", generations=False, artifacts=False)
    app = open_page(run, page)
    expected = {
        "Overview": "No generations.json in this run",
        "A/B detail": "Decision:",
        "Twins vs standard": "The simulator's truth about this population",
        "Sequential monitoring": "daily looks of a",
        "Reward models": "No best-of-n sweep recorded for this run",
        "Style artifacts": "No generations recorded",
        "Conversations": "sessions",
        "Simulated-user fidelity": "held-out split of `chitchat-dataset`",
    }[page]
    assert expected in texts(app)


def test_cli_dashboard_is_registered() -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    result = CliRunner().invoke(app, ["dashboard", "--help"])
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output and "--port" in result.output


def test_decision_colours_mark_ship_and_hold() -> None:
    from dashboards import charts as dashboard_charts

    lifts = pd.DataFrame(
        {
            "generation": [1, 2],
            "candidate": ["a", "b"],
            "metric": ["breadth", "breadth"],
            "lift": [0.05, -0.02],
            "ci_low": [0.01, -0.05],
            "ci_high": [0.09, 0.01],
            "decision": ["ship", "hold"],
        }
    )
    spec = dashboard_charts.lift_by_generation(lifts).to_dict()
    scales = [layer["encoding"]["color"]["scale"] for layer in spec["spec"]["layer"][1:]]
    for scale in scales:
        colours = dict(zip(scale["domain"], scale["range"], strict=True))
        assert colours["ship"] != colours["hold"]
        assert colours["ship"] == dashboard_charts.DECISION_COLORS["ship"]


def test_a_run_held_by_a_writer_is_shown_from_a_snapshot(run_dir: Path, tmp_path: Path) -> None:
    import subprocess

    busy = tmp_path / "busy"
    shutil.copytree(run_dir, busy)
    # Another process holding the store for writing, as a running `flywheel run` does.
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from flywheel.store import RunStore; s = RunStore(sys.argv[1]); "
         "print('open', flush=True); time.sleep(120)", str(busy)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        with pytest.raises(duckdb.IOException, match="lock"):
            duckdb.connect(str(busy / "run.duckdb"), read_only=True)
        app = run_view(busy, "Overview")
        assert not app.error
        assert any("**Live run**" in w.value for w in app.warning)
        snapshot = next(Path(p) for p in texts(app).split("`") if "flywheel-dashboard" in p)
        assert (snapshot / "run.duckdb").is_file() and snapshot != busy
        assert len(app.table[0].value) == len(
            json.loads((busy / "generations.json").read_text())["generations"]
        )
    finally:
        writer.kill()
        writer.wait()
    app = run_view(busy, "Overview")  # the writer let go: the store itself is read again
    assert not app.warning and app.table
