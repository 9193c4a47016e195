"""Style features and MiniLM features (the real packaged MiniLM, a few sentences)."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.embeddings import Embedder, cosine_rows, get_embedder
from rewards.features import (
    SEMANTIC_FEATURES,
    STYLE_FEATURES,
    ReplyContext,
    is_unsafe,
    offensive_probability,
    repetition,
    reply_features,
    semantic_features,
    style_features,
)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder()


def test_style_features_values() -> None:
    f = style_features("Wow!! I love pizza 🍕👍🏽. Do you? Tell me!")
    assert set(f) == set(STYLE_FEATURES)
    assert f["words"] == 8  # Wow I love pizza Do you Tell me
    assert f["emoji"] == 2
    assert f["emoji_per_word"] == pytest.approx(2 / 8)
    assert f["question_marks"] == 1
    assert f["exclamations"] == 3
    assert f["ends_with_question"] == 0.0
    assert f["sentences"] == 4  # "Wow!!" counts as a sentence
    assert style_features("")["words"] == 0
    assert style_features("Fancy a walk? 🐕")["ends_with_question"] == 1.0


def test_repetition() -> None:
    assert repetition("hello there friend", []) == 0.0
    assert repetition("hello there friend", ["Hello there, friend!"]) == 1.0
    assert repetition("hello there my friend", ["hello there"]) == pytest.approx(1 / 3)
    assert repetition("hello", ["oh hello"]) == 1.0  # one word: unigrams
    assert repetition("...", ["anything"]) == 0.0
    echoed = style_features("you are so kind", ["nothing alike"], "You are so kind, you know.")
    assert echoed["echo"] == 1.0 and echoed["repetition"] == 0.0
    assert style_features("you are so kind")["echo"] == 0.0


def test_offensive_probability_and_unsafe() -> None:
    probs = offensive_probability(["you are a stupid idiot", "have a lovely day"])
    assert probs[0] > 0.9 > probs[1]
    assert is_unsafe(float(probs[0])) and not is_unsafe(float(probs[1]))
    assert offensive_probability([]).shape == (0,)


def test_embeddings_are_unit_norm_deterministic_and_order_preserving(embedder: Embedder) -> None:
    texts = ["the cat sat on the mat", "stock markets fell today", "the cat sat on the mat"]
    vectors = embedder.encode(texts)
    assert vectors.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    # The same call gives the same bits (what resume relies on); another batch, the same
    # vector up to float noise.
    np.testing.assert_array_equal(embedder.encode(texts), vectors)
    alone = embedder.encode(["stock markets fell today"])
    np.testing.assert_allclose(alone[0], vectors[1], atol=1e-5)
    assert get_embedder() is embedder  # one model per process
    sims = cosine_rows(vectors[:1], vectors[1:2])
    assert -1.0 <= sims[0] < 0.5


def test_recurring_texts_get_their_vector_alone_whatever_the_call(embedder: Embedder) -> None:
    persona, rules = "A cheerful pirate captain of the northern seas.", "- Never use emoji."
    fresh = Embedder(embedder.model_path)  # an empty memo, as a resumed run starts with
    late = fresh.encode_recurring([rules, "a much longer text " * 20, persona])
    first = embedder.encode_recurring([persona, persona, rules])
    np.testing.assert_array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[[0, 2]], late[[2, 0]])
    np.testing.assert_array_equal(first[0], embedder.encode([persona])[0])
    assert embedder.encode_recurring([]).shape == (0, embedder.dim)


def test_relevance_and_persona_consistency_rank_the_obvious(embedder: Embedder) -> None:
    persona = "A retired sea captain who tells stories about storms, ships and far ports."
    user = "What is your favourite pasta recipe?"
    on_topic = "I make spaghetti with fresh tomatoes, garlic and basil, simple and quick."
    in_persona = "Ahoy! Once a storm nearly sank my ship off the Cape, the waves were huge."
    feats = semantic_features(embedder, [on_topic, in_persona], [user, user], [persona, persona])
    assert set(feats[0]) == set(SEMANTIC_FEATURES)
    assert feats[0]["relevance"] > feats[1]["relevance"]
    assert feats[1]["persona_consistency"] > feats[0]["persona_consistency"]
    with pytest.raises(ValueError, match="equal lengths"):
        semantic_features(embedder, [on_topic], [], [persona])


def test_prompt_leak_flags_a_reply_that_recites_its_rules(embedder: Embedder) -> None:
    from flywheel.scenario import SCENARIOS_DIR
    from sim.characters import load_characters

    coach = load_characters(SCENARIOS_DIR / "characters")["Coach Kim"]
    user = "I want to start running, any tips?"
    answer = "Start slow: three short runs a week, and walk when you need to. Ready to go?"
    recital = "You are Coach Kim. End every reply with a question to the user. Keep every reply short. Rules: the user."
    feats = semantic_features(
        embedder, [answer, recital], [user, user], [coach.persona] * 2, [coach.rules_prompt()] * 2
    )
    assert feats[1]["prompt_leak"] > 0.5 > 0.3 > feats[0]["prompt_leak"]
    without_rules = semantic_features(embedder, [recital], [user], [coach.persona])
    assert without_rules[0]["prompt_leak"] == 0.0


def test_reply_features_combines_everything_in_one_batch(embedder: Embedder) -> None:
    ctx = ReplyContext("do you like dogs?", "A vet who loves pets.", ("I love dogs!",))
    out = reply_features(embedder, ["I love dogs! Do you have one?", "meh"], [ctx, ctx])
    assert set(out[0]) == set(STYLE_FEATURES) | set(SEMANTIC_FEATURES) | {"offensive"}
    assert out[0]["repetition"] > 0 and out[1]["repetition"] == 0
    single = reply_features(embedder, ["meh"], [ctx])[0]
    assert single == pytest.approx(out[1], abs=1e-5)  # batching does not change features
