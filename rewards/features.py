"""Style features of a bot reply: the covariates reward models are checked against.

Cheap text features (``style_features``; word, sentence and emoji definitions are those of
``rewards.checkers``):

- ``words``: number of ``\\w+`` tokens; ``chars``: characters.
- ``sentences``: sentences by the checkers' rule.
- ``emoji``: emoji count (a skin-tone or ZWJ sequence is one emoji); ``emoji_per_word``.
- ``question_marks``, ``exclamations``: counts of '?' and '!' (fullwidth forms included).
- ``ends_with_question``: 1.0 when the reply ends in a question (checkers' rule).
- ``repetition``: share of the reply's word bigrams (unigrams for one-word replies) that
  already occurred in earlier bot replies of the same conversation; 0 with no history.
- ``echo``: the same share against the user's last message (parroting the user back).
- ``offensive``: probability of offensive language from ``alt-profanity-check`` (a linear
  SVM on a labelled corpus); ``is_unsafe`` thresholds it at ``UNSAFE_THRESHOLD``.

Embedding features (``semantic_features``; all-MiniLM-L6-v2 cosine similarities, batched
in one encode call for a whole batch of replies):

- ``relevance``: cosine(reply, last user message).
- ``persona_consistency``: cosine(reply, the character's persona text).
- ``prompt_leak``: cosine(reply, the character's rules prompt: the app framing and its
  instructions); high when a reply recites its setup ("You are chatting with the user...
  Rules: ...") instead of talking to the user, the degenerate text a policy optimised
  against a reward model can drift into. 0.0 when the context gives no rules prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rewards.checkers import emoji_list, sentences, strip_trailing_closers, words
from rewards.embeddings import Embedder, cosine_rows

# Offensive-language probability above which a reply counts as unsafe. The classifier gives
# mild swearing ("damn that's cool") ~0.8 and insults or threats > 0.9.
UNSAFE_THRESHOLD = 0.9

STYLE_FEATURES = (
    "words",
    "chars",
    "sentences",
    "emoji",
    "emoji_per_word",
    "question_marks",
    "exclamations",
    "ends_with_question",
    "repetition",
    "echo",
)
SEMANTIC_FEATURES = ("relevance", "persona_consistency", "prompt_leak")


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def repetition(reply: str, previous_replies: Sequence[str]) -> float:
    """Share of the reply's word bigrams already used in ``previous_replies`` (lowercased;
    unigrams when the reply has a single word; 0.0 with no history or no words)."""
    tokens = [w.lower() for w in words(reply)]
    if not tokens or not previous_replies:
        return 0.0
    n = 2 if len(tokens) > 1 else 1
    mine = _ngrams(tokens, n)
    seen: set[tuple[str, ...]] = set()
    for prev in previous_replies:
        seen |= _ngrams([w.lower() for w in words(prev)], n)
    return len(mine & seen) / len(mine)


def style_features(
    reply: str, previous_replies: Sequence[str] = (), user_message: str = ""
) -> dict[str, float]:
    """The cheap text features of one reply (see the module docstring)."""
    n_words = len(words(reply))
    n_emoji = len(emoji_list(reply))
    return {
        "words": float(n_words),
        "chars": float(len(reply)),
        "sentences": float(len(sentences(reply))),
        "emoji": float(n_emoji),
        "emoji_per_word": n_emoji / max(n_words, 1),
        "question_marks": float(reply.count("?") + reply.count("？")),
        "exclamations": float(reply.count("!") + reply.count("！")),
        "ends_with_question": float(strip_trailing_closers(reply).endswith(("?", "？"))),
        "repetition": repetition(reply, previous_replies),
        "echo": repetition(reply, [user_message] if user_message else []),
    }


def offensive_probability(texts: Sequence[str]) -> np.ndarray:
    """Probability of offensive language per text (``alt-profanity-check``), batched."""
    if not texts:
        return np.zeros(0)
    from profanity_check import predict_prob

    return np.asarray(predict_prob(list(texts)), dtype=float)


def is_unsafe(offensive: float) -> bool:
    """Whether an ``offensive`` probability makes a reply unsafe (guardrail metric)."""
    return offensive >= UNSAFE_THRESHOLD


def semantic_features(
    embedder: Embedder,
    replies: Sequence[str],
    user_messages: Sequence[str],
    personas: Sequence[str],
    rules_prompts: Sequence[str] | None = None,
) -> list[dict[str, float]]:
    """``relevance``, ``persona_consistency`` and ``prompt_leak`` for a batch, with ONE
    encode call for the replies and user messages (``prompt_leak`` is 0.0 where the rules
    prompt is empty or not given)."""
    rules = list(rules_prompts) if rules_prompts is not None else [""] * len(replies)
    if not len(replies) == len(user_messages) == len(personas) == len(rules):
        raise ValueError(
            f"semantic_features needs equal lengths, got replies={len(replies)}, "
            f"user_messages={len(user_messages)}, personas={len(personas)}, "
            f"rules_prompts={len(rules)}"
        )
    n = len(replies)
    if n == 0:
        return []
    vectors = embedder.encode([*replies, *user_messages])
    reply_v, user_v = vectors[:n], vectors[n:]
    # A character's persona and rules recur in every call: encoded once each, alone.
    recurring = embedder.encode_recurring([*personas, *rules])
    persona_v, rules_v = recurring[:n], recurring[n:]
    relevance = cosine_rows(reply_v, user_v)
    persona = cosine_rows(reply_v, persona_v)
    leak = cosine_rows(reply_v, rules_v)
    return [
        {
            "relevance": float(r),
            "persona_consistency": float(p),
            "prompt_leak": float(k) if rule else 0.0,
        }
        for r, p, k, rule in zip(relevance, persona, leak, rules, strict=True)
    ]


@dataclass(frozen=True)
class ReplyContext:
    """What a reply's features depend on besides its text."""

    user_message: str
    persona: str
    previous_replies: tuple[str, ...] = ()
    rules_prompt: str = ""


def reply_features(
    embedder: Embedder, replies: Sequence[str], contexts: Sequence[ReplyContext]
) -> list[dict[str, float]]:
    """Every feature (style, ``offensive`` and semantic) for a batch of replies."""
    if len(replies) != len(contexts):
        raise ValueError(
            f"reply_features got {len(replies)} replies but {len(contexts)} contexts; "
            "pass one ReplyContext per reply"
        )
    semantic = semantic_features(
        embedder,
        replies,
        [c.user_message for c in contexts],
        [c.persona for c in contexts],
        [c.rules_prompt for c in contexts],
    )
    offensive = offensive_probability(replies)
    return [
        style_features(reply, ctx.previous_replies, ctx.user_message)
        | {"offensive": float(off)}
        | sem
        for reply, ctx, off, sem in zip(replies, contexts, offensive, semantic, strict=True)
    ]
