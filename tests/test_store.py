"""The run store: schema, atomic day commits, checkpoints, resume refusal, read helpers."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from flywheel.store import (
    SCHEMA_VERSION,
    TABLES,
    LoggedWorld,
    RunStore,
    fallback_text,
    fallback_totals,
    fingerprint,
    read_logged_world,
    stored_world,
)
from sim.traffic import DayLog
from sim.world import WorldConfig

CONFIG = {"scenario": "unit", "seed": 7}


def _users() -> tuple[pd.DataFrame, pd.DataFrame]:
    users = pd.DataFrame(
        {
            "user_id": ["u0", "u1"],
            "segment": ["casual", "power"],
            "generation": [0, 0],
            "traits": [{"patience": 0.5}, {"patience": 0.9}],
        }
    )
    assignments = pd.DataFrame(
        {
            "user_id": ["u0", "u1"],
            "arm": ["control", "treatment"],
            "bucket": [0.7, 0.05],
            "salt": "s",
        }
    )
    return users, assignments


def _day(day: int, *, reply: str = "hi there", written: int = 0, fallbacks: int = 0) -> DayLog:
    turns = pd.DataFrame(
        [
            {
                "day": day,
                "period": "pre" if day == 0 else "test",
                "arm": "control",
                "life": "control",
                "policy": "p",
                "session_id": f"s{day}",
                "user_id": "u0",
                "character": "ada",
                "turn_index": 0,
                "hour": 20.0,
                "user_message": "hello",
                "bot_reply": reply,
                "completion_tokens": 3,
                "features": {"words": 2.0},
                "checks": {"no_emoji": True},
                "follows_all": True,
                "violates_any": False,
                "unsafe": False,
                "gold_satisfaction": 0.4,
                "novelty": 0.0,
                "continued": False,
                "liked": True,
                "reported": False,
            }
        ]
    )
    sessions = pd.DataFrame(
        [
            {
                "day": day,
                "period": turns.period[0],
                "arm": "control",
                "life": "control",
                "policy": "p",
                "session_id": f"s{day}",
                "user_id": "u0",
                "character": "ada",
                "start_hour": 20.0,
                "end_hour": 20.0,
                "n_user_messages": 1,
                "n_bot_turns": 1,
                "likes": 1,
                "reported": False,
                "ended_by_user": True,
            }
        ]
    )
    user_days = pd.DataFrame(
        {
            "user_id": ["u0", "u1"],
            "arm": ["control", "treatment"],
            "life": ["control", "treatment"],
            "day": day,
            "period": turns.period[0],
            "weekday": day % 7,
            "active": [True, False],
            "sessions": [1, 0],
            "messages": [1, 0],
            "bot_replies": [1, 0],
            "likes": [1, 0],
            "reports": 0,
            "violations": 0,
            "follows": [1, 0],
            "unsafe_replies": 0,
            "completion_tokens": [3, 0],
            "gold_satisfaction": [0.4, 0.0],
            "novelty": 0.0,
        }
    )
    stats = {
        "active_users": 1,
        "sessions": 1,
        "turns": 1,
        "bot_calls": 1,
        "user_calls": 0,
        "bot_tokens": 3,
        "user_tokens": 0,
        "user_messages": written,
        "user_fallbacks": fallbacks,
        "max_bot_batch": 1,
        "wall_s": 0.1,
    }
    return DayLog(day, str(turns.period[0]), day % 7, sessions, turns, user_days, stats)


@pytest.fixture
def store(tmp_path: Path):
    with RunStore(tmp_path / "run") as s:
        yield s


def test_schema_and_version(store: RunStore) -> None:
    tables = {r[0] for r in store._con.execute("SHOW TABLES").fetchall()}
    assert tables == set(TABLES)
    meta = store.read_table("meta").set_index("key")["value"]
    assert meta["schema_version"] == SCHEMA_VERSION
    assert store.artifacts.is_dir()


def test_other_schema_version_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path / "run").close()
    con = duckdb.connect(str(tmp_path / "run" / "run.duckdb"))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(RuntimeError, match="schema version 0"):
        RunStore(tmp_path / "run")


def test_days_round_trip_with_checkpoints(store: RunStore) -> None:
    sink = store.open_sink("ab", CONFIG)
    assert sink.resume_point() is None
    users, assignments = _users()
    sink.begin(users, assignments, b"state-1")
    assert sink.resume_point() == (-1, b"state-1")
    sink.commit_day(_day(0), b"state0")
    sink.commit_day(_day(1), b"state1")
    assert sink.resume_point() == (1, b"state1")
    assert store._con.execute("SELECT count(*) FROM checkpoints").fetchone() == (1,)

    turns = store.read_turns("ab")
    assert list(turns["day"]) == [0, 1]
    assert turns["features"][0] == {"words": 2.0}
    flat = store.read_turns("ab", flat=True)
    assert flat["feature_words"].tolist() == [2.0, 2.0]
    assert flat["check_no_emoji"].tolist() == [True, True]
    user_days = store.read_user_days("ab")
    assert len(user_days) == 4 and user_days["active"].sum() == 2
    assert store.read_days("ab")["turns"].tolist() == [1, 1]
    joined = store.read_users("ab")
    arms = dict(zip(joined.user_id, joined.arm, strict=True))
    assert arms == {"u0": "control", "u1": "treatment"}
    assert joined["traits"][1] == {"patience": 0.9}

    store.finish_experiment("ab")
    status = store.experiment_status("ab")
    assert status is not None and status.finished and status.last_day == 1
    assert status.fingerprint == fingerprint(CONFIG)


def test_a_failed_day_leaves_nothing_behind(store: RunStore) -> None:
    sink = store.open_sink("ab", CONFIG)
    sink.begin(*_users(), b"s")
    sink.commit_day(_day(0), b"state0")
    broken = _day(1)
    broken = DayLog(
        broken.day,
        broken.period,
        broken.weekday,
        broken.sessions,
        broken.turns,
        broken.user_days.drop(columns=["likes"]),
        broken.stats,
    )
    with pytest.raises(ValueError, match=r"missing \['likes'\]"):
        sink.commit_day(broken, b"state1")
    # turns and sessions of day 1 were inserted before the failure: rolled back with it
    assert store.read_turns("ab")["day"].tolist() == [0]
    assert store.read_sessions("ab")["day"].tolist() == [0]
    assert sink.resume_point() == (0, b"state0")


def test_days_must_come_in_order(store: RunStore) -> None:
    sink = store.open_sink("ab", CONFIG)
    sink.begin(*_users(), b"s")
    with pytest.raises(ValueError, match="day 1 committed after day -1"):
        sink.commit_day(_day(1), b"x")


def test_resume_with_another_config_is_refused(store: RunStore) -> None:
    store.open_sink("ab", CONFIG).begin(*_users(), b"s")
    with pytest.raises(ValueError, match="different scenario"):
        store.open_sink("ab", {**CONFIG, "seed": 8})
    with pytest.raises(ValueError, match="already exists"):
        store.begin_experiment("ab", CONFIG, *_users(), b"s")


def test_data_survives_reopening_read_only(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run") as store:
        sink = store.open_sink("ab", CONFIG)
        sink.begin(*_users(), b"s")
        sink.commit_day(_day(0, reply="persisted"), b"c")
        store.write_analysis("ab", "result", {"lift": 0.1, "ci": [0.0, 0.2]})
    with RunStore(tmp_path / "run", read_only=True) as store:
        assert store.read_turns("ab")["bot_reply"].tolist() == ["persisted"]
        assert store.read_analysis("ab", "result") == {"lift": 0.1, "ci": [0.0, 0.2]}
        assert json.loads(json.dumps(store.experiments()["config"][0])) == CONFIG


def test_analysis_table_numbers_days_from_the_test(store: RunStore) -> None:
    sink = store.open_sink("ab", CONFIG)
    sink.begin(*_users(), b"s")
    for day in range(3):
        sink.commit_day(_day(day), b"c")
    table = store.analysis_table("ab")
    assert sorted(table["day"].unique()) == [-1, 0, 1]
    assert set(table.loc[table.day < 0, "period"]) == {"pre"}
    assert table["active"].isin([0, 1]).all()


def test_missing_read_only_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunStore(tmp_path / "nothing", read_only=True)


def test_user_fallbacks_are_committed_with_the_day_and_totalled(tmp_path: Path) -> None:
    """Each day's simulated-user fallback counts are written in the day's transaction, so a
    reopened (resumed) run keeps them; ``user_fallbacks`` totals them per experiment."""
    with RunStore(tmp_path / "run") as store:
        sink = store.open_sink("ab", CONFIG)
        sink.begin(*_users(), b"s")
        sink.commit_day(_day(0, written=10, fallbacks=1), b"c0")
        sink.commit_day(_day(1, written=30, fallbacks=3), b"c1")
        quiet = store.open_sink("aa", {**CONFIG, "seed": 8})
        quiet.begin(*_users(), b"s")
        quiet.commit_day(_day(0), b"c0")
    with RunStore(tmp_path / "run", read_only=True) as store:
        table = store.user_fallbacks().set_index("experiment_id")
        days = store.read_days("ab")
        one = store.user_fallbacks("ab")
    assert list(days["user_fallbacks"]) == [1, 3] and list(days["user_messages"]) == [10, 30]
    assert table.loc["ab"].to_dict() == {
        "user_messages": 40,
        "user_fallbacks": 4,
        "fallback_share": 0.1,
    }
    assert list(one["experiment_id"]) == ["ab"]
    assert table.loc["aa", "user_messages"] == 0 and pd.isna(table.loc["aa", "fallback_share"])
    assert fallback_totals(days)["fallback_share"] == 0.1
    assert fallback_text(fallback_totals(days)) == "4 of 40 user messages (10.0%)"
    assert fallback_text(table.loc["aa"].to_dict()) == "no user message written by the user LLM"


def test_read_logged_world_reads_the_turns_and_the_world_they_were_logged_in(
    tmp_path: Path,
) -> None:
    characters_dir = Path(__file__).resolve().parents[1] / "scenarios" / "characters"
    world = WorldConfig(characters_dir=characters_dir, characters=["Captain Mara", "Pixel"])
    run = tmp_path / "run"
    with RunStore(run) as store:
        # `flywheel ab` records its whole scenario, `flywheel run` the world beside its name.
        ab = store.open_sink("ab", {"scenario": {"world": world.model_dump(mode="json")}})
        ab.begin(*_users(), b"s")
        ab.commit_day(_day(0, reply="from ab"), b"c")
        loop = store.open_sink("gen1-traffic", {"world": world.model_dump(mode="json")})
        loop.begin(*_users(), b"s")
        loop.commit_day(_day(0, reply="from the loop"), b"c")
    logged = read_logged_world(run)
    assert isinstance(logged, LoggedWorld) and logged.world == world
    assert sorted(logged.turns["bot_reply"]) == ["from ab", "from the loop"]
    assert sorted(logged.characters) == ["Captain Mara", "Pixel"]
    assert read_logged_world(run, "gen1-traffic").turns["bot_reply"].tolist() == ["from the loop"]
    with RunStore(tmp_path / "empty") as store:
        store.open_sink("ab", CONFIG).begin(*_users(), b"s")
    with pytest.raises(ValueError, match="has no logged turns"):
        read_logged_world(tmp_path / "empty")
    with RunStore(tmp_path / "no-world") as store:
        sink = store.open_sink("ab", CONFIG)  # a scenario's name and no world
        sink.begin(*_users(), b"s")
        sink.commit_day(_day(0), b"c")
    with pytest.raises(ValueError, match="records no world"):
        read_logged_world(tmp_path / "no-world")


def test_stored_world_reads_either_layout_and_none_without_one() -> None:
    world = WorldConfig(characters=["Pixel"])
    record = world.model_dump(mode="json")
    assert stored_world({"scenario": "demo", "world": record}) == world
    assert stored_world({"scenario": {"world": record}}) == world
    assert stored_world(CONFIG) is None and stored_world({}) is None
