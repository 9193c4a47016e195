"""GRPO reward functions: separate, named, TRL-style callables.

Each reward is an object called as ``reward(prompts, completions, **kwargs) -> list[float]``
(TRL's reward-function signature) with a stable ``__name__``, which TRL turns into the
metric ``rewards/<name>/mean``; every call also logs ``reward/<name>`` (the batch mean)
through TRL's ``log_metric`` hook, the project's metric namespace. The three components:

- ``reward_model``: the score of a trained reward model (any object with
  ``score(contexts, replies) -> array``; context = the last user message).
- ``steerability``: the character's verifiable instructions (``rewards.checkers``): the
  share of its instructions the reply meets, plus 1 when it meets all of them (the
  instruction-following rate counts only complete compliance, so that step is rewarded
  on its own), minus 1 when it breaks a prohibition.
- ``artifact_penalty``: how far the reply's style (words, emoji, exclamation marks) strays
  from the *reference model's* replies to the same character, in reference standard
  deviations beyond a tolerance, summed over features and negated. Without it GRPO
  learns the cheapest trick first (collapsing length, emoji spam).
- ``emoji_rate`` (optional, ``RateConstraint``): holds the share of replies with an emoji
  at the reference model's rate. A per-reply penalty cannot hold a rare feature: at a 3%
  rate a reply without emoji sits inside any tolerance band, so nothing stops the rate
  from falling to zero (benchmarks/README.md, ``--hold-rate none``).

Components live on different scales, so they are normalised each on its own before
they are combined, in one of two ways:

- within the group (TRL's ``multi_objective_aggregation = "normalize_then_sum"``, the
  default of ``training.grpo.grpo_config``): each reward standardised over the completions
  of one prompt, then weighted. A reward that barely separates them (a reward model whose
  scores differ by 0.03 inside a group) is blown up to the same weight as one that
  separates them clearly: its noise steers the policy.
- by the reference's spread (``ScaledReward`` with ``reference_scales``, then TRL's
  ``"sum_then_normalize"``): each reward divided by its standard deviation over the
  reference model's replies, so a reward moves the policy in proportion to how much it
  separates completions relative to its usual range.

Every output is checked where it enters training: one finite float per completion, else
a ValueError naming the reward, the position and the value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rewards.checkers import Checker, run_checkers
from rewards.features import style_features

logger = logging.getLogger(__name__)

# Style features the artifact penalty watches, with the floor on their reference standard
# deviation: a reference model that never uses emoji has std 0, and one emoji must then
# cost a bounded, not an infinite, penalty.
ARTIFACT_FEATURES: dict[str, float] = {"words": 2.0, "emoji": 0.5, "exclamations": 0.5}
# Count features whose *rate* (share of replies with at least one) a RateConstraint can
# hold, with the checker kind that forbids the feature for a character (None: none does).
RATE_FEATURES: dict[str, str | None] = {"emoji": "no_emoji", "exclamations": None}
# How a RateConstraint observes a reply: counting the feature, or the policy's own
# probability of it along the reply (``RateConstraint``).
RATE_ESTIMATES = ("count", "tokens")
# Drift (in reference standard deviations) the artifact penalty forgives by default.
DEFAULT_TOLERANCE = 0.5
# A character needs this many reference replies for its own statistics; with fewer, the
# pooled statistics over every character are used.
MIN_REFERENCE_REPLIES = 8


def artifact_tolerances(tolerance: float | Mapping[str, float]) -> dict[str, float]:
    """Per-feature tolerances (reference sd) from one value or a partial mapping.

    Raises ValueError naming an unknown feature or a negative value, with the fix.
    """
    if isinstance(tolerance, Mapping):
        unknown = sorted(set(tolerance) - set(ARTIFACT_FEATURES))
        if unknown:
            raise ValueError(
                f"artifact tolerance for unknown feature(s) {unknown}; fix: use "
                f"{sorted(ARTIFACT_FEATURES)}"
            )
        values = {f: float(tolerance.get(f, DEFAULT_TOLERANCE)) for f in ARTIFACT_FEATURES}
    else:
        values = dict.fromkeys(ARTIFACT_FEATURES, float(tolerance))
    for feature, value in values.items():
        if not value >= 0:
            raise ValueError(
                f"artifact tolerance of {feature!r} is {value}; fix: a value >= 0 "
                "(reference standard deviations of drift that cost nothing)"
            )
    return values


def completion_text(completion: Any) -> str:
    """The reply text of one TRL completion (a string, or a list of assistant messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")


def last_user_message(prompt: Any) -> str:
    """The last user message of a conversational prompt (the prompt itself if a string)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def check_rewards(name: str, values: Sequence[float], n_expected: int) -> list[float]:
    """Return ``values`` as floats if there is one finite value per completion, else raise."""
    values = [float(v) for v in values]
    if len(values) != n_expected:
        raise ValueError(
            f"reward {name!r} returned {len(values)} values for {n_expected} completions; "
            "it must return one per completion"
        )
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(
                f"reward {name!r} returned {v} for completion {i}; rewards must be finite "
                "(check the reward model's inputs and the reference statistics)"
            )
    return values


def _emit(name: str, values: list[float], kwargs: Mapping[str, Any]) -> list[float]:
    log_metric = kwargs.get("log_metric")
    if log_metric is not None:
        log_metric(f"reward/{name}", float(np.mean(values)))
    return values


class ReplyScorer(Protocol):
    """A reward model as the GRPO reward needs it."""

    def score(self, contexts: Sequence[str], replies: Sequence[str]) -> np.ndarray:
        """One score per (context, reply); higher is better."""
        ...


class RewardModelReward:
    """``reward_model``: a trained reward model's score of each reply."""

    __name__ = "reward_model"

    def __init__(self, scorer: ReplyScorer) -> None:
        if not callable(getattr(scorer, "score", None)):
            raise TypeError(
                f"reward_model needs an object with score(contexts, replies), got "
                f"{type(scorer).__name__}; fix: pass a trained model from rewards.models"
            )
        self.scorer = scorer

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """Score each completion against the last user message of its prompt."""
        contexts = [last_user_message(p) for p in prompts]
        replies = [completion_text(c) for c in completions]
        scores = np.asarray(self.scorer.score(contexts, replies), dtype=float).ravel()
        return _emit(self.__name__, check_rewards(self.__name__, scores, len(prompts)), kwargs)


class SteerabilityReward:
    """``steerability``: the character's instruction checkers on each reply.

    reward = share of instructions met + 1 if all are met - 1 if a prohibition is broken.
    Needs a ``character`` column in the GRPO dataset (TRL passes it as a kwarg).
    """

    __name__ = "steerability"

    def __init__(self, checkers: Mapping[str, Sequence[Checker]]) -> None:
        if not checkers:
            raise ValueError(
                "steerability needs checkers for at least one character; fix: pass "
                "{character.name: character.checkers}"
            )
        self.checkers = {name: tuple(c) for name, c in checkers.items()}

    def score(self, reply: str, character: str) -> float:
        """The reward of one reply for one character."""
        if character not in self.checkers:
            raise ValueError(
                f"steerability has no checkers for character {character!r}; known: "
                f"{sorted(self.checkers)}; fix: include it in the checkers mapping"
            )
        checkers = self.checkers[character]
        if not checkers:
            return 0.0
        result = run_checkers(reply, checkers)
        share = sum(result.checks.values()) / len(result.checks)
        return share + float(result.follows_all) - float(result.violates_any)

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """Reward each completion for its row's character."""
        characters = kwargs.get("character")
        if characters is None:
            raise ValueError(
                "steerability needs a 'character' column in the training dataset; "
                "fix: build the dataset with training.grpo.grpo_records"
            )
        values = [
            self.score(completion_text(c), str(ch))
            for c, ch in zip(completions, characters, strict=True)
        ]
        return _emit(self.__name__, check_rewards(self.__name__, values, len(prompts)), kwargs)


@dataclass(frozen=True)
class StyleReference:
    """Mean and standard deviation of style features of the reference model's replies,
    per character and pooled (key ``None``); for the rate features, also pooled over the
    replies that use them (``when_present``: how many emoji a reply with emoji has)."""

    stats: Mapping[str | None, Mapping[str, tuple[float, float]]]
    when_present: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_replies(
        cls, replies: Sequence[str], characters: Sequence[str] | None = None
    ) -> StyleReference:
        """Fit from reference replies (optionally labelled with their character)."""
        if not replies:
            raise ValueError(
                "StyleReference needs reference replies; fix: sample the reference model "
                "on the training prompts first"
            )
        labels = list(characters) if characters is not None else [None] * len(replies)
        if len(labels) != len(replies):
            raise ValueError(
                f"StyleReference got {len(replies)} replies but {len(labels)} characters"
            )
        table = np.array(
            [[style_features(r)[f] for f in ARTIFACT_FEATURES] for r in replies], dtype=float
        )

        def fit(rows: np.ndarray) -> dict[str, tuple[float, float]]:
            return {
                f: (float(rows[:, j].mean()), max(float(rows[:, j].std()), floor))
                for j, (f, floor) in enumerate(ARTIFACT_FEATURES.items())
            }

        stats: dict[str | None, dict[str, tuple[float, float]]] = {None: fit(table)}
        label_array = np.array(labels, dtype=object)
        for name in {lab for lab in labels if lab is not None}:
            rows = table[label_array == name]
            if len(rows) >= MIN_REFERENCE_REPLIES:
                stats[name] = fit(rows)
        when_present = {}
        for j, (f, floor) in enumerate(ARTIFACT_FEATURES.items()):
            used = table[table[:, j] > 0, j]
            if f in RATE_FEATURES and len(used):
                when_present[f] = (float(used.mean()), max(float(used.std()), floor))
        return cls(stats, when_present)

    def for_character(self, character: str | None) -> Mapping[str, tuple[float, float]]:
        """The character's statistics, or the pooled ones when it has too few replies."""
        return self.stats.get(character, self.stats[None])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (pooled statistics under the key ``"*"``)."""
        stats = {("*" if k is None else k): dict(v) for k, v in self.stats.items()}
        return stats | {"when_present": dict(self.when_present)}


class ArtifactPenalty:
    """``artifact_penalty``: minus the style drift of a reply from the reference model.

    penalty = - sum over features of max(0, |x - mean| / std - tolerance[feature]), with
    the reference statistics of the row's character (pooled if unknown). ``tolerance`` is
    one value for every feature or one per feature (``{"words": 0, "emoji": 1}``; features
    left out keep ``DEFAULT_TOLERANCE``): a tight leash on length, a loose one on a rare
    emoji whose reference std is only the floor.

    A feature a ``RateConstraint`` holds (``held``) is judged only when present, against
    the reference replies that use it: the constraint decides how often, the penalty how
    much. Otherwise any emoji is an outlier (reference mean 0.1, std at the floor) and the
    penalty fights the constraint (a reply with emoji costs about two reference sd).
    """

    __name__ = "artifact_penalty"

    def __init__(
        self,
        reference: StyleReference,
        tolerance: float | Mapping[str, float] = 0.5,
        held: Collection[str] = (),
    ) -> None:
        self.reference = reference
        self.tolerance = artifact_tolerances(tolerance)
        self.held = frozenset(check_rate_feature(f) for f in held)

    def score(self, reply: str, character: str | None = None) -> float:
        """The (non-positive) penalty of one reply."""
        features = style_features(reply)
        penalty = 0.0
        for f, (mean, std) in self.reference.for_character(character).items():
            if f in self.held:
                if not features[f]:
                    continue
                mean, std = self.reference.when_present.get(f, (mean, std))
            penalty += max(0.0, abs(features[f] - mean) / std - self.tolerance[f])
        return -penalty

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """Penalise each completion's style drift."""
        characters = kwargs.get("character") or [None] * len(completions)
        values = [
            self.score(completion_text(c), ch)
            for c, ch in zip(completions, characters, strict=True)
        ]
        return _emit(self.__name__, check_rewards(self.__name__, values, len(prompts)), kwargs)


class ScaledReward:
    """A reward divided by a fixed scale (its spread over the reference model's replies);
    keeps the wrapped reward's ``__name__`` so weights and logs still find it."""

    def __init__(self, reward: Any, scale: float) -> None:
        if not scale > 0:
            raise ValueError(
                f"scale of reward {reward.__name__!r} must be > 0, got {scale}; fix: take it "
                "from reference_scales"
            )
        self.reward = reward
        self.scale = float(scale)
        self.__name__ = reward.__name__

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """The wrapped reward's values over ``scale`` (its own ``reward/<name>`` log is raw)."""
        return [v / self.scale for v in self.reward(prompts, completions, **kwargs)]


def reference_scales(
    rewards: Sequence[Any],
    prompts: Sequence[Any],
    replies: Sequence[str],
    characters: Sequence[str],
    floor: float = 1e-3,
) -> dict[str, float]:
    """Each reward's standard deviation over reference replies (at least ``floor``)."""
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    return {
        reward.__name__: max(
            float(np.std(reward(list(prompts), completions, character=list(characters)))), floor
        )
        for reward in rewards
        if not isinstance(reward, RateConstraint)  # already in reference-sd units; stateful
    }


def scaled_by_reference(
    rewards: Sequence[Any],
    prompts: Sequence[Any],
    replies: Sequence[str],
    characters: Sequence[str],
) -> list[Any]:
    """``rewards`` each divided by its spread over the reference replies
    (``reference_scales``; a ``RateConstraint`` passes through as it is); combine them
    with ``sum_then_normalize``."""
    scales = reference_scales(rewards, prompts, replies, characters)
    return [r if r.__name__ not in scales else ScaledReward(r, scales[r.__name__]) for r in rewards]


def check_rate_feature(feature: str) -> str:
    """``feature`` if a RateConstraint can hold it, else a ValueError listing those it can."""
    if feature not in RATE_FEATURES:
        raise ValueError(
            f"rate feature {feature!r} is unknown; fix: one of {sorted(RATE_FEATURES)}"
        )
    return feature


def characters_allowing(feature: str, checkers: Mapping[str, Sequence[Checker]]) -> list[str]:
    """The characters none of whose checkers forbids ``feature`` (no ``no_emoji``)."""
    forbidding = RATE_FEATURES.get(feature)
    return sorted(
        name
        for name, checks in checkers.items()
        if all(getattr(c, "kind", None) != forbidding for c in checks)
    )


class RateConstraint:
    """``<feature>_rate``: holds the share of replies with a feature at a target rate.

    A Lagrangian constraint E[x] = target on x = 1 if the reply has the feature: each
    reply of a held character is rewarded ``multiplier * (x - target)``, and after every
    batch the multiplier moves by ``lr * (target - batch rate) / target`` (dual ascent,
    clipped to +-``max_multiplier``). While the policy uses the feature less than the
    target the multiplier grows and pays for it, more and it turns into a penalty; it
    keeps growing against any other reward that pushes the rate away, which a fixed bonus
    would not. Its unit is the reference-scaled rewards' (one reference sd), so it is
    never rescaled (``scaled_by_reference`` passes it through).

    Characters outside ``characters`` (those forbidding the feature: steerability already
    teaches them) get 0 and do not count in the batch rate. The multiplier is state: call
    it only on the policy's own samples (GRPO), never on reference replies.

    ``estimate="tokens"``: x is the policy's own probability of the feature along the
    sampled reply (``training.anchor.expected_features``' ``present``, which
    ``AnchoredGRPOTrainer`` passes as the ``expected_<feature>`` column), in units of the
    target: each reply is rewarded ``multiplier * (x - target) / target``. Counting says
    nothing in most steps at a rate of 2%; x has something to say about every reply, and
    E[x] is the rate. As a reward it moves the policy only through the replies it prefers
    (towards where the feature is likely, the part of the rate's gradient a
    ``TokenAnchor`` does not hold), and it never enters the loss, where Adam made a
    multiplier's push bang-bang. With a ``CreditMask`` on the same feature it holds the
    held-out rate while instruction following and gold utility rise; without the mask the
    rate falls (benchmarks/README.md, ``grpo_steerability.py``).
    """

    def __init__(
        self,
        feature: str,
        target: float,
        characters: Collection[str] | None = None,
        lr: float = 0.1,
        max_multiplier: float = 3.0,
        estimate: str = "count",
    ) -> None:
        check_rate_feature(feature)
        if estimate not in RATE_ESTIMATES:
            raise ValueError(
                f"RateConstraint estimate {estimate!r} is unknown; fix: one of {RATE_ESTIMATES}"
            )
        if not 0 < target <= 1:
            raise ValueError(
                f"RateConstraint target for {feature!r} is {target}; fix: a rate in (0, 1], "
                "measured on the reference model's replies (a feature it never uses has "
                "nothing to hold)"
            )
        if not lr > 0 or not max_multiplier > 0:
            raise ValueError(
                f"RateConstraint lr ({lr}) and max_multiplier ({max_multiplier}) must be > 0"
            )
        self.feature = feature
        self.target = float(target)
        self.characters = None if characters is None else frozenset(characters)
        self.lr = float(lr)
        self.max_multiplier = float(max_multiplier)
        self.estimate = estimate
        self.multiplier = 0.0
        # (held replies, batch rate, multiplier after the update) per call: the trace
        self.history: list[tuple[int, float, float]] = []
        self.__name__ = f"{feature}_rate"

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """Reward each held completion, then move the multiplier by this batch's rate."""
        characters = kwargs.get("character") or [None] * len(completions)
        if self.estimate == "tokens":
            column = f"expected_{self.feature}"
            if column not in kwargs:
                raise ValueError(
                    f"{self.__name__} estimates from token probabilities but got no "
                    f"{column!r} column; fix: train with training.anchor.AnchoredGRPOTrainer "
                    "(train_grpo does), or estimate='count'"
                )
            observed = [float(x) for x in kwargs[column]]
            unit = self.target
        else:
            observed = [
                float(style_features(completion_text(c))[self.feature] > 0) for c in completions
            ]
            unit = 1.0
        has = [
            x if self.characters is None or ch in self.characters else None
            for x, ch in zip(observed, characters, strict=True)
        ]
        values = [0.0 if x is None else self.multiplier * (x - self.target) / unit for x in has]
        held = [x for x in has if x is not None]
        if held:
            rate = float(np.mean(held))
            self.multiplier = float(
                np.clip(
                    self.multiplier + self.lr * (self.target - rate) / self.target,
                    -self.max_multiplier,
                    self.max_multiplier,
                )
            )
            self.history.append((len(held), rate, self.multiplier))
            log_metric = kwargs.get("log_metric")
            if log_metric is not None:
                log_metric(f"reward/{self.__name__}_batch", rate)
                log_metric(f"reward/{self.__name__}_multiplier", self.multiplier)
        return _emit(self.__name__, check_rewards(self.__name__, values, len(prompts)), kwargs)


def held_rates(
    features: Sequence[str],
    replies: Sequence[str],
    characters: Sequence[str],
    checkers: Mapping[str, Sequence[Checker]],
    estimates: Mapping[str, Sequence[float]] | None = None,
    **kwargs: Any,
) -> list[RateConstraint]:
    """One ``RateConstraint`` per feature, its target the feature's rate over the reference
    ``replies`` of the characters allowed it (``characters_allowing``). A feature those
    replies never use has nothing to hold: it is skipped with a warning.

    ``estimates``: per feature, the reference model's probability of the feature along each
    reference reply (``training.anchor.expected_features``' ``present``); the target is
    then their mean, the rate a ``estimate="tokens"`` constraint observes, instead of the
    count (0.0226 from 12 of 533 replies, against 0.027 from token probabilities).
    """
    if len(replies) != len(characters):
        raise ValueError(
            f"held_rates got {len(replies)} reference replies but {len(characters)} "
            "characters; fix: one character per reply"
        )
    constraints = []
    for feature in features:
        held = characters_allowing(check_rate_feature(feature), checkers)
        rows = [i for i, ch in enumerate(characters) if ch in held]
        if estimates is not None and feature in estimates:
            if len(estimates[feature]) != len(replies):
                raise ValueError(
                    f"estimates[{feature!r}] has {len(estimates[feature])} values for "
                    f"{len(replies)} reference replies; fix: one per reply, in order"
                )
            observed = [float(estimates[feature][i]) for i in rows]
        else:
            observed = [float(style_features(replies[i])[feature] > 0) for i in rows]
        if not any(observed):
            logger.warning(
                "the %d reference replies by %s never use %s; nothing to hold",
                len(observed), held, feature,
            )  # fmt: skip
            continue
        constraints.append(RateConstraint(feature, float(np.mean(observed)), held, **kwargs))
    return constraints
