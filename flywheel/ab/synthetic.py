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
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

MAX_ACTIVITY = 0.8  # cap of p, so that p (1 + breadth lift) stays a probability
LIFTABLE = ("breadth", "depth", "report_rate", "violation_rate", "unsafe_rate")


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
    treated = rng.random(n_users) < treatment_share
    activity = MAX_ACTIVITY * rng.beta(2, 3, n_users)
    rate = rng.gamma(2.0, 2.5, n_users)
    per_reply = {
        "reports": ("report_rate", 0.04 * rng.beta(1, 3, n_users)),
        "violations": ("violation_rate", 0.5 * rng.beta(2, 8, n_users)),
        "unsafe_replies": ("unsafe_rate", 0.02 * rng.beta(1, 3, n_users)),
    }
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
    for column, (metric, probability) in per_reply.items():
        table[column] = rng.binomial(messages, np.clip(scaled(probability, metric), 0, 1)).ravel()
    return pd.DataFrame(table)
