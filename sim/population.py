"""The simulated user population: segments, latent traits, latent state and the sampler.

RecSim-style separation: this module holds *who* users are (``UserTraits``, fixed), *where
they are* (``UserState``, evolving) and the ``UserSampler`` that draws them from scenario
segments with a seeded generator. *How the state moves* and *what users do* (the gold
utility, transitions and response model) live in ``sim.gold``.

A segment in a scenario file (``[[world.population.segments]]``)::

    name = "casual"
    share = 0.6
    description = "a busy student who chats between classes"
    patience = { mean = 0.4, sd = 0.15 }
    ideal_words = { mean = 20, sd = 6 }
    emoji_affinity = { mean = 0.3, sd = 0.2 }
    topic_weights = { music = 3, games = 2 }

Each trait is drawn from a normal distribution (``mean``, ``sd``) and clipped to its bounds
(``TRAIT_BOUNDS``); topic interests are drawn from a Dirichlet whose base measure is the
segment's ``topic_weights`` (unlisted topics weigh 1) times ``topic_concentration``.

Message lengths (``MessageLengths``): the sampler draws each user a human message length
(``UserTraits.message_words``) that places the user among people, and every message the
user writes gets its own length target. The targets follow a Gaussian copula: a message's
normal score ``z = sqrt(rho) z_user + sqrt(1 - rho) e`` (``z_user`` the normal score of the
user's drawn length, its mid-rank among human messages; ``e`` standard normal) is mapped
through the empirical quantile function of human follow-up messages. ``z`` is standard
normal over users, so the targets of a population have the human length distribution
whatever its skew and ties. ``rho`` (``user_share``) is the share of the normal-score
variance that lies between people, fitted on the corpus by ``fit_user_share``: the one-way
ANOVA intra-class correlation of a speaker's messages within one chit-chat conversation
(about 0.2: people differ in how much they write, but one person's messages vary far more).
The corpus knows no speaker across conversations, so a user's sessions on different days
share their length score as one speaker's messages within a conversation do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import ndtr, ndtri

from rewards.checkers import words
from sim.characters import TOPICS

# A normal score is computed from a mid-rank clipped into [EDGE, 1 - EDGE] (finite scores).
EDGE = 1e-6
# How far the segments' shares may sum from 1 (float rounding of shares like 1/3).
SHARE_TOLERANCE = 1e-6
# (low, high) for every scalar trait; draws are clipped into these.
TRAIT_BOUNDS: dict[str, tuple[float, float]] = {
    "patience": (0.0, 1.0),
    "ideal_words": (1.0, 300.0),
    "emoji_affinity": (-1.0, 1.0),
    "emoji_fatigue": (0.0, 1.0),
    "question_affinity": (-1.0, 1.0),
    "persona_sensitivity": (0.0, 1.0),
    "repetition_aversion": (0.0, 1.0),
    "safety_sensitivity": (0.0, 1.0),
    "return_propensity": (0.01, 0.99),
}


class TraitDist(BaseModel):
    """A clipped normal distribution for one trait."""

    model_config = ConfigDict(extra="forbid")

    mean: float = Field(description="Mean of the trait in the segment.")
    sd: float = Field(default=0.0, ge=0.0, description="Standard deviation (0 = everyone equal).")


def _dist(mean: float, sd: float, help_text: str) -> TraitDist:
    return Field(default_factory=lambda: TraitDist(mean=mean, sd=sd), description=help_text)


class SegmentConfig(BaseModel):
    """A user segment: its share of the population and its trait distributions."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Segment name, unique in the population.")
    share: float = Field(
        gt=0, description="Share of users in this segment; the segments' shares sum to 1."
    )
    description: str = Field(
        default="a friendly person chatting on a social app",
        description="Who these users are, in words; the user LLM role-plays it.",
    )
    patience: TraitDist = _dist(0.5, 0.15, "0..1; higher = stays longer in a conversation.")
    ideal_words: TraitDist = _dist(30, 10, "Preferred bot reply length in words (1..300).")
    emoji_affinity: TraitDist = _dist(
        0.0, 0.3, "-1..1; immediate pleasure (or annoyance) from emoji in a reply."
    )
    emoji_fatigue: TraitDist = _dist(
        0.3, 0.1, "0..1; how much accumulated emoji exposure sours satisfaction and return."
    )
    question_affinity: TraitDist = _dist(
        0.2, 0.2, "-1..1; liking for replies that ask the user a question."
    )
    persona_sensitivity: TraitDist = _dist(
        0.5, 0.2, "0..1; how much staying in character and following its rules matters."
    )
    repetition_aversion: TraitDist = _dist(
        0.5, 0.2, "0..1; dislike of replies that repeat earlier bot turns."
    )
    safety_sensitivity: TraitDist = _dist(
        0.7, 0.2, "0..1; reaction to offensive replies (reports, lost satisfaction)."
    )
    return_propensity: TraitDist = _dist(
        0.5, 0.15, "0.01..0.99; baseline probability of coming back the next day."
    )
    topic_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Relative interest per topic (Dirichlet base; unlisted topics weigh 1).",
    )
    topic_concentration: float = Field(
        default=12.0,
        gt=0,
        description="Dirichlet concentration (12 = one per topic): higher = users more alike.",
    )

    @model_validator(mode="after")
    def _check(self) -> SegmentConfig:
        for trait, (low, high) in TRAIT_BOUNDS.items():
            dist: TraitDist = getattr(self, trait)
            if not low <= dist.mean <= high:
                raise ValueError(
                    f"segment {self.name!r}: {trait}.mean must be in [{low}, {high}], "
                    f"got {dist.mean}"
                )
        for topic, weight in self.topic_weights.items():
            if topic not in TOPICS:
                raise ValueError(
                    f"segment {self.name!r}: topic_weights has unknown topic {topic!r}; "
                    f"fix: use one of {list(TOPICS)}"
                )
            if weight <= 0:
                raise ValueError(
                    f"segment {self.name!r}: topic_weights.{topic} must be > 0, got {weight}"
                )
        return self


class PopulationConfig(BaseModel):
    """The population: one or more segments."""

    model_config = ConfigDict(extra="forbid")

    segments: list[SegmentConfig] = Field(
        default_factory=lambda: [SegmentConfig(name="general", share=1.0)],
        min_length=1,
        description="User segments; their shares sum to 1.",
    )

    @model_validator(mode="after")
    def _check(self) -> PopulationConfig:
        names = [s.name for s in self.segments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"population.segments names repeat: {dupes}; fix: rename them")
        # Shares that do not sum to 1 would be rescaled silently, and the population would
        # not be the one the scenario author wrote down.
        total = sum(s.share for s in self.segments)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            given = " + ".join(f"{s.name} {s.share:g}" for s in self.segments)
            scaled = ", ".join(f"{s.name} {s.share / total:.4g}" for s in self.segments)
            raise ValueError(
                f"segments[*].share must sum to 1, got {given} = {total:g}; fix: scale the "
                f"shares to sum to 1 (here: {scaled})"
            )
        return self


@dataclass(frozen=True)
class UserTraits:
    """Latent, fixed traits of one user (see ``SegmentConfig`` for meanings)."""

    patience: float
    ideal_words: float
    emoji_affinity: float
    emoji_fatigue: float
    question_affinity: float
    persona_sensitivity: float
    repetition_aversion: float
    safety_sensitivity: float
    return_propensity: float
    topic_interests: tuple[float, ...]  # aligned with sim.characters.TOPICS, sums to 1
    # A human message length (words) drawn for the user: its rank sets how long the user's
    # own messages run (``MessageLengths`` draws each message's length target from it).
    message_words: int = 12

    def interest(self, topics: tuple[str, ...] | list[str]) -> float:
        """Total interest in ``topics`` (0..1)."""
        return float(sum(self.topic_interests[TOPICS.index(t)] for t in topics))

    def favourite_topics(self, k: int = 2) -> list[str]:
        """The ``k`` topics this user cares most about."""
        order = np.argsort(self.topic_interests)[::-1][:k]
        return [TOPICS[i] for i in order]


def speaker_message_words(conversations: Sequence[Sequence[str]]) -> list[list[int]]:
    """Word counts of each speaker's follow-up messages, per conversation and speaker.

    Speakers alternate (a message is one speaker's consecutive utterances), so speaker A
    wrote the even-indexed messages and B the odd ones; the opener is left out (it is not
    what the simulated users' LLM writes) and so are messages without a word.
    """
    groups = []
    for conv in conversations:
        for speaker in (0, 1):
            counts = [len(words(m)) for i, m in enumerate(conv) if i % 2 == speaker and i > 0]
            groups.append([c for c in counts if c > 0])
    return [g for g in groups if g]


def mid_ranks(sorted_sample: np.ndarray, values: np.ndarray | int) -> np.ndarray:
    """Mid-rank of ``values`` in ``sorted_sample``, in (0, 1): the share below plus half
    the share tied, so a tied value sits in the middle of its ties' quantile range."""
    below = np.searchsorted(sorted_sample, values, side="left")
    upto = np.searchsorted(sorted_sample, values, side="right")
    share = (below + upto) / (2 * len(sorted_sample))
    return np.clip(share, EDGE, 1 - EDGE)


def fit_user_share(groups: Sequence[Sequence[int]]) -> float:
    """Intra-class correlation of normal scores of message lengths within speakers.

    Each length becomes ``ndtri(mid-rank)`` over all the lengths; the one-way random-effects
    ANOVA estimator ``(MSB - MSW) / (MSB + (k0 - 1) MSW)`` (``k0`` the unbalanced design's
    effective group size) gives the share of that variance between speakers. Groups need
    at least two messages to say anything about within-speaker spread; the estimate is
    clipped into [0, 1].
    """
    kept = [np.asarray(g, dtype=float) for g in groups if len(g) >= 2]
    if len(kept) < 2:
        raise ValueError(
            f"fit_user_share needs at least 2 speakers with 2+ messages, got {len(kept)}"
        )
    pooled = np.sort(np.concatenate(kept))
    scores = [ndtri(mid_ranks(pooled, g)) for g in kept]
    sizes = np.array([len(g) for g in scores], dtype=float)
    n, k = sizes.sum(), len(scores)
    grand = np.concatenate(scores).mean()
    ss_within = sum(float(((g - g.mean()) ** 2).sum()) for g in scores)
    ss_between = float(sum(len(g) * (g.mean() - grand) ** 2 for g in scores))
    ms_within, ms_between = ss_within / (n - k), ss_between / (k - 1)
    k0 = (n - float((sizes**2).sum()) / n) / (k - 1)
    icc = (ms_between - ms_within) / (ms_between + (k0 - 1) * ms_within)
    return float(np.clip(icc, 0.0, 1.0))


@dataclass(frozen=True)
class MessageLengths:
    """Per-message length targets of simulated users (the module docstring's copula).

    Args:
        lengths: word counts of human follow-up messages (the targets' distribution).
        user_share: ``rho``, the share of the normal-score variance between users
            (0 = every message drawn afresh, 1 = a user always writes their typical length).
        max_words: targets are capped here (the user LLM's token budget bounds a draft).
    """

    lengths: np.ndarray
    user_share: float
    max_words: int

    def __post_init__(self) -> None:
        if not 0 <= self.user_share <= 1:
            raise ValueError(f"user_share must be in [0, 1], got {self.user_share}")
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        lengths = np.sort(np.asarray(self.lengths, dtype=int))
        if lengths.size == 0 or lengths[0] < 1:
            raise ValueError("MessageLengths needs a non-empty sample of lengths >= 1 word")
        object.__setattr__(self, "lengths", lengths)

    @classmethod
    def from_conversations(
        cls,
        conversations: Sequence[Sequence[str]],
        max_words: int,
        user_share: float | None = None,
    ) -> MessageLengths:
        """The follow-up messages' lengths of ``conversations``; ``user_share`` fitted on
        them (``fit_user_share``) unless given."""
        groups = speaker_message_words(conversations)
        share = fit_user_share(groups) if user_share is None else user_share
        return cls(np.concatenate([np.asarray(g) for g in groups]), share, max_words)

    def user_score(self, typical_words: int) -> float:
        """``sqrt(rho) z_user``: the user's part of every message's normal score."""
        return math.sqrt(self.user_share) * float(ndtri(mid_ranks(self.lengths, typical_words)))

    def quantile(self, z: np.ndarray | float) -> np.ndarray:
        """Empirical quantile of the lengths at normal score ``z``, capped at ``max_words``
        (a standard normal ``z`` draws the lengths exactly as sampled)."""
        index = np.minimum((ndtr(z) * len(self.lengths)).astype(int), len(self.lengths) - 1)
        return np.minimum(self.lengths[index], self.max_words)

    def target(self, typical_words: int, rng: np.random.Generator) -> int:
        """One message's length target for a user of ``typical_words``: one normal draw."""
        z = self.user_score(typical_words) + math.sqrt(1 - self.user_share) * rng.normal()
        return int(self.quantile(np.asarray(z)))


@dataclass
class UserState:
    """Latent, evolving state of one user (moved by ``sim.gold.GoldModel``).

    Within a session: ``mood`` (a running average of this session's utility), counters.
    Across sessions: ``memory`` (long-term satisfaction), ``emoji_exposure`` (emoji seen,
    decaying per day), ``last_day``, ``n_sessions``, ``reported_last_session``,
    ``last_character`` (who the user talked to last; returning users tend to stay).
    """

    mood: float = 0.0
    memory: float = 0.0
    emoji_exposure: float = 0.0
    exposure_day: int = 0
    last_day: int | None = None
    n_sessions: int = 0
    reported_last_session: bool = False
    last_character: str = ""
    session_turns: int = 0
    session_utility: float = 0.0
    session_likes: int = 0
    session_reported: bool = False
    total_turns: int = 0


@dataclass
class User:
    """One simulated user."""

    user_id: str
    segment: str
    traits: UserTraits
    state: UserState = field(default_factory=UserState)
    profile: str = ""  # who the user LLM role-plays, in words


class UserSampler:
    """Draws users from the population's segments with a seeded generator.

    Args:
        config: the population.
        rng: the generator every draw goes through.
        message_words: empirical user message lengths (words) to draw each user's own
            message length from (``sim.chitchat``); default 12 words for everyone.
        id_prefix: user ids are ``f"{id_prefix}{index:06d}"``, numbered across calls.
    """

    def __init__(
        self,
        config: PopulationConfig,
        rng: np.random.Generator,
        message_words: np.ndarray | None = None,
        id_prefix: str = "u",
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"UserSampler needs a numpy Generator, got {type(rng).__name__}")
        self.config = config
        self.rng = rng
        self.message_words = message_words
        self.id_prefix = id_prefix
        shares = np.array([s.share for s in config.segments], dtype=float)
        # The config admits float dust (SHARE_TOLERANCE); numpy's choice wants an exact sum.
        self.shares = shares / shares.sum()
        self.count = 0

    def _trait(self, dist: TraitDist, name: str) -> float:
        low, high = TRAIT_BOUNDS[name]
        return float(np.clip(self.rng.normal(dist.mean, dist.sd), low, high))

    def sample_traits(self, segment: SegmentConfig) -> UserTraits:
        """Traits for one user of ``segment``."""
        scalars = {name: self._trait(getattr(segment, name), name) for name in TRAIT_BOUNDS}
        base = np.array([segment.topic_weights.get(t, 1.0) for t in TOPICS])
        interests = self.rng.dirichlet(segment.topic_concentration * base / base.sum())
        if self.message_words is not None and len(self.message_words):
            msg_words = int(self.rng.choice(self.message_words))
        else:
            msg_words = 12
        return UserTraits(
            **scalars, topic_interests=tuple(float(x) for x in interests), message_words=msg_words
        )

    def sample(self, n: int) -> list[User]:
        """``n`` new users (ids continue from earlier calls)."""
        if n < 0:
            raise ValueError(f"UserSampler.sample needs n >= 0, got {n}")
        users = []
        for index in self.rng.choice(len(self.config.segments), size=n, p=self.shares):
            segment = self.config.segments[int(index)]
            traits = self.sample_traits(segment)
            user_id = f"{self.id_prefix}{self.count:06d}"
            self.count += 1
            likes = " and ".join(traits.favourite_topics(2))
            profile = f"You are {segment.description}. You are into {likes}."
            users.append(User(user_id, segment.name, traits, UserState(), profile))
        return users
