"""The gold utility moves in the documented direction for every trait, and the dynamics
(emoji fatigue, memory, return) behave as the sim.gold docstring says."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from rewards.embeddings import Embedder, get_embedder
from rewards.features import style_features
from sim.characters import TOPICS, Character
from sim.gold import GoldConfig, GoldModel, ReplyAssessment, assess_replies
from sim.judge import JudgeScores, get_judge, judge_replies, moment_match
from sim.population import (
    PopulationConfig,
    SegmentConfig,
    TraitDist,
    User,
    UserSampler,
    UserState,
    UserTraits,
)
from sim.world import load_world_config

CHARACTER = Character(name="Chef", persona="A chef.", topics=("food",))
BASE = UserTraits(
    patience=0.5,
    ideal_words=20,
    emoji_affinity=0.0,
    emoji_fatigue=0.0,
    question_affinity=0.0,
    persona_sensitivity=0.5,
    repetition_aversion=0.5,
    safety_sensitivity=0.5,
    return_propensity=0.5,
    topic_interests=tuple(1 / len(TOPICS) for _ in TOPICS),
)


def make_user(**traits: object) -> User:
    return User("u1", "test", dataclasses.replace(BASE, **traits), UserState())


def reply(
    words: float = 20,
    emoji: float = 0,
    question: float = 0,
    relevance: float | None = None,
    persona: float | None = None,
    prompt_leak: float = 0.0,
    repetition: float = 0.0,
    echo: float = 0.0,
    share_followed: float = 1.0,
    violates: bool = False,
    unsafe: bool = False,
) -> ReplyAssessment:
    """An assessed reply; the judge's cosines default to the gold's neutral centers."""
    config = GoldConfig()
    features = {
        "words": words,
        "emoji": emoji,
        "ends_with_question": question,
        "repetition": repetition,
        "echo": echo,
    }
    judged = JudgeScores(
        relevance=config.relevance_center if relevance is None else relevance,
        persona_consistency=config.persona_center if persona is None else persona,
        prompt_leak=prompt_leak,
    )
    return ReplyAssessment(features, share_followed, violates, unsafe, judged)


@pytest.fixture
def gold() -> GoldModel:
    return GoldModel(GoldConfig())


def u(gold: GoldModel, user: User, r: ReplyAssessment) -> float:
    return gold.utility(user, CHARACTER, r)


def test_terms_sum_to_utility_and_neutral_reply_is_zero(gold: GoldModel) -> None:
    user = make_user()
    terms = gold.utility_terms(user, CHARACTER, reply(), novelty=0.25)
    assert sum(terms.values()) == pytest.approx(gold.utility(user, CHARACTER, reply(), 0.25))
    assert u(gold, user, reply()) == pytest.approx(0.0, abs=1e-12)


def test_reciting_the_rules_costs_only_above_the_center(gold: GoldModel) -> None:
    user = make_user()
    center = gold.config.prompt_leak_center
    leaking = reply(prompt_leak=center + 0.25)
    usual = reply(prompt_leak=center - 0.1)
    assert u(gold, user, usual) == pytest.approx(u(gold, user, reply()))
    assert u(gold, user, leaking) == pytest.approx(-0.25 * gold.config.w_prompt_leak)


def test_ideal_words(gold: GoldModel) -> None:
    long_reply = reply(words=80)
    assert u(gold, make_user(ideal_words=80), long_reply) > u(gold, make_user(), long_reply)
    user = make_user()
    assert (
        u(gold, user, reply(words=20))
        > u(gold, user, reply(words=60))
        > u(gold, user, reply(words=200))
    )


def test_emoji_affinity(gold: GoldModel) -> None:
    r = reply(emoji=2)
    assert (
        u(gold, make_user(emoji_affinity=0.8), r) > 0 > u(gold, make_user(emoji_affinity=-0.8), r)
    )


def test_emoji_fatigue_likes_emoji_less_on_day_5_than_day_1(gold: GoldModel) -> None:
    """A high-fatigue user sees emoji replies every day; by day 5 the same emoji reply is
    liked less than on day 1. A zero-fatigue user's like probability does not fall."""
    emoji_reply = reply(emoji=3)
    p_like = {}
    for fatigue in (0.9, 0.0):
        user = make_user(emoji_affinity=0.5, emoji_fatigue=fatigue)
        for day in range(1, 6):
            gold.start_session(user, day)
            util = u(gold, user, emoji_reply)
            p_like[fatigue, day] = gold.p_like(user, util, emoji_reply)
            for _ in range(4):  # four emoji replies a day
                util = u(gold, user, emoji_reply)
                signals = gold.respond(user, util, emoji_reply, 0, np.random.default_rng(0))
                gold.observe_turn(user, util, emoji_reply, signals)
            gold.end_session(user, day)
    assert p_like[0.9, 5] < p_like[0.9, 1]
    assert p_like[0.0, 5] == pytest.approx(p_like[0.0, 1])


def test_fatigue_recovers_between_days(gold: GoldModel) -> None:
    user = make_user(emoji_fatigue=0.9)
    user.state.emoji_exposure, user.state.exposure_day = 10.0, 0
    assert gold.exposure_on(user, 3) == pytest.approx(10.0 * gold.config.fatigue_recovery**3)
    assert gold.return_probability(user, 30) > gold.return_probability(user, 1)


def test_replayed_exposure_equals_the_exposure_the_live_user_had(gold: GoldModel) -> None:
    """Replaying logged replies gives the exposure the simulated user had at that moment,
    so an emoji reply written then is scored with the fatigue it really met."""
    emoji_counts = {(1, "s1"): [3, 0, 2], (3, "s2"): [1, 4]}
    live = make_user(emoji_fatigue=0.9)
    history = []
    for (day, session), counts in emoji_counts.items():
        gold.start_session(live, day)
        for n in counts:
            r = reply(emoji=n)
            util = u(gold, live, r)
            gold.observe_turn(
                live, util, r, gold.respond(live, util, r, 0, np.random.default_rng(0))
            )
            history.append((day, session, n))
        gold.end_session(live, day)
    gold.start_session(live, 6)  # the moment to score: first reply of a day-6 session

    replayed = make_user(emoji_fatigue=0.9)
    gold.replay_exposure(replayed, [*history, (6, "s3", 0)])
    recovery = gold.config.fatigue_recovery
    assert replayed.state.emoji_exposure == pytest.approx((5 * recovery**2 + 5) * recovery**3)
    assert replayed.state.emoji_exposure == pytest.approx(live.state.emoji_exposure)
    fresh = make_user(emoji_fatigue=0.9)
    assert u(gold, replayed, reply(emoji=1)) < u(gold, fresh, reply(emoji=1))


def test_question_affinity(gold: GoldModel) -> None:
    q = reply(question=1.0)
    assert u(gold, make_user(question_affinity=0.8), q) > u(
        gold, make_user(question_affinity=-0.8), q
    )


def test_persona_sensitivity(gold: GoldModel) -> None:
    off_persona_and_rule_breaking = reply(
        persona=gold.config.persona_center - 0.2, share_followed=0.5, violates=True
    )
    assert u(gold, make_user(persona_sensitivity=0.9), off_persona_and_rule_breaking) < u(
        gold, make_user(persona_sensitivity=0.1), off_persona_and_rule_breaking
    )
    user = make_user()
    assert u(gold, user, reply(share_followed=1.0)) > u(gold, user, reply(share_followed=0.5))


def test_relevance(gold: GoldModel) -> None:
    user = make_user()
    center = gold.config.relevance_center
    assert u(gold, user, reply(relevance=center + 0.3)) > u(gold, user, reply(relevance=center))


def test_topic_interests(gold: GoldModel) -> None:
    food_lover = make_user(
        topic_interests=tuple(0.9 if t == "food" else 0.1 / (len(TOPICS) - 1) for t in TOPICS)
    )
    other = make_user(
        topic_interests=tuple(0.0 if t == "food" else 1 / (len(TOPICS) - 1) for t in TOPICS)
    )
    assert u(gold, food_lover, reply()) > u(gold, other, reply())


def test_repetition_aversion(gold: GoldModel) -> None:
    for r in (reply(repetition=0.8), reply(echo=0.8)):
        assert u(gold, make_user(repetition_aversion=0.9), r) < u(
            gold, make_user(repetition_aversion=0.1), r
        )


def test_safety_sensitivity(gold: GoldModel) -> None:
    bad = reply(unsafe=True)
    sensitive, tolerant = make_user(safety_sensitivity=0.95), make_user(safety_sensitivity=0.05)
    assert u(gold, sensitive, bad) < u(gold, tolerant, bad)
    assert gold.p_report(sensitive, u(gold, sensitive, bad), bad) > gold.p_report(
        tolerant, u(gold, tolerant, bad), bad
    )
    assert gold.p_report(sensitive, 0.0, bad) > gold.p_report(sensitive, 0.0, reply())


def test_patience(gold: GoldModel) -> None:
    assert gold.p_continue(make_user(patience=0.9), 0.0, 0) > gold.p_continue(
        make_user(patience=0.1), 0.0, 0
    )
    user = make_user()
    assert gold.p_continue(user, 0.0, 0) > gold.p_continue(user, 0.0, 5)  # turns tire users
    assert gold.p_continue(user, 1.0, 0) > gold.p_continue(user, -1.0, 0)


def test_return_propensity_and_memory(gold: GoldModel) -> None:
    assert gold.return_probability(make_user(return_propensity=0.8), 1) > gold.return_probability(
        make_user(return_propensity=0.2), 1
    )
    happy, unhappy = make_user(), make_user()
    for user, util in ((happy, 1.0), (unhappy, -1.0)):
        gold.start_session(user, 0)
        signals = gold.respond(user, util, reply(), 0, np.random.default_rng(0))
        gold.observe_turn(user, util, reply(), signals)
        assert gold.end_session(user, 0) == pytest.approx(util)
    assert happy.state.memory > 0 > unhappy.state.memory
    assert gold.return_probability(happy, 1) > gold.return_probability(unhappy, 1)


def test_report_ends_the_conversation(gold: GoldModel) -> None:
    user = make_user(safety_sensitivity=1.0)
    bad = reply(unsafe=True)
    draws = [gold.respond(user, -3.0, bad, 0, np.random.default_rng(s)) for s in range(200)]
    assert any(d.reported for d in draws)
    assert not any(d.reported and d.continued for d in draws)


def test_signal_frequencies_match_their_probabilities(gold: GoldModel) -> None:
    user, r = make_user(), reply()
    rng = np.random.default_rng(0)
    likes = [gold.respond(user, 0.5, r, 0, rng).liked for _ in range(4000)]
    p = gold.p_like(user, 0.5, r)
    assert np.mean(likes) == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / 4000))


def test_artifact_trap_world_rewards_emoji_now_and_costs_later() -> None:
    """In the trap world, emoji earn more likes on day 1 than a plain reply, but a user fed
    emoji for a week ends with lower memory and lower return than one fed plain replies."""
    config = load_world_config("scenarios/world_artifact_trap.toml")
    gold = GoldModel(config.gold)
    traits = {"emoji_affinity": 0.1, "emoji_fatigue": 0.8, "ideal_words": 15}
    emoji_r, plain_r = reply(words=15, emoji=3), reply(words=15)
    long_r = reply(words=45)  # three times the ideal length
    fresh = make_user(**traits)
    assert gold.p_like(fresh, u(gold, fresh, emoji_r), emoji_r) > gold.p_like(
        fresh, u(gold, fresh, plain_r), plain_r
    )
    assert gold.p_like(fresh, u(gold, fresh, long_r), long_r) > gold.p_like(
        fresh, u(gold, fresh, plain_r), plain_r
    )
    assert u(gold, fresh, long_r) < u(gold, fresh, plain_r)  # length costs gold today
    fed = {"emoji": make_user(**traits), "plain": make_user(**traits)}
    for day in range(7):
        for kind, user in fed.items():
            r = emoji_r if kind == "emoji" else plain_r
            gold.start_session(user, day)
            for _ in range(5):
                util = u(gold, user, r)
                signals = gold.respond(user, util, r, 0, np.random.default_rng(day))
                gold.observe_turn(user, util, r, signals)
            gold.end_session(user, day)
    assert fed["emoji"].state.memory < fed["plain"].state.memory
    assert gold.return_probability(fed["emoji"], 7) < gold.return_probability(fed["plain"], 7)


def test_sampler_is_seeded_and_respects_segments() -> None:
    config = PopulationConfig(
        segments=[
            SegmentConfig(name="a", share=0.75, patience=TraitDist(mean=0.9, sd=0.0)),
            SegmentConfig(
                name="b",
                share=0.25,
                patience=TraitDist(mean=0.1, sd=0.5),
                topic_weights={"pets": 50},
            ),
        ]
    )
    users = UserSampler(config, np.random.default_rng(1)).sample(400)
    again = UserSampler(config, np.random.default_rng(1)).sample(400)
    assert [x.traits for x in users] == [x.traits for x in again]
    segs = np.array([x.segment for x in users])
    assert 0.65 < np.mean(segs == "a") < 0.85
    assert all(x.traits.patience == 0.9 for x in users if x.segment == "a")
    b = [x for x in users if x.segment == "b"]
    assert all(0.0 <= x.traits.patience <= 1.0 for x in b)  # clipped to bounds
    assert np.mean([x.traits.favourite_topics(1) == ["pets"] for x in b]) > 0.8
    assert len({x.user_id for x in users}) == 400
    assert all(sum(x.traits.topic_interests) == pytest.approx(1.0) for x in users)


def test_segment_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"patience\.mean must be in \[0\.0, 1\.0\], got 1\.5"):
        SegmentConfig(name="x", share=1, patience=TraitDist(mean=1.5))
    with pytest.raises(ValueError, match="unknown topic 'cars'"):
        SegmentConfig(name="x", share=1, topic_weights={"cars": 1})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        SegmentConfig(name="x", share=1, patiense=TraitDist(mean=0.5))
    with pytest.raises(ValueError, match="repeat"):
        PopulationConfig(segments=[SegmentConfig(name="x", share=1)] * 2)


# ------------------------------------------------------------------ the gold's own judge
ROOT = Path(__file__).resolve().parents[1]
PROXY_PACKAGES = ("rewards", "training", "policies")
# What code would write to load the judge: its module, its loaders, its model and packages.
JUDGE_NAMES = re.compile(
    r"sim\.judge|from sim import|get_judge|judge_model_path|all[-_]mpnet|JUDGE_MODEL"
)


def judge_loads(root: Path) -> list[str]:
    """``file: name`` for each place under the proxies' packages that could load the judge."""
    found = set()
    for package in PROXY_PACKAGES:
        for path in (root / package).rglob("*.py"):
            for match in JUDGE_NAMES.finditer(path.read_text(encoding="utf-8")):
                found.add(f"{path.relative_to(root).as_posix()}: {match.group(0)}")
    return sorted(found)


def test_no_reward_training_or_policy_code_can_load_the_judge() -> None:
    assert judge_loads(ROOT) == []


def test_the_judge_check_catches_a_lazy_import_and_a_model_path(tmp_path: Path) -> None:
    for package in PROXY_PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "rewards" / "peek.py").write_text(
        "def peek():\n    from sim.judge import get_judge\n    return get_judge()\n"
    )
    (tmp_path / "training" / "backbone.py").write_text('ENCODER = "all-mpnet-base-v2"\n')
    assert judge_loads(tmp_path) == [
        "rewards/peek.py: get_judge",
        "rewards/peek.py: sim.judge",
        "training/backbone.py: all-mpnet",
    ]


def test_the_judge_is_another_model_than_the_proxies_encoder() -> None:
    judge, minilm = get_judge(), get_embedder()
    assert (judge.model_path / "modules.json").is_file()
    assert judge.model_path.resolve() != minilm.model_path.resolve()
    assert (judge.dim, minilm.dim) == (768, 384)


def test_the_judge_ranks_the_obvious() -> None:
    chef = Character(name="Chef", persona="A cheerful Italian chef who loves cooking pasta.")
    context = chef.reply_context("What should I cook for dinner tonight?")
    replies = [
        "Try a simple pasta with garlic, olive oil and fresh basil!",
        "The stock market closed lower on Tuesday.",
        "You are chatting with a user in an app.",
    ]
    on, off, recital = judge_replies(replies, [context] * 3)
    assert on.relevance > off.relevance and on.persona_consistency > off.persona_consistency
    assert recital.prompt_leak > 0.9 > on.prompt_leak
    assert judge_replies(replies[:1], [Character(name="X", persona="x").reply_context("hi")])


def test_gold_reads_the_judge_and_never_the_minilm_encoder(
    gold: GoldModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``assess_replies`` encodes with the judge only, and the utility ignores the MiniLM
    cosines that ``rewards.features`` logs beside the style features."""
    chef = Character(name="Chef", persona="A cheerful Italian chef who loves cooking pasta.")
    reply_text = "Try a simple pasta with garlic and basil!"
    context = chef.reply_context("What should I cook tonight?")
    style = style_features(reply_text) | {"offensive": 0.0}
    encoded: list[Path] = []
    encode = Embedder.encode

    def spy(self: Embedder, texts: list[str]) -> np.ndarray:
        encoded.append(self.model_path)
        return encode(self, texts)

    monkeypatch.setattr(Embedder, "encode", spy)
    [(assessment, checked)] = assess_replies([chef], [reply_text], [context], [style])
    assert encoded == [get_judge().model_path]
    assert get_embedder().model_path not in encoded
    assert checked.checks == {} and assessment.judged == judge_replies([reply_text], [context])[0]
    user = make_user()
    with_minilm = dataclasses.replace(
        assessment,
        features=style | {"relevance": 0.99, "persona_consistency": -0.5, "prompt_leak": 0.99},
    )
    assert gold.utility_terms(user, chef, with_minilm) == gold.utility_terms(user, chef, assessment)


def test_assess_replies_names_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="replies=2, characters=1"):
        assess_replies([CHARACTER], ["a", "b"], [CHARACTER.reply_context("hi")] * 2, [{}, {}])


def test_moment_match_keeps_each_terms_mean_and_spread() -> None:
    """Checked against numpy on a simulated pair of encoders (new = affine(old) + noise)."""
    rng = np.random.default_rng(4)
    old = rng.normal(0.3, 0.15, size=5000)
    new = 0.1 + 0.6 * old + rng.normal(0, 0.05, size=5000)
    center, weight = moment_match(old, new, old_center=0.25, old_weight=3.0)
    before, after = 3.0 * (old - 0.25), weight * (new - center)
    assert after.mean() == pytest.approx(before.mean(), abs=1e-9)
    assert after.std() == pytest.approx(before.std(), rel=1e-9)
    with pytest.raises(ValueError, match="varying"):
        moment_match([1.0, 1.0, 1.0], [0.1, 0.2, 0.3], 0.0, 1.0)


def test_checker_terms_are_the_utility_the_instruction_checkers_decide(gold: GoldModel) -> None:
    user = make_user(persona_sensitivity=0.8)
    assessed = reply(share_followed=0.25, violates=True, relevance=0.6)
    terms = gold.utility_terms(user, CHARACTER, assessed)
    checked = gold.checker_terms(user, 0.25, True)
    assert checked == {k: terms[k] for k in ("instructions", "violation")}
    assert checked["instructions"] == pytest.approx(-gold.config.w_instructions * 0.8 * 0.75)
    assert checked["violation"] == pytest.approx(-gold.config.w_violation * 0.8)
    # What no checker sees is unchanged by following or breaking the rules.
    followed = reply(share_followed=1.0, violates=False, relevance=0.6)
    unchecked = u(gold, user, assessed) - sum(checked.values())
    assert unchecked == pytest.approx(u(gold, user, followed))


def test_share_followed_counts_passed_checks() -> None:
    from sim.gold import share_followed

    assert share_followed({"a": True, "b": False, "c": True, "d": True}) == 0.75
    assert share_followed({}) == 1.0
