"""LLM-simulated users: chit-chat corpus, output cleaning, PII planting, batched writing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from policies import Policy, SamplingParams, load_policy
from policies.base import Chat, Generation
from sim.characters import Character
from sim.chitchat import load_chitchat
from sim.population import PopulationConfig, UserSampler
from sim.user_llm import UserSimulator, clean_message, truncate_words

CHARACTER = Character(name="Captain Mara", persona="A retired sea captain.", topics=("travel",))


class CountingPolicy:
    """Wraps a real policy and records every generate call (to prove batching)."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[list[Chat]] = []

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        self.calls.append(list(chats))
        return self.inner.generate(chats, params)


@pytest.fixture(scope="module")
def tiny_policy(tiny_llama_dir: Path) -> CountingPolicy:
    return CountingPolicy(load_policy(str(tiny_llama_dir)))


def test_chitchat_split_is_seeded_disjoint_and_complete() -> None:
    corpus = load_chitchat(0.2, seed=0)
    n = len(corpus.train) + len(corpus.heldout)
    assert n == 6233  # 7,168 conversations less exact duplicates
    assert len(corpus.heldout) == round(0.2 * n)
    assert not set(corpus.train) & set(corpus.heldout)
    other = load_chitchat(0.2, seed=1)
    assert other.heldout != corpus.heldout
    openers = corpus.openers("train")
    assert openers and all(1 <= len(re.findall(r"\w+", o)) <= 60 for o in openers)
    lengths = corpus.message_words()
    assert 5 <= np.median(lengths) <= 30  # real chat messages are short
    with pytest.raises(ValueError, match="heldout_fraction"):
        load_chitchat(1.5)
    with pytest.raises(ValueError, match="split"):
        corpus.openers("test")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("User: hey, how are you?", "hey, how are you?"),
        ("**Me:** I like pizza.", "I like pizza."),
        ("Captain Mara: ahoy\nUser: nope", "ahoy"),
        ("sure thing!\nCaptain Mara: next line", "sure thing!"),
        ("first paragraph\n\nsecond paragraph", "first paragraph"),
        ('"quoted message"', "quoted message"),
        ("Assistant: User: double prefix", "double prefix"),
        ("one two three four five six", "one two three four"),
        ("   ", ""),
    ],
)
def test_clean_message(raw: str, clean: str) -> None:
    assert clean_message(raw, ["Captain Mara"], max_words=4 if "six" in raw else 50) == clean


def test_truncate_words_keeps_trailing_punctuation() -> None:
    assert truncate_words("one two three! four", 3) == "one two three!"
    assert truncate_words("short", 3) == "short"
    assert truncate_words("I like it. You are so very nice", 5) == "I like it."
    assert truncate_words("Hi. You are so very nice", 5) == "Hi. You are so very"


def test_user_chat_swaps_roles(tiny_policy: CountingPolicy) -> None:
    sim = UserSimulator(tiny_policy, load_chitchat())
    user = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(1)[0]
    chat = sim.user_chat(
        user,
        CHARACTER,
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy!"}],
    )
    assert [m["role"] for m in chat] == ["system", "assistant", "user"]
    assert "Captain Mara" in chat[0]["content"] and user.profile in chat[0]["content"]


def test_pii_is_planted_at_the_configured_rate(tiny_policy: CountingPolicy) -> None:
    sim = UserSimulator(tiny_policy, load_chitchat(), pii_rate=0.5)
    rng = np.random.default_rng(0)
    results = [sim.maybe_plant_pii("hello", rng) for _ in range(400)]
    planted = [text for text, flag in results if flag]
    assert 0.4 < len(planted) / 400 < 0.6
    assert all(text == "hello" for text, flag in results if not flag)
    assert any("@" in t for t in planted)
    assert any(re.search(r"\d{3}.*\d{4}", t) for t in planted)
    never = UserSimulator(tiny_policy, load_chitchat(), pii_rate=0.0)
    assert not any(never.maybe_plant_pii("x", rng)[1] for _ in range(50))
    with pytest.raises(ValueError, match="pii_rate"):
        UserSimulator(tiny_policy, load_chitchat(), pii_rate=2.0)


def test_next_messages_is_one_batched_call_and_seeded(tiny_policy: CountingPolicy) -> None:
    corpus = load_chitchat()
    sim = UserSimulator(tiny_policy, corpus)
    users = UserSampler(
        PopulationConfig(), np.random.default_rng(0), corpus.message_words()
    ).sample(3)
    convs = [
        [{"role": "user", "content": sim.opener(x, np.random.default_rng(i))},
         {"role": "assistant", "content": "Ahoy! Where have you sailed?"}]
        for i, x in enumerate(users)
    ]  # fmt: skip
    params = SamplingParams(max_new_tokens=12, seed=7)
    before = len(tiny_policy.calls)
    first = sim.next_messages(
        users, [CHARACTER] * 3, convs, params, [np.random.default_rng(i) for i in range(3)]
    )
    assert len(tiny_policy.calls) == before + 1 and len(tiny_policy.calls[-1]) == 3
    second = sim.next_messages(
        users, [CHARACTER] * 3, convs, params, [np.random.default_rng(i) for i in range(3)]
    )
    assert first == second
    for (text, pii), user in zip(first, users, strict=True):
        assert re.search(r"\w", text) and not pii
        assert len(re.findall(r"\w+", text)) <= sim.word_cap(user)
    with pytest.raises(ValueError, match="one user, character"):
        sim.next_messages(users, [CHARACTER], convs, params, [np.random.default_rng(0)])
