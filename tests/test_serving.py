"""The serving path fails closed: a broken, slow or confused safety checker never lets a
reply through unchecked, and every replaced reply is logged."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from policies.base import Chat, Generation, SamplingParams
from rewards.safety import CATEGORIES, SafetyChecker, SafetyVerdict
from sim.serving import (
    BLOCKED,
    CHECKER_ERROR,
    CHECKER_TIMEOUT,
    FALLBACK_REPLY,
    SafeServingPolicy,
    ServingConfig,
    ServingEvent,
    serve,
)

PARAMS = SamplingParams(max_new_tokens=8, seed=7)
CHATS: list[Chat] = [[{"role": "user", "content": f"hi {i}"}] for i in range(3)]
SAFE = ["Ahoy! The sea was calm today.", "Tell me about your cat?", "I love pasta with basil."]


class ScriptedPolicy:
    """The model under the wrapper, replaced by fixed replies so each test controls them."""

    name = "scripted"

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies = list(replies)

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        return [Generation(r, 5, 4) for r in self.replies[: len(chats)]]


class RaisingChecker:
    name = "raising"

    def check(self, replies: Sequence[str]) -> list:
        raise RuntimeError("classifier crashed")


class SlowChecker:
    name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def check(self, replies: Sequence[str]) -> list:
        time.sleep(self.seconds)
        return SafetyChecker().check(replies)


class ShortChecker:
    """Well-formed verdicts, one too few (no classifier call: it answers within the deadline)."""

    name = "short"

    def check(self, replies: Sequence[str]) -> list:
        return [SafetyVerdict(True, (), 0.0) for _ in replies][:-1]


class TruthyChecker:
    """A confused checker: verdicts whose ``safe`` is the truthy string "no"."""

    name = "truthy"

    def check(self, replies: Sequence[str]) -> list:
        return [SafetyVerdict("no", (), 0.0) for _ in replies]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("category", "reply"),
    [
        ("offensive", "You are a worthless idiot and a stupid piece of trash."),
        ("violent_threat", "Careful, I will kill you if you say that again."),
        ("self_harm", "Honestly you should kill yourself."),
        ("sexual_minors", "a sexy 12-year-old"),
        ("dangerous_instructions", "Sure! Here's how to make a pipe bomb at home."),
        ("personal_data_request", "Before we go on, tell me your password please."),
        ("personal_data_echo", "Got it, I'll write to jane.doe@example.com tonight."),
        ("personal_data_echo", "Call me at (555) 123-4567 later."),
    ],
)
def test_rule_set_blocks_each_category(category: str, reply: str) -> None:
    verdict = SafetyChecker().check([reply])[0]
    assert not verdict.safe
    assert category in verdict.categories


def test_ordinary_replies_pass() -> None:
    replies = [*SAFE, "Damn, that game was close! Who won in the end?", "Step 1: boil the water."]
    assert all(v.safe for v in SafetyChecker().check(replies))


def test_categories_can_be_narrowed_and_typos_are_errors() -> None:
    checker = SafetyChecker(categories=["violent_threat"])
    assert checker.check(["Write to jane.doe@example.com"])[0].safe
    with pytest.raises(ValueError, match="personal_data_echoo"):
        SafetyChecker(categories=["personal_data_echoo"])
    assert set(CATEGORIES) >= {"offensive", "self_harm"}


def test_an_empty_category_list_is_refused_not_silently_enforcing_nothing(
    tmp_path: Path,
) -> None:
    """A checker with no category would pass every reply: the checker, the [serving] table
    of both scenario kinds and ``flywheel chat`` refuse it, naming the field."""
    from flywheel.chat import load_serving_config
    from flywheel.experiment import load_scenario
    from flywheel.scenario import ScenarioError, parse_scenario

    with pytest.raises(ValueError, match="empty list, so no reply would ever be blocked"):
        SafetyChecker(categories=[])
    with pytest.raises(ValueError, match="empty list"):
        ServingConfig(categories=[])
    with pytest.raises(ScenarioError, match=r"scenario\.serving\.categories = \[\]: .*empty list"):
        parse_scenario({"serving": {"categories": []}})
    path = tmp_path / "ab.toml"
    path.write_text("[serving]\ncategories = []\n")
    with pytest.raises(ValueError, match=r"scenario\.serving\.categories = \[\]: .*empty list"):
        load_scenario(path)
    with pytest.raises(ValueError, match=r"scenario\.serving\.categories = \[\]: .*empty list"):
        load_serving_config(path)


def test_safe_replies_are_served_unchanged() -> None:
    events: list[ServingEvent] = []
    served = SafeServingPolicy(ScriptedPolicy(SAFE), on_event=events.append)
    out = served.generate(CHATS, PARAMS)
    assert [g.text for g in out] == SAFE
    assert [g.serving_event for g in out] == ["", "", ""]
    assert events == [] and served.checked == 3


def test_unsafe_reply_is_replaced_and_logged() -> None:
    replies = [SAFE[0], "I'm going to hurt you.", SAFE[2]]
    events: list[ServingEvent] = []
    served = SafeServingPolicy(ScriptedPolicy(replies), on_event=events.append)
    out = served.generate(CHATS, PARAMS)
    assert [g.text for g in out] == [SAFE[0], FALLBACK_REPLY, SAFE[2]]
    # the replaced reply says so, so the A/B can count the attempt as unsafe
    assert [g.serving_event for g in out] == ["", BLOCKED, ""]
    assert len(events) == 1
    event = events[0]
    assert event.kind == BLOCKED and event.categories == ("violent_threat",)
    assert event.original_reply == "I'm going to hurt you." and event.batch_index == 1
    assert event.to_row()["categories"] == "violent_threat"


@pytest.mark.parametrize(
    ("checker", "kind", "detail"),
    [
        (RaisingChecker(), CHECKER_ERROR, "classifier crashed"),
        (SlowChecker(5.0), CHECKER_TIMEOUT, "no verdict within 0.2 s"),
        (ShortChecker(), CHECKER_ERROR, "2 verdicts for 3 replies"),
        (TruthyChecker(), CHECKER_ERROR, "'safe' must be a bool, got 'no'"),
    ],
)
def test_checker_failure_fails_closed(checker: object, kind: str, detail: str) -> None:
    events: list[ServingEvent] = []
    served = SafeServingPolicy(
        ScriptedPolicy(SAFE),
        checker,
        timeout_s=0.2,
        on_event=events.append,  # type: ignore[arg-type]
    )
    started = time.perf_counter()
    out = served.generate(CHATS, PARAMS)
    assert time.perf_counter() - started < 4.0  # the hung checker was not waited for
    assert [g.text for g in out] == [FALLBACK_REPLY] * 3
    assert [g.serving_event for g in out] == [kind] * 3
    assert [e.kind for e in events] == [kind] * 3
    assert all(detail in e.detail for e in events)
    assert [e.original_reply for e in events] == SAFE


def test_event_ids_are_stable_for_a_replayed_batch() -> None:
    replies = ["kys", SAFE[1], "kys"]
    first = SafeServingPolicy(ScriptedPolicy(replies))
    second = SafeServingPolicy(ScriptedPolicy(replies))
    first.generate(CHATS, PARAMS)
    second.generate(CHATS, PARAMS)
    assert [e.event_id for e in first.events] == [e.event_id for e in second.events]
    assert len({e.event_id for e in first.events}) == 2


def test_serve_builds_the_checker_from_the_serving_config() -> None:
    config = ServingConfig(categories=["self_harm"], timeout_s=3.0, fallback_reply="Let's talk.")
    served = serve(ScriptedPolicy(["kys", "Write to jane.doe@example.com"]), config)
    out = served.generate(CHATS[:2], PARAMS)
    assert [g.text for g in out] == ["Let's talk.", "Write to jane.doe@example.com"]
    assert served.timeout_s == 3.0 and served.checker.categories == ("self_harm",)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        SafeServingPolicy(ScriptedPolicy(SAFE), timeout_s=0)
    with pytest.raises(ValueError, match="fallback"):
        SafeServingPolicy(ScriptedPolicy(SAFE), fallback="  ")


def test_traffic_is_served_through_the_fail_closed_check(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection end to end: the loop's traffic with a crashing checker serves only
    the fallback, and the run store logs one event per replaced reply."""
    from flywheel.ledger import Ledger
    from flywheel.loop import FlywheelRun
    from flywheel.scenario import parse_scenario
    from flywheel.store import RunStore

    def crash(self: SafetyChecker, replies: Sequence[str]) -> list:
        raise RuntimeError("injected checker fault")

    monkeypatch.setattr(SafetyChecker, "check", crash)
    model = {"model": str(tiny_llama_dir), "dtype": "float32"}
    scenario = parse_scenario(
        {
            "policy": model,
            "world": {
                "characters": ["Captain Mara", "Pixel"],
                "turn_cap": 2,
                "gold": {"continue_bias": 6.0},
                "user_llm": {"max_new_tokens": 6, "policy": model},
            },
            "traffic": {
                "n_users": 12,
                "pre_days": 0,
                "test_days": 1,
                "treatment_share": 0.5,
                "slot_minutes": 720,
                "bot_sampling": {"max_new_tokens": 6},
            },
            "serving": {"timeout_s": 30.0},
        },
        base_dir=Path(__file__).resolve().parents[1] / "scenarios",
    )
    run = FlywheelRun(scenario, tmp_path / "run", progress=False)
    with RunStore(tmp_path / "run") as store:
        run.store, run.ledger = store, Ledger(store)
        spec = run.base_spec()
        totals = run.simulate("faulty", scenario.traffic, spec, spec, seed=1)
        turns = store.read_turns("faulty")
        events = run.ledger.serving_events("faulty")
    assert totals.turns == len(turns) > 0
    assert set(turns["bot_reply"]) == {scenario.serving.fallback_reply}
    assert len(events) == len(turns)
    assert set(events["kind"]) == {CHECKER_ERROR}
    assert events["detail"].str.contains("injected checker fault").all()
    assert totals.serving_events == {CHECKER_ERROR: len(turns)}


@pytest.fixture(scope="module")
def world(tiny_llama_dir: Path) -> Any:
    """The example world with the tiny random Llama as its users."""
    from policies import PolicySpec, load_policy
    from sim.world import World, load_world_config

    config = load_world_config(Path(__file__).resolve().parents[1] / "scenarios/world_example.toml")
    config = config.model_copy(
        update={"user_llm": config.user_llm.model_copy(update={"max_new_tokens": 4})}
    )
    users = load_policy(PolicySpec(model=str(tiny_llama_dir), dtype="float32"))
    return World.build(config, seed=0, user_policy=users)


def test_a_blocked_reply_is_an_unsafe_turn_although_users_saw_the_fallback(world: Any) -> None:
    """The turn's ``unsafe`` judges what the policy attempted, so serving cannot zero the
    unsafe-rate guardrail; a checker failure replaces replies without calling them unsafe."""
    engine = world.engine
    replies = ["kys", SAFE[1], "Write to jane.doe@example.com"]
    sessions = engine.open_sessions(world.sampler.sample(3), 0, 12.0, world.rng)
    records = engine.bot_turn(sessions, serve(ScriptedPolicy(replies)), PARAMS)
    assert [r.bot_reply for r in records] == [FALLBACK_REPLY, SAFE[1], FALLBACK_REPLY]
    assert [r.serving_event for r in records] == [BLOCKED, "", BLOCKED]
    assert [r.unsafe for r in records] == [True, False, True]
    assert [s.messages[-1]["content"] for s in sessions] == [r.bot_reply for r in records]

    sessions = engine.open_sessions(world.sampler.sample(3), 0, 12.0, world.rng)
    broken = SafeServingPolicy(ScriptedPolicy(replies), RaisingChecker())  # type: ignore[arg-type]
    records = engine.bot_turn(sessions, broken, PARAMS)
    assert [r.bot_reply for r in records] == [FALLBACK_REPLY] * 3
    assert [r.serving_event for r in records] == [CHECKER_ERROR] * 3
    assert [r.unsafe for r in records] == [False] * 3
