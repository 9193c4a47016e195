"""Every dashboard page under Streamlit's AppTest, on the recorded run and on broken runs.

The recorded run (``tests/fixtures/dashboard_run``, copied into a fresh folder per test) is
what ``flywheel run`` wrote for a two-generation tiny scenario, plus a ``flywheel bon``
sweep: re-record it with ``python -m tests.fixtures.record_dashboard_run``. Expected figures
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

PAGES = {
    "Overview": "views/overview.py",
    "A/B detail": "views/ab_detail.py",
    "Reward models": "views/reward_models.py",
    "Style artifacts": "views/style_artifacts.py",
    "Conversations": "views/conversations.py",
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


def test_ab_detail_computes_the_analysis_when_none_was_recorded(tmp_path: Path) -> None:
    from flywheel.ab import AnalysisConfig, analyze

    run = replay_run(tmp_path / "run", analyses=False, generations=False, artifacts=False)
    app = open_page(run, "A/B detail")
    experiment = app.selectbox(key="ab_experiment").value
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
        "Reward models": "No best-of-n sweep recorded for this run",
        "Style artifacts": "No generations recorded",
        "Conversations": "sessions",
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
