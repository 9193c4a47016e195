"""Simulated annotators: users who say which of two replies they prefer.

A pairwise reward model needs comparisons: two replies to the same context and which one
a person preferred. Here the person is a simulated user (a member of the annotator
*panel*, usually the world's population), and the preference comes from the gold utility
(``sim.gold``, the ORACLE) through Bradley-Terry noise::

    P(annotator prefers a) = sigmoid((U_annotator(a) - U_annotator(b)) / noise)

``U_annotator`` is the gold utility of the reply for *that annotator* (their traits and
current latent state: emoji fatigue and all) in the conversation's context (the user's
message, the character, the bot's earlier replies). Two knobs set label quality:

- ``noise``: the Bradley-Terry temperature; small = annotators almost always pick the
  reply with the higher utility, large = coin flips.
- ``disagreement``: the share of judgements made by a random panel member instead of the
  user whose conversation it was. 0 = each pair is judged by its own user (one taste per
  context); 1 = always a stranger (tastes differ, so annotators disagree).

Pairs come from logged traffic (:func:`pairs_from_turns`): the logged reply and an
alternative written by a policy for the same conversation state, in one batched
``generate`` call. Labels are returned as :class:`ComparisonRecord` rows; ``flywheel/``
stores them in the run store. Columns ``gold_*`` are the oracle and are dropped by
``rewards.datasets`` before any model sees the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import expit

from policies.base import Chat, Policy, SamplingParams
from rewards.embeddings import Embedder
from rewards.features import reply_features
from sim.characters import Character
from sim.gold import GoldModel, ReplyAssessment, assess_replies
from sim.population import User

CHOICES = ("a", "b")


class AnnotatorConfig(BaseModel):
    """How simulated annotators judge pairs (the ``[annotators]`` table of a scenario)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise: float = Field(
        0.5,
        gt=0,
        description="Bradley-Terry temperature in gold-utility units: "
        "P(a) = sigmoid((U(a) - U(b)) / noise).",
    )
    disagreement: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of judgements by a random panel member instead of the "
        "conversation's own user.",
    )
    labels_per_pair: int = Field(1, ge=1, description="Independent judgements of each pair.")


@dataclass(frozen=True)
class PairToJudge:
    """Two replies to the same conversation state."""

    pair_id: str
    user_id: str  # whose conversation it is
    character: str
    context: str  # the user's message both replies answer
    previous_replies: tuple[str, ...]  # the bot's earlier replies in the session
    reply_a: str
    reply_b: str
    day: int = 0


@dataclass(frozen=True)
class ComparisonRecord:
    """One annotator's judgement of one pair. ``gold_*`` fields are the ORACLE."""

    pair_id: str
    user_id: str
    annotator_id: str
    character: str
    day: int
    context: str
    reply_a: str
    reply_b: str
    choice: str  # "a" or "b"
    gold_utility_a: float
    gold_utility_b: float
    gold_p_a: float  # the Bradley-Terry probability the choice was drawn with

    def to_row(self) -> dict[str, Any]:
        """A flat dict for a DataFrame / DuckDB row."""
        return asdict(self)


class SimulatedAnnotators:
    """Label pairs of replies with the gold utility of sampled users (module docstring).

    Args:
        gold: the world's gold model.
        characters: the cast by name (instructions are part of the utility).
        panel: users who may annotate; a pair's own user is looked up here by id.
        embedder: MiniLM encoder for the relevance / persona features.
        config: noise and disagreement.
    """

    def __init__(
        self,
        gold: GoldModel,
        characters: Mapping[str, Character],
        panel: Sequence[User],
        embedder: Embedder,
        config: AnnotatorConfig | None = None,
    ) -> None:
        if not panel:
            raise ValueError("SimulatedAnnotators needs a non-empty panel of users")
        if not characters:
            raise ValueError("SimulatedAnnotators needs the world's characters")
        self.gold = gold
        self.characters = dict(characters)
        self.panel = list(panel)
        self.by_id = {u.user_id: u for u in self.panel}
        self.embedder = embedder
        self.config = config or AnnotatorConfig()

    def _character(self, name: str) -> Character:
        if name not in self.characters:
            raise ValueError(
                f"pair names unknown character {name!r}; fix: one of {sorted(self.characters)}"
            )
        return self.characters[name]

    def assess(self, pairs: Sequence[PairToJudge]) -> list[tuple[ReplyAssessment, ReplyAssessment]]:
        """What the gold model reads about both replies of every pair (ONE encode call)."""
        replies = [p.reply_a for p in pairs] + [p.reply_b for p in pairs]
        contexts = [
            self._character(p.character).reply_context(p.context, p.previous_replies) for p in pairs
        ] * 2
        features = reply_features(self.embedder, replies, contexts)
        characters = [self._character(p.character) for p in pairs] * 2
        assessed = [a for a, _ in assess_replies(characters, replies, contexts, features)]
        n = len(pairs)
        return list(zip(assessed[:n], assessed[n:], strict=True))

    def annotator_for(self, pair: PairToJudge, rng: np.random.Generator) -> User:
        """The pair's own user, or (with probability ``disagreement``) a random panel member."""
        own = self.by_id.get(pair.user_id)
        if own is None or rng.random() < self.config.disagreement:
            return self.panel[int(rng.integers(len(self.panel)))]
        return own

    def label(
        self, pairs: Sequence[PairToJudge], rng: np.random.Generator
    ) -> list[ComparisonRecord]:
        """``labels_per_pair`` judgements of every pair, drawn with ``rng``."""
        records = []
        for pair, (a, b) in zip(pairs, self.assess(pairs), strict=True):
            character = self._character(pair.character)
            for _ in range(self.config.labels_per_pair):
                annotator = self.annotator_for(pair, rng)
                u_a = self.gold.utility(annotator, character, a)
                u_b = self.gold.utility(annotator, character, b)
                p_a = float(expit((u_a - u_b) / self.config.noise))
                records.append(
                    ComparisonRecord(
                        pair_id=pair.pair_id,
                        user_id=pair.user_id,
                        annotator_id=annotator.user_id,
                        character=pair.character,
                        day=pair.day,
                        context=pair.context,
                        reply_a=pair.reply_a,
                        reply_b=pair.reply_b,
                        choice=CHOICES[int(rng.random() >= p_a)],
                        gold_utility_a=u_a,
                        gold_utility_b=u_b,
                        gold_p_a=p_a,
                    )
                )
        return records


def bot_chats(turns: pd.DataFrame, characters: Mapping[str, Character]) -> list[Chat]:
    """The chat the bot saw at each logged turn: system prompt, then the session so far.

    ``turns`` is the run store's turns table (``session_id``, ``turn_index``, ``character``,
    ``user_message``, ``bot_reply``); the result is aligned with its rows.
    """
    missing = {"session_id", "turn_index", "character", "user_message", "bot_reply"} - set(
        turns.columns
    )
    if missing:
        raise ValueError(f"turns table lacks {sorted(missing)}; pass the run store's turns table")
    history: dict[tuple[str, int], Chat] = {}
    for session_id, session in turns.sort_values("turn_index").groupby("session_id", sort=False):
        messages: Chat = []
        for row in session.itertuples():
            messages = [*messages, {"role": "user", "content": row.user_message}]
            history[(session_id, int(row.turn_index))] = messages
            messages = [*messages, {"role": "assistant", "content": row.bot_reply}]
    chats = []
    for row in turns.itertuples():
        if row.character not in characters:
            raise ValueError(
                f"turn of session {row.session_id} names unknown character {row.character!r}; "
                f"fix: load the run's cast, one of {sorted(characters)}"
            )
        system = {"role": "system", "content": characters[row.character].system_prompt()}
        chats.append([system, *history[(row.session_id, int(row.turn_index))]])
    return chats


def pairs_from_turns(
    turns: pd.DataFrame,
    characters: Mapping[str, Character],
    policy: Policy,
    params: SamplingParams,
    rng: np.random.Generator,
    n_pairs: int | None = None,
) -> list[PairToJudge]:
    """Pair logged replies with an alternative from ``policy`` (ONE ``generate`` call).

    Samples ``n_pairs`` logged turns (all if None), writes one alternative reply for each
    from the same conversation state, and puts the two in random order.
    """
    if turns.empty:
        raise ValueError("turns table is empty; log traffic before collecting comparisons")
    if n_pairs is not None and n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 or None, got {n_pairs}")
    chosen = turns
    if n_pairs is not None and n_pairs < len(turns):
        chosen = turns.iloc[np.sort(rng.choice(len(turns), size=n_pairs, replace=False))]
    chosen = chosen.reset_index(drop=True)
    chats = bot_chats(chosen, characters)
    alternatives = [g.text.strip() for g in policy.generate(chats, params)]
    swap = rng.random(len(chosen)) < 0.5
    pairs = []
    for row, chat, alt, flip in zip(chosen.itertuples(), chats, alternatives, swap, strict=True):
        logged = str(row.bot_reply)
        a, b = (alt, logged) if flip else (logged, alt)
        previous = tuple(m["content"] for m in chat if m["role"] == "assistant")
        pairs.append(
            PairToJudge(
                pair_id=f"{row.session_id}:t{int(row.turn_index)}",
                user_id=str(row.user_id),
                character=str(row.character),
                context=str(row.user_message),
                previous_replies=previous,
                reply_a=a,
                reply_b=b,
                day=int(row.day),
            )
        )
    return pairs


def comparisons_frame(records: Sequence[ComparisonRecord]) -> pd.DataFrame:
    """Records as the comparisons table (``rewards.datasets.pairwise_examples`` reads it)."""
    columns = list(ComparisonRecord.__dataclass_fields__)
    return pd.DataFrame([r.to_row() for r in records], columns=columns)
