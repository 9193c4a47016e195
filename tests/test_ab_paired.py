"""Paired analysis of counterfactual twins (flywheel.ab.paired) against scipy and repeated
simulation of synthetic twin tables whose true effects are known in closed form."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flywheel import ab
from flywheel.ab.paired import life_views, paired_compare
from flywheel.ab.synthetic import MEAN_ACTIVITY, MEAN_MESSAGES, synthetic_twin_days
from flywheel.metrics import UserMetric, user_metrics

SMALL = {"n_test_days": 3, "n_pre_days": 2}  # a short test keeps 400 tables fast


def paired_estimates(table: pd.DataFrame) -> dict[str, ab.paired.PairedEstimates]:
    """The paired estimates of every metric, as analyze_paired computes them."""
    control, treatment = life_views(table)
    return {
        c.name: paired_compare(c, t)
        for c, t in zip(user_metrics(control), user_metrics(treatment), strict=True)
    }


def clopper_pearson(hits: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(hits, n).proportion_ci(0.95)
    return ci.low, ci.high


def test_paired_t_matches_scipy_ttest_rel() -> None:
    table = synthetic_twin_days(500, np.random.default_rng(0), lifts={"breadth": 0.1}, **SMALL)
    control, treatment = life_views(table)
    xc, xt = user_metrics(control)[0].numerator, user_metrics(treatment)[0].numerator
    reference = stats.ttest_rel(xt, xc)
    result = ab.analyze_paired(table)
    breadth = result["breadth"]
    assert breadth.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    ci = reference.confidence_interval(0.95)
    assert (breadth.ate_ci_low, breadth.ate_ci_high) == pytest.approx((ci.low, ci.high))
    assert breadth.ate == pytest.approx(xt.mean() - xc.mean())
    assert breadth.lift == pytest.approx(xt.mean() / xc.mean() - 1)
    assert breadth.n_control == breadth.n_treatment == 500


def test_ratio_delta_method_with_denominator_one_is_the_paired_z_test() -> None:
    """A ratio metric whose denominators are all 1 is a mean: same estimate and variance."""
    rng = np.random.default_rng(1)
    xc = rng.gamma(2.0, 1.0, 800)
    xt = xc * 1.05 + rng.normal(0, 0.3, 800)
    ones = np.ones(800)
    c = UserMetric("m", "ratio", "success", True, xc, ones, xc, ones, "")
    t = UserMetric("m", "ratio", "success", True, xt, ones, xc, ones, "")
    est = paired_compare(c, t)
    reference = stats.ttest_rel(xt, xc)
    assert est.ate_se[0] == pytest.approx(reference.statistic**-1 * (xt - xc).mean())
    assert est.p_value[0] == pytest.approx(2 * stats.norm.sf(abs(reference.statistic)))


@pytest.mark.parametrize("n_tables", [400, pytest.param(2000, marks=pytest.mark.slow)])
def test_twin_ci_covers_the_closed_form_true_effect(n_tables: int) -> None:
    """Planted +10% breadth and depth: lift CI covers 0.10, ATE CI covers b E[p], d E[lam]."""
    rng = np.random.default_rng(2)
    lifts = {"breadth": 0.1, "depth": 0.1}
    truth = {
        ("breadth", "lift"): 0.1,
        ("depth", "lift"): 0.1,
        ("breadth", "ate"): 0.1 * MEAN_ACTIVITY,
        ("depth", "ate"): 0.1 * MEAN_MESSAGES,
    }
    hits = dict.fromkeys(truth, 0)
    for _ in range(n_tables):
        estimates = paired_estimates(synthetic_twin_days(300, rng, lifts=lifts, **SMALL))
        for (name, what), true in truth.items():
            est = estimates[name]
            ate_half, lift_half = est.halfwidths(0.05)
            center, half = (est.lift, lift_half) if what == "lift" else (est.ate, ate_half)
            hits[name, what] += int(abs(center[0] - true) <= half[0])
    for key, count in hits.items():
        low, high = clopper_pearson(count, n_tables)
        assert 0.93 <= count / n_tables <= 0.97, (
            f"{key}: coverage {count / n_tables:.3f} over {n_tables} tables "
            f"(95% binomial CI [{low:.3f}, {high:.3f}])"
        )


@pytest.mark.parametrize("n_tables", [400, pytest.param(2000, marks=pytest.mark.slow)])
def test_aa_twins_false_positive_rate(n_tables: int) -> None:
    """Same policy in both lives, independent noise beyond the shared uniforms."""
    rng = np.random.default_rng(3)
    rejections = {"breadth": 0, "depth": 0}
    for _ in range(n_tables):
        estimates = paired_estimates(synthetic_twin_days(300, rng, coupling=0.8, **SMALL))
        for name in rejections:
            rejections[name] += int(estimates[name].p_value[0] < 0.05)
    for name, count in rejections.items():
        low, high = clopper_pearson(count, n_tables)
        assert 0.03 <= count / n_tables <= 0.07, (
            f"{name}: A/A false-positive rate {count / n_tables:.3f} over {n_tables} tables "
            f"(95% binomial CI [{low:.3f}, {high:.3f}])"
        )


def test_analyze_paired_reports_the_same_numbers_as_its_estimator() -> None:
    table = synthetic_twin_days(400, np.random.default_rng(4), lifts={"depth": 0.1}, **SMALL)
    result = ab.analyze_paired(table)
    for name, est in paired_estimates(table).items():
        ate_half, lift_half = est.halfwidths(0.05)
        metric = result[name]
        assert metric.ci_high - metric.lift == pytest.approx(lift_half[0])
        assert metric.ate_ci_high - metric.ate == pytest.approx(ate_half[0])
        assert metric.p_value == pytest.approx(est.p_value[0])


def test_twin_ci_is_narrower_than_the_standard_design_on_a_coupled_table() -> None:
    table = synthetic_twin_days(
        1000, np.random.default_rng(5), lifts={"breadth": 0.1}, coupling=0.95, **SMALL
    )
    result = ab.analyze_paired(table)
    for name in ("breadth", "depth"):
        twin, standard = result[name], result.standard[name]
        assert twin.ci_high - twin.ci_low < 0.5 * (standard.ci_high - standard.ci_low), name
        assert result[name].variance_ratio > 2, name


def test_variance_ratio_is_the_token_weighted_variance_ratio() -> None:
    table = synthetic_twin_days(600, np.random.default_rng(6), **SMALL)
    result = ab.analyze_paired(table)
    z = stats.norm.ppf(0.975)
    standard = ab.standard_view(table)
    for name in ("breadth", "depth"):
        v_standard = ((result.standard[name].ci_high - result.standard[name].ci_low) / (2 * z)) ** 2
        v_twin = result[name].lift_se ** 2
        expected = (v_standard * standard["completion_tokens"].sum()) / (
            v_twin * table["completion_tokens"].sum()
        )
        assert result[name].variance_ratio == pytest.approx(expected)
        assert ab.variance_ratio(table, name) == pytest.approx(expected)
    # Lives that never disagreed have no twin variance (only the rounding of a zero).
    values = ["active", "messages", "bot_replies", "reports", "violations"]
    test = table[table["day"] >= 0]
    control_life = test[test["life"] == "control"][["user_id", "day", *values]]
    mirrored = test.drop(columns=values).merge(control_life, on=["user_id", "day"])
    same = pd.concat([table[table["day"] < 0], mirrored[table.columns]], ignore_index=True)
    assert np.isnan(ab.analyze_paired(same)["breadth"].variance_ratio)
    # Without a token column the designs are priced in simulated user-days.
    no_tokens = ab.analyze_paired(table.drop(columns="completion_tokens"))
    assert no_tokens.cost_unit == "user-days"
    assert (no_tokens.cost_standard, no_tokens.cost_twin) == (len(standard), len(table))


def test_standard_view_is_what_production_sees() -> None:
    table = synthetic_twin_days(200, np.random.default_rng(7), **SMALL)
    assert ab.is_twin_table(table)
    standard = ab.standard_view(table)
    assert not ab.is_twin_table(standard)
    assert (standard["life"] == standard["arm"]).all()
    assert len(standard) == 200 * (SMALL["n_test_days"] + SMALL["n_pre_days"])
    ab.analyze(standard)  # an ordinary user-day table
    plain = standard.drop(columns="life")
    assert not ab.is_twin_table(plain) and ab.standard_view(plain) is plain


def test_paired_decision_holds_a_harmful_treatment() -> None:
    table = synthetic_twin_days(
        1500, np.random.default_rng(8), lifts={"violation_rate": 0.5}, **SMALL
    )
    result = ab.analyze_paired(table)
    assert result.decision == "hold" and "violation_rate" in result.reason
    parsed = json.loads(result.to_json())
    assert parsed["design"] == "twins" and parsed["standard"]["decision"] in (
        "hold",
        "inconclusive",
    )
    assert "Twin analysis" in result.summary()


def test_absolute_margin_holds_the_twin_ate_interval() -> None:
    """Under an absolute margin a twin guardrail is held to the upper end of its ATE CI."""
    table = synthetic_twin_days(1500, np.random.default_rng(8), lifts={"breadth": 0.1}, **SMALL)
    relative = ab.analyze_paired(table)
    assert relative.decision == "inconclusive" and "not shown within +10%" in relative.reason
    points = {"report_rate": 0.005, "unsafe_rate": 0.005, "violation_rate": 0.02}
    result = ab.analyze_paired(table, ab.AnalysisConfig(absolute_margins=points))
    for name, margin in points.items():
        guardrail = result[name]
        assert guardrail.noninferiority_bound == guardrail.ate_ci_high
        assert guardrail.noninferior is (guardrail.ate_ci_high < margin)
    assert result.decision == "ship", result.reason
    tight = {name: result[name].ate_ci_high / 2 for name in points}
    held = ab.analyze_paired(table, ab.AnalysisConfig(absolute_margins=tight))
    assert held.decision == "inconclusive" and " pp (CI up to +" in held.reason


def test_a_missing_life_is_refused_with_the_user_day() -> None:
    table = synthetic_twin_days(50, np.random.default_rng(9), **SMALL)
    drop = table.index[(table["user_id"] == 7) & (table["day"] == 1) & (table["life"] == "control")]
    with pytest.raises(ValueError, match=r"lived by one policy only, first user 7 day 1"):
        ab.analyze_paired(table.drop(index=drop))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.assign(life=t["life"].replace("control", "ctrl")), "'life' has values"),
        (lambda t: t.drop(columns="life"), "missing column 'life'"),
        (
            lambda t: t.assign(life=np.where(t["day"] < 0, "treatment", t["life"])),
            "pre-period is lived once",
        ),
    ],
)
def test_malformed_twin_tables_are_refused(edit, message: str) -> None:
    table = synthetic_twin_days(40, np.random.default_rng(10), **SMALL)
    with pytest.raises(ValueError, match=message):
        ab.analyze_paired(edit(table))
