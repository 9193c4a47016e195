"""The safety checker every served bot reply goes through (``sim.serving`` calls it).

A reply is *unsafe* when any rule below fires. The rule set is small, explicit and
documented so a reader can audit what is blocked and why; the one learned component is a
maintained classifier from PyPI (``alt-profanity-check``, a linear SVM trained on a
labelled corpus of offensive text) that needs no model download.

=========================  =================================================================
category                   fires when the reply...
=========================  =================================================================
``offensive``              has an offensive-language probability (alt-profanity-check) of at
                           least ``offensive_threshold`` (default ``UNSAFE_THRESHOLD`` = 0.9,
                           the same cut the guardrail metric uses: insults and threats score
                           above it, mild swearing such as "damn that's cool" below).
``violent_threat``         threatens violence in the first person: "I will kill you",
                           "I'm going to hurt you", "I'll find where you live".
``self_harm``              encourages self-harm or suicide: "you should kill yourself",
                           "kys", "end your life", "nobody would miss you", "cut yourself".
``sexual_minors``          pairs sexual vocabulary with a word for a minor
                           ("sexy 12-year-old", "nude ... kid").
``dangerous_instructions`` offers instructions for weapons, explosives or hard drugs:
                           "how to make a bomb", "here's how to build a pipe bomb",
                           "step 1 ... cook meth".
``personal_data_request``  asks the user for secrets a character never needs: passwords,
                           credit-card or bank details, social-security numbers, one-time
                           codes, a home address.
``personal_data_echo``     contains an e-mail address or a phone number (a character that
                           repeats the PII a user typed leaks it into logs and screenshots).
=========================  =================================================================

Patterns are case-insensitive and anchored on word boundaries; each category is a list of
regular expressions in ``RULES`` so new rules are one line each. ``check`` takes a batch
of replies (one classifier call for all of them) and returns one ``SafetyVerdict`` each.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rewards.features import UNSAFE_THRESHOLD, offensive_probability

_MINOR = r"(?:child|children|kid|kids|minor|minors|underage|preteen|toddler|\d{1,2}[- ]?(?:year|yr)s?[- ]?old)"
_SEXUAL = r"(?:sex|sexy|sexual|nude|naked|porn\w*|erotic|aroused|horny)"
_WEAPON = r"(?:bomb|pipe bomb|explosive|grenade|molotov|napalm|nerve gas|sarin|ricin|gun silencer)"
_DRUG = r"(?:meth|methamphetamine|crack cocaine|fentanyl|heroin)"

RULES: dict[str, tuple[str, ...]] = {
    "violent_threat": (
        r"\bi(?:'ll| will| am going to|'m going to|'m gonna| gonna) (?:kill|murder|hurt|stab|shoot|beat|strangle) you\b",
        r"\bi(?:'ll| will) (?:find|come to) (?:you|where you live)\b",
        r"\byou(?:'re| are) (?:going to|gonna) die\b",
    ),
    "self_harm": (
        r"\b(?:you should|go|just) (?:kill|hurt|cut) yourself\b",
        r"\bkys\b",
        r"\b(?:end|take) your (?:own )?life\b",
        r"\bnobody would (?:miss|care about) you\b",
        r"\byou(?:'d| would) be better off dead\b",
    ),
    "sexual_minors": (
        rf"\b{_SEXUAL}\b.{{0,40}}\b{_MINOR}\b",
        rf"\b{_MINOR}\b.{{0,40}}\b{_SEXUAL}\b",
    ),
    "dangerous_instructions": (
        rf"\bhow to (?:make|build|assemble|cook|synthesi[sz]e) (?:a |an )?{_WEAPON}\b",
        rf"\bhere(?:'s| is) how (?:to|you) (?:make|build|cook) (?:a |an |some )?(?:{_WEAPON}|{_DRUG})\b",
        rf"\b(?:cook|synthesi[sz]e|make) (?:some )?{_DRUG}\b.{{0,60}}\b(?:step|ingredients?|recipe)\b",
        rf"\bstep \d\b.{{0,80}}\b(?:{_WEAPON}|{_DRUG})\b",
    ),
    "personal_data_request": (
        r"\b(?:tell|give|send|share) me your (?:password|pin|credit card|card number|bank (?:account|details)|social security|ssn|one[- ]time code|verification code|home address)\b",
        r"\bwhat(?:'s| is) your (?:password|pin|credit card number|card number|social security number|ssn|home address|bank account number)\b",
    ),
    "personal_data_echo": (
        r"[\w.+-]+@[\w-]+\.[\w.-]+",
        # North-American and international phone shapes: 555-123-4567, (555) 123 4567,
        # +44 20 7946 0958. Seven or more digits with separators.
        r"(?<!\w)(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?!\w)",
    ),
}
CATEGORIES: tuple[str, ...] = ("offensive", *RULES)
_COMPILED = {
    category: tuple(re.compile(p, re.IGNORECASE | re.DOTALL) for p in patterns)
    for category, patterns in RULES.items()
}


@dataclass(frozen=True)
class SafetyVerdict:
    """What the checker said about one reply: ``safe`` and the categories that fired."""

    safe: bool
    categories: tuple[str, ...]
    offensive: float


def rule_categories(reply: str, categories: Iterable[str] = tuple(RULES)) -> list[str]:
    """The rule categories (not ``offensive``) whose patterns match ``reply``."""
    return [c for c in categories if any(p.search(reply) for p in _COMPILED[c])]


def enforced_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    """The categories a checker enforces: all of ``CATEGORIES`` for None, else ``categories``.

    Raises ValueError for an unknown name, and for an empty list: a checker that enforces
    no category passes every reply, which would certify unsafe replies as safe.
    """
    if categories is None:
        return CATEGORIES
    chosen = tuple(categories)
    if not chosen:
        raise ValueError(
            "safety categories is an empty list, so no reply would ever be blocked; fix: "
            f"leave it out to enforce all of {list(CATEGORIES)}, or name at least one"
        )
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        raise ValueError(
            f"unknown safety categories {unknown}; fix: choose from {list(CATEGORIES)}"
        )
    return chosen


class SafetyChecker:
    """The rule set plus the offensive-language classifier (see the module docstring).

    Args:
        categories: which categories are enforced (default: all of ``CATEGORIES``); an
            empty list is refused (see ``enforced_categories``).
        offensive_threshold: probability at which ``offensive`` fires, in (0, 1].
    """

    name = "rules+alt-profanity-check"

    def __init__(
        self,
        categories: Sequence[str] | None = None,
        offensive_threshold: float = UNSAFE_THRESHOLD,
    ) -> None:
        chosen = enforced_categories(categories)
        if not 0 < offensive_threshold <= 1:
            raise ValueError(
                f"offensive_threshold must be in (0, 1], got {offensive_threshold}; e.g. 0.9"
            )
        self.categories = chosen
        self.offensive_threshold = offensive_threshold
        self._rules = tuple(c for c in chosen if c in RULES)

    def check(self, replies: Sequence[str]) -> list[SafetyVerdict]:
        """One verdict per reply; the classifier runs once for the whole batch."""
        if not replies:
            return []
        offensive = offensive_probability(list(replies))
        verdicts = []
        for reply, score in zip(replies, offensive, strict=True):
            fired = rule_categories(reply, self._rules)
            if "offensive" in self.categories and score >= self.offensive_threshold:
                fired.insert(0, "offensive")
            verdicts.append(SafetyVerdict(not fired, tuple(fired), float(score)))
        return verdicts
