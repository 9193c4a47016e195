"""The world: its configuration (the ``[world]`` table of a scenario file) and its parts.

``WorldConfig`` is what a scenario says about the simulated world; ``World.build`` turns it
into characters, a user sampler, the gold model, the LLM-simulated user and the
``ConversationEngine``, all seeded from one seed. A scenario file carries it as::

    [world]
    characters_dir = "characters"      # relative to the scenario file
    turn_cap = 6
    pii_rate = 0.02

    [world.user_llm]
    max_new_tokens = 96
    [world.user_llm.policy]            # policies.PolicySpec
    model = "smollm2"

    [world.gold]                       # sim.gold.GoldConfig
    like_emoji_appeal = 1.0

    [[world.population.segments]]      # sim.population.SegmentConfig
    name = "casual"
    share = 1.0

``scenarios/world_example.toml`` is a complete example; ``scenarios/world_artifact_trap.toml``
is a world where emoji and long replies earn likes today and cost satisfaction later.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.base import Policy, SamplingParams
from policies.spec import PolicySpec
from rewards.embeddings import Embedder
from sim.characters import Character, load_characters, select_characters
from sim.chitchat import ChitchatCorpus, load_chitchat
from sim.conversation import ConversationEngine
from sim.gold import GoldConfig, GoldModel
from sim.population import PopulationConfig, UserSampler
from sim.user_llm import MAX_MESSAGE_WORDS, UserSimulator

# The repository's shipped characters: the default cast.
DEFAULT_CHARACTERS_DIR = Path(__file__).resolve().parents[1] / "scenarios" / "characters"


class UserLLMConfig(BaseModel):
    """The LLM that writes simulated users' messages and how it samples."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicySpec = Field(
        default_factory=PolicySpec,
        description="Backend and model for the simulated user (default: packaged SmolLM2).",
    )
    max_new_tokens: int = Field(
        default=96,
        ge=1,
        description="Token cap per user message draft; drafts are cut at their length "
        "target, so it must let most run past max_message_words (about 1.2 tokens a word).",
    )
    temperature: float = Field(default=0.9, ge=0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_message_words: int = Field(
        default=MAX_MESSAGE_WORDS,
        ge=1,
        description="Cap on the per-message length targets drawn from human messages.",
    )
    length_user_share: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of message-length spread between users (sim.population."
        "MessageLengths); default: fitted on the chit-chat train split (about 0.2).",
    )

    def params(self, seed: int) -> SamplingParams:
        """Sampling params for one user-LLM call."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
        )


class ChitchatConfig(BaseModel):
    """How the human chit-chat corpus is split and used."""

    model_config = ConfigDict(extra="forbid")

    heldout_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of conversations kept out for evaluation."
    )
    split_seed: int = Field(default=0, description="Seed of the train / held-out split.")
    opener_split: Literal["train", "heldout"] = Field(
        default="train", description="Where openers come from ('heldout' only for evaluation)."
    )


# [world] keys that runs stored by earlier versions may hold: ``length_cap_factor`` capped a
# user's messages at a multiple of their typical length, before per-message length targets.
RETIRED_KEYS = {"user_llm": ("length_cap_factor",)}


class WorldConfig(BaseModel):
    """The simulated world of a scenario (its ``[world]`` table). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    characters_dir: Path = Field(
        default=DEFAULT_CHARACTERS_DIR,
        description="Folder of character TOML files (relative paths: to the scenario file).",
    )
    characters: list[str] | None = Field(
        default=None, description="Names of the characters in play (default: all in the folder)."
    )
    population: PopulationConfig = Field(
        default_factory=PopulationConfig, description="User segments and trait distributions."
    )
    gold: GoldConfig = Field(
        default_factory=GoldConfig, description="Gold utility, response model and dynamics."
    )
    user_llm: UserLLMConfig = Field(
        default_factory=UserLLMConfig, description="The LLM that writes users' messages."
    )
    chitchat: ChitchatConfig = Field(
        default_factory=ChitchatConfig, description="Openers and length calibration data."
    )
    turn_cap: int = Field(default=8, ge=1, description="Most bot replies in one session.")
    pii_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of user messages with planted PII."
    )
    character_affinity: float = Field(
        default=2.0, ge=0, description="How strongly users pick characters by topic interest."
    )
    stickiness: float = Field(
        default=0.7, ge=0, le=1, description="Chance a returning user keeps their last character."
    )

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> WorldConfig:
        """The world a run stored with its experiment. Keys a later version retired
        (``RETIRED_KEYS``) are dropped, so older runs stay readable; a scenario file that
        still sets one is refused as usual."""
        user_llm = {
            k: v
            for k, v in dict(data.get("user_llm") or {}).items()
            if k not in RETIRED_KEYS["user_llm"]
        }
        return cls.model_validate({**data, "user_llm": user_llm} if user_llm else dict(data))

    def resolved(self, base_dir: Path) -> WorldConfig:
        """A copy with a relative ``characters_dir`` made relative to ``base_dir``."""
        if self.characters_dir.is_absolute():
            return self
        return self.model_copy(update={"characters_dir": (base_dir / self.characters_dir)})


def parse_world(
    data: dict, source: str = "<scenario>", base_dir: Path | None = None
) -> WorldConfig:
    """Validate a ``[world]`` table; errors name the source file and the fields."""
    try:
        config = WorldConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{source}: invalid [world] table\n{err}") from err
    return config.resolved(base_dir) if base_dir is not None else config


def load_world_config(path: str | Path) -> WorldConfig:
    """The ``[world]`` table of a scenario TOML file (defaults where it has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    return parse_world(data.get("world", {}), source=str(path), base_dir=path.parent)


@dataclass
class World:
    """The world's parts, built from a ``WorldConfig`` and a seed.

    ``rng`` is the world's generator (users are sampled with it); the engine's sessions
    derive their own generators from the generator passed to ``open_sessions``.
    """

    config: WorldConfig
    seed: int
    rng: np.random.Generator
    characters: dict[str, Character]
    corpus: ChitchatCorpus
    sampler: UserSampler
    gold: GoldModel
    user_simulator: UserSimulator
    engine: ConversationEngine

    @classmethod
    def build(
        cls,
        config: WorldConfig | None = None,
        seed: int = 0,
        user_policy: Policy | None = None,
        embedder: Embedder | None = None,
    ) -> World:
        """Build every part. ``user_policy`` / ``embedder`` override the configured ones
        (tests pass a tiny model); by default they are loaded from the config."""
        config = config or WorldConfig()
        characters = select_characters(load_characters(config.characters_dir), config.characters)
        corpus = load_chitchat(config.chitchat.heldout_fraction, config.chitchat.split_seed)
        rng = np.random.default_rng(seed)
        sampler = UserSampler(
            config.population,
            np.random.default_rng(rng.integers(2**63 - 1)),
            message_words=corpus.message_words("train"),
        )
        if user_policy is None:
            from policies import load_policy

            user_policy = load_policy(config.user_llm.policy)
        if embedder is None:
            from rewards.embeddings import get_embedder

            embedder = get_embedder()
        gold = GoldModel(config.gold)
        user_simulator = UserSimulator(
            user_policy,
            corpus,
            pii_rate=config.pii_rate,
            max_message_words=config.user_llm.max_message_words,
            length_user_share=config.user_llm.length_user_share,
            split=config.chitchat.opener_split,
        )
        engine = ConversationEngine(
            characters,
            user_simulator,
            gold,
            embedder,
            turn_cap=config.turn_cap,
            character_affinity=config.character_affinity,
            stickiness=config.stickiness,
        )
        return cls(config, seed, rng, characters, corpus, sampler, gold, user_simulator, engine)

    def user_params(self, seed: int) -> SamplingParams:
        """Sampling params for one user-LLM call."""
        return self.config.user_llm.params(seed)
