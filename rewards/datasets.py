"""Reward-model example tables built from logged DataFrames.

Reward code sees only what the product could log: texts and the users' observable
signals. ``flywheel/`` reads the run store and passes the DataFrames down; nothing here
touches the store or the simulator. Columns whose name starts with ``gold_`` are the
simulator's oracle (kept in the store for evaluation) and are dropped on the way in, so
no reward model can fit the truth by accident.

Pointwise table (one row per logged bot reply), :data:`POINTWISE_COLUMNS`:

==================== ======= ===========================================================
column               dtype   meaning
==================== ======= ===========================================================
context              str     what the reply answers (the user's message)
reply                str     the bot reply
user_id              str     who received it (used to split and to match pairs)
day                  int     simulated day of the turn
continued            bool    the user wrote another message in the session
liked                bool    the user liked the reply
reported             bool    the user reported the reply
engaged              bool    :func:`engagement_label`: (continued or liked) and not reported
returned_next_day    float   1.0 / 0.0 if the user was active on ``day + 1``; NaN on the
                             last logged day, where it cannot be observed yet
==================== ======= ===========================================================

Pairwise table (one row per annotator judgement), :data:`PAIRWISE_COLUMNS`:

==================== ======= ===========================================================
context              str     the user's message both replies answer
chosen               str     the reply the annotator preferred
rejected             str     the other reply
user_id              str     whose conversation the context came from
annotator_id         str     who judged (simulated annotators are sampled users)
==================== ======= ===========================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

ORACLE_PREFIX = "gold_"

POINTWISE_COLUMNS: tuple[str, ...] = (
    "context",
    "reply",
    "user_id",
    "day",
    "continued",
    "liked",
    "reported",
    "engaged",
    "returned_next_day",
)
PAIRWISE_COLUMNS: tuple[str, ...] = ("context", "chosen", "rejected", "user_id", "annotator_id")

# The pointwise engagement target and the auxiliary user-signal targets.
ENGAGEMENT_TARGET = "engaged"
SIGNAL_TARGETS: tuple[str, ...] = ("continued", "liked", "returned_next_day")

# Names the run store's turns table uses for the two texts (TurnRecord.to_row()).
_TURN_TEXT_ALIASES = {"user_message": "context", "bot_reply": "reply"}
_COMPARISON_CHOICES = ("a", "b")


def require_columns(df: pd.DataFrame, columns: Iterable[str], table: str) -> None:
    """Fail fast when ``df`` lacks a column, naming the table, what is missing and what is there."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{table} table is missing column(s) {missing}; it has {sorted(df.columns)}. "
            f"Fix: pass a DataFrame with the columns documented in rewards/datasets.py"
        )


def drop_oracle_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Remove every ``gold_*`` column: the oracle is for evaluation, never for fitting."""
    return df.drop(columns=[c for c in df.columns if c.startswith(ORACLE_PREFIX)])


def engagement_label(df: pd.DataFrame) -> pd.Series:
    """Binary engagement: the user continued or liked, and did not report the reply.

    A report vetoes engagement because a reply that earns a report is one the product
    must not learn to produce, whatever else the user did afterwards.
    """
    require_columns(df, ("continued", "liked", "reported"), "pointwise")
    return (df["continued"].astype(bool) | df["liked"].astype(bool)) & ~df["reported"].astype(bool)


def returned_next_day(turns: pd.DataFrame, activity: pd.DataFrame | None = None) -> pd.Series:
    """Per turn: 1.0 if its user was active the next day, 0.0 if not, NaN if unobservable.

    ``activity`` lists (user_id, day) pairs on which users were active (the sessions
    table works); without it, a user counts as active on every day they have a turn.
    The last day in the activity log has no observed next day, so it is NaN rather than
    a false "did not return".
    """
    require_columns(turns, ("user_id", "day"), "turns")
    active = turns if activity is None else activity
    require_columns(active, ("user_id", "day"), "activity")
    seen = set(zip(active["user_id"].astype(str), active["day"].astype(int), strict=True))
    last_day = int(active["day"].max())
    out = [
        np.nan if day >= last_day else float((user, day + 1) in seen)
        for user, day in zip(turns["user_id"].astype(str), turns["day"].astype(int), strict=True)
    ]
    return pd.Series(out, index=turns.index, name="returned_next_day", dtype=float)


def pointwise_examples(turns: pd.DataFrame, activity: pd.DataFrame | None = None) -> pd.DataFrame:
    """The pointwise table (see module docstring) from a logged turns DataFrame.

    Accepts the run store's names (``user_message``, ``bot_reply``) or the table's own
    (``context``, ``reply``). Extra columns other than the oracle's are kept, so callers
    can carry ids (``session_id``, ``character``...) through.
    """
    df = drop_oracle_columns(turns).rename(
        columns={k: v for k, v in _TURN_TEXT_ALIASES.items() if k in turns.columns}
    )
    require_columns(
        df, ("context", "reply", "user_id", "day", "continued", "liked", "reported"), "turns"
    )
    df = df.copy()
    df["user_id"] = df["user_id"].astype(str)
    for col in ("continued", "liked", "reported"):
        df[col] = df[col].astype(bool)
    df["engaged"] = engagement_label(df)
    if "returned_next_day" not in df.columns:
        df["returned_next_day"] = returned_next_day(df, activity)
    if df.empty:
        raise ValueError("turns table is empty; log some traffic before training a reward model")
    return df.reset_index(drop=True)


def pairwise_examples(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The pairwise table (see module docstring) from logged annotator comparisons.

    ``comparisons`` is the annotators' log: ``context``, ``reply_a``, ``reply_b``,
    ``choice`` ("a" or "b"), ``user_id``, ``annotator_id`` (the layout written by
    ``sim.annotators``); a table already in chosen/rejected form passes through.
    """
    df = drop_oracle_columns(comparisons)
    if {"chosen", "rejected"} <= set(df.columns):
        require_columns(df, PAIRWISE_COLUMNS, "pairwise")
        out = df.copy()
    else:
        require_columns(
            df,
            ("context", "reply_a", "reply_b", "choice", "user_id", "annotator_id"),
            "comparisons",
        )
        bad = sorted(set(df["choice"]) - set(_COMPARISON_CHOICES))
        if bad:
            raise ValueError(
                f"comparisons.choice must be 'a' or 'b', got {bad}; fix the annotator log"
            )
        a_won = df["choice"] == "a"
        out = df.drop(columns=["reply_a", "reply_b", "choice"]).copy()
        out["chosen"] = np.where(a_won, df["reply_a"], df["reply_b"])
        out["rejected"] = np.where(a_won, df["reply_b"], df["reply_a"])
    if out.empty:
        raise ValueError("comparisons table is empty; run the simulated annotators first")
    out["user_id"] = out["user_id"].astype(str)
    out["annotator_id"] = out["annotator_id"].astype(str)
    return out.reset_index(drop=True)


def split_by_group(
    df: pd.DataFrame, rng: np.random.Generator, test_size: float = 0.2, group: str = "user_id"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole groups (users by default) so no user's style leaks into the test set."""
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    require_columns(df, (group,), "split")
    groups = np.asarray(sorted(df[group].astype(str).unique()))
    if len(groups) < 2:
        raise ValueError(
            f"split needs at least 2 distinct {group!r} values to hold some out, got {len(groups)}"
        )
    n_test = min(len(groups) - 1, max(1, round(test_size * len(groups))))
    test_groups = set(rng.permutation(groups)[:n_test])
    is_test = df[group].astype(str).isin(test_groups)
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def case_control_pairs(
    df: pd.DataFrame,
    target: str,
    rng: np.random.Generator,
    stratum: str | None = "user_id",
    max_pairs: int | None = None,
) -> pd.DataFrame:
    """Pairs (positive reply, negative reply) for fitting a pointwise logistic model as BT.

    If ``P(y=1 | x) = sigmoid(r(x) + a_s)`` with a stratum effect ``a_s``, then given one
    positive and one negative from the same stratum, ``P(x1 is the positive) =
    sigmoid(r(x1) - r(x2))`` exactly (conditional logistic regression). So a pairwise
    Bradley-Terry trainer fitted on these pairs estimates the pointwise model's ``r`` with
    each user's baseline propensity cancelled, which a reply-level reward should not carry.
    Each positive is paired with one random negative of its stratum; strata without both
    outcomes contribute nothing. ``stratum=None`` pairs across the whole table.

    Returns the pairwise layout (``context``, ``chosen``, ``rejected``, ``user_id``) with
    ``chosen_context`` / ``rejected_context`` as well, since the two replies answer
    different messages.
    """
    require_columns(df, ("context", "reply", target, *([stratum] if stratum else [])), "pointwise")
    labelled = df[df[target].notna()]
    groups = labelled.groupby(stratum, sort=True) if stratum else [("all", labelled)]
    rows: list[dict[str, str]] = []
    for key, group in groups:
        y = group[target].astype(bool).to_numpy()
        pos, neg = group[y], group[~y]
        if pos.empty or neg.empty:
            continue
        picks = rng.integers(0, len(neg), size=len(pos))
        for (_, p), j in zip(pos.iterrows(), picks, strict=True):
            n = neg.iloc[int(j)]
            rows.append(
                {
                    "user_id": str(key),
                    "chosen_context": p["context"],
                    "chosen": p["reply"],
                    "rejected_context": n["context"],
                    "rejected": n["reply"],
                }
            )
    if not rows:
        raise ValueError(
            f"no stratum ({stratum!r}) has both positive and negative {target!r} examples; "
            "log more traffic, or pass stratum=None to pair across users"
        )
    out = pd.DataFrame(rows)
    if max_pairs is not None and len(out) > max_pairs:
        out = out.iloc[np.sort(rng.choice(len(out), size=max_pairs, replace=False))]
    out["context"] = out["chosen_context"]
    return out.reset_index(drop=True)


def as_lists(values: Sequence[str] | pd.Series) -> list[str]:
    """Texts as a plain list of str (pandas Series, numpy arrays and tuples accepted)."""
    return [str(v) for v in list(values)]
