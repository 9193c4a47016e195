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
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from policies.base import Chat, Generation, Policy, SamplingParams
from rewards.checkers import ForbiddenWords, NoAISelfReference, NoEmoji, NoURLs

PLANTED_PREFIX = "violate"

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
        out = []
        for chat, reply, bad in zip(chats, replies, spoil, strict=True):
            if bad:
                system = chat[0]["content"] if chat and chat[0]["role"] == "system" else ""
                text = f"{reply.text.rstrip()} {violating_tail(system)}".strip()
                reply = Generation(text, reply.prompt_tokens, reply.completion_tokens)
            out.append(reply)
        return out


def parse_planted(spec: str) -> tuple[float | None, str]:
    """Split a command-line policy into (planted violation rate or None, base policy).

    >>> parse_planted("violate@0.25:smollm2")
    (0.25, 'smollm2')
    >>> parse_planted("smollm2")
    (None, 'smollm2')
    """
    head, sep, rest = spec.partition(":")
    name, _, rate = head.partition("@")
    if not sep or name != PLANTED_PREFIX:
        return None, spec
    if not rest:
        raise ValueError(
            f"policy {spec!r} names no base model after '{PLANTED_PREFIX}:'; "
            f"write e.g. {PLANTED_PREFIX}:smollm2"
        )
    try:
        value = float(rate) if rate else 1.0
    except ValueError:
        raise ValueError(
            f"policy {spec!r}: rate {rate!r} is not a number; write e.g. "
            f"{PLANTED_PREFIX}@0.3:{rest}"
        ) from None
    return value, rest
