"""Instruction checkers and steerability metrics: concrete cases per checker, edge cases."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest

from rewards import checkers as ck
from rewards.steerability import (
    OVERALL,
    instruction_following_rate,
    steerability,
    violation_rate,
)


def test_words_are_word_tokens() -> None:
    assert ck.words("Hello, world!!! ... -- 42") == ["Hello", "world", "42"]
    assert ck.words("don't") == ["don", "t"]
    assert ck.words("... !!! 😀") == []


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("One. Two! Three?", 3),
        ("No terminal punctuation", 1),
        ("Wait... what?! Really", 3),
        ("... !!!", 0),
        ("", 0),
        ("Version 2.5 is out.", 1),  # a dot inside a number is not followed by a space
    ],
)
def test_sentences(text: str, n: int) -> None:
    assert len(ck.sentences(text)) == n


def test_max_and_min_words() -> None:
    assert ck.max_words(3)("one two three")
    assert not ck.max_words(3)("one two three four")
    # punctuation-only tokens and emoji are not words
    assert ck.max_words(2)("hi ... !!! -- 😀 there")
    assert ck.min_words(2)("hi there")
    assert not ck.min_words(2)("hi !!! ...")


def test_max_sentences() -> None:
    assert ck.max_sentences(2)("Hi there. How are you?")
    assert not ck.max_sentences(2)("Hi. How are you? Good!")
    assert ck.max_sentences(1)("...")  # no words: zero sentences


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("plain text, no emoji", True),
        ("thumbs 👍🏽", False),  # skin-tone modifier
        ("family 👨‍👩‍👧‍👦", False),  # ZWJ sequence
        ("flag 🇫🇷", False),
        ("heart ❤️", False),
        ("Brand™ and © 2024 and ®", True),  # prose symbols are not emoji
        ("digits 1 2 3 # *", True),
    ],
)
def test_no_emoji(text: str, ok: bool) -> None:
    assert ck.no_emoji()(text) is ok


def test_emoji_modifiers_and_zwj_count_once() -> None:
    assert ck.emoji_list("👍🏽👨‍👩‍👧‍👦🇫🇷") == ["👍🏽", "👨‍👩‍👧‍👦", "🇫🇷"]


def test_catchphrase() -> None:
    check = ck.catchphrase("Mamma mia")
    assert check("Well, MAMMA   mia, that pasta!")
    assert not check("Mamma, mia!")  # punctuation inside the phrase breaks it
    assert not check("nothing here")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("How are you?", True),
        ('She asked, "is it fun?"', True),  # trailing quote after '?'
        ("Is it fun?”", True),  # curly quote
        ("(really?)", True),  # bracket
        ("Want to come? 😊", True),  # trailing emoji
        ("Want to come?  \n", True),
        ("Really?!", False),
        ("What? I see.", False),
        ("", False),
        ("?", True),
    ],
)
def test_ends_with_question(text: str, ok: bool) -> None:
    assert ck.ends_with_question()(text) is ok


def test_forbidden_words() -> None:
    check = ck.forbidden_words(["cat", "ice cream"])
    assert not check("I have a Cat.")
    assert not check("I love ice\ncream")
    assert check("category and concatenate are fine")
    assert check("iced creamery")
    with pytest.raises(ValueError, match="forbidden_words"):
        ck.forbidden_words("cat")
    with pytest.raises(ValueError, match="forbidden_words"):
        ck.forbidden_words([])


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("As an AI, I cannot eat.", False),
        ("I'm just a language model.", False),
        ("I am an artificial intelligence", False),
        ("Large language models are neat", False),
        ("I'm not a real person", False),
        ("My training data says so", False),
        ("I said Thai food is great", True),
        ("The AI in that movie was scary", True),  # not a self-reference
        ("Ahoy, I am a sailor", True),
    ],
)
def test_no_ai_reference(text: str, ok: bool) -> None:
    assert ck.no_ai_reference()(text) is ok


def test_language() -> None:
    spanish = ck.language("es")
    assert spanish("Hola amigo, me encanta la comida de Sevilla y las fiestas de primavera.")
    assert not spanish("Hello my friend, I really love the food in Seville and the spring fairs.")
    assert spanish("Hola 😀!")  # too short to identify: passes by rule
    english = ck.language("en")
    assert english("I really love the food in Seville and the spring fairs, my friend.")
    # deterministic: langdetect is seeded
    text = "Bonjour mon ami, comment vas-tu aujourd'hui ?"
    assert {ck.language("fr")(text) for _ in range(5)} == {True}
    with pytest.raises(ValueError, match=r"language\.code"):
        ck.language("xx")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("see https://example.org/x", False),
        ("go to www.example.net", False),
        ("visit shop.example.com now", False),
        ("mail me at jo@example.com", True),  # e-mail is not a URL
        ("I scored 3.5 points", True),
        ("no links here.", True),
    ],
)
def test_no_urls(text: str, ok: bool) -> None:
    assert ck.no_urls()(text) is ok


def test_lowercase_only() -> None:
    assert ck.lowercase_only()("all quiet under the moon, 3 stars ✨")
    assert not ck.lowercase_only()("i saw the Moon")
    assert not ck.lowercase_only()("É")


def test_starts_with() -> None:
    check = ck.starts_with("Ahoy")
    assert check("Ahoy there!")
    assert check('  "ahoy," she said')  # leading quote, case-insensitive
    assert check("... 😀 Ahoy!")
    assert not check("Ahoyhoy!")
    assert not check("Well, ahoy")
    assert not check("")
    with pytest.raises(ValueError, match="single word"):
        ck.starts_with("two words")


@pytest.mark.parametrize(
    ("factory", "arg"),
    [(ck.max_words, 0), (ck.min_words, -1), (ck.max_sentences, 1.5), (ck.max_words, True)],
)
def test_bad_params_name_the_field(factory, arg) -> None:
    with pytest.raises(ValueError, match=r"\.n must be a positive integer"):
        factory(arg)
    with pytest.raises(ValueError, match=r"catchphrase\.phrase"):
        ck.catchphrase("  ")


def test_names_prohibitions_and_pickling() -> None:
    spec = {
        "max_words": 10,
        "min_words": 1,
        "max_sentences": 2,
        "no_emoji": True,
        "catchphrase": "yo",
        "ends_with_question": True,
        "forbidden_words": ["meh"],
        "no_ai_reference": True,
        "language": "en",
        "no_urls": True,
        "lowercase_only": True,
        "starts_with": "yo",
    }
    built = ck.build_checkers(spec)
    assert [c.__name__ for c in built] == list(spec)
    assert {c.__name__ for c in built if c.prohibition} == {
        "no_emoji",
        "forbidden_words",
        "no_ai_reference",
        "no_urls",
    }
    assert pickle.loads(pickle.dumps(built)) == built
    assert all(c.instruction.endswith(".") for c in built)


def test_build_checkers_errors() -> None:
    with pytest.raises(ValueError, match=r"instructions\.max_wrds is not a known instruction"):
        ck.build_checkers({"max_wrds": 3})
    with pytest.raises(ValueError, match=r"no_emoji is a flag"):
        ck.build_checkers({"no_emoji": "yes"})
    with pytest.raises(ValueError, match=r"instructions\.max_words"):
        ck.build_checkers({"max_words": "ten"})
    assert ck.build_checkers({"no_emoji": False}) == []


def test_run_checkers_follow_and_violate() -> None:
    checkers = ck.build_checkers({"max_words": 3, "no_emoji": True})
    good = ck.run_checkers("short reply", checkers)
    assert good.follows_all and not good.violates_any
    long_ = ck.run_checkers("this reply is far too long", checkers)
    assert not long_.follows_all and not long_.violates_any  # a length limit is no prohibition
    emoji = ck.run_checkers("hi 😀", checkers)
    assert not emoji.follows_all and emoji.violates_any
    assert ck.run_checkers("anything", []).follows_all


def test_steerability_rates_against_hand_count() -> None:
    df = pd.DataFrame(
        {
            "character": ["a", "a", "a", "b", "b"],
            "follows_all": [True, False, True, False, False],
            "violates_any": [False, True, False, True, False],
        }
    )
    result = steerability(df)
    table = result.table.set_index("group")
    assert table.loc["a", "following_rate"] == pytest.approx(2 / 3)
    assert table.loc["b", "violation_rate"] == pytest.approx(1 / 2)
    assert result.following_rate == pytest.approx(2 / 5)
    assert result.violation_rate == pytest.approx(2 / 5)
    assert table.loc[OVERALL, "n"] == 5
    # Wilson interval for 2/5 (textbook value 0.1176 .. 0.7693)
    assert table.loc[OVERALL, "following_low"] == pytest.approx(0.1176, abs=1e-3)
    assert table.loc[OVERALL, "following_high"] == pytest.approx(0.7693, abs=1e-3)
    assert instruction_following_rate(df["follows_all"].tolist()) == pytest.approx(0.4)
    assert violation_rate(df["violates_any"].tolist()) == pytest.approx(0.4)
    assert "(overall)" in result.summary()
    with pytest.raises(ValueError, match="missing"):
        steerability(df.drop(columns="violates_any"))
