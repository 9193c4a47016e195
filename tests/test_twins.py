"""The twin design and whole-day batching of the traffic model, on a tiny random Llama.

A twin test lives every user's test days twice, once per arm, on common random numbers; the
strongest check of those is an A/A twin test with greedy decoding, where nothing but the
random streams could tell the lives apart: they must come out identical, row for row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flywheel.store import RunStore
from policies import PolicySpec, load_policy
from sim.planted import ViolatingPolicy
from sim.traffic import CountingPolicy, TrafficConfig, TrafficSimulator, drifted_population
from sim.world import World, parse_world

REPO = Path(__file__).resolve().parents[1]
SEED = 5


@pytest.fixture(scope="module")
def tiny_policy(tiny_llama_dir: Path) -> Any:
    return load_policy(PolicySpec(model=str(tiny_llama_dir), dtype="float32"))


def _world(tiny_policy: Any, temperature: float) -> World:
    config = parse_world(
        {
            "characters_dir": str(REPO / "scenarios" / "characters"),
            "turn_cap": 3,
            "user_llm": {"max_new_tokens": 4, "temperature": temperature},
        },
        source="test",
        base_dir=REPO,
    )
    return World.build(config, seed=SEED, user_policy=CountingPolicy(tiny_policy))


def _run(
    tmp_path: Path,
    world: World,
    policies: dict[str, Any],
    temperature: float,
    on_day_end: Any = None,
    **traffic: Any,
) -> dict[str, pd.DataFrame]:
    config = TrafficConfig(
        n_users=12,
        pre_days=1,
        test_days=2,
        treatment_share=0.5,
        max_sessions_per_day=2,
        extra_session_prob=0.5,
        bot_sampling={"max_new_tokens": 4, "temperature": temperature},
        **traffic,
    )
    population = drifted_population(world.sampler, config, SEED)
    simulator = TrafficSimulator(
        world.engine, population.users, policies, config, seed=SEED,
        user_params=world.user_params, progress=False,
    )  # fmt: skip
    with RunStore(tmp_path / "run") as store:
        simulator.run(store.open_sink("ab", {"design": config.design}), on_day_end=on_day_end)
        return {
            "user_days": store.read_user_days("ab").drop(columns=["experiment_id"]),
            "turns": store.read_turns("ab").drop(columns=["experiment_id"]),
            "days": store.read_days("ab"),
        }


def test_greedy_aa_twins_live_identical_lives(tmp_path: Path, tiny_policy: Any) -> None:
    world = _world(tiny_policy, temperature=0.0)
    tables = _run(
        tmp_path, world, {"control": tiny_policy, "treatment": tiny_policy}, 0.0,
        design="twins", novelty_amplitude=0.0,
    )  # fmt: skip
    days = tables["user_days"]
    pre, test = days[days.period == "pre"], days[days.period == "test"]
    assert (pre.life == pre.arm).all() and len(pre) == 12
    assert len(test) == 12 * 2 * 2  # every user, both lives, both test days
    lives = {life: rows.drop(columns="life") for life, rows in test.groupby("life")}
    keys = ["day", "user_id"]
    control = lives["control"].sort_values(keys).reset_index(drop=True)
    treatment = lives["treatment"].sort_values(keys).reset_index(drop=True)
    assert control.active.sum() > 0
    # Common random numbers: same arrivals, openers, characters and signals at every turn.
    pd.testing.assert_frame_equal(control, treatment)


def test_twins_serve_each_life_by_its_arm(tmp_path: Path, tiny_policy: Any) -> None:
    world = _world(tiny_policy, temperature=0.0)
    treatment = ViolatingPolicy(tiny_policy, rate=1.0)
    tables = _run(
        tmp_path, world, {"control": tiny_policy, "treatment": treatment}, 0.0,
        design="twins", novelty_amplitude=0.4,
    )  # fmt: skip
    turns = tables["turns"]
    test = turns[turns.period == "test"]
    served = test.groupby("life")["policy"].agg(set).to_dict()
    assert served == {"control": {tiny_policy.name}, "treatment": {treatment.name}}
    # Both lives of a user meet the test, whatever their hashed arm.
    assert set(test[test.life == "treatment"].arm) == {"control", "treatment"}
    assert (test[test.life == "treatment"].violates_any).all()
    assert (test[test.life == "control"].novelty == 0).all()
    assert (test[test.life == "treatment"].novelty > 0).all()
    # The same first message opens the first session of each user's two lives.
    first = test[test.turn_index == 0].sort_values("hour").groupby(["user_id", "day", "life"])
    openers = first["user_message"].first().unstack("life").dropna()
    assert len(openers) > 0 and (openers["control"] == openers["treatment"]).all()


def test_a_whole_day_is_one_batch_per_round(tmp_path: Path, tiny_policy: Any) -> None:
    world = _world(tiny_policy, temperature=0.8)
    tables = _run(tmp_path, world, {"control": tiny_policy, "treatment": tiny_policy}, 0.8)
    sessions_start = tables["turns"].groupby("day")["hour"].agg(["min", "max"])
    assert (sessions_start["max"] - sessions_start["min"] > 1).all()  # spread over the day
    days = tables["days"].set_index("day")
    first_turns = tables["turns"][tables["turns"].turn_index == 0].groupby("day").size()
    active = tables["user_days"].groupby("day")["active"].sum()
    # Every first session of the day opens in round one, whatever its hour: the first
    # bot call carries one reply per active user.
    assert (days["max_bot_batch"] == active).all()
    assert (days["bot_calls"] < first_turns).all()


def test_a_twin_run_resumes_to_the_same_tables(tmp_path: Path, tiny_policy: Any) -> None:
    def run(folder: str, on_day_end: Any = None) -> dict[str, pd.DataFrame]:
        world = _world(tiny_policy, temperature=0.8)
        treatment = ViolatingPolicy(tiny_policy, rate=0.5)
        return _run(tmp_path / folder, world, {"control": tiny_policy, "treatment": treatment},
                    0.8, on_day_end=on_day_end, design="twins")  # fmt: skip

    def crash_after_the_first_test_day(day: int) -> None:
        if day == 1:  # the twins exist from day 1 on: the checkpoint must carry them
            raise KeyboardInterrupt

    reference = run("reference")
    with pytest.raises(KeyboardInterrupt):
        run("resumed", crash_after_the_first_test_day)
    resumed = run("resumed")
    for name in ("user_days", "turns"):
        pd.testing.assert_frame_equal(resumed[name], reference[name], obj=name)
