"""The style-artifact suite's decision rule on hand-built reply sets with transparent scorers.

The artifact-trap test (tests/test_artifact_trap.py) runs the suite on real reward models;
here the reward is a known formula so each verdict can be traced: content is the number of
the context's words the reply uses, style is a bonus per reply that carries emoji.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from flywheel.scenario import StyleGateConfig
from flywheel.style_regression import run_style_regression
from rewards.checkers import emoji_list, words

N = 40
EMOJI_BONUS = 3.0


class FormulaReward:
    """score = shared context words (+ EMOJI_BONUS when the reply has emoji and style counts)."""

    def __init__(self, style_controlled: bool) -> None:
        self.style_controlled = style_controlled
        self.name = "formula-sc" if style_controlled else "formula"

    def score(
        self, contexts: Sequence[str], replies: Sequence[str], with_style: bool = False
    ) -> np.ndarray:
        style = with_style or not self.style_controlled
        return np.array(
            [
                len(set(words(c.lower())) & set(words(r.lower())))
                + (EMOJI_BONUS if style and emoji_list(r) else 0.0)
                for c, r in zip(contexts, replies, strict=True)
            ]
        )


@pytest.fixture
def pairs() -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    topics = ["tea", "jazz", "rain", "maps", "chess", "bread", "stars", "boats"]
    contexts = [f"tell me about {topics[i % 8]} and {topics[(i + 3) % 8]}" for i in range(N)]
    deployed = [
        f"I like {topics[i % 8]} a lot, {int(rng.integers(2, 9))} times a week." for i in range(N)
    ]
    return contexts, deployed


def suite(contexts: list[str], candidate: list[str], deployed: list[str]):
    return run_style_regression(
        contexts, candidate, deployed, [() for _ in contexts],
        FormulaReward(False), FormulaReward(True), StyleGateConfig(),
    )  # fmt: skip


def test_emoji_that_the_reward_pays_for_fails(pairs) -> None:
    contexts, deployed = pairs
    result = suite(contexts, [f"{r} 🎉✨" for r in deployed], deployed)
    assert not result.passed
    assert result["emoji_rate"].shifted and result["rm_style_term"].shifted
    assert result.raw_win_rate == pytest.approx(1.0)
    assert result.reason.startswith("style shift explains the gain")


def test_better_content_with_paid_emoji_still_fails(pairs) -> None:
    """Best of n under a naive reward picks content AND style: both RMs prefer the
    candidate, yet it learned the style the reward pays for."""
    contexts, deployed = pairs
    candidate = [f"{r} {c.split()[-1]} 🎉" for c, r in zip(contexts, deployed, strict=True)]
    result = suite(contexts, candidate, deployed)
    assert result.style_controlled_win_rate == pytest.approx(1.0)
    assert not result.passed
    assert result.reason.startswith("learned the reward's style")


def test_better_content_in_the_same_style_passes(pairs) -> None:
    contexts, deployed = pairs
    candidate = [f"{r} {c.split()[-1]}" for c, r in zip(contexts, deployed, strict=True)]
    result = suite(contexts, candidate, deployed)
    assert result.passed and not result.shifts
    assert result.reason.startswith("no significant style shift")


def test_a_style_change_the_reward_does_not_pay_for_passes(pairs) -> None:
    """Questions are a style shift, but this reward pays nothing for them."""
    contexts, deployed = pairs
    candidate = [r.replace(".", ", right?") for r in deployed]
    result = suite(contexts, candidate, deployed)
    assert result["question_rate"].shifted and not result["rm_style_term"].shifted
    assert result.passed
    assert "does not explain" in result.reason


def test_too_few_pairs_to_see_a_rise_is_inconclusive(pairs) -> None:
    """Twelve unchanged pairs could not have seen a 0.20 rise in emoji: not a pass."""
    contexts, deployed = pairs
    result = suite(contexts[:12], deployed[:12], deployed[:12])
    assert result.verdict == "inconclusive" and not result.passed and not result.shifts
    assert result["emoji_rate"].power < 0.8 and result.n_needed > 12
    assert result.reason.startswith("inconclusive: 12 pairs detect a 0.20 rise in emoji_rate")
