"""The hf backend: batched, left-padded, seeded, stops at end-of-turn."""

from __future__ import annotations

import pytest

from policies import PolicySpec, SamplingParams, load_policy
from policies.hf import HFPolicy
from policies.tokens import fit_prompt_ids

CHATS = [
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the weather like on your ship today, captain?"}],
    [
        {"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "what should I cook?"},
    ],
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> HFPolicy:
    return load_policy(
        PolicySpec(backend="hf", model=str(tiny_llama_dir), dtype="float32", batch_size=2)
    )


def test_same_seed_same_replies_different_seed_different(tiny: HFPolicy) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    first = tiny.generate(CHATS, params)
    again = tiny.generate(CHATS, params)
    other = tiny.generate(CHATS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert first == again
    assert [g.text for g in first] != [g.text for g in other]
    assert len(first) == len(CHATS)


def test_batched_greedy_matches_one_at_a_time(tiny: HFPolicy) -> None:
    # Left padding with attention masks must not change what each row generates.
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    batched = tiny.generate(CHATS, params)
    single = [tiny.generate([chat], params)[0] for chat in CHATS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]


def test_token_counts_and_stop(tiny: HFPolicy) -> None:
    out = tiny.generate(CHATS, SamplingParams(max_new_tokens=5, temperature=1.0))
    for g in out:
        assert 0 <= g.completion_tokens <= 5
        assert g.prompt_tokens > 3
        assert "<|im_end|>" not in g.text
    assert tiny.tokenizer.convert_tokens_to_ids("<|im_end|>") in tiny.stop_ids


def test_long_history_drops_oldest_turns_keeps_system(tiny_llama_dir) -> None:
    policy = load_policy(
        PolicySpec(backend="hf", model=str(tiny_llama_dir), dtype="float32", max_prompt_tokens=60)
    )
    chat = [{"role": "system", "content": "SYSTEM-PROMPT"}]
    for i in range(20):
        chat += [
            {"role": "user", "content": f"message {i} " * 3},
            {"role": "assistant", "content": "ok"},
        ]
    chat.append({"role": "user", "content": "last"})
    ids = fit_prompt_ids(policy.tokenizer, chat, policy.spec.max_prompt_tokens)
    text = policy.tokenizer.decode(ids)
    assert len(ids) <= 60
    assert "SYSTEM-PROMPT" in text and "last" in text and "message 0 " not in text


def _long_system_chat(system_words: int, last_words: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "PERSONA " + "arr " * system_words},
        {"role": "user", "content": "an old question " * 10},
        {"role": "assistant", "content": "an old answer " * 10},
        {"role": "user", "content": "NEWEST " + "why " * last_words},
    ]


def test_a_long_newest_turn_keeps_the_whole_persona(tiny: HFPolicy) -> None:
    tokenizer = tiny.tokenizer
    chat = _long_system_chat(system_words=30, last_words=30)
    ids = fit_prompt_ids(tokenizer, chat, max_prompt_tokens=90)
    # The persona and the newest turn fit without the old turns: those are what is dropped.
    assert ids == fit_prompt_ids(tokenizer, [chat[0], chat[-1]], max_prompt_tokens=10_000)
    text = tokenizer.decode(ids)
    assert text.count("arr") == 30 and "PERSONA" in text and "NEWEST" in text
    assert "old" not in text


def test_persona_and_newest_turn_over_the_budget_are_refused_with_sizes(tiny: HFPolicy) -> None:
    tokenizer = tiny.tokenizer
    chat = _long_system_chat(system_words=30, last_words=60)
    needed = len(fit_prompt_ids(tokenizer, [chat[0], chat[-1]], max_prompt_tokens=10_000))
    system_text = tokenizer.apply_chat_template(chat[:1], tokenize=False)
    system = len(tokenizer(system_text, add_special_tokens=False)["input_ids"])
    expected = (
        rf"the system prompt \({system} tokens\) and the newest turn need {needed} prompt "
        rf"tokens.*policy.max_prompt_tokens=90; fix: raise policy.max_prompt_tokens to at "
        rf"least {needed}"
    )
    with pytest.raises(ValueError, match=expected):
        fit_prompt_ids(tokenizer, chat, max_prompt_tokens=90)
    with pytest.raises(ValueError, match=r"the newest turn need \d+ prompt tokens"):
        fit_prompt_ids(tokenizer, chat[1:], max_prompt_tokens=20)


@pytest.mark.parametrize(
    ("chat", "fragment"),
    [
        ([], "is empty"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "put it first"),
    ],
)
def test_bad_chats_are_named(tiny: HFPolicy, chat, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        tiny.generate([chat], SamplingParams())


def test_bad_params_and_specs() -> None:
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="base_url is required"):
        PolicySpec(backend="openai")
    with pytest.raises(ValueError, match="Extra inputs"):
        PolicySpec(modle="x")


@pytest.mark.slow
def test_real_smollm2_answers_in_character() -> None:
    policy = load_policy(PolicySpec(backend="hf", model="smollm2"))
    params = SamplingParams(max_new_tokens=24, seed=3)
    out = policy.generate(CHATS[:2], params)
    assert out == policy.generate(CHATS[:2], params)
    assert all(g.text and g.completion_tokens > 0 for g in out)
