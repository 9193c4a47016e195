"""The gold utility (the ORACLE), the users' latent dynamics and their response model.

Only ``sim/`` and ``flywheel/`` may read what this module computes; reward models see only
the observable signals it draws (``rewards/`` never imports ``sim/``).

The semantic terms (relevance, persona, prompt_leak) are cosines of the gold's own judge
(``sim.judge``: all-mpnet-base-v2), never of the MiniLM encoder that reward models and the
logged ``features`` read: the oracle does not see through the proxies' eyes. The style
terms read the observable ``features`` (words, emoji, question, repetition, echo).

Gold utility of bot reply t to user u (hidden satisfaction, ``utility_terms`` lists each term)::

    U_t = bias
        + w_length     * L
        + w_emoji_joy  * emoji_affinity * (1 - exp(-emoji / emoji_saturation))
        - w_emoji_tire * emoji_fatigue * phi(X) * [emoji > 0]
        + w_question   * question_affinity * ends_with_question
        + w_relevance  * (relevance - relevance_center)
        + w_persona    * persona_sensitivity * (persona_consistency - persona_center)
        - w_instructions * persona_sensitivity * (1 - share_of_instructions_followed)
        - w_violation  * persona_sensitivity * violates_any_prohibition
        - w_repetition * repetition_aversion * repetition
        - w_echo       * repetition_aversion * echo          (parroting the user's message)
        - w_prompt_leak * max(0, prompt_leak - prompt_leak_center)  (reciting its own rules)
        - w_unsafe     * safety_sensitivity * unsafe
        + w_topic      * topic_affinity
        + novelty                               (offset set by the traffic model, 0 by default)

    relevance, persona_consistency, prompt_leak: the judge's cosines (sim.judge.JudgeScores)
    L = -1/2 * (ln((words + 1) / (ideal_words + 1)) / length_tolerance)^2      (0 at the ideal)
    topic_affinity = clip(interest in the character's topics * |TOPICS| / |its topics| - 1, -1, 2)

    phi(X) = 1 - exp(-X / fatigue_scale),  X = the user's accumulated emoji exposure
             (emoji seen so far; multiplied by fatigue_recovery each day that passes).

Observable signals, drawn with the session's generator (sigma = logistic)::

    P(like)     = sigma(like_bias + like_slope * U_t
                        + like_length_appeal * max(0, ln((words+1)/(ideal_words+1)))
                        + like_emoji_appeal * [emoji > 0])
    P(report)   = sigma(report_bias - report_slope * U_t
                        + report_unsafe * safety_sensitivity * unsafe)
    P(continue) = sigma(continue_bias + continue_slope * U_t + mood_weight * mood
                        + patience_weight * (patience - 1/2) - turn_decay * turn_index)
                  (0 after a report: a user who reports leaves)

``like_length_appeal`` and ``like_emoji_appeal`` are *surface appeal*: they raise likes but
are not part of U. Set them above 0 and ``w_emoji_tire`` high to build the artifact trap:
emoji and long replies earn likes today while fatigue and length misfit lower satisfaction,
and so return, later.

Latent dynamics::

    each reply:     mood <- rho * mood + (1 - rho) * U_t,  X <- X + emoji  (rho: mood_persistence)
    session end:    memory <- lam * memory + (1 - lam) * mean_t U_t  (lam: memory_persistence)
    session start:  X <- X * fatigue_recovery^(days since X was updated),  mood <- memory / 2

Next-day return::

    P(return on day d) = sigma(logit(return_propensity) + return_memory_weight * memory
                               - return_fatigue_weight * emoji_fatigue * phi(X_d)
                               - return_report_penalty * reported_last_session)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import expit, logit

from rewards.features import ReplyContext, is_unsafe
from sim.characters import TOPICS
from sim.judge import JudgeScores, judge_replies

if TYPE_CHECKING:
    from rewards.checkers import CheckResult
    from rewards.embeddings import Embedder
    from sim.characters import Character
    from sim.population import User


class GoldConfig(BaseModel):
    """Weights of the gold utility, the response model and the latent dynamics."""

    model_config = ConfigDict(extra="forbid")

    bias: float = Field(default=0.0, description="Constant added to every reply's utility.")
    w_length: float = Field(default=1.0, ge=0, description="Weight of the length-fit term.")
    length_tolerance: float = Field(
        default=0.8, gt=0, description="Log-ratio of words/ideal at which length fit is -1/2."
    )
    w_emoji_joy: float = Field(default=0.6, ge=0, description="Weight of immediate emoji pleasure.")
    emoji_saturation: float = Field(
        default=2.0, gt=0, description="Emoji count at which pleasure reaches 63% of its cap."
    )
    w_emoji_tire: float = Field(default=1.0, ge=0, description="Weight of emoji fatigue cost.")
    fatigue_scale: float = Field(
        default=30.0, gt=0, description="Emoji exposure at which fatigue reaches 63%."
    )
    fatigue_recovery: float = Field(
        default=0.9, gt=0, le=1, description="Share of emoji exposure kept per elapsed day."
    )
    w_question: float = Field(default=0.4, ge=0, description="Weight of asking a question.")
    # The semantic centers and weights are on the judge's scale (sim.judge): those the gold
    # had on the MiniLM scale (0.3 / 3.0, 0.25 / 2.0, 0.3 / 4.0) moved so that each term keeps
    # its mean and spread on 2,000 human chit-chat replies (`python -m sim.judge` prints them).
    w_relevance: float = Field(
        default=2.85, ge=0, description="Weight of relevance to the user (per judge cosine)."
    )
    relevance_center: float = Field(
        default=0.313, description="Judge cosine to the user's message counted as neutral."
    )
    w_persona: float = Field(
        default=1.98, ge=0, description="Weight of persona consistency (per judge cosine)."
    )
    persona_center: float = Field(
        default=0.249, description="Judge cosine to the persona counted as neutral."
    )
    w_instructions: float = Field(
        default=0.8, ge=0, description="Cost of not following the character's instructions."
    )
    w_violation: float = Field(default=0.8, ge=0, description="Extra cost of a prohibition broken.")
    w_repetition: float = Field(default=1.5, ge=0, description="Weight of repetition cost.")
    w_echo: float = Field(
        default=1.5, ge=0, description="Weight of the cost of parroting the user's message."
    )
    w_prompt_leak: float = Field(
        default=3.6,
        ge=0,
        description="Cost per unit of judge cosine to the rules prompt above the center: a "
        "reply that recites its setup and rules instead of answering the user.",
    )
    prompt_leak_center: float = Field(
        default=0.342,
        description="Judge cosine to the rules prompt that costs nothing (the MiniLM-scale "
        "0.3, near the packaged SmolLM2 replies' 90th percentile there, moved as above).",
    )
    w_unsafe: float = Field(default=3.0, ge=0, description="Weight of an offensive reply.")
    w_topic: float = Field(default=0.3, ge=0, description="Weight of the user's topic affinity.")

    like_bias: float = Field(default=-1.5, description="Like log-odds at U = 0.")
    like_slope: float = Field(default=1.5, ge=0, description="Like log-odds per unit of U.")
    like_length_appeal: float = Field(
        default=0.0, ge=0, description="Surface appeal of over-long replies on likes (not in U)."
    )
    like_emoji_appeal: float = Field(
        default=0.0, ge=0, description="Surface appeal of any emoji on likes (not in U)."
    )
    report_bias: float = Field(default=-6.0, description="Report log-odds at U = 0, safe reply.")
    report_slope: float = Field(default=1.0, ge=0, description="Report log-odds per unit of -U.")
    report_unsafe: float = Field(
        default=6.0, ge=0, description="Report log-odds added by an unsafe reply, x sensitivity."
    )
    continue_bias: float = Field(default=1.8, description="Continue log-odds at U = 0, turn 0.")
    continue_slope: float = Field(default=1.0, ge=0, description="Continue log-odds per unit of U.")
    mood_weight: float = Field(default=0.5, ge=0, description="Continue log-odds per unit of mood.")
    patience_weight: float = Field(
        default=2.0, ge=0, description="Continue log-odds per unit of (patience - 1/2)."
    )
    turn_decay: float = Field(
        default=0.15, ge=0, description="Continue log-odds lost per turn already taken."
    )
    mood_persistence: float = Field(
        default=0.6, ge=0, le=1, description="Share of mood kept after each reply."
    )
    memory_persistence: float = Field(
        default=0.7, ge=0, le=1, description="Share of long-term memory kept after each session."
    )
    return_memory_weight: float = Field(
        default=1.0, ge=0, description="Return log-odds per unit of long-term memory."
    )
    return_fatigue_weight: float = Field(
        default=1.5, ge=0, description="Return log-odds lost at full emoji fatigue."
    )
    return_report_penalty: float = Field(
        default=1.0, ge=0, description="Return log-odds lost after reporting last session."
    )


@dataclass(frozen=True)
class ReplyAssessment:
    """What the gold model reads about one reply: its observable style ``features``
    (``rewards.features``: words, emoji, ends_with_question, repetition, echo), the
    character's checkers, and the judge's cosines (``judged``, ``sim.judge``)."""

    features: dict[str, float]
    share_followed: float
    violates_any: bool
    unsafe: bool
    judged: JudgeScores


def share_followed(checks: Mapping[str, bool]) -> float:
    """Share of a reply's instruction checks it passes (1 for a character without any)."""
    return float(np.mean(list(checks.values()))) if checks else 1.0


def assess_replies(
    characters: Sequence[Character],
    replies: Sequence[str],
    contexts: Sequence[ReplyContext],
    features: Sequence[dict[str, float]],
    judge: Embedder | None = None,
) -> list[tuple[ReplyAssessment, CheckResult]]:
    """Assess a batch of replies (``features`` from ``rewards.features.reply_features``)
    with ONE judge encode call; each comes with its checker results, which are logged.

    ``judge`` defaults to ``sim.judge.get_judge()``; another encoder reproduces the gold of
    that encoder (the MiniLM one: the gold before it had a judge).
    """
    n = len(replies)
    if not len(characters) == len(contexts) == len(features) == n:
        raise ValueError(
            f"assess_replies needs one character, context and feature dict per reply, got "
            f"replies={n}, characters={len(characters)}, contexts={len(contexts)}, "
            f"features={len(features)}"
        )
    judged = judge_replies(replies, contexts, judge)
    out = []
    for character, reply, f, j in zip(characters, replies, features, judged, strict=True):
        checked = character.check(reply)
        share = share_followed(checked.checks)
        assessment = ReplyAssessment(f, share, checked.violates_any, is_unsafe(f["offensive"]), j)
        out.append((assessment, checked))
    return out


@dataclass(frozen=True)
class Signals:
    """Observable user reactions to one reply, with the probabilities they were drawn from."""

    liked: bool
    reported: bool
    continued: bool
    p_like: float
    p_report: float
    p_continue: float


class GoldModel:
    """Gold utility, response model and latent transitions (formulas in the module docstring).

    ``utility`` and the ``p_*`` functions are pure; ``respond`` draws signals with the
    generator passed in; ``start_session``, ``observe_turn`` and ``end_session`` move state.
    """

    def __init__(self, config: GoldConfig | None = None) -> None:
        self.config = config or GoldConfig()

    def fatigue_level(self, exposure: float) -> float:
        """phi(X): 0 with no exposure, approaching 1."""
        return 1.0 - math.exp(-max(exposure, 0.0) / self.config.fatigue_scale)

    def exposure_on(self, user: User, day: int) -> float:
        """The user's emoji exposure decayed to ``day`` (state unchanged)."""
        days = max(day - user.state.exposure_day, 0)
        return user.state.emoji_exposure * self.config.fatigue_recovery**days

    @staticmethod
    def topic_affinity(user: User, character: Character) -> float:
        """Interest in the character's topics relative to uniform interest, in [-1, 2]."""
        if not character.topics:
            return 0.0
        ratio = user.traits.interest(character.topics) * len(TOPICS) / len(character.topics)
        return float(np.clip(ratio - 1.0, -1.0, 2.0))

    def utility_terms(
        self, user: User, character: Character, reply: ReplyAssessment, novelty: float = 0.0
    ) -> dict[str, float]:
        """Each additive term of U_t (their sum is ``utility``)."""
        c, t, f, j = self.config, user.traits, reply.features, reply.judged
        n_emoji = f["emoji"]
        log_ratio = math.log((f["words"] + 1.0) / (t.ideal_words + 1.0))
        fatigue = self.fatigue_level(user.state.emoji_exposure)
        return {
            "bias": c.bias,
            "length": -c.w_length * 0.5 * (log_ratio / c.length_tolerance) ** 2,
            "emoji_joy": c.w_emoji_joy
            * t.emoji_affinity
            * (1.0 - math.exp(-n_emoji / c.emoji_saturation)),
            "emoji_tire": -c.w_emoji_tire * t.emoji_fatigue * fatigue * float(n_emoji > 0),
            "question": c.w_question * t.question_affinity * f["ends_with_question"],
            "relevance": c.w_relevance * (j.relevance - c.relevance_center),
            "persona": c.w_persona
            * t.persona_sensitivity
            * (j.persona_consistency - c.persona_center),
            **self.checker_terms(user, reply.share_followed, reply.violates_any),
            "repetition": -c.w_repetition * t.repetition_aversion * f["repetition"],
            "echo": -c.w_echo * t.repetition_aversion * f["echo"],
            "prompt_leak": -c.w_prompt_leak * max(0.0, j.prompt_leak - c.prompt_leak_center),
            "unsafe": -c.w_unsafe * t.safety_sensitivity * float(reply.unsafe),
            "topic": c.w_topic * self.topic_affinity(user, character),
            "novelty": float(novelty),
        }

    def checker_terms(
        self, user: User, share_followed: float, violates_any: bool
    ) -> dict[str, float]:
        """The terms of U_t that the character's instruction checkers decide: the part of the
        gold that the steerability reward and gate read too (a gain elsewhere is one no
        checker sees)."""
        c, sensitivity = self.config, user.traits.persona_sensitivity
        return {
            "instructions": -c.w_instructions * sensitivity * (1 - share_followed),
            "violation": -c.w_violation * sensitivity * float(violates_any),
        }

    def utility(
        self, user: User, character: Character, reply: ReplyAssessment, novelty: float = 0.0
    ) -> float:
        """U_t, the hidden satisfaction this reply gives this user now (the ORACLE)."""
        return float(sum(self.utility_terms(user, character, reply, novelty).values()))

    def p_like(self, user: User, utility: float, reply: ReplyAssessment) -> float:
        """Probability the user likes the reply."""
        c, f = self.config, reply.features
        over = max(0.0, math.log((f["words"] + 1.0) / (user.traits.ideal_words + 1.0)))
        z = (
            c.like_bias
            + c.like_slope * utility
            + c.like_length_appeal * over
            + c.like_emoji_appeal * float(f["emoji"] > 0)
        )
        return float(expit(z))

    def p_report(self, user: User, utility: float, reply: ReplyAssessment) -> float:
        """Probability the user reports the reply."""
        c = self.config
        z = (
            c.report_bias
            - c.report_slope * utility
            + c.report_unsafe * user.traits.safety_sensitivity * float(reply.unsafe)
        )
        return float(expit(z))

    def p_continue(self, user: User, utility: float, turn_index: int) -> float:
        """Probability the user writes another message after this reply."""
        c = self.config
        z = (
            c.continue_bias
            + c.continue_slope * utility
            + c.mood_weight * user.state.mood
            + c.patience_weight * (user.traits.patience - 0.5)
            - c.turn_decay * turn_index
        )
        return float(expit(z))

    def respond(
        self,
        user: User,
        utility: float,
        reply: ReplyAssessment,
        turn_index: int,
        rng: np.random.Generator,
    ) -> Signals:
        """Draw like, report and continue for one reply (state unchanged)."""
        p_like = self.p_like(user, utility, reply)
        p_report = self.p_report(user, utility, reply)
        p_continue = self.p_continue(user, utility, turn_index)
        draws = rng.random(3)
        reported = bool(draws[1] < p_report)
        return Signals(
            liked=bool(draws[0] < p_like),
            reported=reported,
            continued=bool(draws[2] < p_continue) and not reported,
            p_like=p_like,
            p_report=p_report,
            p_continue=0.0 if reported else p_continue,
        )

    def start_session(self, user: User, day: int) -> None:
        """Decay emoji exposure to ``day`` and reset the within-session state."""
        s = user.state
        s.emoji_exposure = self.exposure_on(user, day)
        s.exposure_day = max(day, s.exposure_day)
        s.mood = s.memory / 2.0
        s.session_turns = 0
        s.session_utility = 0.0
        s.session_likes = 0
        s.session_reported = False

    def replay_exposure(self, user: User, history: Iterable[tuple[int, str, float]]) -> None:
        """Rebuild ``user``'s emoji exposure from logged bot replies, oldest first.

        ``history`` holds ``(day, session_id, emoji in the reply)`` per reply; a new session
        id starts a session (exposure decays to its day, as in ``start_session``). End it
        with ``(day, session_id, 0)`` of the moment to score, so that the exposure is the
        one the user had then: what the gold utility of a reply written at that moment
        must use (emoji fatigue is the one latent state U_t reads).
        """
        session = None
        for day, session_id, n_emoji in history:
            if session_id != session:
                self.start_session(user, int(day))
                session = session_id
            user.state.emoji_exposure += float(n_emoji)

    def observe_turn(
        self, user: User, utility: float, reply: ReplyAssessment, signals: Signals
    ) -> None:
        """Move the within-session state after one reply and its signals."""
        s = user.state
        rho = self.config.mood_persistence
        s.mood = rho * s.mood + (1.0 - rho) * utility
        s.emoji_exposure += reply.features["emoji"]
        s.session_turns += 1
        s.total_turns += 1
        s.session_utility += utility
        s.session_likes += int(signals.liked)
        s.session_reported = s.session_reported or signals.reported

    def end_session(self, user: User, day: int) -> float:
        """Fold the session into long-term memory; returns the session's mean utility."""
        s = user.state
        mean_u = s.session_utility / s.session_turns if s.session_turns else 0.0
        lam = self.config.memory_persistence
        if s.session_turns:
            s.memory = lam * s.memory + (1.0 - lam) * mean_u
        s.last_day = day
        s.n_sessions += 1
        s.reported_last_session = s.session_reported
        return mean_u

    def return_probability(self, user: User, day: int) -> float:
        """P(the user comes back on ``day``), from memory, fatigue and last session's report."""
        c = self.config
        fatigue = self.fatigue_level(self.exposure_on(user, day))
        z = (
            float(logit(user.traits.return_propensity))
            + c.return_memory_weight * user.state.memory
            - c.return_fatigue_weight * user.traits.emoji_fatigue * fatigue
            - c.return_report_penalty * float(user.state.reported_last_session)
        )
        return float(expit(z))
