"""LLM-simulated users: chit-chat corpus, output cleaning, PII planting, batched writing."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def mute_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A real tiny Llama (SmolLM2's tokenizer) whose first sampled token is always its stop
    token: embeddings are all ones and attention and MLP write nothing to the residual
    stream, so every position's hidden state is the same, and only the stop token's output
    row is non-zero (logit 64 against 0: probability 1 - 1e-23 at temperature 1). Every
    message it writes is empty: a user LLM whose output is never usable."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
    path = tmp_path_factory.mktemp("mute-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_unusable_output_falls_back_and_is_counted(mute_llama_dir: Path) -> None:
    corpus = load_chitchat()
    sim = UserSimulator(load_policy(str(mute_llama_dir)), corpus)
    users = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(3)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy!"}]] * 3
    params = SamplingParams(max_new_tokens=8, seed=1)
    written = sim.next_messages(
        users, [CHARACTER] * 3, convs, params, [np.random.default_rng(i) for i in range(3)]
    )
    chat = sim.user_chat(users[0], CHARACTER, convs[0])
    assert sim.policy.generate([chat], params)[0].text == ""  # the LLM wrote nothing
    replies = corpus.replies("train")
    for (text, _), user in zip(written, users, strict=True):
        assert text and any(r.startswith(text) for r in replies)  # a real human message
        assert len(re.findall(r"\w+", text)) <= sim.word_cap(user)
    assert (sim.messages, sim.fallbacks) == (3, 3)


def test_a_run_reports_its_fallback_share(
    tmp_path: Path, tiny_llama_dir: Path, mute_llama_dir: Path
) -> None:
    """`flywheel ab` with a user LLM that never writes a usable message: every user message
    after the opener is a fallback, and the run store, the A/B report and its simulation
    summary say so (share 1.0), counted against the sessions table."""
    from flywheel.experiment import run_ab
    from flywheel.store import RunStore, fallback_text

    scenario = tmp_path / "mute_users.toml"
    scenario.write_text(
        f"""
name = "mute_users"
seed = 5
[world]
characters_dir = "{Path(__file__).resolve().parents[1] / "scenarios" / "characters"}"
turn_cap = 3
[world.gold]
continue_bias = 6.0
[world.user_llm]
max_new_tokens = 4
[world.user_llm.policy]
model = "{mute_llama_dir}"
dtype = "float32"
[traffic]
n_users = 12
pre_days = 1
test_days = 1
treatment_share = 0.5
slot_minutes = 720
max_sessions_per_day = 1
[traffic.bot_sampling]
max_new_tokens = 4
""",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    outcome = run_ab(scenario, str(tiny_llama_dir), str(tiny_llama_dir), out, progress=False)
    with RunStore(out, read_only=True) as store:
        shares = store.user_fallbacks()
        sessions = store.read_sessions("ab")
    written = int(sessions["n_user_messages"].sum()) - len(sessions)  # less the openers
    assert written > 0
    row = shares.set_index("experiment_id").loc["ab"]
    assert (row["user_messages"], row["user_fallbacks"]) == (written, written)
    assert row["fallback_share"] == 1.0
    totals = outcome.simulation["user_fallbacks"]
    assert totals == {"user_messages": written, "user_fallbacks": written, "fallback_share": 1.0}
    saved = json.loads((out / "ab" / "simulation.json").read_text())
    assert saved["user_fallbacks"] == totals
    report = (out / "ab" / "report.md").read_text()
    assert f"| simulated-user fallbacks | {fallback_text(totals)} |" in report
    assert "(100.0%)" in fallback_text(totals)
