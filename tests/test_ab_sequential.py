"""Always-valid monitoring (flywheel.ab.sequential) against confseq's and seqabpy's reference
values, Brownian motion, and repeated A/A simulation with daily peeking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from flywheel import ab
from flywheel.ab.sequential import (
    confidence_sequence,
    daily_looks,
    mixture_rho,
    normal_log_mixture,
    normal_mixture_bound,
    sequential_srm_p_values,
)
from flywheel.ab.synthetic import synthetic_twin_days, synthetic_user_days
from flywheel.cli import app

LOOKS = 7  # daily looks of a one-week test


def test_normal_mixture_matches_confseq_reference_values() -> None:
    """confseq's C++ unit tests (test/uniform_boundaries_unittest.cpp, values from its R
    reference implementation): v_opt = 100, alpha_opt = alpha = 0.05, two-sided."""
    rho = mixture_rho(100, 0.05)
    assert rho == pytest.approx(12.60056, abs=1e-5)
    assert normal_log_mixture(10, 100, rho) == pytest.approx(-0.6510052, abs=1e-5)
    assert normal_mixture_bound(100, 0.05, rho) == pytest.approx(30.35209, abs=1e-5)


def test_boundary_crossing_rate_of_brownian_motion_is_below_alpha() -> None:
    """4,000 Gaussian random walks of 1,000 steps, checked after every step."""
    rng = np.random.default_rng(0)
    paths = rng.standard_normal((4000, 1000)).cumsum(axis=1)
    v = np.arange(1, 1001)
    crossed = (np.abs(paths) >= normal_mixture_bound(v, 0.05, mixture_rho(300, 0.05))).any(1)
    low, high = stats.binomtest(int(crossed.sum()), len(crossed)).proportion_ci(0.95)
    assert high < 0.05, f"crossing rate {crossed.mean():.3f} (95% CI [{low:.3f}, {high:.3f}])"
    assert crossed.mean() > 0.01  # the boundary is not vacuous


def test_sequential_srm_matches_seqabpy_reference_values() -> None:
    """seqabpy 0.3.1 gavi.sequential_p_value (Lindon & Malek 2022, Dirichlet prior 100 x
    the designed shares) on the same counts."""
    assert sequential_srm_p_values(np.array([120]), np.array([80]), 0.5)[0] == pytest.approx(
        0.11852388011169322, rel=1e-9
    )
    assert sequential_srm_p_values(np.array([5000]), np.array([5300]), 0.5)[0] == pytest.approx(
        0.13489369839234933, rel=1e-9
    )
    assert sequential_srm_p_values(np.array([850]), np.array([150]), 0.1)[0] == pytest.approx(
        5.18520097446477e-05, rel=1e-9
    )
    # running minimum over looks: once small, it stays small
    p = sequential_srm_p_values(np.array([900, 850, 9000]), np.array([100, 150, 1000]), 0.1)
    assert p[0] == 1.0  # seqabpy: 1 for (900, 100)
    assert p[1] == pytest.approx(5.18520097446477e-05, rel=1e-9)
    assert p[2] == p[1]  # back on the designed split, yet the mismatch seen stays seen


@pytest.mark.parametrize("n_tables", [400, pytest.param(1500, marks=pytest.mark.slow)])
def test_daily_peeking_inflates_false_positives_and_the_cs_does_not(n_tables: int) -> None:
    """A/A user-day tables, 7 daily looks: stop at the first look with p < 0.05 (naive) or
    with a confidence sequence that excludes 0."""
    rng = np.random.default_rng(1)
    naive, sequential = {"breadth": 0, "depth": 0}, {"breadth": 0, "depth": 0}
    for _ in range(n_tables):
        looks = daily_looks(synthetic_user_days(300, rng, n_test_days=LOOKS))
        for i, name in enumerate(naive):
            p_values = np.array([float(est[i].p_value[0]) for est in looks.estimates])
            naive[name] += int((p_values < 0.05).any())
            cs = confidence_sequence(*looks.lift_and_se(name), alpha=0.05, horizon=LOOKS)
            sequential[name] += int((cs.low > 0).any() or (cs.high < 0).any())
    for name in naive:
        n_low, n_high = stats.binomtest(naive[name], n_tables).proportion_ci(0.95)
        s_low, s_high = stats.binomtest(sequential[name], n_tables).proportion_ci(0.95)
        message = (
            f"{name} over {n_tables} A/A tables: naive daily peeking {naive[name] / n_tables:.3f} "
            f"(95% CI [{n_low:.3f}, {n_high:.3f}]), confidence sequence "
            f"{sequential[name] / n_tables:.3f} (95% CI [{s_low:.3f}, {s_high:.3f}])"
        )
        assert n_low > 0.05, message
        assert s_high <= 0.05, message


def test_a_planted_lift_is_detected_and_stops_early_for_harm() -> None:
    table = synthetic_user_days(3000, np.random.default_rng(2), lifts={"breadth": 0.2})
    result = ab.sequential_monitor(table)
    breadth = result.looks[-1]["breadth"]
    assert breadth.ci_low > 0 and breadth.significant
    assert result.looks[0]["breadth"].p_value >= breadth.p_value  # always-valid p never rises
    harmful = synthetic_user_days(3000, np.random.default_rng(3), lifts={"violation_rate": 1.0})
    stopped = ab.sequential_monitor(harmful)
    assert stopped.decision == "hold" and "violation_rate" in stopped.reason
    assert stopped.stopped_at is not None and stopped.stopped_at < LOOKS - 1
    assert json.loads(stopped.to_json())["stopped_at"] == stopped.stopped_at


def test_cs_is_wider_than_the_fixed_horizon_ci_and_monitors_twins_paired() -> None:
    table = synthetic_twin_days(800, np.random.default_rng(4), n_test_days=4, n_pre_days=3)
    twins = ab.sequential_monitor(table)
    standard = ab.sequential_monitor(table, design="standard")
    fixed = ab.analyze_paired(table)
    last = twins.looks[-1]["breadth"]
    assert twins.design == "twins" and standard.design == "standard"
    assert last.lift == pytest.approx(fixed["breadth"].lift)
    assert last.ci_high - last.ci_low > fixed["breadth"].ci_high - fixed["breadth"].ci_low
    assert twins.looks[-1].srm is None and standard.looks[-1].srm is not None
    assert last.ci_high - last.ci_low < (
        standard.looks[-1]["breadth"].ci_high - standard.looks[-1]["breadth"].ci_low
    )


def test_a_sample_ratio_mismatch_keeps_the_test_running() -> None:
    table = synthetic_user_days(2000, np.random.default_rng(5), lifts={"breadth": 0.25})
    treated = table.loc[table["arm"] == "treatment", "user_id"].unique()
    skewed = table[~table["user_id"].isin(treated[: len(treated) // 3])]
    result = ab.sequential_monitor(skewed)
    assert result.looks[0].srm.flagged and result.stopped_at is None
    assert "sample ratio mismatch" in result.reason and "always-valid p" in result.reason


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: confidence_sequence(np.zeros(3), np.ones(2), alpha=0.05, horizon=3), "shape"),
        (lambda: confidence_sequence(np.zeros(3), np.ones(3), alpha=0.05, horizon=0), "horizon"),
        (lambda: mixture_rho(0, 0.05), "v_opt > 0"),
        (
            lambda: ab.sequential_monitor(
                synthetic_user_days(20, np.random.default_rng(6)), design="bandit"
            ),
            "design must be",
        ),
        (
            lambda: ab.sequential_monitor(
                synthetic_user_days(20, np.random.default_rng(7)).drop(columns="messages")
            ),
            "missing column",
        ),
        (
            lambda: ab.sequential_monitor(
                synthetic_user_days(20, np.random.default_rng(8)),
                ab.AnalysisConfig(absolute_margins={"report_rate": 0.005}),
            ),
            "always-valid interval of the lift only",
        ),
    ],
)
def test_bad_input_is_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_cli_analyze_sequential_prints_daily_cis_for_both_designs(tmp_path: Path) -> None:
    table = synthetic_twin_days(300, np.random.default_rng(8), n_test_days=3, n_pre_days=2)
    table.to_csv(tmp_path / "twins.csv", index=False)
    out = tmp_path / "out"
    done = CliRunner().invoke(
        app, ["analyze", str(tmp_path / "twins.csv"), "--out", str(out), "--sequential"]
    )
    assert done.exit_code == 0, done.output
    assert "Twin analysis" in done.output and "A/B analysis" in done.output
    assert "Always-valid 95% CIs of the lift by day (twins)" in done.output
    assert "Always-valid 95% CIs of the lift by day (standard)" in done.output
    for name in ("paired.json", "sequential_twins.json", "sequential_standard.json"):
        assert json.loads((out / name).read_text())
    looks = json.loads((out / "sequential_standard.json").read_text())["looks"]
    assert [look["day"] for look in looks] == [0, 1, 2]


def test_a_look_without_variance_carries_no_information() -> None:
    # Twins whose lives never disagreed on day 0 leave a paired se of rounding noise there;
    # taken as information, it would make the boundary absurdly wide at every later look.
    estimate = np.array([0.0, 0.02, 0.03])
    noisy = confidence_sequence(estimate, np.array([1.7e-17, 0.02, 0.015]), alpha=0.05, horizon=3)
    clean = confidence_sequence(estimate, np.array([np.nan, 0.02, 0.015]), alpha=0.05, horizon=3)
    assert np.isnan(noisy.low[0]) and np.isnan(noisy.high[0])
    np.testing.assert_allclose(noisy.low[1:], clean.low[1:])
    np.testing.assert_allclose(noisy.high[1:], clean.high[1:])
    assert noisy.high[1] - noisy.low[1] < 0.5
