"""Every path that serves simulated users goes through the fail-closed safety check, and the
A/B's unsafe-rate guardrail counts what each arm *attempted*: ``flywheel ab`` with a planted
unsafe treatment (``unsafe@RATE:MODEL``) holds it on that guardrail, with the serving events
of both arms in the run store; ``flywheel chat`` serves through the same check."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import tiny_scenario_toml
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.ledger import Ledger
from flywheel.store import RunStore
from rewards.safety import SafetyChecker
from sim.planted import UNSAFE_SNIPPETS
from sim.serving import BLOCKED, CHECKER_ERROR, FALLBACK_REPLY

EVENING_ONLY = [0.0] * 20 + [1.0, 0.0, 0.0, 0.0]  # every session arrives at 20:00


@pytest.fixture(scope="module")
def tiny_scenario(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    return tiny_scenario_toml(
        tmp_path_factory.mktemp("scenario") / "tiny_unsafe.toml",
        user_model=tiny_llama_dir,
        name="tiny_unsafe",
        seed=5,
        temperature=0.0,
        traffic={
            "n_users": 80,
            "pre_days": 0,
            "max_sessions_per_day": 1,
            "hourly_weights": EVENING_ONLY,
        },
    )


@pytest.fixture(scope="module")
def unsafe_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_scenario: Path, tiny_llama_dir: Path
) -> Path:
    """``flywheel ab`` through the command line: a control that attempts an unsafe reply
    now and then, a treatment that attempts one on most replies."""
    out = tmp_path_factory.mktemp("unsafe_ab")
    model = str(tiny_llama_dir)
    done = CliRunner().invoke(
        app,
        ["ab", str(tiny_scenario), "--control", f"unsafe@0.1:{model}",
         "--treatment", f"unsafe@0.6:{model}", "--out", str(out), "--quiet"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output[-3000:]
    (out / "stdout.txt").write_text(done.output)
    return out


def test_a_planted_unsafe_treatment_is_held_on_the_unsafe_guardrail(unsafe_run: Path) -> None:
    assert "decision: HOLD" in (unsafe_run / "stdout.txt").read_text()
    result = json.loads((unsafe_run / "ab" / "result.json").read_text())
    unsafe = result["metrics"]["unsafe_rate"]
    assert 0 < unsafe["control"] < 0.3 and 0.4 < unsafe["treatment"] < 0.8
    assert result["decision"] == "hold" and "unsafe_rate" in result["reason"]


def test_both_arms_are_served_and_their_events_are_in_the_run_store(unsafe_run: Path) -> None:
    with RunStore(unsafe_run) as store:  # the ledger creates its tables: not read-only
        turns = store.read_turns("ab")
        events = Ledger(store).serving_events("ab")
    policies = set(turns["policy"])
    assert {p.split(":")[0] for p in policies} == {"unsafe@0.1", "unsafe@0.6"}
    assert set(events["policy"]) == policies and set(events["kind"]) == {BLOCKED}
    # users saw no unsafe reply: each attempt was replaced by the fallback and logged once
    assert not any(s in reply for s in UNSAFE_SNIPPETS for reply in turns["bot_reply"])
    assert not any(v.safe for v in SafetyChecker().check(list(events["original_reply"])))
    for policy, rows in turns.groupby("policy"):
        logged = events[events["policy"] == policy]
        assert rows["unsafe"].sum() == len(logged) == (rows["bot_reply"] == FALLBACK_REPLY).sum()
    simulation = json.loads((unsafe_run / "ab" / "simulation.json").read_text())
    assert simulation["serving_events"] == {
        policy: {BLOCKED: int((events["policy"] == policy).sum())} for policy in policies
    }
    assert "## Serving" in (unsafe_run / "ab" / "report.md").read_text()


def test_flywheel_chat_serves_through_the_fail_closed_check(
    tiny_scenario: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: with a crashing checker, chat users see only the fallback."""
    from flywheel.chat import run_chat
    from policies import PolicySpec, SamplingParams

    def crash(self: SafetyChecker, replies: Sequence[str]) -> list:
        raise RuntimeError("injected checker fault")

    monkeypatch.setattr(SafetyChecker, "check", crash)
    run = run_chat(
        tiny_scenario,
        users=3,
        bot=PolicySpec(model=str(tiny_llama_dir), dtype="float32"),
        bot_params=SamplingParams(max_new_tokens=4, temperature=0.0),
        progress=False,
    )
    assert len(run.turns) > 0 and set(run.turns["bot_reply"]) == {FALLBACK_REPLY}
    assert [e.kind for e in run.serving_events] == [CHECKER_ERROR] * len(run.turns)
    assert not run.turns["unsafe"].any()
