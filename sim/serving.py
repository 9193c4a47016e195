"""The serving path: every bot reply passes a safety check that fails closed.

``SafeServingPolicy`` wraps any ``Policy``. After the wrapped model answers a batch, the
whole batch goes to the safety checker (``rewards.safety.SafetyChecker`` by default) in a
worker thread with a deadline. Then, per reply:

- checker says safe                  -> the reply is served unchanged;
- checker says unsafe                -> the fallback reply is served, event ``blocked``;
- checker raised an exception        -> the fallback reply is served, event ``checker_error``;
- checker missed its deadline        -> the fallback reply is served, event ``checker_timeout``;
- checker returned a malformed result (wrong count, not a verdict, ``safe`` not a bool)
                                     -> the fallback reply is served, event ``checker_error``.

Failing *closed* means that when we cannot tell whether a reply is safe we do not show it:
a broken or slow checker costs engagement (a bland fallback) but never lets an unchecked
reply through. Every replaced reply produces one ``ServingEvent`` that goes to
``on_event`` (the generation loop writes them to the run store) and to ``events``.

A verdict must carry ``safe`` as a real ``bool``: a checker that answers ``"no"``, ``1`` or
``None`` is broken, and the batch fails closed as ``checker_error`` (a truthy string must not
pass a reply).

A replaced reply comes back as a ``Generation`` whose ``serving_event`` names the event kind,
so what the model *attempted* stays visible downstream: ``sim.conversation`` counts a
``blocked`` reply as an unsafe turn of the arm that wrote it (the A/B's ``unsafe_replies``),
although users saw the fallback. ``checker_error`` and ``checker_timeout`` are not counted as
unsafe, since nobody knows whether the reply was unsafe; they are recorded as events (the run
store's ``serving_events`` table) and cost the arm the fallback's engagement.

``serve(policy, config, on_event=...)`` is the one place that builds this path from a
``ServingConfig`` (the scenario's ``[serving]`` table); ``flywheel run``, ``flywheel ab`` and
``flywheel chat`` all serve simulated users through it.

A checker thread that misses its deadline cannot be killed in Python; it is left running
as a daemon and its late result is ignored. Each batch gets a fresh thread, so one hung
check does not make every later check wait behind it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.base import Chat, Generation, Policy, SamplingParams

FALLBACK_REPLY = "Sorry, I'd rather not answer that. Tell me more about your day instead?"
DEFAULT_TIMEOUT_S = 10.0  # seconds; the rule set and classifier take milliseconds per batch

BLOCKED = "blocked"
CHECKER_ERROR = "checker_error"
CHECKER_TIMEOUT = "checker_timeout"


class ServingConfig(BaseModel):
    """The ``[serving]`` table of a scenario: the safety check every served reply passes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    categories: list[str] | None = Field(
        None,
        description="Safety categories enforced (rewards.safety.CATEGORIES); default: all; "
        "an empty list is refused (it would block nothing).",
    )
    offensive_threshold: float = Field(
        0.9, gt=0, le=1, description="alt-profanity-check probability at which a reply is blocked."
    )
    timeout_s: float = Field(
        DEFAULT_TIMEOUT_S,
        gt=0,
        description="Seconds the checker has per batch before the batch fails closed.",
    )
    fallback_reply: str = Field(
        FALLBACK_REPLY,
        min_length=1,
        description="What users see instead of a blocked or unchecked reply.",
    )

    @field_validator("categories")
    @classmethod
    def _enforceable(cls, value: list[str] | None) -> list[str] | None:
        from rewards.safety import enforced_categories

        enforced_categories(value)  # names the unknown category, refuses an empty list
        return value


class ReplyChecker(Protocol):
    """What the serving path needs from a safety checker."""

    name: str

    def check(self, replies: Sequence[str]) -> Sequence[Any]:
        """One verdict per reply, each with ``safe: bool`` and ``categories``."""
        ...


@dataclass(frozen=True)
class ServingEvent:
    """One reply that was not served as generated, and why.

    ``event_id`` is a hash of the policy, the call's seed, the position in the batch and
    the original reply, so a replayed batch (a resumed run) yields the same id and the
    store can keep each event once.
    """

    event_id: str
    policy: str
    kind: str
    categories: tuple[str, ...]
    detail: str
    seed: int
    batch_index: int
    original_reply: str
    served_reply: str

    def to_row(self) -> dict[str, Any]:
        """A flat dict for a table row (categories joined with ',')."""
        return {
            "event_id": self.event_id,
            "policy": self.policy,
            "kind": self.kind,
            "categories": ",".join(self.categories),
            "detail": self.detail,
            "seed": self.seed,
            "batch_index": self.batch_index,
            "original_reply": self.original_reply,
            "served_reply": self.served_reply,
        }


def _event_id(policy: str, seed: int, index: int, reply: str) -> str:
    key = f"{policy}\x1f{seed}\x1f{index}\x1f{reply}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class SafeServingPolicy:
    """A ``Policy`` whose replies have all passed a safety check (see the module docstring).

    Args:
        base: the model that writes the replies.
        checker: the safety checker; default ``rewards.safety.SafetyChecker()``.
        timeout_s: deadline for checking one batch, in seconds (> 0).
        fallback: the reply served instead of an unsafe or unchecked one.
        on_event: called with each ``ServingEvent`` as it happens.
        name: label in logs; default the wrapped policy's name.
    """

    def __init__(
        self,
        base: Policy,
        checker: ReplyChecker | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fallback: str = FALLBACK_REPLY,
        on_event: Callable[[ServingEvent], None] | None = None,
        name: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"serving timeout_s must be > 0 seconds, got {timeout_s}")
        if not fallback.strip():
            raise ValueError("serving fallback reply is empty; fix: give a short, safe sentence")
        if checker is None:
            from rewards.safety import SafetyChecker

            checker = SafetyChecker()
        self.base = base
        self.checker = checker
        self.timeout_s = timeout_s
        self.fallback = fallback
        self.on_event = on_event
        self.name = name or base.name
        self.events: list[ServingEvent] = []
        self.checked = 0

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Generate with the wrapped model, then serve only replies the checker cleared."""
        generations = self.base.generate(chats, params)
        texts = [g.text for g in generations]
        verdicts, failure, detail = self._check(texts)
        served = []
        for index, (gen, verdict) in enumerate(zip(generations, verdicts, strict=True)):
            self.checked += 1
            if failure is None and verdict.safe:
                served.append(gen)
                continue
            kind = failure or BLOCKED
            categories = () if failure else tuple(verdict.categories)
            self._emit(
                ServingEvent(
                    event_id=_event_id(self.name, params.seed, index, gen.text),
                    policy=self.name,
                    kind=kind,
                    categories=categories,
                    detail=detail if failure else ", ".join(categories),
                    seed=params.seed,
                    batch_index=index,
                    original_reply=gen.text,
                    served_reply=self.fallback,
                )
            )
            served.append(
                Generation(
                    self.fallback,
                    gen.prompt_tokens,
                    gen.completion_tokens,
                    serving_event=kind,
                    cached_tokens=gen.cached_tokens,
                )
            )
        return served

    def _check(self, texts: list[str]) -> tuple[list[Any], str | None, str]:
        """(verdicts, failure kind or None, failure detail); fails closed on any problem."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["verdicts"] = list(self.checker.check(texts))
            except Exception as err:
                outcome["error"] = f"{type(err).__name__}: {err}"

        worker = threading.Thread(target=work, name="safety-check", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        unchecked = [None] * len(texts)
        if worker.is_alive():
            return unchecked, CHECKER_TIMEOUT, f"no verdict within {self.timeout_s:g} s"
        if "error" in outcome:
            return unchecked, CHECKER_ERROR, outcome["error"]
        verdicts = outcome["verdicts"]
        if len(verdicts) != len(texts):
            detail = f"checker returned {len(verdicts)} verdicts for {len(texts)} replies"
            return unchecked, CHECKER_ERROR, detail
        # Only a real bool decides: a truthy "no" or 1 from a confused checker fails closed.
        malformed = [v for v in verdicts if not isinstance(getattr(v, "safe", None), bool)]
        if malformed:
            seen = getattr(malformed[0], "safe", "no 'safe' field")
            detail = f"checker verdict 'safe' must be a bool, got {seen!r}"
            return unchecked, CHECKER_ERROR, detail
        return verdicts, None, ""

    def _emit(self, event: ServingEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)


def serve(
    policy: Policy,
    config: ServingConfig | None = None,
    *,
    on_event: Callable[[ServingEvent], None] | None = None,
    name: str | None = None,
) -> SafeServingPolicy:
    """``policy`` behind the fail-closed safety check ``config`` describes (default settings
    when None): the serving path of every command that serves simulated users.

    Args:
        policy: the model (or planted wrapper) that writes the replies.
        config: the scenario's ``[serving]`` table.
        on_event: called with each ``ServingEvent`` (the run store records them).
        name: label in logs and events; default the policy's name.
    """
    from rewards.safety import SafetyChecker

    config = config or ServingConfig()
    return SafeServingPolicy(
        policy,
        SafetyChecker(config.categories, config.offensive_threshold),
        timeout_s=config.timeout_s,
        fallback=config.fallback_reply,
        on_event=on_event,
        name=name,
    )
