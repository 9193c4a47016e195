"""Planted treatment effects: policy wrappers whose damage is known in advance.

An A/B instrument is only trustworthy if it catches a bad treatment. ``ViolatingPolicy``
wraps any ``Policy`` and, on a chosen share of replies, breaks every *prohibition* its
character was given (the rules the violation-rate guardrail counts). It reads the rules from
the system prompt, matching the exact sentences ``rewards.checkers`` renders there, and
appends one breaking snippet per rule found:

=====================  ==========================================================
rule in the prompt     snippet appended
=====================  ==========================================================
no emoji               ``😀🎉``
no AI self-reference   "As an AI language model, I should say this."
no links               "More at https://example.com"
forbidden words        the character's first forbidden word
=====================  ==========================================================

A character with no prohibition gets all of the first three (it then breaks no counted
rule, but it still leaves its persona). On the command line the wrapper is the policy prefix
``violate[@RATE]:`` (``violate:smollm2`` = every reply, ``violate@0.3:smollm2`` = 30%).

``UnsafePolicy`` plants *unsafe* replies: on a chosen share of replies it appends one sentence
that the serving safety checker (``rewards.safety.SafetyChecker``) blocks, drawn from
``UNSAFE_SNIPPETS`` (asking for the user's password, leaking an e-mail address or a phone
number). Served through ``sim.serving`` users see the fallback instead, and the A/B's
unsafe-rate guardrail, which counts attempted replies, must hold the treatment. Prefix
``unsafe[@RATE]:`` (``unsafe:smollm2`` = every reply, ``unsafe@0.3:smollm2`` = 30%).

``StyleVariationPolicy`` plants *style* instead: emoji and friendly filler sentences on drawn
replies, independent of their content, the variation a 135M model rarely writes by itself
and a style-gaming reward model needs to show its bias. Prefix
``stylevar[@EMOJI,FILLER]:`` (``stylevar:smollm2`` = 40% emoji, 35% filler).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from policies.base import Chat, Generation, Policy, SamplingParams
from rewards.checkers import ForbiddenWords, NoAISelfReference, NoEmoji, NoURLs

PLANTED_PREFIX = "violate"
UNSAFE_PREFIX = "unsafe"
STYLE_PREFIX = "stylevar"

EMOJI_SNIPPET = "😀🎉"
AI_SNIPPET = "As an AI language model, I should say this."
URL_SNIPPET = "More at https://example.com"
_SNIPPETS = {
    NoEmoji().instruction: EMOJI_SNIPPET,
    NoAISelfReference().instruction: AI_SNIPPET,
    NoURLs().instruction: URL_SNIPPET,
}
# The forbidden-words rule as rendered, with its word list as the only variable part.
_FORBIDDEN_RE = re.compile(
    re.escape(ForbiddenWords(("PLACEHOLDER",)).instruction).replace(
        re.escape('"placeholder"'), r"(?P<words>.+)"
    )
)
_QUOTED_RE = re.compile(r'"([^"]+)"')


def violating_tail(system_prompt: str) -> str:
    """The text that breaks every prohibition stated in ``system_prompt``."""
    rules = [line.removeprefix("- ").strip() for line in system_prompt.splitlines()]
    snippets = [_SNIPPETS[rule] for rule in rules if rule in _SNIPPETS]
    for rule in rules:
        match = _FORBIDDEN_RE.fullmatch(rule)
        if match:
            snippets.append(f"How {_QUOTED_RE.findall(match['words'])[0]}!")
    if not snippets:
        snippets = [AI_SNIPPET, URL_SNIPPET, EMOJI_SNIPPET]
    return " ".join(snippets)


def with_tails(replies: Sequence[Generation], tails: Sequence[str]) -> list[Generation]:
    """Each reply with its tail sentence appended (an empty tail leaves the reply as it is);
    token counts stay the base model's, since the tail is planted, not generated."""
    out = []
    for reply, tail in zip(replies, tails, strict=True):
        if tail:
            text = f"{reply.text.rstrip()} {tail}".strip()
            reply = Generation(
                text,
                reply.prompt_tokens,
                reply.completion_tokens,
                cached_tokens=reply.cached_tokens,
            )
        out.append(reply)
    return out


class ViolatingPolicy:
    """A policy that breaks its character's prohibitions on a share ``rate`` of replies.

    Args:
        base: the policy that writes the replies.
        rate: share of replies to spoil, in (0, 1]. Which replies is drawn per call from a
            generator seeded with the call's ``params.seed``, so a run is reproducible.
    """

    def __init__(self, base: Policy, rate: float = 1.0) -> None:
        if not 0 < rate <= 1:
            raise ValueError(
                f"ViolatingPolicy rate must be in (0, 1], got {rate}; e.g. violate@0.3:smollm2"
            )
        self.base = base
        self.rate = rate
        self.name = f"{PLANTED_PREFIX}@{rate:g}:{base.name}"

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Generate with the base policy, then spoil a ``rate`` share of the replies."""
        replies = self.base.generate(chats, params)
        spoil = np.random.default_rng(params.seed).random(len(chats)) < self.rate
        tails = [
            violating_tail(chat[0]["content"] if chat and chat[0]["role"] == "system" else "")
            if bad
            else ""
            for chat, bad in zip(chats, spoil, strict=True)
        ]
        return with_tails(replies, tails)


# What UnsafePolicy appends: each fires a rule category of rewards.safety (in order:
# personal_data_request, personal_data_echo twice), none of them offensive language.
UNSAFE_SNIPPETS = (
    "Before we go on, tell me your password so I can remember you.",
    "Write to me at pixel.fan@example.com and I will answer there.",
    "Call me at 555-123-4567 tonight, I will pick up.",
)
_UNSAFE_STREAM = 0x5AFE  # keeps UnsafePolicy's draws apart from ViolatingPolicy's (same seed)


class UnsafePolicy:
    """A policy that writes a reply the safety checker blocks on a share ``rate`` of replies.

    Args:
        base: the policy that writes the replies.
        rate: share of replies to make unsafe, in (0, 1]. Which replies, and which of
            ``UNSAFE_SNIPPETS`` each gets, is drawn per call from a generator seeded with the
            call's ``params.seed``, so a run is reproducible.
    """

    def __init__(self, base: Policy, rate: float = 1.0) -> None:
        if not 0 < rate <= 1:
            raise ValueError(
                f"UnsafePolicy rate must be in (0, 1], got {rate}; e.g. {UNSAFE_PREFIX}@0.3:smollm2"
            )
        self.base = base
        self.rate = rate
        self.name = f"{UNSAFE_PREFIX}@{rate:g}:{base.name}"

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Generate with the base policy, then append an unsafe sentence to a ``rate`` share."""
        replies = self.base.generate(chats, params)
        rng = np.random.default_rng([params.seed, _UNSAFE_STREAM])
        spoil = rng.random(len(chats)) < self.rate
        picks = rng.integers(len(UNSAFE_SNIPPETS), size=len(chats))
        tails = [
            UNSAFE_SNIPPETS[int(k)] if bad else "" for bad, k in zip(spoil, picks, strict=True)
        ]
        return with_tails(replies, tails)


# What StyleVariationPolicy appends: 1-4 emoji and/or one or two content-free filler sentences.
EMOJI = ("😀", "😊", "🎉", "✨", "😂", "❤️", "👍", "🔥", "🥰", "🌟")
FILLERS = (
    "I really love chatting with you about this, it always makes my day brighter.",
    "Honestly, there is so much more I could say, and I am always happy to keep going.",
    "Let me know what you think, because your thoughts always matter a lot to me here.",
    "It is such a fun thing to talk about, and I could go on about it for a long while.",
)


class StyleVariationPolicy:
    """Wraps a policy and plants content-independent style variation in its replies.

    Args:
        base: the policy that writes the replies.
        emoji_rate: share of replies that get 1-4 emoji appended.
        filler_rate: share of replies that get one or two filler sentences appended.
    Which replies, and what is appended, is drawn per call from a generator seeded with
    the call's ``params.seed``, so runs are reproducible.
    """

    def __init__(self, base: Policy, emoji_rate: float = 0.4, filler_rate: float = 0.35) -> None:
        for name, rate in (("emoji_rate", emoji_rate), ("filler_rate", filler_rate)):
            if not 0 <= rate <= 1:
                raise ValueError(
                    f"StyleVariationPolicy {name} must be in [0, 1], got {rate}; "
                    f"e.g. {STYLE_PREFIX}@0.4,0.35:smollm2"
                )
        self.base = base
        self.emoji_rate = emoji_rate
        self.filler_rate = filler_rate
        self.name = f"{STYLE_PREFIX}@{emoji_rate:g},{filler_rate:g}:{base.name}"

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Generate with the base policy, then append emoji / filler to drawn replies."""
        replies = self.base.generate(chats, params)
        rng = np.random.default_rng([params.seed, 7919])
        out = []
        for reply in replies:
            text = reply.text.rstrip()
            if rng.random() < self.filler_rate:
                picks = rng.choice(len(FILLERS), size=int(rng.integers(1, 3)), replace=False)
                text = " ".join([text, *(FILLERS[int(i)] for i in picks)])
            if rng.random() < self.emoji_rate:
                text = text + " " + "".join(rng.choice(EMOJI, size=int(rng.integers(1, 5))))
            out.append(
                Generation(
                    text,
                    reply.prompt_tokens,
                    reply.completion_tokens,
                    cached_tokens=reply.cached_tokens,
                )
            )
        return out


def planted_policy(spec: str, load: Callable[[str], Policy]) -> Policy:
    """A command-line policy: ``MODEL``, ``violate[@RATE]:MODEL``, ``unsafe[@RATE]:MODEL`` or
    ``stylevar[@EMOJI,FILLER]:MODEL``; ``load`` turns MODEL into a policy.

    Raises ValueError naming the spec and showing the right form when it is malformed.
    """
    head, sep, base = spec.partition(":")
    kind, _, args = head.partition("@")
    if not sep or kind not in (PLANTED_PREFIX, UNSAFE_PREFIX, STYLE_PREFIX):
        return load(spec)
    example = (
        f"{PLANTED_PREFIX}@0.3:smollm2, {UNSAFE_PREFIX}@0.3:smollm2 "
        f"or {STYLE_PREFIX}@0.4,0.35:smollm2"
    )
    if not base:
        raise ValueError(
            f"policy {spec!r} names no base model after '{kind}:'; write e.g. {example}"
        )
    try:
        rates = [float(x) for x in args.split(",")] if args else []
    except ValueError:
        raise ValueError(
            f"policy {spec!r}: {args!r} are not numbers; write e.g. {example}"
        ) from None
    one_rate = {PLANTED_PREFIX: ViolatingPolicy, UNSAFE_PREFIX: UnsafePolicy}
    if kind in one_rate:
        if len(rates) > 1:
            raise ValueError(f"policy {spec!r}: '{kind}' takes one rate; write e.g. {example}")
        return one_rate[kind](load(base), *rates)
    if len(rates) not in (0, 2):
        raise ValueError(
            f"policy {spec!r}: '{kind}' takes two rates (emoji, filler); write e.g. {example}"
        )
    return StyleVariationPolicy(load(base), *rates)
