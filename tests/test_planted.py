"""Planted policy wrappers (sim.planted) on the tiny random Llama: what they append, their
seeding, and the command-line forms ``violate[@RATE]:``, ``unsafe[@RATE]:`` and
``stylevar[@EMOJI,FILLER]:``."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import PolicySpec, SamplingParams, load_policy
from policies.base import Policy
from rewards.checkers import NoEmoji, build_checkers, run_checkers
from rewards.features import style_features
from rewards.safety import SafetyChecker
from sim.planted import (
    EMOJI_SNIPPET,
    FILLERS,
    UNSAFE_SNIPPETS,
    StyleVariationPolicy,
    UnsafePolicy,
    ViolatingPolicy,
    planted_policy,
)

PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
CHATS = [
    [
        {"role": "system", "content": f"You are Pixel.\n- {NoEmoji().instruction}"},
        {"role": "user", "content": f"tell me about game {i}"},
    ]
    for i in range(12)
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> Policy:
    return load_policy(PolicySpec(model=str(tiny_llama_dir), dtype="float32", batch_size=4))


def test_style_variation_appends_emoji_and_filler_to_the_base_reply(tiny: Policy) -> None:
    plain = [g.text for g in tiny.generate(CHATS, PARAMS)]
    emoji_only = StyleVariationPolicy(tiny, emoji_rate=1.0, filler_rate=0.0)
    styled = [g.text for g in emoji_only.generate(CHATS, PARAMS)]
    for base, text in zip(plain, styled, strict=True):
        assert text.startswith(base.rstrip())
        assert style_features(text)["emoji"] >= 1 + style_features(base)["emoji"]
    filler_only = StyleVariationPolicy(tiny, emoji_rate=0.0, filler_rate=1.0)
    assert all(any(f in g.text for f in FILLERS) for g in filler_only.generate(CHATS, PARAMS))
    unchanged = StyleVariationPolicy(tiny, emoji_rate=0.0, filler_rate=0.0)
    assert [g.text for g in unchanged.generate(CHATS, PARAMS)] == [p.rstrip() for p in plain]


def test_style_variation_is_seeded_and_hits_about_its_rates(tiny: Policy) -> None:
    policy = StyleVariationPolicy(tiny, emoji_rate=0.5, filler_rate=0.5)
    first = [g.text for g in policy.generate(CHATS * 4, PARAMS)]
    assert first == [g.text for g in policy.generate(CHATS * 4, PARAMS)]
    other = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    assert first != [g.text for g in policy.generate(CHATS * 4, other)]
    with_filler = sum(any(f in t for f in FILLERS) for t in first) / len(first)
    assert 0.25 < with_filler < 0.75


def test_violating_policy_breaks_the_characters_prohibitions(tiny: Policy) -> None:
    replies = ViolatingPolicy(tiny, rate=1.0).generate(CHATS, PARAMS)
    checkers = build_checkers({"no_emoji": True})
    assert all(EMOJI_SNIPPET in g.text for g in replies)
    assert all(run_checkers(g.text, checkers).violates_any for g in replies)


def test_unsafe_policy_writes_replies_the_real_safety_checker_blocks(tiny: Policy) -> None:
    plain = [g.text for g in tiny.generate(CHATS * 4, PARAMS)]
    replies = [g.text for g in UnsafePolicy(tiny, rate=0.5).generate(CHATS * 4, PARAMS)]
    spoiled = [text != base for base, text in zip(plain, replies, strict=True)]
    assert 0.25 < sum(spoiled) / len(spoiled) < 0.75
    verdicts = SafetyChecker().check(replies)
    # Unsafe exactly where spoiled, or where the random tiny model's own text already was.
    already = [not v.safe for v in SafetyChecker().check(plain)]
    assert [not v.safe for v in verdicts] == [s or a for s, a in zip(spoiled, already, strict=True)]
    assert sum(already) < sum(spoiled) / 4
    assert {s for t in replies for s in UNSAFE_SNIPPETS if s in t} == set(UNSAFE_SNIPPETS)
    assert all(not v.safe for v in SafetyChecker().check(list(UNSAFE_SNIPPETS)))
    # seeded by the call's seed, so a resumed run spoils the same replies
    again = [g.text for g in UnsafePolicy(tiny, rate=0.5).generate(CHATS * 4, PARAMS)]
    assert again == replies


def test_command_line_forms_build_the_right_wrapper(tiny: Policy) -> None:
    asked: list[str] = []

    def load(model: str) -> Policy:
        asked.append(model)
        return tiny

    assert planted_policy("smollm2", load) is tiny
    violating = planted_policy("violate@0.3:smollm2", load)
    assert isinstance(violating, ViolatingPolicy) and violating.rate == 0.3
    assert planted_policy("violate:smollm2", load).rate == 1.0
    styled = planted_policy("stylevar@0.5,0.2:smollm2", load)
    assert isinstance(styled, StyleVariationPolicy)
    assert (styled.emoji_rate, styled.filler_rate) == (0.5, 0.2)
    default = planted_policy("stylevar:smollm2", load)
    assert (default.emoji_rate, default.filler_rate) == (0.4, 0.35)
    unsafe = planted_policy("unsafe@0.25:smollm2", load)
    assert isinstance(unsafe, UnsafePolicy) and unsafe.rate == 0.25
    assert unsafe.name == f"unsafe@0.25:{tiny.name}"
    assert planted_policy("unsafe:smollm2", load).rate == 1.0
    assert asked == ["smollm2"] * 7
    assert planted_policy("/models/with:colon", load) is tiny  # not a planted prefix


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("violate@x:smollm2", "'x' are not numbers"),
        ("violate@0.1,0.2:smollm2", "one rate"),
        ("stylevar@0.5:smollm2", "two rates"),
        ("stylevar:", "no base model"),
        ("stylevar@2,0:smollm2", "emoji_rate must be in"),
        ("violate@0:smollm2", "rate must be in"),
        ("unsafe@0.1,0.2:smollm2", "one rate"),
        ("unsafe@1.5:smollm2", "UnsafePolicy rate must be in"),
        ("unsafe:", "no base model"),
    ],
)
def test_malformed_planted_policies_say_what_to_write(
    tiny: Policy, spec: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        planted_policy(spec, lambda model: tiny)
