"""The one interface every chat-model backend implements.

A *chat* is a list of OpenAI-style messages: ``{"role": "system"|"user"|"assistant",
"content": str}``. The system prompt, when present, comes first; the last message is the
one being answered. Backends generate one reply per chat for a whole batch at once,
because batching is where the throughput is (see benchmarks/generation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Message = dict[str, str]
Chat = list[Message]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a reply. ``seed`` makes a batch reproducible."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be >= 1, got {self.max_new_tokens}; ask for at least one token"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Generation:
    """One generated reply and what it cost.

    ``completion_ids``: the sampled token ids up to and including the stop token, where
    the backend returns them (transformers does; others leave it empty).
    ``serving_event``: empty when ``text`` is what the model wrote; otherwise the kind of
    ``sim.serving`` event that replaced the model's reply by ``text`` (``blocked``,
    ``checker_error``, ``checker_timeout``).
    ``cached_tokens``: of the ``prompt_tokens``, how many the backend served from its prefix
    cache instead of encoding them (0 where it has none or does not say).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    completion_ids: tuple[int, ...] = ()
    serving_event: str = ""
    cached_tokens: int = 0


@runtime_checkable
class Policy(Protocol):
    """A chat model that answers a batch of chats."""

    name: str

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Return one reply per chat, in order."""
        ...


def validate_chat(chat: Chat, index: int = 0) -> None:
    """Fail fast on a malformed chat, naming the message and the fix."""
    if not chat:
        raise ValueError(f"chat {index} is empty; give at least one user message")
    for j, message in enumerate(chat):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"chat {index} message {j} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(f"chat {index} message {j} has no string 'content'")
        if role == "system" and j != 0:
            raise ValueError(f"chat {index} message {j} is a system message; put it first")
