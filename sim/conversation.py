"""Conversations between simulated users and characters, batched turn by turn.

``ConversationEngine`` is the world's one way to run conversations; the traffic model
(``sim.traffic``), the gymnasium env (``sim.env``) and ``flywheel chat`` all drive it:

1. ``open_sessions(users, day, hour, rng)`` picks each user's character, starts the latent
   session state and writes the users' first messages (real openers from chit-chat data).
2. ``bot_turn(sessions, bot_policy, params, novelty)`` answers every given session with ONE
   ``bot_policy.generate`` call, then scores the replies (features, checkers), computes the
   gold utility, draws the user's signals and moves latent state. A session whose user
   leaves, reports, said goodbye, or reaches the turn cap gets ``ended=True``.
   ``apply_replies`` does the same for replies written elsewhere (the env's actions).
3. ``user_turn(sessions, params)`` writes the next user message for every open session with
   ONE user-LLM call.
4. ``close_session(session)`` folds the session into the user's long-term state and returns
   a ``SessionRecord``; ``return_probability(user, day)`` gives next-day return.

Each session owns its generators, so the users' signals do not depend on how sessions are
grouped into batches. Given ``open_sessions``' ``seeds`` (the traffic model derives one per
user, day and session), a session spawns two from its seed: ``rng`` writes (character choice,
opener, PII, fallbacks) and ``signal_rng`` draws the user's reactions, exactly three uniforms
per reply (like, report, continue), so two sessions opened with the same seed draw the same
uniform at the same turn whatever the replies were: the common random numbers of a twin
experiment (``sim.traffic``). Without seeds (the env, ``flywheel chat``), one generator drawn
from ``rng`` does both.

How a session ends (checked after every bot reply, in this order; ``end_reason``):

1. ``reported``: the user reported the reply (a user who reports leaves).
2. ``goodbye``: the user's message that this reply answered closed the chat (the user LLM
   said bye, ``sim.user_llm.is_goodbye``). The character answers the goodbye, the user
   reacts to that answer (like / report drawn as for any reply) and leaves: the reply's
   ``continued`` is recorded False whatever the continue draw was, and the goodbye is the
   user's last message (``TurnRecord.user_message`` of the session's last turn).
3. ``left``: the continue draw failed (the latent leave hazard, ``sim.gold``).
4. ``turn_cap``: the session reached the world's turn cap.

So a user leaves when either the utility-driven continue draw fails or their own text says
goodbye, whichever comes first. A goodbye is read from the text alone and draws nothing: every
reply, the farewell answer included, consumes exactly its three ``signal_rng`` uniforms, so
the common random numbers stay aligned turn by turn between twin lives.

Also: ``open_sessions`` takes an
optional ``characters`` list to pin characters; ``apply_replies`` and ``run_sessions`` exist
for the env and ``flywheel chat``; ``TurnRecord`` also carries ``segment``, ``hour``,
``user_message_pii`` (the answered user message had planted PII) and ``serving_event``
(``unsafe`` judges the reply the policy attempted, see ``TurnRecord``); ``SessionRecord``
carries ``segment``, ``likes``, ``end_reason``, ``mean_gold_satisfaction`` (ORACLE) and
``pii_messages``. The user's last character lives in ``UserState.last_character`` so that a
pickled population resumes with the same choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.special import softmax

from policies.base import Chat, Message, Policy, SamplingParams
from rewards.checkers import CheckResult
from rewards.embeddings import Embedder
from rewards.features import reply_features
from sim.characters import Character
from sim.gold import GoldModel, ReplyAssessment, assess_replies
from sim.population import User
from sim.serving import BLOCKED
from sim.user_llm import UserSimulator

END_LEFT = "left"
END_REPORTED = "reported"
END_TURN_CAP = "turn_cap"
END_GOODBYE = "goodbye"


@dataclass(frozen=True)
class TurnRecord:
    """One bot reply, how it scored and how the user reacted.

    ``gold_satisfaction`` is the ORACLE (sim.gold); everything else is observable.
    ``bot_reply`` is the reply the user saw, and features, checks, gold and signals are of
    it. ``unsafe`` judges the reply the policy *attempted*: True when the serving check
    blocked it (``serving_event == "blocked"``; the user saw the fallback instead) or when
    the reply shown is offensive (``rewards.features.is_unsafe``). ``serving_event`` is the
    ``sim.serving`` event that replaced the reply ("" when served as generated); a checker
    error or timeout replaces a reply without making it unsafe.
    """

    session_id: str
    user_id: str
    segment: str
    character: str
    day: int
    hour: float
    turn_index: int
    user_message: str
    bot_reply: str
    completion_tokens: int
    features: dict[str, float]
    checks: dict[str, bool]
    follows_all: bool
    violates_any: bool
    unsafe: bool
    gold_satisfaction: float
    continued: bool
    liked: bool
    reported: bool
    user_message_pii: bool = False
    serving_event: str = ""

    def to_row(self) -> dict[str, Any]:
        """A flat dict: scalars as they are, ``feature_<name>`` and ``check_<kind>`` columns."""
        row = {k: v for k, v in asdict(self).items() if k not in ("features", "checks")}
        row.update({f"feature_{k}": float(v) for k, v in self.features.items()})
        row.update({f"check_{k}": bool(v) for k, v in self.checks.items()})
        return row


@dataclass(frozen=True)
class SessionRecord:
    """One finished session. ``mean_gold_satisfaction`` is the ORACLE."""

    session_id: str
    user_id: str
    segment: str
    character: str
    day: int
    hour: float
    n_user_messages: int
    n_turns: int
    likes: int
    liked: bool
    reported: bool
    end_reason: str
    mean_gold_satisfaction: float
    pii_messages: int

    def to_row(self) -> dict[str, Any]:
        """A flat dict for a DataFrame row."""
        return asdict(self)


@dataclass
class Session:
    """One conversation in progress. ``messages`` excludes the system prompt."""

    session_id: str
    user: User
    character: Character
    day: int
    hour: float
    rng: np.random.Generator
    signal_rng: np.random.Generator
    messages: list[Message] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    pii_flags: list[bool] = field(default_factory=list)  # one per user message
    goodbye: bool = False  # the user's latest message closes the chat (see the module doc)
    ended: bool = False
    end_reason: str = ""
    closed: bool = False

    @property
    def bot_replies(self) -> list[str]:
        """The character's replies so far."""
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    @property
    def last_user_message(self) -> str:
        """The user's latest message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def transcript(self, user_label: str = "user") -> str:
        """The conversation as ``user: ...`` / ``<character>: ...`` lines."""
        names = {"user": user_label, "assistant": self.character.name}
        return "\n".join(f"{names[m['role']]}: {m['content']}" for m in self.messages)


class ConversationEngine:
    """Runs batched conversations in a world (see the module docstring).

    Args:
        characters: characters by name (the world's cast).
        user_simulator: writes user messages (an LLM behind ``policies``).
        gold: gold utility, dynamics and response model.
        embedder: MiniLM encoder for relevance / persona features.
        turn_cap: most bot replies in one session.
        character_affinity: how strongly users pick characters matching their topics
            (softmax inverse temperature over topic affinity).
        stickiness: probability a returning user picks their last character again.
    """

    def __init__(
        self,
        characters: dict[str, Character],
        user_simulator: UserSimulator,
        gold: GoldModel,
        embedder: Embedder,
        turn_cap: int = 8,
        character_affinity: float = 2.0,
        stickiness: float = 0.7,
    ) -> None:
        if not characters:
            raise ValueError("ConversationEngine needs at least one character")
        if turn_cap < 1:
            raise ValueError(f"turn_cap must be >= 1, got {turn_cap}")
        if not 0 <= stickiness <= 1:
            raise ValueError(f"stickiness must be in [0, 1], got {stickiness}")
        self.characters = characters
        self.user_simulator = user_simulator
        self.gold = gold
        self.embedder = embedder
        self.turn_cap = turn_cap
        self.character_affinity = character_affinity
        self.stickiness = stickiness

    # ------------------------------------------------------------------ opening
    def choose_character(self, user: User, rng: np.random.Generator) -> Character:
        """The character ``user`` talks to: often the last one, else by topic affinity."""
        last = user.state.last_character
        if last in self.characters and rng.random() < self.stickiness:
            return self.characters[last]
        cast = list(self.characters.values())
        affinity = np.array([self.gold.topic_affinity(user, c) for c in cast])
        return cast[int(rng.choice(len(cast), p=softmax(self.character_affinity * affinity)))]

    def open_sessions(
        self,
        users: Sequence[User],
        day: int,
        hour: float,
        rng: np.random.Generator,
        characters: Sequence[str] | None = None,
        *,
        seeds: Sequence[Sequence[int]] | None = None,
    ) -> list[Session]:
        """Start one session per user with the user's first message written.

        ``characters`` optionally pins each user's character by name. ``seeds`` optionally
        gives each session its own seed (entropy for ``numpy.random.SeedSequence``) instead
        of one drawn from ``rng``.
        """
        for name, given in (("characters", characters), ("seeds", seeds)):
            if given is not None and len(given) != len(users):
                raise ValueError(f"open_sessions got {len(users)} users but {len(given)} {name}")
        sessions = []
        for i, user in enumerate(users):
            if seeds is not None:
                session_rng, signal_rng = (
                    np.random.default_rng(s) for s in np.random.SeedSequence(seeds[i]).spawn(2)
                )
            else:  # no common random numbers asked for: one generator, drawn from ``rng``
                session_rng = signal_rng = np.random.default_rng(int(rng.integers(2**63 - 1)))
            if characters is not None:
                if characters[i] not in self.characters:
                    known = sorted(self.characters)
                    raise ValueError(f"unknown character {characters[i]!r}; fix: one of {known}")
                character = self.characters[characters[i]]
            else:
                character = self.choose_character(user, session_rng)
            self.gold.start_session(user, day)
            opener, pii = self.user_simulator.maybe_plant_pii(
                self.user_simulator.opener(user, session_rng), session_rng
            )
            session = Session(
                session_id=f"{user.user_id}:d{day}:s{user.state.n_sessions}",
                user=user,
                character=character,
                day=day,
                hour=hour,
                rng=session_rng,
                signal_rng=signal_rng,
                messages=[{"role": "user", "content": opener}],
                pii_flags=[pii],
            )
            sessions.append(session)
        return sessions

    # ------------------------------------------------------------------ bot side
    @staticmethod
    def bot_chat(session: Session) -> Chat:
        """What the bot policy sees: the character's system prompt, then the conversation."""
        return [{"role": "system", "content": session.character.system_prompt()}, *session.messages]

    def bot_turn(
        self,
        sessions: Sequence[Session],
        bot_policy: Policy,
        params: SamplingParams,
        novelty: Sequence[float] | float | None = None,
    ) -> list[TurnRecord]:
        """Answer every session with ONE ``bot_policy.generate`` call, then score and react."""
        if not sessions:
            return []
        self._require_open(sessions, "bot_turn")
        generations = bot_policy.generate([self.bot_chat(s) for s in sessions], params)
        return self.apply_replies(
            sessions,
            [g.text for g in generations],
            [g.completion_tokens for g in generations],
            novelty,
            serving_events=[g.serving_event for g in generations],
        )

    def apply_replies(
        self,
        sessions: Sequence[Session],
        replies: Sequence[str],
        completion_tokens: Sequence[int] | None = None,
        novelty: Sequence[float] | float | None = None,
        *,
        serving_events: Sequence[str] | None = None,
    ) -> list[TurnRecord]:
        """Score given replies (one per session), draw signals, move state, end sessions.

        ``serving_events``: per reply, the ``sim.serving`` event that replaced it ("" or
        None = the reply is what the policy wrote); a ``blocked`` reply makes the turn unsafe.
        """
        self._require_open(sessions, "apply_replies")
        n = len(sessions)
        if len(replies) != n:
            raise ValueError(f"apply_replies got {n} sessions but {len(replies)} replies")
        tokens = list(completion_tokens) if completion_tokens is not None else [0] * n
        events = list(serving_events) if serving_events is not None else [""] * n
        if len(events) != n:
            raise ValueError(f"apply_replies got {n} sessions but {len(events)} serving events")
        offsets = self._novelty(novelty, n)
        replies = [r.strip() for r in replies]
        contexts = [
            s.character.reply_context(s.last_user_message, tuple(s.bot_replies)) for s in sessions
        ]
        features = reply_features(self.embedder, replies, contexts)
        assessed = assess_replies([s.character for s in sessions], replies, contexts, features)
        records = []
        for session, reply, (assessment, checked), n_tokens, offset, event in zip(
            sessions, replies, assessed, tokens, offsets, events, strict=True
        ):
            records.append(
                self._react(session, reply, assessment, checked, int(n_tokens), offset, event)
            )
        return records

    def _react(
        self,
        session: Session,
        reply: str,
        assessment: ReplyAssessment,
        checked: CheckResult,
        n_tokens: int,
        novelty: float,
        serving_event: str,
    ) -> TurnRecord:
        user, character = session.user, session.character
        utility = self.gold.utility(user, character, assessment, novelty)
        turn_index = len(session.turns)
        signals = self.gold.respond(user, utility, assessment, turn_index, session.signal_rng)
        self.gold.observe_turn(user, utility, assessment, signals)
        record = TurnRecord(
            session_id=session.session_id,
            user_id=user.user_id,
            segment=user.segment,
            character=character.name,
            day=session.day,
            hour=session.hour,
            turn_index=turn_index,
            user_message=session.last_user_message,
            bot_reply=reply,
            completion_tokens=n_tokens,
            features=assessment.features,
            checks=checked.checks,
            follows_all=checked.follows_all,
            violates_any=checked.violates_any,
            # The attempt counts: a blocked reply is unsafe although the user saw the
            # fallback, so serving cannot hide an arm's unsafe replies from its guardrail.
            unsafe=serving_event == BLOCKED or assessment.unsafe,
            gold_satisfaction=utility,
            continued=signals.continued and not session.goodbye,
            liked=signals.liked,
            reported=signals.reported,
            user_message_pii=session.pii_flags[-1],
            serving_event=serving_event or "",
        )
        session.messages.append({"role": "assistant", "content": reply})
        session.turns.append(record)
        if signals.reported:
            session.ended, session.end_reason = True, END_REPORTED
        elif session.goodbye:
            session.ended, session.end_reason = True, END_GOODBYE
        elif not signals.continued:
            session.ended, session.end_reason = True, END_LEFT
        elif len(session.turns) >= self.turn_cap:
            session.ended, session.end_reason = True, END_TURN_CAP
        return record

    # ------------------------------------------------------------------ user side
    def user_turn(self, sessions: Sequence[Session], params: SamplingParams) -> None:
        """Write the next user message of every open session with ONE user-LLM call."""
        live = [s for s in sessions if not s.ended]
        if not live:
            return
        for s in live:
            if s.messages[-1]["role"] != "assistant":
                raise ValueError(
                    f"session {s.session_id} is waiting for a bot reply, not a user message; "
                    "fix: call bot_turn first"
                )
        written = self.user_simulator.next_messages(
            [s.user for s in live],
            [s.character for s in live],
            [s.messages for s in live],
            params,
            [s.rng for s in live],
        )
        for session, message in zip(live, written, strict=True):
            session.messages.append({"role": "user", "content": message.text})
            session.pii_flags.append(message.pii)
            session.goodbye = message.goodbye

    # ------------------------------------------------------------------ closing
    def close_session(self, session: Session) -> SessionRecord:
        """Fold a session into the user's long-term state (once) and summarise it."""
        if session.closed:
            raise ValueError(f"session {session.session_id} is already closed")
        if not session.ended:
            session.ended, session.end_reason = True, session.end_reason or END_LEFT
        mean_u = self.gold.end_session(session.user, session.day)
        session.user.state.last_character = session.character.name
        session.closed = True
        likes = sum(t.liked for t in session.turns)
        return SessionRecord(
            session_id=session.session_id,
            user_id=session.user.user_id,
            segment=session.user.segment,
            character=session.character.name,
            day=session.day,
            hour=session.hour,
            n_user_messages=sum(m["role"] == "user" for m in session.messages),
            n_turns=len(session.turns),
            likes=likes,
            liked=likes > 0,
            reported=any(t.reported for t in session.turns),
            end_reason=session.end_reason,
            mean_gold_satisfaction=mean_u,
            pii_messages=sum(session.pii_flags),
        )

    def return_probability(self, user: User, day: int) -> float:
        """P(``user`` is active on ``day``), from the gold model's latent state."""
        return self.gold.return_probability(user, day)

    # ------------------------------------------------------------------ loops
    def run_sessions(
        self,
        sessions: Sequence[Session],
        bot_policy: Policy,
        bot_params: SamplingParams,
        user_params: SamplingParams,
    ) -> list[TurnRecord]:
        """Alternate batched bot and user turns until every session has ended.

        Each round re-seeds both sampling params from ``seed + round`` so rounds differ.
        """
        records: list[TurnRecord] = []
        round_index = 0
        live = [s for s in sessions if not s.ended]
        while live:
            bp = _reseed(bot_params, round_index)
            records.extend(self.bot_turn(live, bot_policy, bp))
            live = [s for s in live if not s.ended]
            self.user_turn(live, _reseed(user_params, round_index))
            round_index += 1
        return records

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _require_open(sessions: Sequence[Session], where: str) -> None:
        for s in sessions:
            if s.ended:
                raise ValueError(f"{where}: session {s.session_id} has ended ({s.end_reason})")
            if s.messages[-1]["role"] != "user":
                raise ValueError(
                    f"{where}: session {s.session_id} is waiting for a user message; "
                    "fix: call user_turn first"
                )

    @staticmethod
    def _novelty(novelty: Sequence[float] | float | None, n: int) -> list[float]:
        if novelty is None:
            return [0.0] * n
        if isinstance(novelty, int | float):
            return [float(novelty)] * n
        if len(novelty) != n:
            raise ValueError(f"novelty has {len(novelty)} offsets for {n} sessions")
        return [float(x) for x in novelty]


def _reseed(params: SamplingParams, offset: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed + offset,
    )
