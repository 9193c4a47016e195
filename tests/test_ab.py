"""A/B analysis (flywheel.ab) against independent references: scipy, statsmodels, bootstrap,
textbook values and repeated simulation with a known truth."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.weightstats import CompareMeans
from typer.testing import CliRunner

from flywheel import ab
from flywheel.ab.aa import aa_p_values
from flywheel.ab.synthetic import synthetic_user_days
from flywheel.cli import app
from flywheel.metrics import UserMetric, aggregate_users, user_metrics

DAYS = 7


def mean_metric(x: np.ndarray, u: np.ndarray | None = None, kind: str = "mean") -> UserMetric:
    """A per-user mean metric (kind 'ratio' with denominator 1 must give the same numbers)."""
    ones = np.ones_like(x, dtype=float)
    u = np.zeros_like(ones) if u is None else u
    return UserMetric("m", kind, "success", True, x, ones, u, ones, "test metric")


def batch_experiments(
    rng: np.random.Generator, n_experiments: int, n_users: int, breadth: float, depth: float
) -> tuple[np.ndarray, UserMetric, UserMetric]:
    """Independent experiments (rows) with exact true lifts of breadth and depth.

    Same model as flywheel.ab.synthetic at the per-user level: active days ~ Binomial(7, p),
    messages ~ Poisson(lam * active days), treatment multiplies p and lam.
    """
    shape = (n_experiments, n_users)
    treated = rng.random(shape) < 0.5
    p = 0.8 * rng.beta(2, 3, shape)
    lam = rng.gamma(2.0, 2.5, shape)
    active = rng.binomial(DAYS, p * np.where(treated, 1 + breadth, 1))
    pre_active = rng.binomial(DAYS, p)
    messages = rng.poisson(lam * np.where(treated, 1 + depth, 1) * active)
    pre_messages = rng.poisson(lam * pre_active)
    ones = np.ones(shape)
    b = UserMetric("breadth", "mean", "success", True, active / DAYS, ones, pre_active / DAYS,
                   ones, "")  # fmt: skip
    d = UserMetric("depth", "ratio", "success", True, messages.astype(float),
                   active.astype(float), pre_messages.astype(float), pre_active.astype(float), "")  # fmt: skip
    return treated, b, d


# ---------------------------------------------------------------- sample ratio mismatch


def test_srm_reproduces_the_textbook_value() -> None:
    srm = ab.srm_test(821_588, 815_482, treatment_share=0.5)
    assert srm.p_value == pytest.approx(1.8e-6, rel=0.05)
    assert srm.chi2 == pytest.approx(2 * 3053**2 / 818_535)
    assert srm.flagged
    assert not ab.srm_test(9_020, 980, treatment_share=0.1).flagged


# ---------------------------------------------------------------- estimators vs references


def test_mean_metric_matches_scipy_welch_and_ratio_form_matches_statsmodels_z() -> None:
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 1.5, 3000)
    treated = rng.random(3000) < 0.3
    x[treated] *= 1.05
    est = ab.compare(mean_metric(x), treated, cuped=False)
    welch = stats.ttest_ind(x[treated], x[~treated], equal_var=False)
    assert est.p_value[0] == pytest.approx(welch.pvalue, rel=1e-9)
    assert est.lift[0] == pytest.approx(x[treated].mean() / x[~treated].mean() - 1)
    # A ratio metric whose denominator is 1 for every user is a mean: the delta method must
    # collapse to the two-sample z-test exactly.
    ratio = ab.compare(mean_metric(x, kind="ratio"), treated, cuped=False)
    _, z_p = CompareMeans.from_data(x[treated], x[~treated]).ztest_ind(usevar="unequal")
    assert ratio.p_value[0] == pytest.approx(z_p, rel=1e-9)


def test_difference_interval_matches_statsmodels_and_covers_at_its_level() -> None:
    """The interval of treatment - control that absolute margins are held to: for a mean
    metric statsmodels' unequal-variance z interval; for a per-reply rate its upper end
    misses a true difference of +0.5 points on about alpha / 2 of experiments, so a
    guardrail worse by exactly its margin passes about that often."""
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 1.5, 3000)
    treated = rng.random(3000) < 0.3
    est = ab.compare(mean_metric(x, kind="ratio"), treated, cuped=False)
    _, high = CompareMeans.from_data(x[treated], x[~treated]).zconfint_diff(usevar="unequal")
    assert est.difference_ci_high[0] == pytest.approx(high, rel=1e-9)

    shape = (2000, 1000)  # experiments x users: ~30 reports per control arm
    treated = rng.random(shape) < 0.5
    replies = rng.poisson(5.0, shape) + 1.0
    reports = rng.binomial(replies.astype(int), np.where(treated, 0.015, 0.010)).astype(float)
    zeros = np.zeros(shape)
    rate = UserMetric("report_rate", "ratio", "guardrail", False, reports, replies, zeros,
                      zeros, "")  # fmt: skip
    missed = (ab.compare(rate, treated, cuped=False).difference_ci_high < 0.005).mean()
    # alpha / 2 = 2.5%, give or take the normal approximation's skew on rare counts
    # (2.4% - 3.4% seen over seeds) and 2,000 experiments' noise (SE 0.35 points)
    assert 0.015 < missed < 0.04, missed


def test_delta_method_ratio_ci_agrees_with_user_level_bootstrap() -> None:
    rng = np.random.default_rng(1)
    treated, _, depth = batch_experiments(rng, 1, 4000, breadth=0.0, depth=0.1)
    treated, x, y = treated[0], depth.numerator[0], depth.denominator[0]
    est = ab.compare(
        UserMetric("depth", "ratio", "success", True, x, y, x * 0, y * 0 + 1, ""),
        treated,
        cuped=False,
    )
    n_boot = 2000
    lifts = []
    for arm in (treated, ~treated):
        idx = rng.integers(0, arm.sum(), (n_boot, arm.sum()))
        lifts.append(x[arm][idx].sum(1) / y[arm][idx].sum(1))
    boot = lifts[0] / lifts[1] - 1
    assert est.se[0] == pytest.approx(boot.std(ddof=1), rel=0.08)
    low, high = np.percentile(boot, [2.5, 97.5])
    width = high - low
    assert est.ci_low[0] == pytest.approx(low, abs=0.1 * width)
    assert est.ci_high[0] == pytest.approx(high, abs=0.1 * width)


@pytest.mark.parametrize("cuped", [True, False])
def test_ci_covers_the_true_lift_95_percent_of_the_time(cuped: bool) -> None:
    """2,000 independent experiments of 1,000 users: coverage must be 93-97%."""
    rng = np.random.default_rng(2 + cuped)
    truth = {"breadth": 0.05, "depth": 0.10}
    covered = {name: 0 for name in truth}
    n_experiments, chunk = 2000, 500
    for _ in range(n_experiments // chunk):
        treated, breadth, depth = batch_experiments(rng, chunk, 1000, **truth)
        for metric in (breadth, depth):
            est = ab.compare(metric, treated, cuped=cuped)
            hit = (est.ci_low <= truth[metric.name]) & (truth[metric.name] <= est.ci_high)
            covered[metric.name] += int(hit.sum())
    for name, hits in covered.items():
        assert 0.93 <= hits / n_experiments <= 0.97, (name, hits / n_experiments)


# ---------------------------------------------------------------- CUPED


def test_cuped_shrinks_variance_by_rho_squared_with_pooled_theta() -> None:
    rng = np.random.default_rng(4)
    n, rho = 20_000, 0.8
    z = rng.normal(size=n)
    u = 5 + z
    x = 5 + rho * z + np.sqrt(1 - rho**2) * rng.normal(size=n)
    treated = rng.random(n) < 0.5
    x[treated] += 0.05
    est = ab.compare(mean_metric(x, u), treated)
    plain = ab.compare(mean_metric(x, u), treated, cuped=False)
    # theta is the OLS slope of the metric on its covariate over both arms pooled
    slope = sm.OLS(x, sm.add_constant(u)).fit().params[1]
    assert est.theta[0] == pytest.approx(slope, rel=1e-9)
    assert est.variance_reduction[0] == pytest.approx(rho**2, abs=0.02)
    width = (est.ci_high - est.ci_low)[0] / (plain.ci_high - plain.ci_low)[0]
    assert width == pytest.approx(np.sqrt(1 - rho**2), abs=0.03)
    # A covariate unrelated to the metric removes (almost) nothing.
    noise = ab.compare(mean_metric(x, rng.normal(size=n)), treated)
    assert abs(noise.variance_reduction[0]) < 0.005


def test_cuped_on_a_table_reduces_variance_of_breadth_and_depth() -> None:
    table = synthetic_user_days(4000, np.random.default_rng(5), lifts={"depth": 0.05})
    result = ab.analyze(table)
    assert result.cuped
    # Per-user breadth pre and test are Binomial(7, p) / 7 with p ~ 0.8 Beta(2, 3):
    # corr = Var p / (Var p + E[p(1 - p)] / 7), and CUPED removes corr^2 of the variance.
    var_p = 0.8**2 * 2 * 3 / (5**2 * 6)
    mean_p = 0.8 * 2 / 5
    rho = var_p / (var_p + (mean_p - var_p - mean_p**2) / DAYS)
    assert result["breadth"].cuped_variance_reduction == pytest.approx(rho**2, abs=0.05)
    assert result["depth"].cuped_variance_reduction > 0.3
    assert result["depth"].ci_high - result["depth"].ci_low < (
        result["depth"].ci_high_unadjusted - result["depth"].ci_low_unadjusted
    )
    # without a pre-period there is nothing to adjust with
    no_pre = ab.analyze(table[table["day"] >= 0])
    assert not no_pre.cuped
    assert all(m.cuped_variance_reduction == 0 for m in no_pre.metrics)


# ---------------------------------------------------------------- power


def test_mde_is_detected_with_the_stated_power() -> None:
    """Simulate experiments whose true breadth lift equals the reported MDE: ~80% reject."""
    n_users = 1000
    mde = ab.analyze(synthetic_user_days(n_users, np.random.default_rng(6)))["breadth"].mde
    rng = np.random.default_rng(7)
    rejected = 0
    for _ in range(4):
        treated, breadth, _ = batch_experiments(rng, 500, n_users, breadth=mde, depth=0.0)
        rejected += int((ab.compare(breadth, treated).p_value < 0.05).sum())
    assert 0.74 <= rejected / 2000 <= 0.86, rejected / 2000


# ---------------------------------------------------------------- A/A


@pytest.fixture(scope="module")
def logged() -> pd.DataFrame:
    """A logged run with real effects: re-randomisation must still give true nulls."""
    lifts = {"breadth": 0.1, "violation_rate": 0.5}
    return synthetic_user_days(3000, np.random.default_rng(8), lifts=lifts)


def test_aa_false_positive_rate_and_uniform_p_values(logged: pd.DataFrame) -> None:
    result = ab.aa_test(logged, 1000, seed=0)
    assert result.n_treatment == int(
        (logged.groupby("user_id")["arm"].first() == "treatment").sum()
    )
    for metric in result.metrics:
        assert 0.03 <= metric.false_positive_rate <= 0.07, metric
        assert metric.ks_p_value > 0.01, metric
        assert metric.n_valid == 1000
    assert result.calibrated
    assert json.loads(result.to_json())["metrics"]["depth"]["n_valid"] == 1000


def test_aa_vectorised_replicates_equal_the_plain_analysis(logged: pd.DataFrame) -> None:
    users = aggregate_users(logged)
    names, p_values = aa_p_values(users, 3, seed=11)
    # the same three re-assignments, drawn the way aa_p_values draws one chunk
    rng = np.random.default_rng(11)
    assignments = rng.permuted(np.tile(users.treatment, (3, 1)), axis=1)
    for replicate, assignment in enumerate(assignments):
        result = ab.analyze(users.with_treatment(assignment))
        expected = [result[name].p_value for name in names]
        np.testing.assert_allclose(p_values[:, replicate], expected, rtol=1e-8)


# ---------------------------------------------------------------- decision


@pytest.mark.parametrize(
    ("lifts", "share", "config", "decision", "says"),
    [
        ({"violation_rate": 0.5}, 0.5, {}, "hold", "significantly worse: violation_rate"),
        ({"breadth": 0.1}, 0.5, {"noninferiority_margins": {
            "report_rate": 0.3, "violation_rate": 0.3, "unsafe_rate": 0.3}}, "ship",
         "significantly better: breadth"),
        ({"breadth": 0.1}, 0.5, {}, "inconclusive", "not shown within +10%"),
        ({}, 0.5, {}, "inconclusive", "no success metric moved significantly"),
        ({"breadth": 0.1}, 0.45, {}, "inconclusive", "sample ratio mismatch"),
    ],
)  # fmt: skip
def test_decision_rule(
    lifts: dict[str, float], share: float, config: dict, decision: str, says: str
) -> None:
    table = synthetic_user_days(5000, np.random.default_rng(9), lifts=lifts, treatment_share=share)
    result = ab.analyze(table, ab.AnalysisConfig(**config))
    assert (result.decision, says in result.reason) == (decision, True), result.summary()


def with_reports(table: pd.DataFrame, rng: np.random.Generator, control: float, treatment: float):
    """The table with every bot reply reported at the arm's rate (treatment: test days only)."""
    exposed = (table["arm"] == "treatment") & (table["day"] >= 0)
    return table.assign(reports=rng.binomial(table["bot_replies"], np.where(exposed, treatment, control)))  # fmt: skip


@pytest.mark.parametrize(("treatment", "noninferior"), [(0.005, True), (0.015, False)])
def test_absolute_margin_bounds_a_rare_guardrail_in_points(
    treatment: float, noninferior: bool
) -> None:
    """A report rate of 0.5%: no affordable test shows it within +10%, but within +0.5
    percentage points it is shown, unless the treatment really adds a point."""
    rng = np.random.default_rng(13)
    table = with_reports(
        synthetic_user_days(3000, rng, lifts={"breadth": 0.1}), rng, 0.005, treatment
    )
    relative = ab.analyze(table)
    assert not relative["report_rate"].noninferior
    points = {"report_rate": 0.005, "unsafe_rate": 0.005, "violation_rate": 0.02}
    result = ab.analyze(table, ab.AnalysisConfig(absolute_margins=points))
    report = result["report_rate"]
    assert (report.noninferiority_scale, report.noninferiority_margin) == ("absolute", 0.005)
    assert report.noninferior is noninferior
    assert result["breadth"].significant
    if noninferior:
        assert result.decision == "ship", result.reason
    else:
        assert report.noninferiority_bound > 0.005 and result.decision != "ship"
        assert "report_rate" in result.reason


def test_guardrail_with_no_control_events_holds_a_worse_treatment_under_cuped() -> None:
    """Control wrote no unsafe reply in the test, some in the pre-period. CUPED must not
    shift its mean of 0 (the centring's rounding, ~1e-18, or a shift below 0 would make a
    relative lift of any size and sign); the lift over no events is undefined, and the
    treatment, unsafe on half its replies, must still be held."""
    rows = []
    for user in range(200):
        treated = user >= 100
        rank = user % 100
        pre_unsafe = int(rank < (5 if treated else 10))
        test_unsafe = (2 if rank < 5 else 1) if treated else 0
        for day, unsafe in ((-1, pre_unsafe), (0, test_unsafe)):
            rows.append({"user_id": user, "arm": "treatment" if treated else "control",
                         "day": day, "active": 1, "messages": 3, "bot_replies": 2,
                         "reports": 0, "violations": 0, "unsafe_replies": unsafe})  # fmt: skip
    result = ab.analyze(pd.DataFrame(rows))
    unsafe = next(m for m in result.metrics if m.name == "unsafe_rate")
    assert unsafe.control == 0 and unsafe.cuped_theta == 0
    assert unsafe.lift == math.inf
    assert unsafe.treatment == pytest.approx(0.525)
    assert unsafe.significant and not unsafe.improved
    assert (
        result.decision == "hold" and "unsafe_rate 0 -> 0.525 (no control events)" in result.reason
    )
    row = next(line for line in result.summary().splitlines() if line.startswith("unsafe_rate"))
    assert "no control events" in row and "n/a" in row


def test_guardrail_with_no_treatment_events_has_no_interval_and_is_not_worse() -> None:
    """Treatment wrote no unsafe reply: its per-user variance is 0, and the delta method
    would call the lift of -100% exact. No interval is claimed; an arm without events
    cannot be worse than its control, so the guardrail holds nothing back."""
    rows = [
        {"user_id": user, "arm": "treatment" if user >= 100 else "control", "day": 0,
         "active": 1, "messages": 3, "bot_replies": 2, "reports": 0, "violations": 0,
         "unsafe_replies": int(user < 100 and user % 10 == 0)}
        for user in range(200)
    ]  # fmt: skip
    result = ab.analyze(pd.DataFrame(rows))
    unsafe = next(m for m in result.metrics if m.name == "unsafe_rate")
    assert unsafe.treatment == 0 and unsafe.lift == -1
    assert math.isnan(unsafe.ci_low) and math.isnan(unsafe.ci_high)
    assert unsafe.noninferior and unsafe.improved
    row = next(line for line in result.summary().splitlines() if line.startswith("unsafe_rate"))
    assert "no treatment events" in row


def test_multiple_comparison_correction_is_holm_within_families() -> None:
    result = ab.analyze(synthetic_user_days(3000, np.random.default_rng(10)))
    for role in ("success", "guardrail"):
        family = [m for m in result.metrics if m.role == role]
        expected = sm.stats.multipletests([m.p_value for m in family], method="holm")[1]
        np.testing.assert_allclose([m.p_value_adjusted for m in family], expected)


# ---------------------------------------------------------------- result objects, config, CLI


def test_result_is_frozen_and_serialises_to_strict_json() -> None:
    table = synthetic_user_days(500, np.random.default_rng(12)).assign(unsafe_replies=0)
    result = ab.analyze(table)
    data = json.loads(result.to_json())
    assert {"decision", "reason", "srm_p_value", "metrics"} <= data.keys()
    for metric in data["metrics"].values():
        assert {"lift", "ci_low", "ci_high", "p_value", "cuped_variance_reduction"} <= metric.keys()
    assert data["metrics"]["unsafe_rate"]["lift"] is None  # 0 / 0: no events in either arm
    assert result["unsafe_rate"].noninferior  # no events is not a breach
    assert data["srm_p_value"] == result.srm.p_value
    assert "breadth" in result.summary() and result.decision.upper() in result.summary()
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.decision = "ship"  # type: ignore[misc]
    with pytest.raises(KeyError, match="no metric 'joy'"):
        result["joy"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\), got 1.5"),
        ({"correction": "magic"}, "not a statsmodels multipletests method"),
        ({"noninferiority_margins": {"report_rate": 0.0}}, "must be a positive"),
        ({"retention_day": 0}, "retention_day must be >= 1"),
        ({"noninferiority_margins": {"reports": 0.1}}, r"unknown guardrail\(s\) \['reports'\]"),
        ({"absolute_margins": {"report_rate": -0.01}}, r"absolute_margins\['report_rate'\] must"),
        ({"absolute_margins": {"likes": 0.01}}, r"absolute_margins has unknown guardrail"),
    ],
)
def test_config_errors_name_field_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ab.AnalysisConfig(**kwargs)


def test_one_arm_table_is_refused() -> None:
    table = synthetic_user_days(50, np.random.default_rng(13)).assign(arm="control")
    with pytest.raises(ValueError, match="at least 2 per arm"):
        ab.analyze(table)


def test_cli_analyze_writes_report_plots_and_aa(tmp_path: Path) -> None:
    table = synthetic_user_days(600, np.random.default_rng(14), lifts={"violation_rate": 0.8})
    table.to_csv(tmp_path / "days.csv", index=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flywheel.cli", "analyze", str(tmp_path / "days.csv"),
           "--out", str(out), "--aa", "200"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["decision"] == "hold" and "violation_rate" in result["reason"]
    assert json.loads((out / "aa.json").read_text())["n_replicates"] == 200
    for png in ("daily.png", "lift.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "**Decision: HOLD**" in report and "## A/A calibration" in report


def test_cli_analyze_reports_a_bad_table_without_traceback(tmp_path: Path) -> None:
    table = synthetic_user_days(20, np.random.default_rng(16)).drop(columns=["reports"])
    table.to_csv(tmp_path / "bad.csv", index=False)
    bad = CliRunner().invoke(app, ["analyze", str(tmp_path / "bad.csv"), "--out", str(tmp_path)])
    assert bad.exit_code == 2
    assert "missing column(s) ['reports']" in bad.output and "Traceback" not in bad.output


def test_every_metric_definition_is_analysed() -> None:
    users = aggregate_users(synthetic_user_days(200, np.random.default_rng(15)))
    result = ab.analyze(users)
    assert [m.name for m in result.metrics] == [m.name for m in user_metrics(users)]
