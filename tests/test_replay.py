"""sim.replay.GoldReplay: a new reply is scored for the logged user as they were then."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from sim.characters import Character
from sim.gold import GoldConfig
from sim.population import PopulationConfig, UserSampler
from sim.replay import MOMENT_COLUMNS, GoldReplay, compare_gold

CHEF = Character(name="Chef", persona="A chef.", topics=("food",))
# A user the population draws, with emoji fatigue that a replayed exposure visibly costs.
DRAWN = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(1)[0]
TRAITS = dataclasses.replace(DRAWN.traits, emoji_fatigue=0.9)
# (day, session, emoji in each reply the user saw), oldest first.
SERVED = {(1, "s1"): [3, 0, 2], (3, "s2"): [1, 4]}


def logged() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The users and turns tables as the run store returns them (traits parsed from JSON)."""
    traits = {**dataclasses.asdict(TRAITS), "topic_interests": list(TRAITS.topic_interests)}
    users = pd.DataFrame(
        # The same user in two experiments, and a stored key that is no trait.
        [{"user_id": "u1", "segment": DRAWN.segment, "traits": {**traits, "cohort": 2}}] * 2
    )
    turns = pd.DataFrame(
        {
            "user_id": "u1",
            "day": day,
            "hour": 10.0 + i,
            "session_id": session,
            "turn_index": i,
            "features": {"emoji": float(n)},
        }
        for (day, session), counts in SERVED.items()
        for i, n in enumerate(counts)
    )
    return users, turns.sample(frac=1.0, random_state=0)  # replay must sort them itself


@pytest.fixture(scope="module")
def replay() -> GoldReplay:
    users, turns = logged()
    return GoldReplay(users, turns, {"Chef": CHEF}, GoldConfig())


def test_the_user_has_the_exposure_of_the_replies_before_the_moment(replay: GoldReplay) -> None:
    r = replay.gold.config.fatigue_recovery
    expected = {
        (1, "s1", 0): 0.0,  # nothing seen yet
        (1, "s1", 2): 3.0,  # the first two replies of the session
        (3, "s2", 1): 5 * r**2 + 1,  # day 1's five, decayed two days, then this session's 1
        (6, "s3", 0): (5 * r**2 + 5) * r**3,  # everything, decayed to day 6
    }
    for (day, session, turn), exposure in expected.items():
        user = replay.user_at("u1", day, session, turn)
        assert user.state.emoji_exposure == pytest.approx(exposure), (day, session, turn)
        assert user.traits == TRAITS and user.segment == DRAWN.segment


def test_an_emoji_reply_scores_lower_where_the_user_had_seen_more_emoji(
    replay: GoldReplay,
) -> None:
    moments = [(1, "s1", 0), (3, "s2", 1)]
    candidates = pd.DataFrame(
        {
            "prompt": [{"role": "user", "content": "What should I cook tonight?"}],
            "character": "Chef",
            "reply": "A tomato risotto, slow and creamy! 🍅🍅",
            "user_id": "u1",
            "day": day,
            "session_id": session,
            "turn_index": turn,
        }
        for day, session, turn in moments
    )[["prompt", "character", "reply", *MOMENT_COLUMNS]]
    fresh, tired = replay(candidates)
    # Only the emoji-fatigue term differs: w_emoji_tire * emoji_fatigue * (phi(X) - phi(0)).
    config = replay.gold.config
    exposure = 5 * config.fatigue_recovery**2 + 1
    phi = 1 - math.exp(-exposure / config.fatigue_scale)
    assert fresh - tired == pytest.approx(config.w_emoji_tire * TRAITS.emoji_fatigue * phi)
    assert tired < fresh


def contexts(moments: list[tuple[int, str, int]]) -> pd.DataFrame:
    """Logged contexts of u1 at ``moments`` (day, session, turn), all asking the chef."""
    return pd.DataFrame(
        {
            "prompt": [{"role": "user", "content": "What should I cook tonight?"}],
            "character": "Chef",
            "user_id": "u1",
            "day": day,
            "session_id": session,
            "turn_index": turn,
        }
        for day, session, turn in moments
    )


def test_gold_comparison_is_the_paired_t_test_of_the_replayed_utilities(
    replay: GoldReplay,
) -> None:
    from scipy import stats

    where = contexts([(1, "s1", 0), (1, "s1", 2), (3, "s2", 1), (6, "s3", 0)])
    candidate = ["Risotto!", "A slow tomato risotto tonight.", "Soup 🍲", "Pasta with garlic?"]
    parent = ["I am a chef. I am a chef.", "Food.", "Try a salad 🥗🥗🥗", "Pasta."]
    result = compare_gold(replay, where, candidate, parent)

    ours = replay(where.assign(reply=candidate))
    theirs = replay(where.assign(reply=parent))
    reference = stats.ttest_rel(ours, theirs)
    low, high = reference.confidence_interval(0.95)
    assert result.n == 4
    assert result.candidate == pytest.approx(ours.mean())
    assert result.parent == pytest.approx(theirs.mean())
    assert result.diff == pytest.approx((ours - theirs).mean())
    assert result.p_value == pytest.approx(reference.pvalue)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high))


def test_gold_comparison_of_identical_replies_has_nothing_to_test(replay: GoldReplay) -> None:
    where = contexts([(1, "s1", 0), (3, "s2", 1)])
    replies = ["Risotto!", "Soup 🍲"]
    result = compare_gold(replay, where, replies, replies)
    assert result.diff == 0.0 and result.n == 2
    assert math.isnan(result.p_value) and math.isnan(result.ci_low)
