"""Power planner: users x days each design needs for a target lift, and what they cost.

From a pilot table (a twin table gives both designs; a standard table the standard one) the
per-user variance of each metric's lift estimator is measured at every daily look of the
pilot (:func:`flywheel.ab.sequential.daily_looks`): for the standard design the CUPED lift of
:func:`flywheel.ab.analyze` on the standard view, ``Var(L) = s2 (1/n_c + 1/n_t)``; for twins
the paired lift of :mod:`flywheel.ab.paired`, ``Var(L) = s2 / n``. The days dimension assumes
each user's outcome is a persistent user effect plus independent day noise, so the per-user
variance after d test days is ``s2(d) = a + b / d``; ``a, b >= 0`` are fitted by non-negative
least squares to the pilot's looks (a one-day pilot gives ``b = 0``: no gain from more days).
For each number of days the users needed at the target relative MDE, alpha and power come
from statsmodels (``TTestIndPower`` with equal arms for the standard design, ``TTestPower``
for the paired one, effect size ``mde / sqrt(s2(d))``); the plan keeps the cheapest.

The pilot should run the candidate itself: the twin variance grows with the effect (the two
lives of a user disagree more often when the policies differ), so an A/A pilot understates
what twins need (``tests/test_ab_planner.py`` plans from a pilot of the planted lift).

Cost: both designs live the pilot's pre-period once per user (CUPED and the twins' shared
start need it); a standard user lives each test day once, a twin user twice. Generated
tokens = users x (pre days x tokens per pre user-day + test days x lives x tokens per test
user-day), per-user-day tokens from the pilot's ``completion_tokens`` column unless given;
CPU minutes = tokens x seconds per token / 60.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.optimize import nnls
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from flywheel.ab.analysis import AnalysisConfig
from flywheel.ab.paired import TOKENS, is_twin_table, standard_view
from flywheel.ab.sequential import Design, daily_looks
from flywheel.metrics import aggregate_users

DEFAULT_MAX_DAYS = 14  # longest test the planner considers, in days
LIVES = {"standard": 1, "twins": 2}  # user lives per test user-day
# Above this standardized effect, 2 users per arm (or 2 twin pairs) already give any usual
# power; a pilot whose lives never disagreed gives an infinite effect size.
MAX_EFFECT_SIZE = 100.0
MIN_USERS = {"standard": 4, "twins": 2}


@dataclass(frozen=True)
class Plan:
    """Users x days one design needs to detect ``mde`` on one metric, and the price."""

    design: Design
    metric: str
    mde: float  # target relative lift (0.1 = +10%)
    alpha: float
    power: float
    users: int  # users to assign (both arms together; twins: each lives both arms)
    days: int  # test days
    pre_days: int  # pre-period days each user lives once
    user_days: int  # simulated user-days: users x (pre_days + lives x days)
    tokens: float  # generated tokens
    cpu_minutes: float  # at the given seconds per generated token
    unit_variance: float  # per-user variance s2(days) of the lift (module doc)


def _fit_days(days: np.ndarray, unit_variance: np.ndarray) -> tuple[float, float]:
    """Non-negative ``a, b`` of ``s2(d) = a + b / d`` over the pilot's looks."""
    usable = np.isfinite(unit_variance) & (unit_variance > 0)
    days, unit_variance = days[usable], unit_variance[usable]
    if len(days) == 0:
        return math.nan, math.nan
    if len(days) == 1:
        return float(unit_variance[0]), 0.0
    (a, b), _ = nnls(np.column_stack([np.ones_like(days), 1 / days]), unit_variance)
    return float(a), float(b)


def _unit_variances(
    pilot: pd.DataFrame, design: Design, metric: str, config: AnalysisConfig
) -> np.ndarray:
    """The per-user variance of the metric's lift at each look of the pilot."""
    looks = daily_looks(pilot, config, design=design)
    _, se = looks.lift_and_se(metric)
    if design == "twins":
        return se**2 * looks.n_control
    return se**2 / (1 / looks.n_control + 1 / looks.n_treatment)


def _users(design: Design, effect_size: float, alpha: float, power: float) -> int:
    """Users needed for a standardized effect (statsmodels power solvers).

    statsmodels' root finder starts at 2 observations and returns NaN when even those give
    more than the target power (a large effect); then the smallest count that reaches it is
    searched directly.
    """
    solver = TTestPower() if design == "twins" else TTestIndPower()
    kwargs = {} if design == "twins" else {"ratio": 1.0}
    if effect_size > MAX_EFFECT_SIZE:  # the pilot saw (almost) no variance: the fewest users
        return MIN_USERS[design]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        n = float(np.asarray(
            solver.solve_power(effect_size=effect_size, alpha=alpha, power=power, **kwargs)
        ).item())  # fmt: skip
    if not math.isfinite(n):
        n = next(
            k for k in range(2, 10_000)
            if solver.power(effect_size, k, alpha, **kwargs) >= power
        )  # fmt: skip
    per_unit = math.ceil(n)
    return per_unit if design == "twins" else 2 * per_unit


def _token_rates(pilot: pd.DataFrame, tokens_per_user_day: float | None) -> tuple[float, float]:
    """Generated tokens per pre-period user-day and per test user-day (per life)."""
    if tokens_per_user_day is not None:
        if not tokens_per_user_day > 0:
            raise ValueError(f"tokens_per_user_day must be > 0, got {tokens_per_user_day}")
        return tokens_per_user_day, tokens_per_user_day
    if TOKENS not in pilot.columns:
        raise ValueError(
            f"the pilot table has no {TOKENS!r} column; pass tokens_per_user_day (generated "
            "tokens per simulated user-day, e.g. from a traffic benchmark)"
        )
    is_pre = (pilot["period"] == "pre") if "period" in pilot.columns else (pilot["day"] < 0)
    test_rate = float(pilot.loc[~is_pre, TOKENS].mean())
    pre_rate = float(pilot.loc[is_pre, TOKENS].mean()) if is_pre.any() else test_rate
    return pre_rate, test_rate


def plan_experiment(
    pilot: pd.DataFrame,
    *,
    mde: float,
    seconds_per_token: float,
    alpha: float = 0.05,
    power: float = 0.8,
    metrics: tuple[str, ...] = ("breadth", "depth"),
    tokens_per_user_day: float | None = None,
    days: int | None = None,
    max_days: int = DEFAULT_MAX_DAYS,
    min_days: int = 1,
    config: AnalysisConfig | None = None,
) -> tuple[Plan, ...]:
    """One :class:`Plan` per design and metric (see module doc for the model).

    ``days`` fixes the test length; None picks the cheapest in ``min_days``..``max_days``. ``config``
    sets CUPED and the retention day of the metrics (its alpha and power are overridden).
    """
    if not mde > 0:
        raise ValueError(f"mde must be a positive relative lift (0.1 = +10%), got {mde}")
    if not seconds_per_token > 0:
        raise ValueError(f"seconds_per_token must be > 0, got {seconds_per_token}")
    if (days is not None and days < 1) or not 1 <= min_days <= max_days:
        raise ValueError(
            f"need days >= 1 and 1 <= min_days <= max_days, got {days}, {min_days}, {max_days}"
        )
    config = replace(config or AnalysisConfig(), alpha=alpha, power=power)
    designs: tuple[Design, ...] = ("standard", "twins") if is_twin_table(pilot) else ("standard",)
    pre_rate, test_rate = _token_rates(pilot, tokens_per_user_day)
    pre_days = aggregate_users(standard_view(pilot)).n_pre_days
    candidates = [days] if days is not None else list(range(min_days, max_days + 1))
    plans = []
    for design in designs:
        for metric in metrics:
            s2 = _unit_variances(pilot, design, metric, config)
            a, b = _fit_days(np.arange(1, len(s2) + 1, dtype=float), s2)
            if not math.isfinite(a):
                raise ValueError(
                    f"the pilot gives no variance for {metric!r} ({design}); it needs users "
                    "the metric counts in both arms (a longer or larger pilot)"
                )
            options = []
            for d in candidates:
                unit_variance = a + b / d
                users = _users(design, mde / math.sqrt(unit_variance), alpha, power)
                tokens = users * (pre_days * pre_rate + d * LIVES[design] * test_rate)
                options.append((tokens, d, users, unit_variance))
            tokens, d, users, unit_variance = min(options)
            plans.append(
                Plan(
                    design=design,
                    metric=metric,
                    mde=mde,
                    alpha=alpha,
                    power=power,
                    users=users,
                    days=d,
                    pre_days=pre_days,
                    user_days=users * (pre_days + LIVES[design] * d),
                    tokens=tokens,
                    cpu_minutes=tokens * seconds_per_token / 60,
                    unit_variance=unit_variance,
                )
            )
    return tuple(plans)


def format_plan(plans: tuple[Plan, ...]) -> str:
    """The plans as a plain-text table, cheapest design per metric marked."""
    header = (
        f"{'metric':<12}{'design':<10}{'users':>9}{'days':>6}{'pre':>5}{'user-days':>11}"
        f"{'tokens':>14}{'CPU min':>10}"
    )
    lines = []
    if plans:
        p = plans[0]
        lines.append(f"Plan: detect a {p.mde:+.0%} lift at alpha {p.alpha}, power {p.power:.0%}")
    lines.append(header)
    for p in sorted(plans, key=lambda p: (p.metric, p.tokens)):
        cheapest = min(q.tokens for q in plans if q.metric == p.metric) == p.tokens
        lines.append(
            f"{p.metric:<12}{p.design:<10}{p.users:>9,}{p.days:>6}{p.pre_days:>5}"
            f"{p.user_days:>11,}{p.tokens:>14,.0f}{p.cpu_minutes:>10,.1f}"
            + ("  <- cheapest" if cheapest and len(plans) > 1 else "")
        )
    return "\n".join(lines)
