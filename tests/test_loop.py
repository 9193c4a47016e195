"""The generation loop end to end on tiny models, and its resume guarantee: a `flywheel run`
killed with SIGKILL (between steps and in the middle of a simulated day) and started again
finishes with exactly what an uninterrupted run produced, losing nothing."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import tiny_scenario_toml

from flywheel.ledger import Ledger, StepConflictError, derive_seed
from flywheel.store import RunStore

REPO = Path(__file__).resolve().parents[1]
# Volatile by nature (clocks), left out of the comparison.
VOLATILE = ("runtime", "per_second", "wall_s", "_at")


def tiny_scenario(path: Path, model: Path) -> Path:
    """Two generations of a tiny world: 2 characters, 30 users, 2 logged days, 1 + 1 day A/B."""
    return tiny_scenario_toml(
        path,
        user_model=model,
        max_new_tokens=6,
        generations=2,
        policy={"model": str(model), "dtype": "float32"},
        world={
            "characters": ["Captain Mara", "Pixel"],
            "pii_rate": 0.1,
            "gold": {"continue_bias": 6.0},
        },
        collect={"days": 2},
        traffic={"n_users": 30, "test_days": 1},
        serving={"timeout_s": 120.0},
        curation={"require_continued": False, "held_out_share": 0.3},
        reward_models={"test_size": 0.4, "minilm": {"max_epochs": 3, "hidden": 8}},
        recipes=[
            {
                "name": "rs",
                "kind": "rs+sft",
                "reward_normalisation": "reference",
                "prompts": 4,
                "samples": 2,
                "max_steps": 1,
                "max_new_tokens": 6,
                "trainer": {"per_device_train_batch_size": 2},
            }
        ],
        gates={
            "eval_prompts": 4,
            "max_new_tokens": 6,
            "min_rm_win_rate": 0.0,
            "steerability": {
                "prompts_per_character": 1,
                "max_following_drop": 1.0,
                "max_violation_increase": 1.0,
            },
            "safety": {"max_unsafe_rate": 1.0},
            "ifbench": {"samples": 2, "max_new_tokens": 6},
        },
    )


def flywheel(scenario: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """`flywheel run` in a subprocess (optionally killing itself at ``fault``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("FLYWHEEL_FAULT", None)
    if fault:
        env["FLYWHEEL_FAULT"] = fault
    command = [sys.executable, "-m", "flywheel.cli", "run", str(scenario), "--out", str(out)]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)


def scrub(value: Any) -> Any:
    """``value`` without clock-dependent keys."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not any(t in k for t in VOLATILE)}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def snapshot(run_dir: Path) -> dict[str, Any]:
    """Everything a run produced that must not depend on interruptions."""
    con = duckdb.connect(str(run_dir / "run.duckdb"), read_only=True)
    try:
        tables = {}
        for table, order in (
            ("turns", "experiment_id, day, session_id, turn_index"),
            ("sessions", "experiment_id, day, session_id"),
            ("user_days", "experiment_id, day, user_id"),
            ("serving_events", "experiment_id, event_id"),
            ("analyses", "experiment_id, name"),
        ):
            frame = con.execute(f"SELECT * FROM {table} ORDER BY {order}").df()
            tables[table] = scrub(
                json.loads(
                    frame.drop(columns=["created_at"], errors="ignore").to_json(orient="records")
                )
            )
        days = con.execute(
            "SELECT experiment_id, day FROM days ORDER BY experiment_id, day"
        ).fetchall()
        steps = con.execute(
            "SELECT generation, step, status, seed, outputs FROM steps ORDER BY generation, step"
        ).fetchall()
        finished = con.execute(
            "SELECT experiment_id FROM experiments WHERE finished_at IS NOT NULL ORDER BY 1"
        ).fetchall()
    finally:
        con.close()
    weights = {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.glob("artifacts/gen*/models/*/*.safetensors"))
    }
    return {
        "generations": json.loads((run_dir / "generations.json").read_text()),
        "tables": tables,
        "days": days,
        "steps": [(g, s, st, seed, scrub(json.loads(o))) for g, s, st, seed, o in steps],
        "finished": finished,
        "weights": weights,
    }


def step_status(run_dir: Path) -> dict[tuple[int, str], str]:
    con = duckdb.connect(str(run_dir / "run.duckdb"), read_only=True)
    try:
        return {
            (g, s): st
            for g, s, st in con.execute("SELECT generation, step, status FROM steps").fetchall()
        }
    finally:
        con.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Any]:
    """An uninterrupted run and one killed twice and resumed, of the same scenario."""
    root = tmp_path_factory.mktemp("loop")
    scenario = tiny_scenario(root / "tiny.toml", tiny_llama_dir)
    clean = flywheel(scenario, root / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]

    resumed = root / "resumed"
    first = flywheel(scenario, resumed, fault="after:1:reward_models")
    after_first = step_status(resumed)
    second = flywheel(scenario, resumed, fault="day:gen2-traffic:1")
    after_second = step_status(resumed)
    last = flywheel(scenario, resumed)
    assert last.returncode == 0, last.stderr[-3000:]
    return {
        "clean": root / "clean",
        "resumed": resumed,
        "kills": (first, second),
        "after_first": after_first,
        "after_second": after_second,
        "stdout": clean.stdout,
    }


def test_run_writes_the_generation_table(runs: dict[str, Any]) -> None:
    doc = json.loads((runs["clean"] / "generations.json").read_text())
    assert doc["schema_version"] == 1 and doc["scenario"] == "tiny" and doc["seed"] == 3
    assert [g["generation"] for g in doc["generations"]] == [1, 2]
    for record in doc["generations"]:
        assert record["candidate"] == f"gen{record['generation']}-rs"
        assert record["recipe"] == "rs+sft"
        assert record["decision"] in ("ship", "hold", "gated")
        assert {g["name"] for g in record["gates"]} == {
            "rm_win_rate", "steerability", "style_artifacts", "safety", "ifbench",
        }  # fmt: skip
        assert (runs["clean"] / record["model_path"] / "config.json").is_file()
        # The oracle's view: the same held-out logged contexts, both models' replies.
        gold = record["oracle"]["gold"]
        assert gold["n"] >= 1 and math.isfinite(gold["parent"])
        assert gold["diff"] == pytest.approx(gold["candidate"] - gold["parent"])
        if record["decision"] == "gated":
            assert record["ab"] is None
        else:
            assert record["ab_experiment_id"] == f"gen{record['generation']}-ab"
            assert {"breadth", "depth", "report_rate"} <= set(record["ab"]["metrics"])
    first, second = doc["generations"]
    assert second["parent"] == first["deployed_after"]
    assert "| gen |" in (runs["clean"] / "generations.md").read_text()
    assert "gold vs parent [95% CI]" in (runs["clean"] / "generations.md").read_text()
    assert {p.name for p in (runs["clean"] / "plots").glob("*.png")} >= {
        "lift.png",
        "steerability.png",
    }
    assert "Generations" in runs["stdout"]


def test_every_step_is_recorded_with_seed_and_outputs(runs: dict[str, Any]) -> None:
    con = duckdb.connect(str(runs["clean"] / "run.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT generation, step, status, seed, config, outputs FROM steps"
        ).fetchall()
    finally:
        con.close()
    steps = {(g, s) for g, s, *_ in rows}
    for generation in (1, 2):
        for step in (
            "collect",
            "curate",
            "reward_models",
            "candidate:rs",
            "offline:rs",
            "ab",
            "decide",
        ):
            assert (generation, step) in steps
    for generation, step, status, seed, config, outputs in rows:
        assert status == "done"
        assert seed == derive_seed(3, generation, step)
        assert json.loads(config) is not None and json.loads(outputs) is not None
    curated = [json.loads(o) for g, s, *_, o in rows if s == "curate"]
    assert sum(c["pii_spans_scrubbed"] for c in curated) > 0  # the world planted PII
    assert all(c["pii_spans_after_scrubbing"] == 0 for c in curated)


def test_privacy_audit_finds_what_scrubbing_missed() -> None:
    import pandas as pd

    from flywheel.loop import pii_audit

    prompt = [{"role": "system", "content": "x"}, {"role": "user", "content": "hello {{EMAIL}}"}]
    clean = pd.DataFrame({"prompt": [prompt], "completion": ["nice to meet you"]})
    assert pii_audit([clean], "en_US") == 0
    leaky = pd.DataFrame({"prompt": [prompt], "completion": ["mail me at bob.smith@example.com"]})
    assert pii_audit([clean, leaky], "en_US") == 1


def test_kills_happened_where_injected(runs: dict[str, Any]) -> None:
    first, second = runs["kills"]
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == -signal.SIGKILL
    assert runs["after_first"] == {
        (1, "collect"): "done", (1, "curate"): "done", (1, "reward_models"): "done",
    }  # fmt: skip
    assert runs["after_second"][(1, "decide")] == "done"
    assert runs["after_second"][(2, "collect")] == "running"


def test_resumed_run_equals_uninterrupted_run(runs: dict[str, Any]) -> None:
    clean, resumed = snapshot(runs["clean"]), snapshot(runs["resumed"])
    assert resumed["generations"] == clean["generations"]
    assert resumed["weights"] == clean["weights"] and clean["weights"]
    assert resumed["days"] == clean["days"]  # every day once: none lost, none doubled
    assert resumed["finished"] == clean["finished"]
    for table in clean["tables"]:
        assert resumed["tables"][table] == clean["tables"][table], table
    assert resumed["steps"] == clean["steps"]


def test_report_prints_the_table_again(runs: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    result = CliRunner().invoke(app, ["report", str(runs["resumed"])])
    assert result.exit_code == 0
    assert "gen1-rs" in result.output and "gen2-rs" in result.output
    markdown = CliRunner().invoke(app, ["report", str(runs["resumed"]), "--markdown"])
    assert markdown.output.startswith("# Flywheel run: tiny")


def test_best_of_n_sweep_on_a_run_reward_model(
    runs: dict[str, Any], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """``flywheel bon`` on a loop run: proxy and gold of the proxy-best of n, n = 1, 2, 4."""
    from typer.testing import CliRunner

    from flywheel.cli import app

    run_dir, out = runs["clean"], tmp_path / "bon"
    rm = next((run_dir / "artifacts" / "gen1" / "rm").iterdir())
    result = CliRunner().invoke(
        app,
        ["bon", str(run_dir), "--rm", str(rm), "--policy", str(tiny_llama_dir),
         "--n", "4,1,2", "--contexts", "3", "--max-new-tokens", "6", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    table = sweep["table"]
    assert [row["n"] for row in table] == [1, 2, 4]
    assert [row["kl"] for row in table] == pytest.approx(
        [math.log(n) - (n - 1) / n for n in (1, 2, 4)]
    )
    # The expected best of n under the proxy never falls as n grows.
    assert all(a["proxy"] <= b["proxy"] + 1e-9 for a, b in itertools.pairwise(table))
    assert all(math.isfinite(row["gold"]) for row in table)
    assert (out / "bon.png").stat().st_size > 0
    bad = CliRunner().invoke(app, ["bon", str(run_dir), "--rm", str(rm), "--n", "0,2"])
    assert bad.exit_code == 2 and "--n must list positive integers" in bad.output


def test_report_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "flywheel run" in result.output


def test_ledger_refuses_another_scenario_and_changed_steps(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        ledger = Ledger(store)
        ledger.bind_scenario({"seed": 1})
        ledger.bind_scenario({"seed": 1})
        with pytest.raises(StepConflictError, match="another scenario"):
            ledger.bind_scenario({"seed": 2})
        calls = []
        out = ledger.run_step(1, "x", 5, {"a": 1}, {}, lambda: calls.append(1) or {"v": 1})
        again = ledger.run_step(1, "x", 5, {"a": 1}, {}, lambda: calls.append(1) or {"v": 2})
        assert out == again == {"v": 1} and calls == [1]
        with pytest.raises(StepConflictError, match="another config"):
            ledger.run_step(1, "x", 5, {"a": 2}, {}, lambda: {"v": 3})


def test_step_seeds_depend_on_generation_and_step_only() -> None:
    assert derive_seed(0, 1, "collect") == derive_seed(0, 1, "collect")
    seeds = {derive_seed(0, g, s) for g in (1, 2) for s in ("collect", "curate")}
    assert len(seeds) == 4
    assert derive_seed(1, 1, "collect") != derive_seed(0, 1, "collect")


def test_shipped_candidate_serves_the_next_generation(tmp_path: Path) -> None:
    from dataclasses import replace

    from flywheel.loop import GEN0, FlywheelRun
    from flywheel.records import GenerationRecord
    from flywheel.scenario import Scenario

    recorded = REPO / "tests" / "fixtures" / "dashboard_run" / "generations.json"
    record = GenerationRecord.from_dict(json.loads(recorded.read_text())["generations"][0])

    def decided(generation: int, decision: str, parent: str) -> GenerationRecord:
        return replace(
            record, generation=generation, decision=decision, recipe_name="grpo", parent=parent
        )

    run = FlywheelRun(Scenario(), tmp_path, progress=False)
    spec = run.deployed_spec(decided(2, "ship", GEN0))
    assert spec.label == "gen2-grpo"
    assert spec.model == str((tmp_path / "artifacts" / "gen2" / "models" / "grpo").resolve())
    assert run.deployed_spec(decided(3, "hold", "gen2-grpo")) == spec
    assert run.deployed_spec(decided(1, "gated", GEN0)) == run.base_spec()
