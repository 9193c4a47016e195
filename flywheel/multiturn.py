"""Multi-turn GRPO with the simulator's LLM-simulated users on the other side.

``SimulatedUsers`` is ``training.multiturn.UserSide`` on the world's ``ConversationEngine``,
the engine ``sim.env.ChatEnv`` and ``VectorChatEnv`` step, making the calls
``VectorChatEnv.step`` makes: the policy's replies of every open conversation scored at
once (``apply_replies``: features, checkers, the gold's reaction), then ONE user-LLM call
for all conversations still open (``user_turn``). It does not go through the env classes
themselves because a GRPO group needs what they do not offer: the same user opened G times
with the same seed. The envs draw their own users and open sessions without seeds (one
generator then both writes and draws signals, sim.conversation), and ``VectorChatEnv``
restarts a finished conversation with a new user.

Common random numbers: a row names a user of the pool and a seed; each of the G
conversations of its group gets its own copy of that user (the gold model moves the user's
latent state as the chat goes), opened with the row's seed, so the character, the opener,
the fallback and PII draws and the user's like / report / continue uniforms at every turn
are the same across the group. The user LLM's own sampling is not: one batched call writes
every conversation's message and its draws depend on the batch (``policies.hf``).

What crosses to training: the chats and the users' messages, and whether the user ended
the chat (which the flywheel sees in its logs). The gold utility stays here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from policies.base import Chat
from sim.conversation import Session
from sim.population import User, UserSampler
from sim.world import World

if TYPE_CHECKING:
    from training.multiturn import MultiTurnSettings
    from training.recipes import GRPOBuild, GRPORecipe

SESSION_HOUR = 12.0  # hour of day the training conversations happen at (the envs' choice)


def draw_users(world: World, n: int, rng: np.random.Generator, prefix: str) -> list[User]:
    """``n`` new users of ``world``'s population drawn with ``rng``, ids ``{prefix}000000``...
    (a separate draw, and prefix, for the held-out users of an evaluation)."""
    words = world.corpus.message_words("train")
    return UserSampler(world.config.population, rng, words, id_prefix=prefix).sample(n)


class SimulatedUsers:
    """The world's simulated users as the other side of multi-turn GRPO.

    Args:
        world: the built world (characters, user LLM, gold model, embedder).
        users: the pool rows draw from (``draw_users``); never mutated, each conversation
            talks to a copy.
        day: the simulated day the conversations happen on.
    """

    def __init__(self, world: World, users: Sequence[User], day: int = 0) -> None:
        if not users:
            raise ValueError("SimulatedUsers needs at least one user; fix: draw_users(world, n)")
        self.world = world
        self.users = list(users)
        self.day = day
        self._sessions: list[Session] = []
        self._seeds: list[int] = []
        self._turn = 0

    def _open_sessions(self, user_index: Sequence[int], seeds: Sequence[int]) -> list[Session]:
        for index in user_index:
            if not 0 <= index < len(self.users):
                raise ValueError(
                    f"row names user {index} but the pool holds {len(self.users)}; fix: rows "
                    "from this SimulatedUsers' rows()"
                )
        return self.world.engine.open_sessions(
            [copy.deepcopy(self.users[i]) for i in user_index],
            self.day,
            SESSION_HOUR,
            np.random.default_rng(0),  # unused: every session has its own seed
            seeds=[[int(s)] for s in seeds],
        )

    def rows(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        """One GRPO dataset row per user of the pool: its opening (``prompt``, the
        character the user chose), the user's index and a seed drawn with ``rng``."""
        seeds = [int(s) for s in rng.integers(2**31 - 1, size=len(self.users))]
        sessions = self._open_sessions(range(len(self.users)), seeds)
        return [
            {
                "prompt": self.world.engine.bot_chat(s),
                "character": s.character.name,
                "user": i,
                "seed": seed,
            }
            for i, (s, seed) in enumerate(zip(sessions, seeds, strict=True))
        ]

    def open(self, rows: Sequence[Mapping[str, Any]]) -> list[Chat]:
        """Open one conversation per row with a copy of its user and its seed."""
        self._seeds = [int(row["seed"]) for row in rows]
        self._sessions = self._open_sessions([int(row["user"]) for row in rows], self._seeds)
        self._turn = 0
        return [self.world.engine.bot_chat(s) for s in self._sessions]

    def reply(self, conversations: Sequence[int], replies: Sequence[str]) -> list[str | None]:
        """Score the replies, draw the users' reactions, then write the next message of
        every conversation the user stays in with one user-LLM call (None: the user left,
        reported, said goodbye before this reply, or the world's turn cap was reached)."""
        engine = self.world.engine
        sessions = [self._sessions[i] for i in conversations]
        engine.apply_replies(sessions, list(replies))
        live = [s for s in sessions if not s.ended]
        # One seed per batch and turn, from the rows' seeds: the same rows write alike.
        entropy = np.random.SeedSequence([self._turn, *self._seeds]).generate_state(1)
        engine.user_turn(live, self.world.user_params(int(entropy[0] >> 1)))
        self._turn += 1
        return [None if s.ended else s.messages[-1]["content"] for s in sessions]

    @property
    def sessions(self) -> list[Session]:
        """The conversations of the latest ``open`` (for evaluation and tests; they hold
        the oracle, which training never reads)."""
        return list(self._sessions)


def train_in_conversations(
    recipe: GRPORecipe,
    train: pd.DataFrame,
    world: World,
    model_args: Any,
    out: str | Path,
    *,
    checkers: Mapping[str, Sequence[Any]],
    users: int,
    seed: int,
    rng: np.random.Generator,
    settings: MultiTurnSettings | None = None,
    scorer: Any | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[GRPOBuild, Path]:
    """Multi-turn GRPO of ``recipe`` from ``model_args``: its rewards calibrated on the
    curated ``train`` split's logged replies, its conversations held with ``users`` new
    simulated users of ``world``, all drawn with ``rng`` in that order (the reference
    replies, the users, the rows' seeds). The trainer works in ``out/trainer``.

    Returns the build (rewards, weights, what ``describe`` records) and the merged
    checkpoint folder ``out``. ``flywheel train grpo --multiturn`` and a scenario's
    ``kind = "grpo_multiturn"`` recipe both train through here.
    """
    from training.multiturn import train_multiturn
    from training.recipes import build_grpo, logged_reference

    reference = logged_reference(
        None, list(train["prompt"]), list(train["completion"]),
        list(train["character"]), recipe, rng,
    )  # fmt: skip
    build = build_grpo(recipe, checkers, reference, Path(out) / "trainer", seed, scorer)
    side = SimulatedUsers(world, draw_users(world, users, rng, "train-"))
    return build, train_multiturn(build, side.rows(rng), side, model_args, out, settings, callbacks)


def run_grpo_multiturn(
    turns: pd.DataFrame,
    world: World,
    model: str,
    out: str | Path,
    steps: int,
    *,
    users: int = 64,
    settings: MultiTurnSettings | None = None,
    scorer: Any | None = None,
    seed: int = 0,
    use_peft: bool = True,
    overrides: Mapping[str, Any] | None = None,
    hold_rates: Sequence[str] = (),
    callbacks: Sequence[Any] = (),
) -> Path:
    """``flywheel train grpo --multiturn``: ``training.recipes.run_grpo``'s recipe
    (``cli_recipe``; held rates counted, as a conversation has no per-reply token estimate)
    calibrated on the logged ``turns``' curated train replies, trained in conversations with
    ``users`` new simulated users of ``world``; returns the merged checkpoint folder."""
    from training.models import model_config
    from training.recipes import cli_recipe, curated

    recipe = replace(cli_recipe(steps, hold_rates, overrides), rate_estimate="count")
    system_prompts = {name: c.system_prompt() for name, c in world.characters.items()}
    data = curated(turns, system_prompts, seed)
    _, checkpoint = train_in_conversations(
        recipe, data.train, world, model_config(model, use_peft=use_peft), out,
        checkers={name: c.checkers for name, c in world.characters.items()},
        users=users, seed=seed, rng=np.random.default_rng(seed), settings=settings,
        scorer=scorer, callbacks=callbacks,
    )  # fmt: skip
    return checkpoint
