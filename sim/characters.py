"""Characters: a persona plus verifiable instructions, loaded from scenario TOML files.

A character file (``scenarios/characters/<name>.toml``)::

    name = "Captain Mara"
    persona = "A retired sea captain who tells salty stories about storms and far ports."
    topics = ["travel", "history"]

    [instructions]          # kind = parameter, see rewards.checkers.build_checkers
    max_words = 40
    no_emoji = true
    starts_with = "Ahoy"

The system prompt is rendered from the persona and the same instructions that
``rewards.checkers`` verifies, so what the policy is told and what is checked cannot drift.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rewards.checkers import Checker, CheckResult, build_checkers, run_checkers
from rewards.features import ReplyContext

# The topic vocabulary shared by characters and user interests (sim.population).
TOPICS = (
    "music",
    "sports",
    "food",
    "travel",
    "movies",
    "games",
    "science",
    "books",
    "pets",
    "fashion",
    "history",
    "wellbeing",
)


class CharacterSpec(BaseModel):
    """One character file, validated (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Display name, unique across the scenario.")
    persona: str = Field(
        min_length=10, description="Who the character is, in the second person or third."
    )
    topics: list[str] = Field(
        default_factory=list, description=f"Topics the character talks about, from {TOPICS}."
    )
    instructions: dict[str, Any] = Field(
        default_factory=dict,
        description="Verifiable instructions, `kind = parameter` (rewards.checkers).",
    )

    @field_validator("topics")
    @classmethod
    def _known_topics(cls, topics: list[str]) -> list[str]:
        unknown = [t for t in topics if t not in TOPICS]
        if unknown:
            raise ValueError(f"unknown topics {unknown}; fix: use topics from {list(TOPICS)}")
        return topics


@dataclass(frozen=True)
class Character:
    """A character the policy plays: persona, topics and checkers."""

    name: str
    persona: str
    checkers: tuple[Checker, ...] = ()
    topics: tuple[str, ...] = ()
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        kinds = [c.__name__ for c in self.checkers]
        dupes = sorted({k for k in kinds if kinds.count(k) > 1})
        if dupes:
            raise ValueError(
                f"character {self.name!r} has more than one {dupes} instruction; "
                "fix: keep one checker per kind"
            )

    @classmethod
    def from_spec(cls, spec: CharacterSpec, source: str = "") -> Character:
        """Build a character, turning its instruction table into checkers."""
        where = f"{source or spec.name}: instructions"
        return cls(
            name=spec.name,
            persona=spec.persona.strip(),
            checkers=tuple(build_checkers(spec.instructions, where=where)),
            topics=tuple(spec.topics),
            source=source,
        )

    def system_prompt(self) -> str:
        """The system prompt: persona, then the app framing and one line per instruction."""
        return f"You are {self.name}. {self.persona}\n{self.rules_prompt()}"

    def rules_prompt(self) -> str:
        """The system prompt below the persona line: the app framing and the rules. A reply
        that reads like this text recites its instructions (``prompt_leak``)."""
        lines = ["You are chatting with a user in an app."]
        if self.checkers:
            lines.append("Rules:")
            lines.extend(f"- {c.instruction}" for c in self.checkers)
        return "\n".join(lines)

    def reply_context(
        self, user_message: str, previous_replies: tuple[str, ...] = ()
    ) -> ReplyContext:
        """What a reply's features need from this character (``rewards.features``)."""
        return ReplyContext(user_message, self.persona, previous_replies, self.rules_prompt())

    def check(self, reply: str) -> CheckResult:
        """Run this character's checkers on ``reply``."""
        return run_checkers(reply, self.checkers)


def load_character(path: str | Path) -> Character:
    """One character from a TOML file; errors name the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    try:
        spec = CharacterSpec.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid character file\n{err}") from err
    return Character.from_spec(spec, source=str(path))


def load_characters(path_or_dir: str | Path) -> dict[str, Character]:
    """Characters by name from a TOML file or every ``*.toml`` in a folder (sorted)."""
    path = Path(path_or_dir)
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise FileNotFoundError(f"no *.toml character files in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"character path {path} does not exist")
    out: dict[str, Character] = {}
    for file in files:
        character = load_character(file)
        if character.name in out:
            raise ValueError(
                f"{file}: character name {character.name!r} is already used by "
                f"{out[character.name].source}; fix: give each character a unique name"
            )
        out[character.name] = character
    return out


def select_characters(
    available: Mapping[str, Character], names: list[str] | None
) -> dict[str, Character]:
    """The named subset of ``available`` (all when ``names`` is None), in the given order."""
    if names is None:
        return dict(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"world.characters names {unknown}, which are not defined; "
            f"fix: use names from {sorted(available)}"
        )
    return {n: available[n] for n in names}
