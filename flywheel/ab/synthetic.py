"""Synthetic user-day tables with known true lifts: for tests, benchmarks and power studies.

Each user has latent traits, drawn once and shared by the pre-period and the test:
activity probability ``p ~ 0.8 Beta(2, 3)``, message rate ``lam ~ Gamma(2, 2.5)`` per active
day, and per-reply report / violation / unsafe probabilities. On a test day a treatment user
is active with probability ``p (1 + breadth)``, sends ``Poisson(lam (1 + depth))`` messages
when active (one bot reply each), and each reply is reported / violating / unsafe with the
user's probability times ``1 + lift``. Because every lift multiplies every treatment user
alike, the true relative lift of breadth, depth and the three per-reply rates is exactly the
one passed in; retention's true lift is not known in closed form. The pre-period carries no
treatment, and shares the traits, so it correlates with the test period as real logs do.

:func:`synthetic_twin_days` draws the same users as counterfactual twins (the twin table of
:mod:`flywheel.ab.paired`): every test day is lived once under control and once under
treatment, with common random numbers. Each life's decision (active, message count, each
per-reply count) comes from the inverse CDF of a uniform that, with probability ``coupling``,
is the user-day's shared uniform and otherwise that life's own: each life's outcomes have
exactly the distribution of :func:`synthetic_user_days`, so the true lifts are the planted
ones, while the lives are correlated as in the simulator (an A/A twin table has identical
lives on a ``coupling**2`` share of decisions and independent noise on the rest). Over the
population the true average treatment effects are then ``breadth * E[p]`` on breadth and
``depth * E[lam]`` on depth (:data:`MEAN_ACTIVITY`, :data:`MEAN_MESSAGES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

MAX_ACTIVITY = 0.8  # cap of p, so that p (1 + breadth lift) stays a probability
LIFTABLE = ("breadth", "depth", "report_rate", "violation_rate", "unsafe_rate")
MEAN_ACTIVITY = MAX_ACTIVITY * 2 / 5  # E[p]: mean of 0.8 Beta(2, 3)
MEAN_MESSAGES = 2.0 * 2.5  # E[lam]: mean of Gamma(2, 2.5), messages per active day
TOKENS_PER_REPLY = 40  # mean generated tokens per bot reply in the completion_tokens column
PER_REPLY = {  # count column -> (its metric, scale of the user's per-reply probability)
    "reports": ("report_rate", 0.04),
    "violations": ("violation_rate", 0.5),
    "unsafe_replies": ("unsafe_rate", 0.02),
}


def synthetic_user_days(
    n_users: int,
    rng: np.random.Generator,
    *,
    lifts: Mapping[str, float] | None = None,
    n_test_days: int = 7,
    n_pre_days: int = 7,
    treatment_share: float = 0.5,
) -> pd.DataFrame:
    """A user-day table (the :mod:`flywheel.metrics` format) with the given true lifts."""
    lifts = _checked(lifts, n_users, n_test_days, n_pre_days)
    treated = rng.random(n_users) < treatment_share
    activity, rate, per_reply = _traits(n_users, rng)
    days = np.arange(-n_pre_days, n_test_days)
    user, day = np.meshgrid(np.arange(n_users), days, indexing="ij")
    exposed = treated[:, None] & (day >= 0)

    def scaled(base: np.ndarray, metric: str) -> np.ndarray:
        return base[:, None] * np.where(exposed, 1 + lifts.get(metric, 0.0), 1.0)

    active = rng.random(user.shape) < scaled(activity, "breadth")
    messages = np.where(active, rng.poisson(scaled(rate, "depth")), 0)
    table = {
        "user_id": user.ravel(),
        "arm": np.where(treated, "treatment", "control")[user.ravel()],
        "day": day.ravel(),
        "active": active.ravel().astype(np.int64),
        "messages": messages.ravel(),
        "bot_replies": messages.ravel(),
    }
    for column, (metric, _) in PER_REPLY.items():
        probability = np.clip(scaled(per_reply[column], metric), 0, 1)
        table[column] = rng.binomial(messages, probability).ravel()
    return pd.DataFrame(table)


def synthetic_twin_days(
    n_users: int,
    rng: np.random.Generator,
    *,
    lifts: Mapping[str, float] | None = None,
    n_test_days: int = 7,
    n_pre_days: int = 7,
    treatment_share: float = 0.5,
    coupling: float = 0.9,
) -> pd.DataFrame:
    """A twin table (:mod:`flywheel.ab.paired`) with the given true lifts (see module doc).

    Pre-period rows appear once (``life`` = the user's hash arm ``arm``); every test day has
    one row per life. ``completion_tokens`` is Poisson with mean ``TOKENS_PER_REPLY`` per bot
    reply, so the design's token cost can be counted as in a simulator table.
    """
    lifts = _checked(lifts, n_users, n_test_days, n_pre_days)
    if not 0 <= coupling <= 1:
        raise ValueError(f"coupling must be in [0, 1] (share of shared uniforms), got {coupling}")
    treated = rng.random(n_users) < treatment_share
    activity, rate, per_reply = _traits(n_users, rng)
    arm = np.where(treated, "treatment", "control")
    pre = _pre_period(n_pre_days, activity, rate, per_reply, rng)
    shape = (n_users, n_test_days)
    shared = {name: rng.random(shape) for name in ("active", "messages", *PER_REPLY)}
    frames = []
    for life in ("control", "treatment"):
        lift = lifts if life == "treatment" else {}

        def uniform(name: str) -> np.ndarray:
            own = rng.random(shape)
            return np.where(rng.random(shape) < coupling, shared[name], own)

        active = uniform("active") < (activity * (1 + lift.get("breadth", 0.0)))[:, None]
        mean_messages = (rate * (1 + lift.get("depth", 0.0)))[:, None]
        messages = np.where(
            active, _inverse_cdf(stats.poisson, uniform("messages"), mean_messages), 0
        )
        counts = {"active": active.astype(np.int64), "messages": messages}
        counts["bot_replies"] = messages
        for column, (metric, _) in PER_REPLY.items():
            probability = np.clip(per_reply[column] * (1 + lift.get(metric, 0.0)), 0, 1)
            counts[column] = _inverse_cdf(
                stats.binom, uniform(column), messages, probability[:, None]
            )
        frames.append(_frame(counts, np.arange(n_test_days), arm, life, rng))
    frames.insert(0, _frame(pre, np.arange(-n_pre_days, 0), arm, None, rng))
    return pd.concat(frames, ignore_index=True)


def _inverse_cdf(distribution: Any, uniform: np.ndarray, *params: np.ndarray) -> np.ndarray:
    """Counts from uniforms by the inverse CDF (shared uniforms give coupled counts)."""
    # scipy's discrete ppf answers -1 at u = 0, which rng.random() can return
    return np.maximum(distribution.ppf(uniform, *params), 0).astype(np.int64)


def _checked(
    lifts: Mapping[str, float] | None, n_users: int, n_test_days: int, n_pre_days: int
) -> dict[str, float]:
    """The lifts as a dict, after checking them and the table's size."""
    lifts = dict(lifts or {})
    unknown = sorted(set(lifts) - set(LIFTABLE))
    if unknown:
        raise ValueError(f"lifts has unknown metric(s) {unknown}; known: {list(LIFTABLE)}")
    if not -1 < lifts.get("breadth", 0.0) <= 1 / MAX_ACTIVITY - 1:
        raise ValueError(
            f"lifts['breadth'] must be in (-1, {1 / MAX_ACTIVITY - 1:.2f}] so that activity "
            f"stays a probability, got {lifts['breadth']}"
        )
    if n_users < 2 or n_test_days < 1 or n_pre_days < 0:
        raise ValueError(
            f"need n_users >= 2, n_test_days >= 1, n_pre_days >= 0; got {n_users}, "
            f"{n_test_days}, {n_pre_days}"
        )
    return lifts


def _traits(
    n_users: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Activity probability, message rate and per-reply probabilities of each user."""
    activity = MAX_ACTIVITY * rng.beta(2, 3, n_users)
    rate = rng.gamma(2.0, 2.5, n_users)
    shapes = {"reports": (1, 3), "violations": (2, 8), "unsafe_replies": (1, 3)}
    per_reply = {
        column: scale * rng.beta(*shapes[column], n_users)
        for column, (_, scale) in PER_REPLY.items()
    }
    return activity, rate, per_reply


def _pre_period(
    n_pre_days: int,
    activity: np.ndarray,
    rate: np.ndarray,
    per_reply: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Counts of the untreated pre-period (users x pre days), lived once."""
    shape = (len(activity), n_pre_days)
    active = rng.random(shape) < activity[:, None]
    messages = np.where(active, rng.poisson(np.broadcast_to(rate[:, None], shape)), 0)
    counts = {"active": active.astype(np.int64), "messages": messages, "bot_replies": messages}
    for column, probability in per_reply.items():
        counts[column] = rng.binomial(messages, probability[:, None])
    return counts


def _frame(
    counts: dict[str, np.ndarray],
    days: np.ndarray,
    arm: np.ndarray,
    life: str | None,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Long user-day rows of (users x days) count matrices; ``life`` None = the hash arm."""
    user, day = np.meshgrid(np.arange(len(arm)), days, indexing="ij")
    table = {"user_id": user.ravel(), "arm": arm[user.ravel()], "day": day.ravel()}
    table["life"] = table["arm"] if life is None else np.full(user.size, life)
    table |= {column: values.ravel() for column, values in counts.items()}
    table["completion_tokens"] = rng.poisson(TOKENS_PER_REPLY * table["bot_replies"])
    return pd.DataFrame(table)
