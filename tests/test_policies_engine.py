"""The hf_engine backend: prefix caching, continuous batching, per-chat seeds, stops."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from policies import PolicySpec, SamplingParams, load_policy
from policies.engine import (
    BLOCK_TOKENS,
    NUCLEUS_CANDIDATES,
    EnginePolicy,
    PrefixCache,
    sample_next,
    shared_prefixes,
)
from policies.hf import HFPolicy

PERSONA = "You are Captain Mara, a cheerful pirate who sails the northern seas. " * 4
CHATS = [
    [{"role": "system", "content": PERSONA}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the weather like on your ship today, captain?"}],
    [
        {"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "what should I cook?"},
    ],
    [{"role": "system", "content": PERSONA}, {"role": "user", "content": "where are we going?"}],
]


def _engine(path, **fields) -> EnginePolicy:
    spec = PolicySpec(backend="hf_engine", model=str(path), dtype="float32", **fields)
    return load_policy(spec)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> EnginePolicy:
    return _engine(tiny_llama_dir, batch_size=2)


def test_greedy_matches_hf_generate_one_chat_at_a_time(tiny_llama_dir) -> None:
    # Prefix reuse, left-padded states of different lengths and rows joining a running
    # batch (batch_size=2 < 4 chats) must not change what each chat generates.
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    hf = HFPolicy(PolicySpec(backend="hf", model=str(tiny_llama_dir), dtype="float32"))
    engine = _engine(tiny_llama_dir, batch_size=2)
    with shared_prefixes():
        first = engine.generate(CHATS, params)
        again = engine.generate(CHATS, params)  # now served from the prefix cache
    reference = [hf.generate([chat], params)[0] for chat in CHATS]
    assert [g.completion_ids for g in first] == [g.completion_ids for g in reference]
    assert [g.completion_ids for g in again] == [g.completion_ids for g in reference]
    assert [g.prompt_tokens for g in first] == [g.prompt_tokens for g in reference]
    assert all(g.cached_tokens > 0 for g in again)


def test_seed_per_chat_not_per_batch(tiny: EnginePolicy) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    with shared_prefixes():
        batch = tiny.generate(CHATS, params)
        repeat = tiny.generate(CHATS, params)  # now with the prompts served from the cache
    assert [g.completion_ids for g in repeat] == [g.completion_ids for g in batch]
    # Chat i alone with seed 7 + i gets the reply it got inside the batch.
    alone = [
        tiny.generate([chat], SamplingParams(max_new_tokens=12, temperature=1.0, seed=7 + i))[0]
        for i, chat in enumerate(CHATS)
    ]
    assert [g.completion_ids for g in alone] == [g.completion_ids for g in batch]
    other = tiny.generate(CHATS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert [g.completion_ids for g in other] != [g.completion_ids for g in batch]


def test_second_turn_encodes_only_the_new_tokens(tiny_llama_dir) -> None:
    engine = _engine(tiny_llama_dir, batch_size=4)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    with shared_prefixes():
        first = engine.generate(CHATS[:1], params)[0]
        turn2 = CHATS[0] + [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "and then?"},
        ]
        second = engine.generate([turn2], params)[0]
        # A second chat with the same persona reuses the system prompt's blocks.
        sibling = engine.generate(CHATS[3:4], params)[0]
    assert first.cached_tokens == 0
    assert second.cached_tokens >= first.prompt_tokens // BLOCK_TOKENS * BLOCK_TOKENS
    new_tokens = second.prompt_tokens - first.prompt_tokens
    assert second.prompt_tokens - second.cached_tokens < new_tokens + BLOCK_TOKENS
    assert sibling.cached_tokens >= BLOCK_TOKENS
    # Outside the block each call starts from an empty cache: the same call, the same
    # replies and the same cache hits, whatever came before.
    alone = engine.generate([turn2], params)[0]
    assert alone.cached_tokens == 0
    assert engine.generate([turn2], params)[0] == alone


def test_prefix_cache_off_encodes_everything(tiny_llama_dir) -> None:
    engine = _engine(tiny_llama_dir, prefix_cache_tokens=0)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    with shared_prefixes():
        engine.generate(CHATS, params)
        assert all(g.cached_tokens == 0 for g in engine.generate(CHATS, params))
    assert len(engine.cache) == 0


def test_stops_at_end_of_turn_and_counts_tokens(tiny: EnginePolicy) -> None:
    end_of_turn = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in tiny.stop_ids
    out = tiny.generate(CHATS, SamplingParams(max_new_tokens=6, temperature=1.0))
    for g in out:
        assert g.completion_tokens <= 6
        assert len(g.completion_ids) in (g.completion_tokens, g.completion_tokens + 1)
        stops = [t for t in g.completion_ids if t in tiny.stop_ids]
        assert stops in ([], [g.completion_ids[-1]])  # a stop token only ever ends a reply
        assert "<|im_end|>" not in g.text


def test_stop_token_ends_the_reply(tiny: EnginePolicy, monkeypatch) -> None:
    # Make the end-of-turn token the only one the model can sample: every reply is empty.
    end_of_turn = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    forward = tiny.model.forward

    def forced(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., end_of_turn] = 1e4
        return out

    monkeypatch.setattr(tiny.model, "forward", forced)
    out = tiny.generate(CHATS, SamplingParams(max_new_tokens=6, temperature=0.8))
    assert [(g.text, g.completion_tokens, g.completion_ids) for g in out] == [
        ("", 0, (end_of_turn,))
    ] * len(CHATS)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    draws = {
        sample_next(logits, 1.0, 0.8, [torch.Generator().manual_seed(s)])[0] for s in range(200)
    }
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8; tokens 2 and 3 are cut
    greedy = sample_next(logits, 0.0, 0.8, [torch.Generator()])
    assert greedy == [0]


def _full_sort_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The reference: sort the whole vocabulary, keep tokens until the mass reaches top_p."""
    values, order = probs.sort(descending=True)
    keep = (values.cumsum(-1) - values) < top_p
    return set(order[keep].tolist())


@pytest.mark.parametrize("spread", [0.5, 8.0], ids=["peaked", "flat"])
def test_partial_sort_nucleus_is_the_full_sort_nucleus(spread: float) -> None:
    # A flat row's nucleus is wider than the partially sorted candidates: the sampler must
    # notice and sort that row whole; a peaked row's nucleus lies within the candidates.
    vocab = 4 * NUCLEUS_CANDIDATES
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) / spread
    nucleus = _full_sort_nucleus(torch.softmax(logits[0], -1), 0.9)
    assert (len(nucleus) > NUCLEUS_CANDIDATES) == (spread == 8.0)
    draws = {
        sample_next(logits, 1.0, 0.9, [torch.Generator().manual_seed(s)])[0] for s in range(2000)
    }
    assert draws <= nucleus
    candidates = set(torch.softmax(logits[0], -1).topk(NUCLEUS_CANDIDATES).indices.tolist())
    if spread == 8.0:  # some draws come from past the candidates: the row was sorted whole
        assert draws - candidates
    else:
        assert nucleus <= candidates


def test_prefix_cache_needs_the_whole_prefix_and_evicts_least_recent() -> None:
    cache = PrefixCache(max_tokens=2 * BLOCK_TOKENS)
    kv = torch.randn(1, 2, 1, 3 * BLOCK_TOKENS, 4)
    ids = list(range(3 * BLOCK_TOKENS + 1))
    cache.store(ids, 0, kv)
    assert len(cache) == 2  # the first block was evicted, least recently used
    assert cache.lookup(ids) == (0, None)  # later blocks are unreachable without it
    cache = PrefixCache(max_tokens=4 * BLOCK_TOKENS)
    cache.store(ids, 0, kv)
    n, states = cache.lookup(ids)
    assert n == 3 * BLOCK_TOKENS and torch.equal(states, kv)
    changed = [ids[0] + 1000, *ids[1:]]
    assert cache.lookup(changed) == (0, None)
    # A prompt that is all cached still leaves its last token to encode.
    n, _ = cache.lookup(ids[: 2 * BLOCK_TOKENS])
    assert n == BLOCK_TOKENS


def test_spec_validates_engine_fields() -> None:
    with pytest.raises(ValidationError, match="prefix_cache_tokens"):
        PolicySpec(backend="hf_engine", prefix_cache_tokens=-1)
    with pytest.raises(ValidationError, match="backend"):
        PolicySpec(backend="engine")


def test_calls_answered_together_keep_their_seeds_and_replies(
    tiny: EnginePolicy, monkeypatch
) -> None:
    # Two arms wrapping one model share a batch; each call keeps its seeds, and greedy replies
    # are exactly its own call's. (Sampled replies agree up to rounding: a draw on this random
    # model's flat distribution can flip when another batch shape rounds the logits otherwise.)
    greedy = [SamplingParams(max_new_tokens=12, temperature=0.0, seed=s) for s in (5, 90)]
    calls = [(CHATS[:3], greedy[0]), (CHATS[1:], greedy[1])]
    alone = [tiny.generate(chats, params) for chats, params in calls]
    seeds: list[int] = []
    new_row = tiny._new_row
    monkeypatch.setattr(
        tiny, "_new_row", lambda i, ids, seed: seeds.append(seed) or new_row(i, ids, seed)
    )
    with tiny.together(calls), monkeypatch.context() as patch:  # both from the joint run
        patch.setattr(tiny, "_run", lambda calls: pytest.fail("generated again"))
        joint = [tiny.generate(*calls[1]), tiny.generate(*calls[0])][::-1]
    assert sorted(seeds) == [5, 6, 7, 90, 91, 92]
    assert [[g.completion_ids for g in call] for call in joint] == [
        [g.completion_ids for g in call] for call in alone
    ]


def test_calls_with_other_settings_are_not_joined(tiny: EnginePolicy) -> None:
    short = SamplingParams(max_new_tokens=4)
    other = SamplingParams(max_new_tokens=8)
    with (
        pytest.raises(ValueError, match="different sampling settings"),
        tiny.together([(CHATS, short), (CHATS, other)]),
    ):
        pass


def test_malformed_chat_is_refused(tiny: EnginePolicy) -> None:
    with pytest.raises(ValueError, match="chat 1 is empty"):
        tiny.generate([CHATS[0], []], SamplingParams())


def test_real_smollm2_same_call_same_replies() -> None:
    # In bf16 a reply served from another call's cache can differ from a fresh one; the
    # default backend must still answer the same call the same way twice.
    policy = load_policy("smollm2")
    assert isinstance(policy, EnginePolicy)
    params = SamplingParams(max_new_tokens=24, seed=3)
    assert policy.generate(CHATS, params) == policy.generate(CHATS, params)
