"""Gymnasium environments: one conversation (``ChatEnv``) or many at once (``VectorChatEnv``).

Both sit on the world's ``ConversationEngine``; the agent plays the *character* and the
world plays the user (an LLM writes the user's messages, the gold model decides whether
the user likes, reports or leaves). Registered as ``flywheel/SocialChat-v0`` when ``sim`` is
imported (``gymnasium.make`` / ``gymnasium.make_vec``).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import emoji
import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from policies.base import Chat
from sim.conversation import END_TURN_CAP, Session, TurnRecord
from sim.population import User, UserSampler
from sim.world import World, WorldConfig, load_world_config

REPLACEMENT_CHAR = "\ufffd"


def _charset() -> str:
    """Characters observations and actions may hold: printable ASCII, Latin, Greek, Cyrillic,
    general punctuation and common symbols, every code point used by an emoji sequence
    (skin tones, ZWJ, variation selectors) and U+FFFD, which replaces anything else."""
    ranges = [
        (0x00A0, 0x024F),  # Latin-1 supplement, Latin extended A/B
        (0x0370, 0x04FF),  # Greek, Cyrillic
        (0x2000, 0x206F),  # general punctuation (curly quotes, ellipsis, ZWJ)
        (0x20A0, 0x20CF),  # currency symbols
        (0x2100, 0x21FF),  # letterlike symbols, arrows
        (0x2600, 0x27BF),  # misc symbols, dingbats
    ]
    chars = set(string.printable) - {"\x0b", "\x0c", "\r"}
    for low, high in ranges:
        chars.update(chr(c) for c in range(low, high + 1))
    for sequence in emoji.EMOJI_DATA:
        chars.update(sequence)
    chars.add(REPLACEMENT_CHAR)
    return "".join(sorted(chars))


CHARSET = _charset()
_CHARSET_SET = frozenset(CHARSET)


def sanitize(text: str) -> str:
    """``text`` with every character outside ``CHARSET`` replaced by U+FFFD."""
    return "".join(c if c in _CHARSET_SET else REPLACEMENT_CHAR for c in text)


@dataclass(frozen=True)
class RewardWeights:
    """Engagement reward: ``continued * continued + liked * liked - reported * reported``."""

    continued: float = 1.0
    liked: float = 1.0
    reported: float = 5.0

    def __call__(self, record: TurnRecord) -> float:
        return (
            self.continued * record.continued
            + self.liked * record.liked
            - self.reported * record.reported
        )


def render_chat(chat: Chat, max_chars: int) -> str:
    """``role: content`` lines, sanitised; the oldest text is cut to fit ``max_chars``."""
    text = sanitize("\n".join(f"{m['role']}: {m['content']}" for m in chat))
    return text[-max_chars:]


def step_info(record: TurnRecord) -> dict[str, Any]:
    """The info of one step: signals, features, checks and the oracle (evaluation only)."""
    return {
        "signals": {
            "continued": record.continued,
            "liked": record.liked,
            "reported": record.reported,
        },
        "features": dict(record.features),
        "checks": dict(record.checks),
        "follows_all": record.follows_all,
        "violates_any": record.violates_any,
        "unsafe": record.unsafe,
        "oracle": {"gold_satisfaction": record.gold_satisfaction},
    }


def _build_world(world: World | None, scenario: str | Path | None, world_seed: int) -> World:
    if world is not None:
        return world
    config = load_world_config(scenario) if scenario is not None else WorldConfig()
    return World.build(config, seed=world_seed)


class _UserDraws:
    """Draws env users with the env's generator; ids are random hex so they are seeded too."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.message_words = world.corpus.message_words("train")

    def draw(self, rng: np.random.Generator, n: int) -> list[User]:
        sampler = UserSampler(self.world.config.population, rng, self.message_words)
        users = sampler.sample(n)
        for user in users:
            user.user_id = f"env-{int(rng.integers(16**8)):08x}"
        return users


class ChatEnv(gym.Env[str, str]):
    """One conversation between a sampled simulated user and a character.

    **Observation**: the conversation so far as seen by the character, rendered as
    ``system: ...`` / ``user: ...`` / ``assistant: ...`` lines (the system prompt carries the
    persona and the instructions); characters outside ``CHARSET`` become U+FFFD and the
    oldest text is cut beyond ``max_observation_chars``. ``info["chat"]`` holds the same
    conversation as structured messages for ``policies`` backends.

    **Action**: the character's next message, a string of up to ``max_action_chars``.

    **Reward**: the engagement signal of that message, ``RewardWeights`` (default: +1 if
    the user writes again, +1 if they like it, -5 if they report it).

    **Episode end**: *terminated* when the user leaves or reports; *truncated* when the
    world's turn cap is reached with the user still there.

    **Info** (every step, a fresh dict): ``signals`` (continued / liked / reported),
    ``features`` (``rewards.features``), ``checks`` (the character's checkers),
    ``follows_all``, ``violates_any``, ``unsafe``, ``chat`` and ``oracle`` (the gold
    satisfaction: for evaluation only, never for training rewards); at the end also
    ``session`` (the ``SessionRecord`` row).

    **Arguments**: ``world`` (a built ``World``; default: built from ``scenario`` or the
    default ``WorldConfig`` with seed ``world_seed``, loading the packaged SmolLM2 as the
    user LLM), ``character`` (pin one character; default: users choose), ``reward_weights``,
    ``max_observation_chars``, ``max_action_chars``, ``render_mode`` (``"ansi"``).
    ``reset(options=...)`` accepts ``character``, ``user`` (a ``sim.population.User`` to
    continue with) and ``day``.

    >>> import gymnasium, sim  # doctest: +SKIP
    >>> env = gymnasium.make("flywheel/SocialChat-v0", world=world)  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
    >>> obs, reward, terminated, truncated, info = env.step("Ahoy! Tell me more?")  # doctest: +SKIP
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        world: World | None = None,
        scenario: str | Path | None = None,
        world_seed: int = 0,
        character: str | None = None,
        reward_weights: RewardWeights | None = None,
        max_observation_chars: int = 4096,
        max_action_chars: int = 1024,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        self.world = _build_world(world, scenario, world_seed)
        if character is not None and character not in self.world.characters:
            raise ValueError(
                f"character {character!r} is not in the world; "
                f"fix: one of {sorted(self.world.characters)}"
            )
        self.character = character
        self.reward_weights = reward_weights or RewardWeights()
        self.max_observation_chars = max_observation_chars
        self.render_mode = render_mode
        self.observation_space = spaces.Text(max_length=max_observation_chars, charset=CHARSET)
        self.action_space = spaces.Text(max_length=max_action_chars, charset=CHARSET)
        self._draws = _UserDraws(self.world)
        self._session: Session | None = None

    @property
    def session(self) -> Session | None:
        """The conversation in progress (None before the first reset)."""
        return self._session

    def _chat(self) -> Chat:
        assert self._session is not None
        return self.world.engine.bot_chat(self._session)

    def _observation(self) -> str:
        return render_chat(self._chat(), self.max_observation_chars)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Sample a user (or take ``options['user']``) and write their first message."""
        super().reset(seed=seed)
        options = options or {}
        user = options.get("user") or self._draws.draw(self.np_random, 1)[0]
        character = options.get("character", self.character)
        day = int(options.get("day", 0))
        self._session = self.world.engine.open_sessions(
            [user],
            day,
            12.0,
            self.np_random,
            characters=[character] if character is not None else None,
        )[0]
        info = {
            "user_id": user.user_id,
            "segment": user.segment,
            "character": self._session.character.name,
            "chat": self._chat(),
        }
        return self._observation(), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Score the character's message, draw the user's reaction, write their reply."""
        session = self._session
        if session is None:
            raise RuntimeError("ChatEnv.step called before reset(); call reset() first")
        if session.ended:
            raise RuntimeError(
                f"ChatEnv.step called after the episode ended ({session.end_reason}); "
                "call reset() first"
            )
        if not isinstance(action, str):
            raise TypeError(f"ChatEnv action must be a str, got {type(action).__name__}")
        engine = self.world.engine
        record = engine.apply_replies([session], [action])[0]
        if not session.ended:
            seed = int(self.np_random.integers(2**31 - 1))
            engine.user_turn([session], self.world.user_params(seed))
        terminated = session.ended and session.end_reason != END_TURN_CAP
        truncated = session.ended and session.end_reason == END_TURN_CAP
        info = step_info(record) | {"chat": self._chat()}
        if session.ended:
            info["session"] = engine.close_session(session).to_row()
        return self._observation(), float(self.reward_weights(record)), terminated, truncated, info

    def render(self) -> str | None:
        """The transcript as text (``render_mode="ansi"``)."""
        if self.render_mode != "ansi" or self._session is None:
            return None
        return self._session.transcript()


class VectorChatEnv(VectorEnv):
    """``num_envs`` conversations stepped together, with batched scoring and ONE user-LLM
    call per step for every conversation still open.

    Same observation, action, reward and episode semantics as ``ChatEnv``; spaces are
    ``Tuple``s of ``Text``. Autoreset is ``NEXT_STEP``: after a conversation ends, the next
    ``step`` ignores its action and starts a new conversation (reward 0). To answer all
    conversations with one batched policy call::

        actions = [g.text for g in policy.generate(venv.chats(), params)]
        obs, rewards, terminated, truncated, infos = venv.step(actions)
    """

    metadata: ClassVar[dict[str, Any]] = {
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": [],
    }

    def __init__(
        self,
        num_envs: int,
        world: World | None = None,
        scenario: str | Path | None = None,
        world_seed: int = 0,
        character: str | None = None,
        reward_weights: RewardWeights | None = None,
        max_observation_chars: int = 4096,
        max_action_chars: int = 1024,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.world = _build_world(world, scenario, world_seed)
        self.character = character
        self.reward_weights = reward_weights or RewardWeights()
        self.max_observation_chars = max_observation_chars
        self.single_observation_space = spaces.Text(
            max_length=max_observation_chars, charset=CHARSET
        )
        self.single_action_space = spaces.Text(max_length=max_action_chars, charset=CHARSET)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._draws = _UserDraws(self.world)
        self._sessions: list[Session] = []
        self._day = 0

    def chats(self) -> list[Chat]:
        """The character-side chat of every conversation (for one batched generate call)."""
        return [self.world.engine.bot_chat(s) for s in self._sessions]

    def _open(self, n: int) -> list[Session]:
        users = self._draws.draw(self.np_random, n)
        pinned = [self.character] * n if self.character is not None else None
        return self.world.engine.open_sessions(users, self._day, 12.0, self.np_random, pinned)

    def _observations(self) -> tuple[str, ...]:
        return tuple(render_chat(chat, self.max_observation_chars) for chat in self.chats())

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        """Start ``num_envs`` new conversations (``options['day']`` sets the day)."""
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        self._day = int((options or {}).get("day", 0))
        self._sessions = self._open(self.num_envs)
        infos: dict[str, Any] = {}
        for i, s in enumerate(self._sessions):
            infos = self._add_info(
                infos, {"user_id": s.user.user_id, "character": s.character.name}, i
            )
        return self._observations(), infos

    def step(
        self, actions: Sequence[str]
    ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Apply every open conversation's action, batched; restart finished ones."""
        if not self._sessions:
            raise RuntimeError("VectorChatEnv.step called before reset(); call reset() first")
        actions = tuple(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got {len(actions)}")
        engine = self.world.engine
        rewards = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        restart = [i for i, s in enumerate(self._sessions) if s.closed]
        active = [i for i, s in enumerate(self._sessions) if not s.closed]
        records = engine.apply_replies(
            [self._sessions[i] for i in active], [actions[i] for i in active]
        )
        live = [self._sessions[i] for i in active if not self._sessions[i].ended]
        engine.user_turn(live, self.world.user_params(int(self.np_random.integers(2**31 - 1))))
        for i, record in zip(active, records, strict=True):
            session = self._sessions[i]
            rewards[i] = self.reward_weights(record)
            info = step_info(record)
            if session.ended:
                terminated[i] = session.end_reason != END_TURN_CAP
                truncated[i] = session.end_reason == END_TURN_CAP
                info["session"] = engine.close_session(session).to_row()
            infos = self._add_info(infos, info, i)
        if restart:
            for i, session in zip(restart, self._open(len(restart)), strict=True):
                self._sessions[i] = session
        return self._observations(), rewards, terminated, truncated, infos
