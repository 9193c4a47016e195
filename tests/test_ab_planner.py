"""Power planner (flywheel.ab.planner): the planned users x days reach the target power when
the experiment is simulated, for both designs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from flywheel import ab
from flywheel.ab.paired import life_views, paired_compare
from flywheel.ab.synthetic import synthetic_twin_days, synthetic_user_days
from flywheel.metrics import aggregate_users, engagement_breadth

MDE = 0.1
PRE_DAYS = 3


@pytest.fixture(scope="module")
def plans() -> dict[str, ab.Plan]:
    """Breadth plans from a 4-day pilot of the treatment itself, free to choose up to 6 days
    (extrapolated)."""
    pilot = synthetic_twin_days(
        3000, np.random.default_rng(0), lifts={"breadth": MDE}, n_test_days=4, n_pre_days=PRE_DAYS
    )
    found = ab.plan_experiment(
        pilot, mde=MDE, seconds_per_token=0.01, metrics=("breadth",), max_days=6
    )
    return {plan.design: plan for plan in found}


def _rejects(design: str, plan: ab.Plan, rng: np.random.Generator) -> bool:
    """One simulated experiment of the planned size with the true lift = the MDE."""
    size = {"n_test_days": plan.days, "n_pre_days": PRE_DAYS}
    if design == "twins":
        control, treatment = life_views(
            synthetic_twin_days(plan.users, rng, lifts={"breadth": MDE}, **size)
        )
        est = paired_compare(engagement_breadth(control), engagement_breadth(treatment))
        return bool(est.p_value[0] < plan.alpha)
    users = aggregate_users(synthetic_user_days(plan.users, rng, lifts={"breadth": MDE}, **size))
    return bool(ab.compare(engagement_breadth(users), users.treatment).p_value[0] < plan.alpha)


@pytest.mark.parametrize("design", ["standard", "twins"])
def test_planned_size_reaches_the_target_power_in_simulation(
    plans: dict[str, ab.Plan], design: str
) -> None:
    plan, n_experiments = plans[design], 200
    rng = np.random.default_rng(1)
    hits = sum(_rejects(design, plan, rng) for _ in range(n_experiments))
    low, high = stats.binomtest(hits, n_experiments).proportion_ci(0.99)
    assert low <= plan.power <= high, (
        f"{design}: {plan.users} users x {plan.days} days planned for power {plan.power}; "
        f"simulated power {hits / n_experiments:.3f} over {n_experiments} experiments "
        f"(99% binomial CI [{low:.3f}, {high:.3f}])"
    )


def test_twins_need_fewer_tokens_and_the_plan_prices_them(plans: dict[str, ab.Plan]) -> None:
    twins, standard = plans["twins"], plans["standard"]
    assert twins.tokens < standard.tokens
    for plan, lives in ((twins, 2), (standard, 1)):
        assert plan.user_days == plan.users * (PRE_DAYS + lives * plan.days)
        assert plan.cpu_minutes == pytest.approx(plan.tokens * 0.01 / 60)
    text = ab.format_plan(tuple(plans.values()))
    assert "twins" in text and "standard" in text and "<- cheapest" in text


def test_a_standard_pilot_plans_the_standard_design_only() -> None:
    pilot = synthetic_user_days(500, np.random.default_rng(2), n_test_days=3, n_pre_days=2)
    found = ab.plan_experiment(pilot, mde=MDE, seconds_per_token=0.01, tokens_per_user_day=50)
    assert {plan.design for plan in found} == {"standard"}
    assert {plan.metric for plan in found} == {"breadth", "depth"}
    later = ab.plan_experiment(
        pilot, mde=MDE, seconds_per_token=0.01, tokens_per_user_day=50, min_days=4
    )
    assert min(plan.days for plan in later) >= 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mde": 0.0}, "mde must be a positive"),
        ({"seconds_per_token": 0.0}, "seconds_per_token must be > 0"),
        ({"days": 0}, "need days >= 1"),
        ({"min_days": 5, "max_days": 3}, "1 <= min_days <= max_days"),
        ({"tokens_per_user_day": -1.0}, "tokens_per_user_day must be > 0"),
    ],
)
def test_bad_plan_requests_are_refused(kwargs: dict, message: str) -> None:
    pilot = synthetic_twin_days(100, np.random.default_rng(3), n_test_days=2, n_pre_days=1)
    with pytest.raises(ValueError, match=message):
        ab.plan_experiment(pilot, **{"mde": MDE, "seconds_per_token": 0.01, **kwargs})


def test_a_pilot_without_token_counts_needs_the_rate() -> None:
    pilot = synthetic_user_days(100, np.random.default_rng(4), n_test_days=2, n_pre_days=1)
    with pytest.raises(ValueError, match="no 'completion_tokens' column; pass tokens_per_user_day"):
        ab.plan_experiment(pilot, mde=MDE, seconds_per_token=0.01)


def test_users_for_large_or_infinite_effects_are_the_fewest_that_reach_power() -> None:
    from statsmodels.stats.power import TTestPower

    from flywheel.ab.planner import MIN_USERS, _users

    assert _users("twins", float("inf"), 0.05, 0.8) == MIN_USERS["twins"]
    assert _users("standard", float("inf"), 0.05, 0.8) == MIN_USERS["standard"]
    n = _users("twins", 20.0, 0.05, 0.8)  # statsmodels' own root finder gives NaN here
    assert TTestPower().power(20.0, n, 0.05) >= 0.8
