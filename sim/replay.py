"""Oracle replay: the gold utility a new reply would have had for the logged user it answers.

Best-of-n and other offline evaluations write new replies to logged contexts. Their gold
utility (ORACLE, ``sim.gold``) must be the one the user who wrote the context would have
felt at that moment: that user's latent traits (logged in the run store's ``users`` table)
and the emoji exposure they had then, rebuilt from the replies logged before it
(``GoldModel.replay_exposure``). Emoji fatigue is the only latent state the utility reads,
so traits plus replayed exposure reproduce the user exactly.

``compare_gold`` is the oracle's view of an offline evaluation: the gold utility of a
candidate's and its parent's replies to the same held-out contexts, paired. The flywheel
shows it beside the proxies and never decides on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from rewards.embeddings import Embedder, get_embedder
from rewards.features import reply_features
from sim.characters import Character
from sim.gold import GoldConfig, GoldModel, assess_replies
from sim.population import User, UserState, UserTraits

_TRAITS = frozenset(f.name for f in fields(UserTraits))
# Columns a candidate table needs besides prompt, character and reply: where its context was.
MOMENT_COLUMNS = ("user_id", "session_id", "turn_index", "day")


class _Served(NamedTuple):
    day: int
    session_id: str
    turn_index: int
    emoji: float


class GoldReplay:
    """Gold utility (ORACLE) of candidate replies to logged contexts, under ``config``.

    Call it with a candidate table (``prompt``: the chat ending in the user's message,
    ``character``, ``reply`` and ``MOMENT_COLUMNS``); it returns one utility per row.

    Args:
        users: the run store's users table (``user_id``, ``segment``, ``traits``: a dict
            of ``UserTraits`` fields); a user logged in several experiments keeps their
            first row (traits are fixed for life).
        turns: the logged turns (``user_id``, ``day``, ``hour``, ``session_id``,
            ``turn_index``, ``features`` with ``emoji``): the replies each user had seen.
        characters: by name, every character a candidate row names.
        config: the world's gold configuration the run was logged under.
        embedder: the MiniLM encoder of the logged style features (default: the packaged one).
    """

    def __init__(
        self,
        users: pd.DataFrame,
        turns: pd.DataFrame,
        characters: Mapping[str, Character],
        config: GoldConfig,
        embedder: Embedder | None = None,
    ) -> None:
        self.users = users.drop_duplicates("user_id").set_index("user_id")
        self.characters = characters
        self.gold = GoldModel(config)
        self.embedder = embedder or get_embedder()
        served = turns.assign(emoji=[f["emoji"] for f in turns["features"]]).sort_values(
            ["day", "hour", "session_id", "turn_index"]
        )
        self.history = {
            user_id: [_Served(*row) for row in group[list(_Served._fields)].itertuples(index=False)]
            for user_id, group in served.groupby("user_id")
        }

    def user_at(self, user_id: str, day: int, session_id: str, turn_index: int) -> User:
        """``user_id`` as they were when writing turn ``turn_index`` of ``session_id``."""
        row = self.users.loc[user_id]
        traits = {k: v for k, v in row["traits"].items() if k in _TRAITS}
        if "topic_interests" in traits:
            traits["topic_interests"] = tuple(traits["topic_interests"])
        user = User(user_id, row["segment"], UserTraits(**traits), UserState())
        before = []
        for served in self.history.get(user_id, []):
            if served.session_id == session_id and served.turn_index >= turn_index:
                break
            before.append((served.day, served.session_id, served.emoji))
        self.gold.replay_exposure(user, [*before, (day, session_id, 0.0)])
        return user

    def __call__(self, candidates: pd.DataFrame) -> np.ndarray:
        """One gold utility per candidate row, in row order."""
        chars = [self.characters[name] for name in candidates["character"]]
        contexts = [
            character.reply_context(prompt[-1]["content"])
            for prompt, character in zip(candidates["prompt"], chars, strict=True)
        ]
        replies = list(candidates["reply"])
        features = reply_features(self.embedder, replies, contexts)
        assessed = assess_replies(chars, replies, contexts, features)
        users: dict[tuple[Any, ...], User] = {}
        out = []
        for row, character, (assessment, _) in zip(
            candidates.itertuples(index=False), chars, assessed, strict=True
        ):
            key = (row.user_id, int(row.day), row.session_id, int(row.turn_index))
            if key not in users:
                users[key] = self.user_at(*key)
            out.append(self.gold.utility(users[key], character, assessment))
        return np.asarray(out)


@dataclass(frozen=True)
class GoldComparison:
    """Mean gold utility (ORACLE) of a candidate's and its parent's replies to the same
    logged contexts, and their paired difference with its t interval and two-sided p."""

    candidate: float
    parent: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int


def compare_gold(
    replay: GoldReplay,
    contexts: pd.DataFrame,
    candidate: Sequence[str],
    parent: Sequence[str],
    alpha: float = 0.05,
) -> GoldComparison:
    """Gold utility of ``candidate`` vs ``parent`` replies to ``contexts`` (``prompt``,
    ``character`` and ``MOMENT_COLUMNS``), paired per context (statsmodels' t-test)."""
    from statsmodels.stats.weightstats import DescrStatsW

    # Both reply sets in one replay: one judge call, and each user rebuilt once.
    both = pd.concat(
        [contexts.assign(reply=list(candidate)), contexts.assign(reply=list(parent))],
        ignore_index=True,
    )
    utility = replay(both)
    ours, theirs = utility[: len(contexts)], utility[len(contexts) :]
    diff = ours - theirs
    if len(diff) > 1 and np.ptp(diff) > 0:
        stats = DescrStatsW(diff)
        p_value = float(stats.ttest_mean()[1])
        low, high = stats.tconfint_mean(alpha)
    else:  # one context, or the same utility everywhere: nothing to test
        p_value, low, high = float("nan"), float("nan"), float("nan")
    return GoldComparison(
        candidate=float(ours.mean()),
        parent=float(theirs.mean()),
        diff=float(diff.mean()),
        ci_low=float(low),
        ci_high=float(high),
        p_value=p_value,
        n=len(diff),
    )
