"""LLM-simulated users: chit-chat corpus, output cleaning, message length targets and
cuts, PII planting, batched writing, goodbyes that end a chat, the assistant-speak checker
and the redraft of drafts it flags."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_scenario_toml
from scipy import stats

from policies import Policy, SamplingParams, load_policy
from policies.base import Chat, Generation
from sim.characters import Character
from sim.chitchat import load_chitchat
from sim.conversation import END_GOODBYE
from sim.population import (
    MessageLengths,
    PopulationConfig,
    UserSampler,
    fit_user_share,
    speaker_message_words,
)
from sim.user_llm import (
    CUT_SLACK,
    END_MARKER,
    MAX_MESSAGE_WORDS,
    UserMessage,
    UserSimulator,
    assistant_speak,
    clean_message,
    cut_words,
    is_assistant_speak,
    is_goodbye,
    mood_words,
    truncate_words,
)
from sim.world import World, parse_world

CHARACTER = Character(name="Captain Mara", persona="A retired sea captain.", topics=("travel",))
REPO = Path(__file__).resolve().parents[1]


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
    assert clean_message(raw, ["Captain Mara"], target_words=4 if "six" in raw else 50) == clean


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
        target_words=7,
    )
    assert [m["role"] for m in chat] == ["system", "assistant", "user"]
    assert "Captain Mara" in chat[0]["content"] and user.profile in chat[0]["content"]
    assert "about 7 words" in chat[0]["content"]


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
    # The length target is each conversation's first draw: the prompt asks for it and
    # the message is cut near it.
    targets = [sim.target_words(x, np.random.default_rng(i)) for i, x in enumerate(users)]
    for message, target, chat in zip(first, targets, tiny_policy.calls[-1], strict=True):
        assert isinstance(message, UserMessage)
        assert re.search(r"\w", message.text) and not message.pii
        assert message.goodbye == is_goodbye(message.text)
        assert f"about {target} words" in chat[0]["content"]
        assert len(re.findall(r"\w+", message.text)) <= target + int(CUT_SLACK * target) + 1
    with pytest.raises(ValueError, match="one user, character"):
        sim.next_messages(users, [CHARACTER], convs, params, [np.random.default_rng(0)])


def constant_llama(path: Path, smollm2_dir: Path, token: str | None) -> Path:
    """A real tiny Llama (SmolLM2's tokenizer) that samples ``token`` at every step (None:
    its stop token): embeddings are all ones and attention and MLP write nothing to the
    residual stream, so every position's hidden state is the same, and only that token's
    output row is non-zero (logit 64 against 0: probability 1 - 1e-23 at temperature 1)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if token is None:
        token_id = tokenizer.eos_token_id
    else:
        (token_id,) = tokenizer.encode(token, add_special_tokens=False)
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
        model.lm_head.weight[token_id] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mute_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A user LLM whose output is never usable: every message it writes is empty."""
    return constant_llama(tmp_path_factory.mktemp("mute-llama"), smollm2_dir, None)


@pytest.fixture(scope="module")
def goodbye_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A user LLM that says " goodbye" at every step: every message it writes is a goodbye."""
    return constant_llama(tmp_path_factory.mktemp("bye-llama"), smollm2_dir, " goodbye")


def test_unusable_output_falls_back_and_is_counted(mute_llama_dir: Path) -> None:
    corpus = load_chitchat()
    sim = UserSimulator(load_policy(str(mute_llama_dir)), corpus)
    users = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(3)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy!"}]] * 3
    params = SamplingParams(max_new_tokens=8, seed=1)
    written = sim.next_messages(
        users, [CHARACTER] * 3, convs, params, [np.random.default_rng(i) for i in range(3)]
    )
    chat = sim.user_chat(users[0], CHARACTER, convs[0], target_words=5)
    assert sim.policy.generate([chat], params)[0].text == ""  # the LLM wrote nothing
    replies = corpus.replies("train")
    for message in written:
        text = message.text
        assert text and any(r.startswith(text) for r in replies)  # a real human message
        assert len(re.findall(r"\w+", text)) <= MAX_MESSAGE_WORDS
    assert (sim.messages, sim.fallbacks, sim.redrafts) == (3, 3, 0)


def test_a_run_reports_its_fallback_share(
    tmp_path: Path, tiny_llama_dir: Path, mute_llama_dir: Path
) -> None:
    """`flywheel ab` with a user LLM that never writes a usable message: every user message
    after the opener is a fallback, and the run store, the A/B report and its simulation
    summary say so (share 1.0), counted against the sessions table."""
    from flywheel.experiment import run_ab
    from flywheel.store import RunStore, fallback_text

    scenario = tiny_scenario_toml(
        tmp_path / "mute_users.toml",
        user_model=mute_llama_dir,
        name="mute_users",
        seed=5,
        world={"turn_cap": 3, "gold": {"continue_bias": 6.0}},
        traffic={"n_users": 12, "test_days": 1, "max_sessions_per_day": 1},
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


# ---------------------------------------------------------------------------- assistant-speak
ASSISTANT_PHRASINGS = [
    "How can I help you today?",
    "What can I do for you?",
    "I hope this helps!",
    "I hope I can help you",
    "As an AI, I don't have feelings.",
    "I'm here to help with anything you need.",
    "I'd be happy to assist you with that.",
    "Feel free to ask me anything.",
    "Let me know if you have any other questions.",
    "I'm just a language model, so I can't travel.",
    "I'm sorry, but I'm unable to facilitate communication or provide companionship.",
    "Is there anything else I can do for you?",
    "I am a virtual assistant.",
    "Glad I could help!",
]
HUMAN_MESSAGES = [
    "hey whats up",
    "lol yeah I just got back from practice, so tired",
    "Can you help me pick a movie for tonight? I can't decide",
    "I hope it doesn't rain tomorrow, we have a picnic",
    "my mom is an assistant principal at my school haha",
    "I am not a morning person at all",
    "what do you do for fun?",
    "Honestly I'd love to go to Japan someday",
]


@pytest.mark.parametrize("text", ASSISTANT_PHRASINGS)
def test_assistant_speak_flags_assistant_phrasings(text: str) -> None:
    assert is_assistant_speak(text) and assistant_speak(text)


@pytest.mark.parametrize("text", HUMAN_MESSAGES)
def test_assistant_speak_passes_human_messages(text: str) -> None:
    assert not is_assistant_speak(text) and assistant_speak(text) == ()


def test_assistant_speak_rarely_flags_held_out_human_chat() -> None:
    """People chatting for fun almost never sound like an assistant: under 0.5% of the
    held-out chit-chat messages are flagged (about 0.04% when the checker was written)."""
    corpus = load_chitchat()
    messages = [m for conv in corpus.conversations("heldout") for m in conv]
    flagged = [m for m in messages if is_assistant_speak(m)]
    assert len(messages) > 20_000
    assert len(flagged) / len(messages) < 0.005, flagged[:20]


# ---------------------------------------------------------------------------- goodbyes
@pytest.mark.parametrize(
    "text",
    ["bye!", "ok gotta go, ttyl", "Goodnight :)", "nice talking to you", f"fine {END_MARKER}",
     "I have to go now, see you later", "Take care!", "have a great day"],
)  # fmt: skip
def test_goodbyes_are_recognised(text: str) -> None:
    assert is_goodbye(text)


@pytest.mark.parametrize(
    "text",
    ["I'd love to see you try", "what do you do for a living?", "I have to admit it's good",
     "byproduct of the war", "we had a good day at the beach", "I have to go to work",
     "take care of my dog", "I had a good night"],
)  # fmt: skip
def test_other_messages_are_not_goodbyes(text: str) -> None:
    assert not is_goodbye(text)


def test_goodbyes_sit_at_the_end_of_human_conversations() -> None:
    """On held-out human chat, a conversation's last message is a goodbye far more often
    than any earlier message (about 21% against 0.6% when the pattern was written)."""
    corpus = load_chitchat()
    convs = [c for c in corpus.conversations("heldout") if len(c) > 1]
    last = np.mean([is_goodbye(c[-1]) for c in convs])
    earlier = np.mean([is_goodbye(m) for c in convs for m in c[:-1]])
    assert last > 0.1 and earlier < 0.03 and last > 5 * earlier


def test_system_prompt_carries_segment_mood_and_the_way_out(tiny_policy: CountingPolicy) -> None:
    sim = UserSimulator(tiny_policy, load_chitchat())
    user = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(1)[0]
    prompts = {}
    for mood in (-1.0, 0.0, 1.0):
        user.state.mood = mood
        prompts[mood] = sim.system_prompt(user, CHARACTER, 12)
        assert user.profile in prompts[mood] and mood_words(mood) in prompts[mood]
        assert "say bye" in prompts[mood]
    assert len(set(prompts.values())) == 3
    assert "bored" in prompts[-1.0] and "enjoying" in prompts[1.0]


def _goodbye_world(user_policy: Policy, turn_cap: int = 5) -> World:
    """A world whose users always continue and never report, so only a goodbye ends early."""
    config = parse_world(
        {
            "characters_dir": str(REPO / "scenarios" / "characters"),
            "turn_cap": turn_cap,
            "gold": {"continue_bias": 30.0, "report_bias": -30.0},
            "user_llm": {"max_new_tokens": 4},
        },
        source="test",
    )
    return World.build(config, seed=3, user_policy=user_policy)


def test_a_goodbye_ends_the_session_after_the_bot_answers_it(
    goodbye_llama_dir: Path, tiny_llama_dir: Path
) -> None:
    """The user LLM says bye: the character answers, the reply's continue is recorded False,
    the session ends as 'goodbye', and the goodbye is the last turn's user message. The
    signal stream drew exactly three uniforms per reply, the farewell answer included."""
    world = _goodbye_world(load_policy(str(goodbye_llama_dir)))
    engine, bot = world.engine, load_policy(str(tiny_llama_dir))
    users = world.sampler.sample(3)
    seeds = [[9, i] for i in range(3)]
    sessions = engine.open_sessions(users, 0, 20.0, np.random.default_rng(0), seeds=seeds)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, seed=0)
    first = engine.bot_turn(sessions, bot, params)
    assert all(r.continued for r in first) and not any(s.ended for s in sessions)
    engine.user_turn(sessions, params)
    assert all(s.goodbye and is_goodbye(s.last_user_message) for s in sessions)
    second = engine.bot_turn(sessions, bot, params)
    for session, record, seed in zip(sessions, second, seeds, strict=True):
        assert session.ended and session.end_reason == END_GOODBYE
        assert not record.continued and record.user_message == session.last_user_message
        reference = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
        reference.random(3 * 2)
        assert session.signal_rng.random() == reference.random()
        summary = engine.close_session(session)
        assert (summary.end_reason, summary.n_turns, summary.n_user_messages) == (END_GOODBYE, 2, 2)


@pytest.fixture(scope="module")
def hello_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A user LLM that says " hello" at every step: usable messages that never close a chat."""
    return constant_llama(tmp_path_factory.mktemp("hello-llama"), smollm2_dir, " hello")


def test_without_a_goodbye_the_same_users_chat_to_the_cap(
    hello_llama_dir: Path, tiny_llama_dir: Path
) -> None:
    """The control of the test above: the same world with a user LLM whose messages are no
    goodbye runs every session to the turn cap (so the goodbye, not the world, ended them)."""
    world = _goodbye_world(load_policy(str(hello_llama_dir)), turn_cap=3)
    engine, bot = world.engine, load_policy(str(tiny_llama_dir))
    sessions = engine.open_sessions(
        world.sampler.sample(3), 0, 20.0, np.random.default_rng(0), seeds=[[9, i] for i in range(3)]
    )
    params = SamplingParams(max_new_tokens=4, temperature=0.0, seed=0)
    engine.run_sessions(sessions, bot, params, params)
    assert [s.end_reason for s in sessions] == ["turn_cap"] * 3


def test_an_end_marker_alone_becomes_a_human_goodbye(tiny_policy: CountingPolicy) -> None:
    """A user model that writes only the end marker (as UserLM does) still closes the chat;
    its empty text is replaced by a real human closing message and counted as a fallback.
    Words before the marker are kept as the goodbye."""
    sim = UserSimulator(tiny_policy, load_chitchat())
    user = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(1)[0]
    closings = sim.closings()
    assert closings and all(is_goodbye(c) for c in closings)
    for seed in range(3):
        message = sim.read_generation(
            END_MARKER, user, CHARACTER, np.random.default_rng(seed), target_words=10
        )
        assert message.goodbye and END_MARKER not in message.text
        assert any(c.startswith(message.text) for c in closings)
    kept = sim.read_generation(
        f"ok {END_MARKER} trailing", user, CHARACTER, np.random.default_rng(0), target_words=10
    )
    assert kept == UserMessage("ok", False, True)
    assert (sim.messages, sim.fallbacks) == (4, 3)


# ---------------------------------------------------------------------------- message lengths
@pytest.mark.parametrize(
    ("text", "target", "cut"),
    [
        # the clause end nearest to the target, within CUT_SLACK of it, either side
        ("I really love that song, it reminds me of summer. Do you like it?", 10,
         "I really love that song, it reminds me of summer."),
        ("I really love that song, it reminds me of summer. Do you like it?", 4,
         "I really love that song"),  # 5 words: the comma is 1 away, the slack of 4 is 1
        ("one two three four five six", 4, "one two three four"),  # no clause end: the word
        ("I don't know what you mean", 3, "I don't"),  # a cut never splits a token
        ("short one", 3, "short one"),
        ("Wow, that is great!", 1, "Wow"),  # the trailing comma goes
    ],
)  # fmt: skip
def test_cut_words(text: str, target: int, cut: str) -> None:
    assert cut_words(text, target) == cut


@pytest.fixture(scope="module")
def lengths() -> MessageLengths:
    return MessageLengths.from_conversations(load_chitchat().conversations("train"), 60)


def test_user_share_estimator_recovers_a_simulated_intra_class_correlation() -> None:
    """Simulation as the reference: speakers with a normal random effect of variance 0.3
    and noise of variance 0.7 (ICC 0.3), 3-12 messages each, lengths exp(3 + z) rounded:
    the rank-based estimate lands within 0.03 of 0.3, and 0.0 without a speaker effect."""
    rng = np.random.default_rng(0)

    def groups(icc: float) -> list[np.ndarray]:
        out = []
        for _ in range(3000):
            z = np.sqrt(icc) * rng.normal() + np.sqrt(1 - icc) * rng.normal(
                size=rng.integers(3, 13)
            )
            out.append(np.maximum(1, np.round(np.exp(1 + z))).astype(int))
        return out

    assert fit_user_share(groups(0.3)) == pytest.approx(0.3, abs=0.03)
    assert fit_user_share(groups(0.0)) == pytest.approx(0.0, abs=0.02)
    with pytest.raises(ValueError, match="at least 2 speakers"):
        fit_user_share([[3, 4]])


def test_length_targets_follow_people_across_and_within_users(lengths: MessageLengths) -> None:
    """Targets of 400 sampled users x 8 messages: their pooled distribution is the held-out
    human one (KS < 0.04; the cap at 60 words alone moves the CDF by 0.035), and how much
    of their spread lies between users is the corpus's own share (about 0.2)."""
    corpus = load_chitchat()
    assert lengths.user_share == pytest.approx(
        fit_user_share(speaker_message_words(corpus.conversations("train")))
    )
    assert 0.1 < lengths.user_share < 0.3
    users = UserSampler(
        PopulationConfig(), np.random.default_rng(0), corpus.message_words("train")
    ).sample(400)
    rng = np.random.default_rng(1)
    targets = [[lengths.target(u.traits.message_words, rng) for _ in range(8)] for u in users]
    pooled = np.concatenate(targets)
    human = np.array([len(re.findall(r"\w+", m)) for m in corpus.replies("heldout")])
    assert stats.ks_2samp(pooled, human).statistic < 0.04
    assert pooled.max() <= 60 and pooled.min() >= 1
    assert fit_user_share(targets) == pytest.approx(lengths.user_share, abs=0.05)
    # A user's rank among people carries over: long-drawn users write longer messages.
    by_user = {u.traits.message_words: np.median(t) for u, t in zip(users, targets, strict=True)}
    short = [v for k, v in by_user.items() if k <= 5]
    long = [v for k, v in by_user.items() if k >= 30]
    assert np.mean(long) > np.mean(short) + 5


def test_cut_lengths_follow_their_targets_and_people(lengths: MessageLengths) -> None:
    """Long real drafts (train messages of 70+ words) cut at 3,000 drawn targets: every cut
    but a handful lands within the clause slack of its target (one more word where a token
    holds two), centred on it, and the cut lengths match held-out human messages (KS < 0.04)."""
    corpus = load_chitchat()
    drafts = [m for m in corpus.replies("train") if len(re.findall(r"\w+", m)) >= 70]
    rng = np.random.default_rng(2)
    typical = corpus.message_words("train")
    targets = [lengths.target(int(rng.choice(typical)), rng) for _ in range(3000)]
    cuts = np.array(
        [
            len(re.findall(r"\w+", cut_words(drafts[i % len(drafts)], t)))
            for i, t in enumerate(targets)
        ]
    )
    targets_arr = np.array(targets)
    within = np.abs(cuts - targets_arr) <= np.floor(CUT_SLACK * targets_arr) + 1
    assert np.mean(within) > 0.99  # the rest: tokens like "...well..." that hold many words
    assert abs(np.mean(cuts - targets_arr)) < 0.25
    assert np.mean(cuts == targets_arr) > 0.5
    human = np.array([len(re.findall(r"\w+", m)) for m in corpus.replies("heldout")])
    assert stats.ks_2samp(cuts, human).statistic < 0.04


# ---------------------------------------------------------------------------- redrafts
ASSISTANT_DRAFT = "How can I help?"
HUMAN_DRAFT = "haha same, I was out surfing all day"


class SeedScriptedPolicy:
    """A user LLM whose draft is a function of its seed: chat ``i`` of a call sampled with
    seed ``s`` writes assistant-speak when ``(s + i) % 3 == 0`` (the seeding contract of
    ``policies``: chat ``i`` draws with ``params.seed + i``). Records every call."""

    name = "seed-scripted"

    def __init__(self) -> None:
        self.calls: list[tuple[list[Chat], SamplingParams]] = []

    @staticmethod
    def text(seed: int) -> str:
        return ASSISTANT_DRAFT if seed % 3 == 0 else HUMAN_DRAFT

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        self.calls.append((list(chats), params))
        return [Generation(self.text(params.seed + i), 10, 10) for i in range(len(chats))]


def test_assistant_speak_drafts_are_redrafted_once_then_replaced() -> None:
    """Seven conversations at seed 0: drafts 0, 3 and 6 sound like an assistant and are
    sampled again, in ONE more call, at seeds 7, 8, 9 (never a first draft's seed); 9 is
    assistant-speak again, so that message becomes a real human message (a fallback)."""
    policy = SeedScriptedPolicy()
    corpus = load_chitchat()
    sim = UserSimulator(policy, corpus)  # type: ignore[arg-type]
    users = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(7)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy!"}]] * 7
    targets = [sim.target_words(u, np.random.default_rng(i)) for i, u in enumerate(users)]
    assert min(targets) >= 4  # every cut keeps the whole assistant phrase
    rngs = [np.random.default_rng(i) for i in range(7)]
    written = sim.next_messages(
        users, [CHARACTER] * 7, convs, SamplingParams(max_new_tokens=96, seed=0), rngs
    )
    (first, params), (second, again) = policy.calls
    assert len(first) == 7 and (params.seed, again.seed) == (0, 7)
    assert second == [first[0], first[3], first[6]]  # the flagged chats, re-asked as they were
    assert again.max_new_tokens == params.max_new_tokens
    assert (sim.messages, sim.redrafts, sim.fallbacks) == (7, 3, 1)
    texts = [m.text for m in written]
    for i in range(6):  # first drafts 1, 2, 4, 5 and redrafts 0, 3: the human draft, cut
        assert HUMAN_DRAFT.startswith(texts[i]) and texts[i]
    assert texts[6] != ASSISTANT_DRAFT and any(
        r.startswith(texts[6]) for r in corpus.replies("train")
    )
    assert not any(assistant_speak(t) for t in texts)


def test_a_run_stores_its_redrafts_and_the_card_counts_what_was_sent(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """Traffic with the seed-scripted user LLM (a third of its drafts offer help): the days
    table's user_redrafts are the chats of the redraft calls and user_fallbacks the redrafts
    that offered help again; no message the users sent offers help, and the fidelity card's
    assistant-speak line counts those sent messages and reports the redraft share."""
    from flywheel.fidelity import fidelity_card
    from flywheel.store import RunStore
    from sim.traffic import CountingPolicy, TrafficConfig, TrafficSimulator, drifted_population

    scripted = SeedScriptedPolicy()
    bot = load_policy(str(tiny_llama_dir))
    world_config = parse_world(
        {
            "characters_dir": str(REPO / "scenarios" / "characters"),
            "turn_cap": 3,
            "gold": {"bias": 6.0},
        },
        source="test",
    )
    world = World.build(world_config, seed=2, user_policy=CountingPolicy(scripted))  # type: ignore[arg-type]
    traffic = TrafficConfig(
        n_users=12, pre_days=1, test_days=1, treatment_share=0.5, bot_sampling={"max_new_tokens": 4}
    )
    population = drifted_population(world.sampler, traffic, 2)
    simulator = TrafficSimulator(
        world.engine, population.users, {"control": bot, "treatment": bot}, traffic,
        seed=2, user_params=world.user_params, progress=False,
    )  # fmt: skip
    config = {
        "world": world_config.model_dump(mode="json"),
        "traffic": traffic.model_dump(mode="json"),
    }
    run_dir = tmp_path / "run"
    with RunStore(run_dir) as store:
        simulator.run(store.open_sink("ab", config))
    with RunStore(run_dir, read_only=True) as store:
        days = store.read_days("ab")
        turns = store.read_turns("ab")
    # A redraft call follows the first-draft call it redrafts, seeded past its chats.
    pairs = list(zip(scripted.calls, scripted.calls[1:], strict=False))
    redraft_calls = [(b, a) for a, b in pairs if b[1].seed == a[1].seed + len(a[0])]
    redrafted = sum(len(chats) for (chats, _), _ in redraft_calls)
    again = sum(
        SeedScriptedPolicy.text(p.seed + i) == ASSISTANT_DRAFT
        for (chats, p), _ in redraft_calls
        for i in range(len(chats))
    )
    assert redrafted > 0 and again > 0
    assert int(days["user_redrafts"].sum()) == redrafted
    assert int(days["user_fallbacks"].sum()) == again
    written = turns.loc[turns["turn_index"] >= 1, "user_message"]
    assert int(days["user_messages"].sum()) == len(written)
    assert not any(assistant_speak(m) for m in written)
    card = fidelity_card(run_dir)
    line = card.line("assistant-speak share")
    assert (line.value, line.n, line.status) == (0.0, len(written), "PASS")
    assert f"{redrafted} of {len(written)} drafts were redrafted" in line.detail
    assert card.redraft_share == pytest.approx(redrafted / len(written))
    assert "drafts redrafted for sounding like an assistant" in card.summary()
