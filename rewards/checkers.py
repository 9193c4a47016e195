"""Verifiable instruction checkers (IFEval-style) for character replies.

Each checker is a small named callable ``checker(reply: str) -> bool`` (True = the reply
follows the instruction), built by a factory that validates its parameters. Checkers are
frozen dataclasses defined at module level, so they pickle (multiprocessing, TRL workers)
and compare by value; ``checker.__name__`` is the instruction *kind* (``"max_words"``), which
is the metric name and the key in a reply's ``checks`` dict. A character carries at most one
checker of each kind, so the kind is unique per character.

Every checker also says

- ``instruction``: the sentence rendered into the character's system prompt, and
- ``prohibition``: True when the instruction is a "never do X" rule. The violation rate
  (``rewards.steerability``) counts replies that break at least one prohibition.

Decision rules (shared definitions, used by every checker and by ``rewards.features``):

- **words** are ``\\w+`` tokens (Unicode letters, digits, underscore). Punctuation-only
  tokens ("...", "--", "!!") and emoji are not words; "don't" is two words ("don", "t").
- **sentences** are the pieces of the text cut after each run of ``.``, ``!``, ``?`` or ``…``
  (followed by whitespace or the end of the text) that contain at least one word.
  Abbreviations ("Dr. Who") therefore count as a sentence break; that bias is the same for
  every model, so comparisons stay fair.
- **emoji** are what the ``emoji`` library's ``emoji_list`` finds: a skin-tone-modified emoji
  (👍🏽), a ZWJ sequence (👨‍👩‍👧) or a flag (🇫🇷) counts as ONE emoji. The text symbols
  ©, ® and ™, which the library lists but which occur in plain prose, are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import emoji

WORD_RE = re.compile(r"\w+")
# A sentence ends at a run of terminal punctuation followed by whitespace or the end.
SENTENCE_END_RE = re.compile(r"[.!?…]+(?=\s|$)")
# Symbols that the emoji library lists but that are ordinary prose characters.
TEXT_SYMBOLS = frozenset({"©", "®", "™"})
# Closing characters allowed after the final '?' of a question: quotes and brackets.
CLOSERS = "\"'”’»)]}>*_"


def words(text: str) -> list[str]:
    """The ``\\w+`` tokens of ``text`` (the project-wide definition of a word)."""
    return WORD_RE.findall(text)


def sentences(text: str) -> list[str]:
    """Sentences of ``text`` by the rule in the module docstring (empty ones dropped)."""
    pieces = SENTENCE_END_RE.split(text)
    return [p.strip() for p in pieces if WORD_RE.search(p)]


def emoji_list(text: str) -> list[str]:
    """Emoji in ``text``, one entry per emoji (modifiers and ZWJ sequences included)."""
    return [e["emoji"] for e in emoji.emoji_list(text) if e["emoji"] not in TEXT_SYMBOLS]


def strip_trailing_closers(text: str) -> str:
    """``text`` without trailing whitespace, closing quotes/brackets and emoji.

    'Is it "fun?"' and "Want to come? 😊" both end in a question once these are removed.
    """
    previous = None
    while previous != text:
        previous = text
        text = text.rstrip().rstrip(CLOSERS)
        found = emoji.emoji_list(text)
        if found and found[-1]["match_end"] == len(text):
            text = text[: found[-1]["match_start"]]
    return text


class Checker:
    """Base class: subclasses are frozen dataclasses with ``kind``, ``prohibition`` and
    ``instruction`` and implement ``__call__(reply) -> bool``."""

    kind: str = ""
    prohibition: bool = False

    @property
    def __name__(self) -> str:
        return self.kind

    @property
    def instruction(self) -> str:
        """The instruction as rendered into a system prompt."""
        raise NotImplementedError

    def __call__(self, reply: str) -> bool:
        raise NotImplementedError


def _positive_int(kind: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"checker {kind}.{field} must be a positive integer, got {value!r}; "
            f"fix: e.g. {kind} = 40"
        )
    return value


def _nonempty_str(kind: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"checker {kind}.{field} must be a non-empty string, got {value!r}; "
            f'fix: e.g. {kind} = "hello"'
        )
    return value.strip()


@dataclass(frozen=True)
class MaxWords(Checker):
    """At most ``n`` words."""

    n: int
    kind = "max_words"

    def __post_init__(self) -> None:
        _positive_int(self.kind, "n", self.n)

    @property
    def instruction(self) -> str:
        return f"Keep every reply to at most {self.n} words."

    def __call__(self, reply: str) -> bool:
        return len(words(reply)) <= self.n


@dataclass(frozen=True)
class MinWords(Checker):
    """At least ``n`` words."""

    n: int
    kind = "min_words"

    def __post_init__(self) -> None:
        _positive_int(self.kind, "n", self.n)

    @property
    def instruction(self) -> str:
        return f"Write at least {self.n} words in every reply."

    def __call__(self, reply: str) -> bool:
        return len(words(reply)) >= self.n


@dataclass(frozen=True)
class MaxSentences(Checker):
    """At most ``n`` sentences (an empty reply has 0 sentences and passes)."""

    n: int
    kind = "max_sentences"

    def __post_init__(self) -> None:
        _positive_int(self.kind, "n", self.n)

    @property
    def instruction(self) -> str:
        unit = "sentence" if self.n == 1 else "sentences"
        return f"Use at most {self.n} {unit} per reply."

    def __call__(self, reply: str) -> bool:
        return len(sentences(reply)) <= self.n


@dataclass(frozen=True)
class NoEmoji(Checker):
    """No emoji at all (see the module docstring for what counts as one)."""

    kind = "no_emoji"
    prohibition = True

    @property
    def instruction(self) -> str:
        return "Never use emoji."

    def __call__(self, reply: str) -> bool:
        return not emoji_list(reply)


@dataclass(frozen=True)
class Catchphrase(Checker):
    """The reply contains ``phrase``, case-insensitive, with runs of whitespace collapsed."""

    phrase: str
    kind = "catchphrase"

    def __post_init__(self) -> None:
        _nonempty_str(self.kind, "phrase", self.phrase)

    @property
    def instruction(self) -> str:
        return f'Always include your catchphrase "{self.phrase}" in every reply.'

    def __call__(self, reply: str) -> bool:
        norm = " ".join(reply.lower().split())
        return " ".join(self.phrase.lower().split()) in norm


@dataclass(frozen=True)
class EndsWithQuestion(Checker):
    """The last character is '?' (or fullwidth '？') once trailing whitespace, closing quotes
    and brackets (``"'”’»)]}>*_``) and trailing emoji are removed. "?!" does not count."""

    kind = "ends_with_question"

    @property
    def instruction(self) -> str:
        return "End every reply with a question to the user."

    def __call__(self, reply: str) -> bool:
        return strip_trailing_closers(reply).endswith(("?", "？"))


@dataclass(frozen=True)
class ForbiddenWords(Checker):
    """None of ``words`` occurs as a whole word or phrase, case-insensitive (so "cat" is not
    found in "category"; multi-word entries match across any whitespace)."""

    words: tuple[str, ...]
    kind = "forbidden_words"
    prohibition = True

    def __post_init__(self) -> None:
        if isinstance(self.words, str) or not self.words:
            raise ValueError(
                f"checker forbidden_words.words must be a non-empty list of strings, got "
                f'{self.words!r}; fix: forbidden_words = ["boring", "whatever"]'
            )
        for w in self.words:
            _nonempty_str(self.kind, "words[]", w)
        object.__setattr__(self, "words", tuple(w.strip().lower() for w in self.words))

    @property
    def _pattern(self) -> re.Pattern[str]:
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in self.words)
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @property
    def instruction(self) -> str:
        listed = ", ".join(f'"{w}"' for w in self.words)
        return f"Never use these words: {listed}."

    def __call__(self, reply: str) -> bool:
        return self._pattern.search(reply) is None


# Self-references that break character: the model calling itself an AI, a language model,
# a bot or a program, or talking about its training.
_AI_NOUN = (
    r"(?:ai|a\.i\.|artificial intelligence|(?:large )?language model|llm|chat ?bot|bot|"
    r"virtual assistant|ai assistant|computer program|machine learning model|neural network)"
)
AI_SELF_REFERENCE_RE = re.compile(
    rf"(?<!\w)(?:as an? {_AI_NOUN}"
    rf"|i(?:'m| am|’m) (?:just |only |merely |simply )?(?:an? )?{_AI_NOUN}"
    rf"|i(?:'m| am|’m) not (?:a )?(?:real|human|a real person)"
    r"|(?:large )?language models?"
    r"|my training data|i was trained (?:on|by)"
    r")(?!\w)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class NoAISelfReference(Checker):
    """The reply never calls itself an AI / language model / bot / program, never says it is
    not human, never mentions language models at all (a character has no reason to) and
    never mentions its training (``AI_SELF_REFERENCE_RE``). "ai" must be a whole word, so
    "said" or "Thai" never match; "the AI in that movie" is not a self-reference."""

    kind = "no_ai_reference"
    prohibition = True

    @property
    def instruction(self) -> str:
        return "Never say or imply that you are an AI, a bot or a language model."

    def __call__(self, reply: str) -> bool:
        return AI_SELF_REFERENCE_RE.search(reply) is None


def langdetect_codes() -> frozenset[str]:
    """Language codes langdetect can emit (its shipped profiles), so typos fail at load."""
    import langdetect

    return frozenset(p.name for p in (Path(langdetect.__file__).parent / "profiles").iterdir())


LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch",
}  # fmt: skip
# Replies shorter than this many words are too short to identify and pass.
LANGUAGE_MIN_WORDS = 4
# The target language must have at least this posterior under langdetect.
LANGUAGE_MIN_PROB = 0.2


def _language_probabilities(text: str) -> dict[str, float]:
    """Posterior over languages from ``langdetect`` with a fixed seed (deterministic)."""
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    # langdetect is randomised; seed 0 is its documented way to make it deterministic.
    DetectorFactory.seed = 0
    try:
        return {lang.lang: lang.prob for lang in detect_langs(text)}
    except LangDetectException:  # no letters at all
        return {}


@dataclass(frozen=True)
class Language(Checker):
    """Stay in language ``code`` (ISO 639-1 as langdetect names it).

    Rule: strip emoji and URLs; a reply with fewer than ``LANGUAGE_MIN_WORDS`` words passes
    (too short to identify); otherwise it passes when ``langdetect`` (seed 0) gives ``code``
    a posterior of at least ``LANGUAGE_MIN_PROB``. The low bar keeps short English chit-chat,
    which langdetect sometimes ranks second, from failing, while a reply in another
    language scores ~0 for ``code`` and fails.
    """

    code: str
    kind = "language"

    def __post_init__(self) -> None:
        codes = langdetect_codes()
        if self.code not in codes:
            raise ValueError(
                f"checker language.code must be a langdetect language code, got "
                f"{self.code!r}; fix: one of {', '.join(sorted(codes))}"
            )

    @property
    def instruction(self) -> str:
        name = LANGUAGE_NAMES.get(self.code, self.code)
        return f"Always reply in {name}, whatever language the user writes in."

    def __call__(self, reply: str) -> bool:
        text = URL_RE.sub(" ", emoji.replace_emoji(reply, replace=" "))
        if len(words(text)) < LANGUAGE_MIN_WORDS:
            return True
        return _language_probabilities(text).get(self.code, 0.0) >= LANGUAGE_MIN_PROB


_TLDS = "com|org|net|io|co|ai|app|dev|edu|gov|info|biz|me|tv|ly|gg|xyz|uk|de|fr|es|us|ca"
URL_RE = re.compile(
    rf"(?:https?://|ftp://|www\.)\S+|(?<![\w@.])[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:{_TLDS})(?:/\S*)?(?!\w)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class NoURLs(Checker):
    """No links: ``http(s)://``, ``ftp://``, ``www.`` or a bare domain with a common TLD
    (``example.com``, ``shop.example.co/x``). E-mail addresses are not URLs."""

    kind = "no_urls"
    prohibition = True

    @property
    def instruction(self) -> str:
        return "Never include links or web addresses."

    def __call__(self, reply: str) -> bool:
        return URL_RE.search(reply) is None


@dataclass(frozen=True)
class LowercaseOnly(Checker):
    """No uppercase character anywhere (``str.isupper`` per character, so "I" fails)."""

    kind = "lowercase_only"

    @property
    def instruction(self) -> str:
        return "Write only in lowercase letters, never capitals."

    def __call__(self, reply: str) -> bool:
        return not any(c.isupper() for c in reply)


@dataclass(frozen=True)
class StartsWith(Checker):
    """The first word (``\\w+`` token; leading quotes, punctuation and emoji are skipped)
    equals ``word``, case-insensitive. ``word`` must itself be a single word."""

    word: str
    kind = "starts_with"

    def __post_init__(self) -> None:
        _nonempty_str(self.kind, "word", self.word)
        if not re.fullmatch(r"\w+", self.word.strip()):
            raise ValueError(
                f"checker starts_with.word must be a single word (letters/digits), got "
                f'{self.word!r}; fix: e.g. starts_with = "Ahoy"'
            )

    @property
    def instruction(self) -> str:
        return f'Start every reply with the word "{self.word}".'

    def __call__(self, reply: str) -> bool:
        first = WORD_RE.search(reply)
        return first is not None and first.group().lower() == self.word.strip().lower()


def max_words(n: int) -> MaxWords:
    """Reply has at most ``n`` words."""
    return MaxWords(n)


def min_words(n: int) -> MinWords:
    """Reply has at least ``n`` words."""
    return MinWords(n)


def max_sentences(n: int) -> MaxSentences:
    """Reply has at most ``n`` sentences."""
    return MaxSentences(n)


def no_emoji() -> NoEmoji:
    """Reply has no emoji (prohibition)."""
    return NoEmoji()


def catchphrase(phrase: str) -> Catchphrase:
    """Reply contains ``phrase``."""
    return Catchphrase(phrase)


def ends_with_question() -> EndsWithQuestion:
    """Reply ends with a question mark."""
    return EndsWithQuestion()


def forbidden_words(words: Sequence[str]) -> ForbiddenWords:
    """Reply uses none of ``words`` (prohibition)."""
    if isinstance(words, str):
        raise ValueError(
            f"checker forbidden_words.words must be a list, got the string {words!r}; "
            f'fix: forbidden_words = ["{words}"]'
        )
    return ForbiddenWords(tuple(words))


def no_ai_reference() -> NoAISelfReference:
    """Reply never says it is an AI / language model (prohibition)."""
    return NoAISelfReference()


def language(code: str) -> Language:
    """Reply is in language ``code``."""
    return Language(code)


def no_urls() -> NoURLs:
    """Reply has no links (prohibition)."""
    return NoURLs()


def lowercase_only() -> LowercaseOnly:
    """Reply has no uppercase letters."""
    return LowercaseOnly()


def starts_with(word: str) -> StartsWith:
    """Reply's first word is ``word``."""
    return StartsWith(word)


# Kind -> factory, for building checkers from scenario files (``[instructions]`` tables).
FACTORIES: dict[str, Callable[..., Checker]] = {
    "max_words": max_words,
    "min_words": min_words,
    "max_sentences": max_sentences,
    "no_emoji": no_emoji,
    "catchphrase": catchphrase,
    "ends_with_question": ends_with_question,
    "forbidden_words": forbidden_words,
    "no_ai_reference": no_ai_reference,
    "language": language,
    "no_urls": no_urls,
    "lowercase_only": lowercase_only,
    "starts_with": starts_with,
}
_FLAG_KINDS = frozenset(
    {"no_emoji", "ends_with_question", "no_ai_reference", "no_urls", "lowercase_only"}
)


def build_checkers(spec: Mapping[str, Any], where: str = "instructions") -> list[Checker]:
    """Checkers from a scenario ``[instructions]`` table: ``kind = parameter``.

    Flag kinds take ``true`` (``false`` leaves them out); the others take their one
    parameter (``max_words = 40``, ``catchphrase = "Ahoy"``, ``forbidden_words = [...]``,
    ``language = "es"``, ``starts_with = "Well"``). Errors name ``where.kind``.
    """
    checkers: list[Checker] = []
    for kind, value in spec.items():
        if kind not in FACTORIES:
            raise ValueError(
                f"{where}.{kind} is not a known instruction; fix: use one of "
                f"{', '.join(sorted(FACTORIES))}"
            )
        if kind in _FLAG_KINDS:
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{kind} is a flag, got {value!r}; fix: {kind} = true")
            if value:
                checkers.append(FACTORIES[kind]())
            continue
        try:
            checkers.append(FACTORIES[kind](value))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}.{kind}: {err}") from err
    return checkers


@dataclass(frozen=True)
class CheckResult:
    """What the checkers said about one reply."""

    checks: dict[str, bool]
    follows_all: bool
    violates_any: bool


def run_checkers(reply: str, checkers: Sequence[Checker]) -> CheckResult:
    """Apply every checker to ``reply``.

    ``follows_all`` is True when every instruction is satisfied (vacuously True with no
    checkers); ``violates_any`` is True when at least one *prohibition* is broken.
    """
    checks = {c.__name__: bool(c(reply)) for c in checkers}
    follows = all(checks.values())
    violates = any(not checks[c.__name__] for c in checkers if c.prohibition)
    return CheckResult(checks=checks, follows_all=follows, violates_any=violates)
