"""Production traffic as a SimPy model: days, arrivals, sessions, returns, A/B arms.

A population lives through ``pre_days`` (everyone served by the control policy: the CUPED
covariate period) and then ``test_days``. Simulated time is in hours since the start of day 0.

Two designs (``[traffic] design``):

- ``standard``: users hashed into the treatment arm are served by the treatment policy on
  test days, the others by control. What production can do.
- ``twins``: every user lives through the test days twice, once served by control and once by
  treatment, starting from the same latent state at the end of the pre-period. Only a
  simulator can do this; comparing a user with their own twin removes the between-user
  variance that a standard test pays for with users (``flywheel.ab.paired``). Both lives are
  stored, each row tagged with its ``life``.

Each day:

1. For every user the day's activity is drawn: active with probability ``world return
   probability x weekday factor`` (clipped to [0, 1]); an active user opens ``1 +
   Binomial(max_sessions_per_day - 1, extra_session_prob)`` sessions at hours drawn from the
   time-of-day profile ``hourly_weights``, at least ``session_gap_hours`` apart, each rounded
   down to its arrival slot (``slot_minutes``).
2. One SimPy process per active user life runs that life's sessions one after another. A
   session is: opener, then bot reply and user message alternating until the world says the
   user left or the turn cap ended it.
3. The whole day is one batch. Users do not interact within a day, so the simulator runs every
   session of the day in lockstep on a logical clock: all first sessions open together, each
   round answers every pending bot reply with ONE backend call per arm policy and every
   pending user message with ONE user-LLM call, and a user's next session joins the round
   after their previous one ended (continuous batching). Each session still carries the
   hours of the diurnal profile: a turn is stamped ``start hour + think_minutes`` per reply
   before it, so the logs read as the day was lived.
4. When every session of the day has ended, the day's turns, sessions and user-day metrics
   are handed to the sink together with a checkpoint of the simulator state (the lives'
   latent states, the random generator, first-exposure days), which the run store writes in
   ONE transaction. A run resumed from the checkpoint of day k replays days k+1... exactly
   as the uninterrupted run did.

Common random numbers: every user-side draw comes from a stream of its own, derived from the
scenario seed, the user's position in the population, the day and (for sessions) the
session's position in the day, with ``numpy.random.SeedSequence``. One user's draws never
shift because another user's history changed, and both lives of a twin use the same
uniforms: the same activity and arrival draws each day, the same opener and character draw,
and the same like / report / continue uniforms at the same turn
(``sim.conversation.Session.signal_rng``). A life is active when the shared uniform is below
its own return probability, so the lives differ only where the policies made them differ.
The bots' sampling seeds come from the simulator's one generator, a call at a time, so the
two arms of an A/A twin test sample independently.

Production dynamics:

- Weekday seasonality: ``weekday_factors`` multiply the activity probability.
- Novelty: a user served by the treatment reacts to the change itself. On test days the world
  adds ``novelty_amplitude * 0.5 ** (days since first exposure / novelty_half_life_days)`` to
  the user's satisfaction with every reply (negative amplitude = change aversion). That is
  why a test runs a week: day-1 lifts overstate the lasting effect.
- Drift between generations: the population of generation g is the generation-0 population
  with each user replaced by a newcomer with probability ``1 - (1 - churn)^g``; newcomers
  are drawn from the segment mix shifted by ``segment_drift`` per generation.

Same scenario + seed -> the same numbers. Assignment is hash-based (sha256 of salt and user
id), so a user stays in the same arm across restarts, machines and re-runs with the same salt.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import pickle
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import simpy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policies.base import Chat, Generation, Policy, SamplingParams
from policies.engine import shared_prefixes
from sim import tables
from sim.population import User, UserSampler

HOURS_PER_DAY = 24.0  # hours
MINUTES_PER_HOUR = 60.0  # minutes
SESSION_GAP_H = 4.0  # hours: least time between two sessions of one user on one day
THINK_MIN = 1.0  # minutes: a user reads the reply and writes the next message
SLOT_MIN = 60  # minutes: arrivals within one slot open their sessions together
LAST_ARRIVAL_MARGIN_H = 1.0  # hours before midnight after which no session opens

# Relative session starts per hour of the day (0 = midnight .. 23), the diurnal shape of a
# consumer chat app: a night trough around 3-5 h, a lunch bump, and the peak at 20-22 h.
HOURLY_WEIGHTS = (
    2.6, 1.8, 1.1, 0.7, 0.5, 0.6, 1.0, 1.8, 2.6, 3.0, 3.2, 3.4,
    4.0, 3.9, 3.5, 3.4, 3.6, 4.2, 5.0, 6.0, 6.8, 7.0, 6.0, 4.2,
)  # fmt: skip
# Activity multiplier per weekday (0 = Monday): quieter mid-week, busier at the weekend.
WEEKDAY_FACTORS = (1.0, 0.96, 0.95, 0.97, 1.03, 1.12, 1.1)

_DRIFT_STREAM = 0xD21F7  # separates the drift draws from every other stream of the seed
# Per-user streams (see the module docstring), one code per purpose.
_VISIT_STREAM = 0x715
_SESSION_STREAM = 0x5E55

CONTROL = "control"
TREATMENT = "treatment"
PRE = "pre"
TEST = "test"

# SimPy processes events of one instant by priority (lower first). Timeouts and resumed
# processes run at NORMAL (1); the batcher flushes after them, so a flush sees every
# request of its instant: openers and user messages (2), then bot replies (3), which may
# answer sessions that were opened or continued at that same instant.
_USER_FLUSH_PRIORITY = 2
_BOT_FLUSH_PRIORITY = 3


# ---------------------------------------------------------------------------- configuration
class SamplingConfig(BaseModel):
    """How bot replies are sampled (the user LLM's sampling is the world's ``user_llm``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(48, ge=1, description="Longest reply in tokens.")
    temperature: float = Field(0.8, ge=0, description="0 = greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")

    def params(self, seed: int) -> SamplingParams:
        """Return ``SamplingParams`` with this config and ``seed``."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
        )


class TrafficConfig(BaseModel):
    """The ``[traffic]`` table of a scenario: who comes when, and how the test is split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_users: int = Field(200, ge=2, description="Users in the experiment population.")
    pre_days: int = Field(
        2, ge=0, description="Days before the test, all on control: CUPED's covariate period."
    )
    test_days: int = Field(7, ge=1, description="Days of the A/B test (7 covers a full week).")
    treatment_share: float = Field(
        0.1, gt=0, lt=1, description="Share of users hashed into the treatment arm."
    )
    salt: str = Field(
        "ab",
        min_length=1,
        description="Experiment salt of the hash assignment; a new salt "
        "re-randomises, the same salt keeps every user in the same arm.",
    )
    design: Literal["standard", "twins"] = Field(
        "standard",
        description="standard: each user in their hashed arm; twins: each user lives the "
        "test days twice, once per arm, with common random numbers (sim/traffic.py).",
    )
    start_weekday: int = Field(0, ge=0, le=6, description="Weekday of day 0 (0 = Monday).")
    weekday_factors: tuple[float, ...] = Field(
        WEEKDAY_FACTORS, description="7 activity multipliers, Monday first, each > 0."
    )
    hourly_weights: tuple[float, ...] = Field(
        HOURLY_WEIGHTS, description="24 relative session-start weights, midnight first, >= 0."
    )
    slot_minutes: int = Field(
        SLOT_MIN,
        ge=1,
        le=720,
        description="Arrival slot in minutes; must divide 1440. Session start hours "
        "are rounded down to it.",
    )
    think_minutes: float = Field(
        THINK_MIN, gt=0, description="Minutes between a bot reply and the next user message."
    )
    session_gap_hours: float = Field(
        SESSION_GAP_H, ge=0, description="Least hours between two sessions of a user on a day."
    )
    max_sessions_per_day: int = Field(2, ge=1, description="Most sessions of a user per day.")
    extra_session_prob: float = Field(
        0.25, ge=0, le=1, description="Chance of each session beyond the first on an active day."
    )
    novelty_amplitude: float = Field(
        0.15,
        ge=-5,
        le=5,
        description="Satisfaction offset on a treatment user's first "
        "exposure day (gold-utility units); negative = change aversion, 0 = none.",
    )
    novelty_half_life_days: float = Field(
        1.5, gt=0, description="Days for the novelty offset to halve."
    )
    generation: int = Field(
        0, ge=0, description="Population generation (drift applies per generation)."
    )
    churn_per_generation: float = Field(
        0.0, ge=0, lt=1, description="Share of users replaced by newcomers per generation."
    )
    segment_drift: dict[str, float] = Field(
        default_factory=dict,
        description="Per-generation multiplier of a segment's weight "
        "among newcomers, e.g. {casual = 1.2}; segments not named keep their weight.",
    )
    bot_sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Sampling of bot replies (both arms)."
    )

    @field_validator("weekday_factors")
    @classmethod
    def _check_weekdays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) != 7 or min(value) <= 0:
            raise ValueError(
                f"traffic.weekday_factors needs 7 values > 0 (Monday first), got {list(value)}"
            )
        return value

    @field_validator("hourly_weights")
    @classmethod
    def _check_hours(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) != 24 or min(value) < 0 or sum(value) <= 0:
            raise ValueError(
                f"traffic.hourly_weights needs 24 values >= 0 with a positive sum "
                f"(midnight first), got {list(value)}"
            )
        return value

    @field_validator("slot_minutes")
    @classmethod
    def _check_slot(cls, value: int) -> int:
        if 1440 % value:
            raise ValueError(
                f"traffic.slot_minutes must divide a day (1440 minutes), got {value}; "
                f"use e.g. 15, 30, 60 or 120"
            )
        return value

    @model_validator(mode="after")
    def _check_expected_arms(self) -> TrafficConfig:
        expected = self.n_users * self.treatment_share
        if expected < 1 or self.n_users - expected < 1:
            raise ValueError(
                f"traffic.n_users = {self.n_users} with treatment_share = "
                f"{self.treatment_share} leaves an arm with under one expected user; "
                f"raise n_users or move treatment_share towards 0.5"
            )
        return self

    @property
    def total_days(self) -> int:
        """Pre-period plus test period, in days."""
        return self.pre_days + self.test_days

    def period(self, day: int) -> str:
        """'pre' or 'test' for ``day`` (0-based from the first pre-period day)."""
        return PRE if day < self.pre_days else TEST

    def weekday(self, day: int) -> int:
        """Weekday of ``day`` (0 = Monday)."""
        return (self.start_weekday + day) % 7


# ---------------------------------------------------------------------------- assignment
def hash_bucket(user_id: str, salt: str) -> float:
    """Return the user's position in [0, 1): the first 60 bits of sha256(salt:user_id)."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()
    return int(digest[:15], 16) / float(16**15)


def assign_arm(user_id: str, salt: str, treatment_share: float) -> str:
    """Deterministic arm of ``user_id``: 'treatment' when its bucket < ``treatment_share``."""
    return TREATMENT if hash_bucket(user_id, salt) < treatment_share else CONTROL


def novelty_offset(days_since_exposure: int, amplitude: float, half_life_days: float) -> float:
    """Satisfaction offset of a treatment user ``days_since_exposure`` days after first use."""
    return amplitude * 0.5 ** (days_since_exposure / half_life_days)


# ---------------------------------------------------------------------------- drift
@dataclass(frozen=True)
class Population:
    """An experiment's users and the generation each one joined in (drift bookkeeping)."""

    users: list[User]
    joined: dict[str, int]


def drifted_population(sampler: UserSampler, config: TrafficConfig, seed: int) -> Population:
    """The population of generation ``config.generation`` (see the module docstring).

    Slot i holds user i of generation 0 until its arrival generation ``k_i`` (the first g
    with ``u_i < 1 - (1 - churn)^g`` for a uniform ``u_i`` fixed per slot), then a newcomer
    drawn at ``k_i`` from the segment mix shifted by ``segment_drift ** k_i``. So a newcomer
    of generation 2 is the same person in generations 3, 4, ..., and each generation is a
    superset of the previous one's newcomers: drift accumulates instead of reshuffling.

    Args:
        sampler: the world's user sampler (its config and length calibration are reused;
            generation 0 is drawn with its generator).
        config: traffic config (n_users, generation, churn_per_generation, segment_drift).
        seed: seeds the slot uniforms and the newcomers' draws.
    """
    segments = {s.name for s in sampler.config.segments}
    unknown = sorted(set(config.segment_drift) - segments)
    if unknown:
        raise ValueError(
            f"traffic.segment_drift names segments {unknown} that the population lacks; "
            f"use names from {sorted(segments)}"
        )
    bad = {k: v for k, v in config.segment_drift.items() if v <= 0}
    if bad:
        raise ValueError(f"traffic.segment_drift multipliers must be > 0, got {bad}")
    users = sampler.sample(config.n_users)
    joined = {u.user_id: 0 for u in users}
    churn, generation = config.churn_per_generation, config.generation
    if generation == 0 or churn == 0:
        return Population(users, joined)
    slots = np.random.default_rng([seed, _DRIFT_STREAM]).random(config.n_users)
    # Smallest g >= 1 with u < 1 - (1 - churn)^g.
    arrival = (np.floor(np.log1p(-slots) / math.log1p(-churn)) + 1).astype(int)
    for i in np.flatnonzero(arrival <= generation):
        k = int(arrival[i])
        drifted = sampler.config.model_copy(
            update={
                "segments": [
                    s.model_copy(
                        update={"share": s.share * config.segment_drift.get(s.name, 1.0) ** k}
                    )
                    for s in sampler.config.segments
                ]
            }
        )
        newcomer_sampler = UserSampler(
            drifted,
            np.random.default_rng([seed, _DRIFT_STREAM, k, int(i)]),
            message_words=sampler.message_words,
        )
        newcomer = dataclasses.replace(newcomer_sampler.sample(1)[0], user_id=f"g{k}n{i:06d}")
        del joined[users[i].user_id]
        users[i] = newcomer
        joined[newcomer.user_id] = k
    return Population(users, joined)


# ---------------------------------------------------------------------------- the world's API
class Engine(Protocol):
    """What the traffic model needs from ``sim.conversation.ConversationEngine``."""

    def open_sessions(
        self,
        users: Sequence[Any],
        day: int,
        hour: float,
        rng: np.random.Generator,
        *,
        seeds: Sequence[Sequence[int]] | None = None,
    ) -> list[Any]: ...

    def bot_turn(
        self,
        sessions: Sequence[Any],
        bot_policy: Policy,
        params: SamplingParams,
        novelty: Sequence[float] | None = None,
    ) -> list[Any]: ...

    def user_turn(self, sessions: Sequence[Any], params: SamplingParams) -> None: ...

    def close_session(self, session: Any) -> Any: ...

    def return_probability(self, user: Any, day: int) -> float: ...


class TrafficSink(Protocol):
    """Where a simulated experiment goes (``flywheel.store.ExperimentSink`` implements it)."""

    def resume_point(self) -> tuple[int, bytes] | None:
        """Latest ``(finished day, checkpoint)``, or None for a fresh experiment."""
        ...

    def begin(self, users: pd.DataFrame, assignments: pd.DataFrame, checkpoint: bytes) -> None:
        """Record the population, the assignment and the day -1 checkpoint."""
        ...

    def commit_day(self, log: DayLog, checkpoint: bytes) -> None:
        """Record one finished day and the checkpoint after it, atomically."""
        ...

    def finish(self) -> None:
        """Mark the experiment finished."""
        ...


# ---------------------------------------------------------------------------- records
@dataclass(frozen=True)
class DayLog:
    """Everything one simulated day produced; the sink commits it at once.

    ``sessions``, ``turns`` and ``user_days`` have the columns of the run-store tables of the
    same names (see ``flywheel/store.py``) without ``experiment_id``; ``stats`` holds the
    day's counters (active_users, sessions, turns, bot_calls, user_calls, bot_tokens,
    user_tokens, user_messages, user_fallbacks, user_redrafts, max_bot_batch, bot_seconds,
    wall_s).
    """

    day: int
    period: str
    weekday: int
    sessions: pd.DataFrame
    turns: pd.DataFrame
    user_days: pd.DataFrame
    stats: Mapping[str, float]


@dataclass
class SimState:
    """What survives a day boundary; pickled into every checkpoint.

    ``next_day`` is the first day not yet simulated; ``rng_state`` is the state of the
    generator behind the bots' sampling seeds; ``first_exposure`` maps a user to the test day
    their treatment-served life first saw the treatment (the novelty clock); ``users`` carry
    their latent states (in a twin test: the control lives), ``twins`` the treatment lives of
    a twin test from its first test day on (None before, and in a standard test).
    """

    next_day: int
    users: list[Any]
    rng_state: dict[str, Any]
    first_exposure: dict[str, int] = field(default_factory=dict)
    twins: list[Any] | None = None

    def dumps(self) -> bytes:
        """Serialise for the run store."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(blob: bytes) -> SimState:
        """Inverse of ``dumps``."""
        state = pickle.loads(blob)
        if not isinstance(state, SimState):
            raise TypeError(
                f"checkpoint holds a {type(state).__name__}, not a SimState; the run store is "
                f"from another version, start a new run directory"
            )
        return state


@dataclass
class BatchStats:
    """Counters of backend calls, for the days table and the throughput benchmark."""

    bot_calls: int = 0
    user_calls: int = 0
    open_calls: int = 0
    bot_tokens: int = 0
    user_tokens: int = 0
    user_messages: int = 0
    user_fallbacks: int = 0
    user_redrafts: int = 0
    max_bot_batch: int = 0
    bot_seconds: float = 0.0  # wall time inside bot_turn: generation and scoring
    bot_batch_sizes: list[int] = field(default_factory=list)

    def as_row(self) -> dict[str, float]:
        """The counters the ``days`` table stores."""
        return {
            "bot_seconds": self.bot_seconds,
            "bot_calls": self.bot_calls,
            "user_calls": self.user_calls,
            "bot_tokens": self.bot_tokens,
            "user_tokens": self.user_tokens,
            "user_messages": self.user_messages,
            "user_fallbacks": self.user_fallbacks,
            "user_redrafts": self.user_redrafts,
            "max_bot_batch": self.max_bot_batch,
        }


class CountingPolicy:
    """Wraps a policy and counts its calls, chats, tokens and seconds (throughput figures).

    The simulated user's LLM sits inside the world, so wrapping it before the world is built
    is the one way to see what the user side costs.
    """

    def __init__(self, base: Policy) -> None:
        self.base = base
        self.name = base.name
        self.calls = 0
        self.chats = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of the prompt tokens, those served from a prefix cache
        self.completion_tokens = 0
        self.seconds = 0.0

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Generate with the base policy and count."""
        started = time.perf_counter()
        out = self.base.generate(chats, params)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.chats += len(chats)
        self.prompt_tokens += sum(g.prompt_tokens for g in out)
        self.cached_tokens += sum(g.cached_tokens for g in out)
        self.completion_tokens += sum(g.completion_tokens for g in out)
        return out


class _Flush(simpy.Event):
    """An event that fires at the current instant, after events of lower ``priority``."""

    def __init__(self, env: simpy.Environment, priority: int) -> None:
        super().__init__(env)
        # Set the outcome directly (as simpy's own Timeout does) so the event can be
        # scheduled with a custom priority instead of succeed()'s NORMAL.
        self._ok = True
        self._value = None
        env.schedule(self, priority=priority)


class Batcher:
    """Gathers requests due at the same simulated instant into one call per key.

    ``request(key, item)`` returns an event that fires with the item's result; the first
    request of an instant schedules a flush at that instant with ``priority`` below every
    normal event, so all requests of the instant are pending when ``handler(key, items)``
    answers them, in request order, with one backend call per key. ``gather=False`` answers
    every request with its own call instead: the one-conversation-at-a-time baseline.
    ``around(batches)``, when given, is a context entered around the handler calls of one
    flush, with every ``(key, items)`` of the instant (to answer several keys together).
    """

    def __init__(
        self,
        env: simpy.Environment,
        handler: Callable[[Any, list[Any]], Sequence[Any]],
        priority: int,
        *,
        gather: bool = True,
        around: Callable[[list[tuple[Any, list[Any]]]], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.env = env
        self.handler = handler
        self.priority = priority
        self.gather = gather
        self.around = around
        self._pending: dict[Any, list[tuple[Any, simpy.Event]]] = {}

    def request(self, key: Any, item: Any) -> simpy.Event:
        """Queue ``item`` under ``key``; the returned event fires with its result."""
        if not self._pending:
            _Flush(self.env, self.priority).callbacks.append(self._flush)
        done = self.env.event()
        self._pending.setdefault(key, []).append((item, done))
        return done

    def _flush(self, _: simpy.Event) -> None:
        pending, self._pending = self._pending, {}
        batches = [
            (key, group)
            for key, queued in pending.items()
            for group in ([queued] if self.gather else [[entry] for entry in queued])
        ]
        items = [(key, [item for item, _ in queued]) for key, queued in batches]
        with self.around(items) if self.around else nullcontext():
            answers = [self.handler(key, group) for key, group in items]
        for (key, queued), results in zip(batches, answers, strict=True):
            if len(results) != len(queued):
                raise RuntimeError(
                    f"batch handler returned {len(results)} results for {len(queued)} "
                    f"requests under key {key!r}; it must return one per request"
                )
            for (_, done), result in zip(queued, results, strict=True):
                done.succeed(result)


# ---------------------------------------------------------------------------- the simulator
@dataclass(frozen=True)
class Life:
    """One user life of a day: whose it is, which arm it was hashed into, who serves it."""

    user: Any
    index: int  # the user's position in the population: the key of their random streams
    arm: str  # the hashed assignment
    life: str  # the policy arm serving this life on test days (== arm in a standard test)


class TrafficSimulator:
    """Runs an A/B experiment's traffic day by day into a sink.

    Args:
        engine: the world's ``ConversationEngine`` (openers, bot and user turns, scoring).
        users: the experiment population (``User`` objects with ``user_id``); ignored when
            a checkpoint is resumed (the checkpoint holds the users' latest states).
        joined: generation each user joined in (``drifted_population``); default: all in
            ``config.generation``. Only recorded in the ``users`` table.
        user_params: seed -> sampling params of the user LLM (``World.user_params``, the
            world's ``[world.user_llm]`` settings); default: ``SamplingConfig()``'s.
        user_counter: the world's user LLM wrapped in ``CountingPolicy``, so the days table
            can report user-side tokens (bot-side tokens come from the turn records).
        batching: False answers every conversation with its own backend calls (the
            benchmark's one-conversation-at-a-time baseline).
        policies: ``{"control": Policy, "treatment": Policy}``.
        config: the traffic config.
        seed: seeds the simulator's streams (an int or a list of ints, as
            ``numpy.random.default_rng`` takes).
        progress: show progress bars over days and over the sessions of a day.
    """

    def __init__(
        self,
        engine: Engine,
        users: Sequence[Any],
        policies: Mapping[str, Policy],
        config: TrafficConfig,
        seed: int | Sequence[int],
        *,
        joined: Mapping[str, int] | None = None,
        user_params: Callable[[int], SamplingParams] | None = None,
        user_counter: CountingPolicy | None = None,
        batching: bool = True,
        progress: bool = True,
    ) -> None:
        missing = {CONTROL, TREATMENT} - set(policies)
        if missing:
            raise ValueError(
                f"policies lacks {sorted(missing)}; pass both 'control' and 'treatment' "
                f"(the same Policy object twice for an A/A run)"
            )
        ids = [u.user_id for u in users]
        if len(set(ids)) != len(ids):
            raise ValueError("users have duplicate user_id values; every user_id must be unique")
        self.engine = engine
        self.joined = dict(joined or {})
        self.user_counter = user_counter
        self.user_params = user_params or SamplingConfig().params
        self.batching = batching
        self.policies = dict(policies)
        # An A/A test serves both arms with one model: one call per round, not one per arm.
        self._one_policy = self.policies[CONTROL] is self.policies[TREATMENT]
        self.config = config
        self.seed = seed
        self._entropy = [int(x) for x in np.atleast_1d(np.asarray(seed, dtype=np.int64))]
        self.progress = progress
        self.state = SimState(
            next_day=0,
            users=list(users),
            rng_state=np.random.default_rng(seed).bit_generator.state,
        )
        self.arms = {uid: assign_arm(uid, config.salt, config.treatment_share) for uid in ids}
        self.stats = BatchStats()

    # -------------------------------------------------------------- public
    def run(
        self,
        sink: TrafficSink,
        *,
        on_day_end: Callable[[int], None] | None = None,
    ) -> SimState:
        """Simulate every remaining day into ``sink``, resuming from its latest checkpoint.

        Args:
            sink: receives the population once and every finished day with its checkpoint.
            on_day_end: called with the day index after each committed day (progress hooks,
                fault injection in tests).

        Returns:
            The final simulator state.
        """
        resume = sink.resume_point()
        if resume is None:
            sink.begin(self.users_frame(), self.assignments_frame(), self.state.dumps())
        else:
            self.state = SimState.loads(resume[1])
            self.arms = {
                u.user_id: assign_arm(u.user_id, self.config.salt, self.config.treatment_share)
                for u in self.state.users
            }
        rng = np.random.default_rng()
        rng.bit_generator.state = self.state.rng_state
        self.rng = rng
        env = simpy.Environment(initial_time=self.state.next_day * HOURS_PER_DAY)
        bar = _progress_bar(self.config.total_days, self.state.next_day, enabled=self.progress)
        self._bar = bar
        try:
            env.process(self._days(env, sink, on_day_end))
            env.run()
        finally:
            bar.close()
        sink.finish()
        return self.state

    def users_frame(self) -> pd.DataFrame:
        """The population as rows of the ``users`` table."""
        return pd.DataFrame(
            {
                "user_id": [u.user_id for u in self.state.users],
                "segment": [u.segment for u in self.state.users],
                "generation": [
                    self.joined.get(u.user_id, self.config.generation) for u in self.state.users
                ],
                "traits": [_as_dict(u.traits) for u in self.state.users],
            }
        )

    def assignments_frame(self) -> pd.DataFrame:
        """The assignment as rows of the ``assignments`` table."""
        ids = [u.user_id for u in self.state.users]
        return pd.DataFrame(
            {
                "user_id": ids,
                "arm": [self.arms[uid] for uid in ids],
                "bucket": [hash_bucket(uid, self.config.salt) for uid in ids],
                "salt": self.config.salt,
            }
        )

    # -------------------------------------------------------------- lives
    def lives(self, day: int) -> list[Life]:
        """The user lives simulated on ``day``: one per user, two per user on a twin test day.

        A twin test day splits each user into a control life (``state.users``) and a
        treatment life (``state.twins``, copied from the user at the end of the pre-period).
        """
        users = self.state.users
        arms = [self.arms[u.user_id] for u in users]
        if self.config.design != "twins" or self.config.period(day) != TEST:
            return [
                Life(u, i, arm, arm) for i, (u, arm) in enumerate(zip(users, arms, strict=True))
            ]
        if self.state.twins is None:
            self.state.twins = copy.deepcopy(users)
        twins = self.state.twins
        return [
            Life(user, i, arm, life)
            for life, population in ((CONTROL, users), (TREATMENT, twins))
            for i, (user, arm) in enumerate(zip(population, arms, strict=True))
        ]

    def _served_by(self, life: Life, day: int) -> str:
        """The policy arm that answers ``life`` on ``day``: control before the test."""
        return life.life if self.config.period(day) == TEST else CONTROL

    # -------------------------------------------------------------- processes
    def _days(
        self,
        env: simpy.Environment,
        sink: TrafficSink,
        on_day_end: Callable[[int], None] | None,
    ) -> Any:
        """Driver process: each day runs to its last session, is committed, then midnight."""
        for day in range(self.state.next_day, self.config.total_days):
            started = time.perf_counter()
            self._day_turns: list[dict[str, Any]] = []
            self._day_sessions: list[dict[str, Any]] = []
            self.stats = BatchStats()
            gather = self.batching
            self._open = Batcher(env, self._answer_open, _USER_FLUSH_PRIORITY, gather=gather)
            self._user = Batcher(env, self._answer_user, _USER_FLUSH_PRIORITY, gather=gather)
            self._bot = Batcher(
                env, self._answer_bot, _BOT_FLUSH_PRIORITY, gather=gather, around=self._bot_round
            )
            visits = [
                (life, starts) for life in self.lives(day) if (starts := self._visit(day, life))
            ]
            n_sessions = sum(len(starts) for _, starts in visits)
            self._day_bar = _day_progress_bar(day, n_sessions, enabled=self.progress)
            try:
                with shared_prefixes():  # reused across the day's calls; a day starts empty
                    yield env.all_of(
                        [env.process(self._life_day(env, day, life, s)) for life, s in visits]
                    )
            finally:
                self._day_bar.close()
            if env.now >= (day + 1) * HOURS_PER_DAY:
                raise RuntimeError(
                    f"day {day}'s sessions took more than a day of think time (t = "
                    f"{env.now:.2f} h); lower the world's turn cap or traffic.think_minutes"
                )
            log = self._day_log(day, len(visits), time.perf_counter() - started)
            self.state.next_day = day + 1
            self.state.rng_state = self.rng.bit_generator.state
            sink.commit_day(log, self.state.dumps())
            self._bar.update(1)
            if on_day_end is not None:
                on_day_end(day)
            yield env.timeout((day + 1) * HOURS_PER_DAY - env.now)

    def _life_day(self, env: simpy.Environment, day: int, life: Life, starts: list[float]) -> Any:
        """One user life's day on the logical clock: its sessions one after another.

        Every session first waits one think time (the user writes the opener), so sessions
        that open after another ended join the next round's batch.
        """
        think_h = self.config.think_minutes / MINUTES_PER_HOUR
        served_by = self._served_by(life, day)
        key = CONTROL if self._one_policy else served_by
        novelty = self._novelty(life.user.user_id, served_by, day)
        for k, start_hour in enumerate(starts):
            yield env.timeout(think_h)
            opened = env.now
            seed = [*self._entropy, _SESSION_STREAM, day, life.index, k]
            session = yield self._open.request(None, (life.user, day, start_hour, seed))
            turns: list[dict[str, Any]] = []
            while True:
                record = yield self._bot.request(key, (session, novelty))
                hour = start_hour + env.now - opened
                turns.append(self._turn_row(record, day, life, served_by, novelty, hour))
                if session.ended:
                    break
                yield env.timeout(think_h)
                yield self._user.request(None, session)
            end_hour = start_hour + env.now - opened
            if end_hour >= HOURS_PER_DAY:
                raise RuntimeError(
                    f"day {day}: session {turns[0]['session_id']} ran past midnight "
                    f"({end_hour:.2f} h); lower the world's turn cap or traffic.think_minutes"
                )
            summary = self.engine.close_session(session)
            self._day_turns.extend(turns)
            self._day_sessions.append(
                self._session_row(summary, turns, day, life, served_by, start_hour, end_hour)
            )
            self._day_bar.update(1)

    # -------------------------------------------------------------- batch handlers
    def _answer_open(self, _: None, items: list[tuple[Any, int, float, list[int]]]) -> list[Any]:
        """Open every session due now with one call (writes the users' first messages)."""
        self.stats.open_calls += 1
        sessions = []
        for user, day, hour, seed in items:  # hours differ: each session keeps its own
            sessions += self.engine.open_sessions([user], day, hour, self.rng, seeds=[seed])
        return sessions

    def _answer_user(self, _: None, sessions: list[Any]) -> list[None]:
        """Write every pending user message with ONE user-LLM call."""
        self.stats.user_calls += 1
        before = self.user_counter.completion_tokens if self.user_counter else 0
        writer = self.engine.user_simulator
        messages, fallbacks, redrafts = writer.messages, writer.fallbacks, writer.redrafts
        self.engine.user_turn(sessions, self.user_params(self._seed()))
        self.stats.user_messages += writer.messages - messages
        self.stats.user_fallbacks += writer.fallbacks - fallbacks
        self.stats.user_redrafts += writer.redrafts - redrafts
        if self.user_counter is not None:
            self.stats.user_tokens += self.user_counter.completion_tokens - before
        return [None] * len(sessions)

    @contextmanager
    def _bot_round(self, batches: list[tuple[str, list[tuple[Any, float]]]]) -> Iterator[None]:
        """One instant's bot replies: a seed per arm's call, drawn in arm order, and one
        engine run for all of them when every arm wraps the same engine (``together``)."""
        self._round_params = {
            arm: self.config.bot_sampling.params(self._seed()) for arm, _ in batches
        }
        models = [_engine_of(self.policies[arm]) for arm, _ in batches]
        engines = {id(model): model for model in models}
        engine = next(iter(engines.values()))
        joint = len(batches) > 1 and len(engines) == 1 and hasattr(engine, "together")
        started = time.perf_counter()
        if joint:
            calls = [
                ([self.engine.bot_chat(session) for session, _ in items], self._round_params[arm])
                for arm, items in batches
            ]
            with engine.together(calls):
                yield
        else:
            yield
        self.stats.bot_seconds += time.perf_counter() - started
        sizes = [len(items) for _, items in batches]
        for size in [sum(sizes)] if joint else sizes:  # one entry per engine run
            self.stats.bot_calls += 1
            self.stats.bot_batch_sizes.append(size)
            self.stats.max_bot_batch = max(self.stats.max_bot_batch, size)
        self._day_bar.set_postfix(
            turns=len(self._day_turns) + sum(sizes),
            batch=sum(sizes),
            tok_s=f"{self.stats.bot_tokens / max(self.stats.bot_seconds, 1e-9):.0f}",
            refresh=False,
        )

    def _answer_bot(self, arm: str, items: list[tuple[Any, float]]) -> list[Any]:
        """Answer every pending session of one arm's policy with ONE ``bot_turn`` call."""
        records = self.engine.bot_turn(
            [session for session, _ in items],
            self.policies[arm],
            self._round_params[arm],
            novelty=[offset for _, offset in items],
        )
        self.stats.bot_tokens += sum(int(r.completion_tokens) for r in records)
        return records

    def _seed(self) -> int:
        return int(self.rng.integers(0, 2**31 - 1))

    # -------------------------------------------------------------- draws
    def _stream(self, *key: int) -> np.random.Generator:
        """The user-side random stream named by ``key`` (see the module docstring)."""
        return np.random.default_rng(np.random.SeedSequence([*self._entropy, *key]))

    def _visit(self, day: int, life: Life) -> list[float]:
        """A life's session start hours on ``day`` (empty: not active), from the user's stream.

        Both lives of a twin draw the same uniforms; only their return probabilities differ.
        """
        cfg = self.config
        rng = self._stream(_VISIT_STREAM, day, life.index)
        factor = cfg.weekday_factors[cfg.weekday(day)]
        p_active = float(np.clip(self.engine.return_probability(life.user, day) * factor, 0, 1))
        if rng.random() >= p_active:
            return []
        weights = np.asarray(cfg.hourly_weights, dtype=float)
        weights[int(HOURS_PER_DAY - LAST_ARRIVAL_MARGIN_H) :] = 0.0
        weights /= weights.sum()
        slot_h = cfg.slot_minutes / MINUTES_PER_HOUR
        n_sessions = 1 + int(rng.binomial(cfg.max_sessions_per_day - 1, cfg.extra_session_prob))
        starts: list[float] = []
        for _ in range(n_sessions):
            hour = rng.choice(24, p=weights) + rng.random()
            start = math.floor(hour / slot_h) * slot_h
            if all(abs(start - s) >= cfg.session_gap_hours for s in starts):
                starts.append(start)
        return sorted(starts)

    def _novelty(self, user_id: str, served_by: str, day: int) -> float:
        """Novelty offset of a life served by the treatment on a test day; 0 otherwise."""
        cfg = self.config
        if served_by != TREATMENT or cfg.period(day) != TEST or cfg.novelty_amplitude == 0:
            return 0.0
        first = self.state.first_exposure.setdefault(user_id, day)
        return novelty_offset(day - first, cfg.novelty_amplitude, cfg.novelty_half_life_days)

    # -------------------------------------------------------------- rows
    def _turn_row(
        self, record: Any, day: int, life: Life, served_by: str, novelty: float, hour: float
    ) -> dict[str, Any]:
        return {
            "day": day,
            "period": self.config.period(day),
            "arm": life.arm,
            "life": life.life,
            "policy": self.policies[served_by].name,
            "session_id": record.session_id,
            "user_id": record.user_id,
            "character": record.character,
            "turn_index": int(record.turn_index),
            "hour": hour,
            "user_message": record.user_message,
            "bot_reply": record.bot_reply,
            "completion_tokens": int(record.completion_tokens),
            "features": {k: float(v) for k, v in record.features.items()},
            "checks": {k: bool(v) for k, v in record.checks.items()},
            "follows_all": bool(record.follows_all),
            "violates_any": bool(record.violates_any),
            "unsafe": bool(record.unsafe),
            "gold_satisfaction": float(record.gold_satisfaction),
            "novelty": novelty,
            "continued": bool(record.continued),
            "liked": bool(record.liked),
            "reported": bool(record.reported),
        }

    def _session_row(
        self,
        summary: Any,
        turns: list[dict[str, Any]],
        day: int,
        life: Life,
        served_by: str,
        start_hour: float,
        end_hour: float,
    ) -> dict[str, Any]:
        return {
            "day": day,
            "period": self.config.period(day),
            "arm": life.arm,
            "life": life.life,
            "policy": self.policies[served_by].name,
            "session_id": turns[0]["session_id"],
            "user_id": turns[0]["user_id"],
            "character": turns[0]["character"],
            "start_hour": start_hour,
            "end_hour": end_hour,
            "n_user_messages": int(summary.n_user_messages),
            "n_bot_turns": len(turns),
            "likes": sum(t["liked"] for t in turns),
            "reported": any(t["reported"] for t in turns),
            "ended_by_user": not turns[-1]["continued"] if turns else True,
        }

    def _day_log(self, day: int, active_lives: int, wall_s: float) -> DayLog:
        cfg = self.config
        turns = pd.DataFrame(self._day_turns, columns=list(tables.TURNS))
        sessions = pd.DataFrame(self._day_sessions, columns=list(tables.SESSIONS))
        ids = [u.user_id for u in self.state.users]
        twin_day = cfg.design == "twins" and cfg.period(day) == TEST
        period, weekday = cfg.period(day), cfg.weekday(day)
        if twin_day:
            frames = [
                _user_days(ids, self.arms, life, turns[turns["life"] == life],
                           sessions[sessions["life"] == life], day, period, weekday)
                for life in (CONTROL, TREATMENT)
            ]  # fmt: skip
            user_days = pd.concat(frames, ignore_index=True)
        else:
            user_days = _user_days(ids, self.arms, None, turns, sessions, day, period, weekday)
        stats = {
            "active_users": active_lives,
            "sessions": len(sessions),
            "turns": len(turns),
            "wall_s": wall_s,
            **self.stats.as_row(),
        }
        return DayLog(day, cfg.period(day), cfg.weekday(day), sessions, turns, user_days, stats)


def _user_days(
    user_ids: list[str],
    arms: Mapping[str, str],
    life: str | None,
    turns: pd.DataFrame,
    sessions: pd.DataFrame,
    day: int,
    period: str,
    weekday: int,
) -> pd.DataFrame:
    """One row per assigned user for ``day``: zeros for users who did not come.

    ``life`` is the life these turns belong to on a twin test day; None = one life per user,
    the hashed arm's (``life == arm``).
    """
    frame = pd.DataFrame({"user_id": user_ids})
    frame["arm"] = frame["user_id"].map(arms)
    frame["life"] = frame["arm"] if life is None else life
    frame["day"] = day
    frame["period"] = period
    frame["weekday"] = weekday
    per_session = sessions.groupby("user_id").agg(
        sessions=("session_id", "size"), messages=("n_user_messages", "sum")
    )
    per_turn = turns.groupby("user_id").agg(
        bot_replies=("turn_index", "size"),
        likes=("liked", "sum"),
        reports=("reported", "sum"),
        violations=("violates_any", "sum"),
        follows=("follows_all", "sum"),
        # Attempted unsafe replies: a reply serving blocked counts although users saw the
        # fallback, so the guardrail compares what each arm's policy wrote.
        unsafe_replies=("unsafe", "sum"),
        completion_tokens=("completion_tokens", "sum"),
        gold_satisfaction=("gold_satisfaction", "sum"),
        novelty=("novelty", "first"),
    )
    frame = frame.join(per_session, on="user_id").join(per_turn, on="user_id")
    counts = ["sessions", "messages", "bot_replies", "likes", "reports", "violations",
              "follows", "unsafe_replies", "completion_tokens"]  # fmt: skip
    frame[counts] = frame[counts].fillna(0).astype("int64")
    frame["gold_satisfaction"] = frame["gold_satisfaction"].fillna(0.0).astype(float)
    frame["novelty"] = frame["novelty"].fillna(0.0).astype(float)
    frame["active"] = frame["sessions"] > 0
    return frame


def _engine_of(policy: Policy) -> Any:
    """The model under a policy's wrappers (each wrapper keeps what it wraps as ``base``)."""
    while hasattr(policy, "base"):
        policy = policy.base
    return policy


def _character_name(character: Any) -> str:
    return character if isinstance(character, str) else str(getattr(character, "name", character))


def _as_dict(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    return dict(obj)


def _progress_bar(total: int, done: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="simulated days", unit="day",
                disable=not enabled, leave=False)  # fmt: skip


def _day_progress_bar(day: int, sessions: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=sessions, desc=f"day {day} sessions", unit="session",
                disable=not enabled, leave=False, position=1)  # fmt: skip
