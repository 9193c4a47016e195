"""Paired analysis of counterfactual twins: the same users lived under control and treatment.

The twin table
--------------
A user-day table (:mod:`flywheel.metrics`) plus a string column ``life``: which policy served
the row's user life, ``"control"`` or ``"treatment"``. In a standard experiment ``life`` equals
``arm`` on every row (or the column is absent). In a twin experiment every user has their
pre-period rows once (``life == arm``, the hash-assigned arm) and, for every test day, two rows,
one per life, with the same ``user_id``, ``day`` and ``arm``.

- :func:`standard_view`: the rows with ``life == arm``, what production would have seen (each
  user in their hash-assigned arm only): an ordinary table for :func:`flywheel.ab.analyze`.
- :func:`life_views`: per life, its test rows plus the shared pre-period rows, aggregated with
  :func:`flywheel.metrics.aggregate_users` in the same user order, so every metric of
  :func:`flywheel.metrics.user_metrics` gives per-user (numerator, denominator) in each life.

Statistics
----------
Each metric in a life is ``M = sum(x) / sum(y)`` over all n users. The estimand is the average
treatment effect over the population, ``ATE = M_t - M_c``, and the relative lift
``L = M_t / M_c - 1``. The delta method on the paired sums linearises both with the per-user
influence values ``e_i = (x_i - M y_i) / mean(y)`` of each life::

    ATE: d_i = e_t,i - e_c,i                    Var(ATE) = var(d) / n
    L:   l_i = e_t,i / M_c - M_t e_c,i / M_c^2  Var(L)   = var(l) / n

(sample variances, ddof 1). Because both lives of a user enter one ``d_i``, the covariance of
the two lives' sums enters the variance: ``var(d) = var(e_t) + var(e_c) - 2 cov(e_t, e_c)``.
A mean metric that counts every user in both lives (breadth: y = 1) has ``d_i = x_t,i - x_c,i``
minus a constant, so its test is exactly the paired t-test (``scipy.stats.ttest_rel``: t with
n - 1 degrees of freedom, also for the ATE CI). Other metrics (ratio metrics, and retention,
whose eligible users differ between lives) use a z-test. The relative lift's CI is the delta
method (``L +- z sd(L)``, as in :mod:`flywheel.ab.delta`), not Fieller; its p-value is the ATE's.

CUPED is not applied: the pre-period is shared by both lives, so a per-life adjustment with one
theta cancels in the difference. Multiple-comparison correction, guardrail non-inferiority
margins and the ship / hold / inconclusive rule are those of :mod:`flywheel.ab.analysis`.

Variance ratio at equal generated tokens
----------------------------------------
A twin experiment generates tokens for both lives of every test user-day. With ``V`` the
variance of a design's lift estimator and ``C`` the generated tokens it spent (the sum of the
``completion_tokens`` column over the rows the design lives: :func:`standard_view` for the
standard design, every row for twins; without that column, the number of user-day rows), and
both variances proportional to 1 / users, so to 1 / tokens::

    variance_ratio = (V_standard * C_standard) / (V_twin * C_twin)

``V_standard`` is that of :func:`flywheel.ab.analyze` on :func:`standard_view` (CUPED when
configured). Above 1, twins buy the same precision with fewer tokens.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.power import TTestPower

from flywheel.ab.analysis import (
    ABResult,
    AnalysisConfig,
    Decision,
    MetricResult,
    adjust_p_values,
    analyze,
    decide,
    noninferiority,
    srm_test,
)
from flywheel.ab.delta import ZERO_TOLERANCE
from flywheel.metrics import ARMS, UserMetric, UserTable, aggregate_users, user_metrics
from flywheel.persist import json_ready

LIFE = "life"  # the twin table's column: which policy served this user life
TOKENS = "completion_tokens"  # generated tokens of a user-day, when the table logs them


def _lives(table: pd.DataFrame) -> pd.Series:
    """The ``life`` column, or ``arm`` where a standard table has none."""
    return table[LIFE] if LIFE in table.columns else table["arm"]


def _is_pre(table: pd.DataFrame) -> np.ndarray:
    if "period" in table.columns:
        return (table["period"] == "pre").to_numpy()
    return (table["day"] < 0).to_numpy()


def is_twin_table(table: pd.DataFrame) -> bool:
    """Whether some test user-day of the table was lived by both policies."""
    if LIFE not in table.columns:
        return False
    test = table.loc[~_is_pre(table), ["user_id", "day", LIFE]]
    return bool(test.groupby(["user_id", "day"], sort=False)[LIFE].nunique().gt(1).any())


def standard_view(table: pd.DataFrame) -> pd.DataFrame:
    """The rows production would have seen: each user only in their hash-assigned arm."""
    if LIFE not in table.columns:
        return table
    return table[(table[LIFE] == table["arm"]).to_numpy()]


def check_twin_table(table: pd.DataFrame) -> None:
    """Refuse a table that is not a complete twin table, naming the first offending row."""
    for column in ("user_id", "arm", "day", LIFE):
        if column not in table.columns:
            raise ValueError(
                f"twin table is missing column {column!r}; a twin table is a user-day table "
                "(flywheel.metrics) plus 'life' = the policy that served the row's user life"
            )
    lives = table[LIFE]
    bad = sorted(set(pd.unique(lives)) - set(ARMS), key=str)
    if bad:
        raise ValueError(f"twin table column 'life' has values {bad[:5]}; use {list(ARMS)}")
    pre = _is_pre(table)
    crossed = pre & (lives != table["arm"]).to_numpy()
    if crossed.any():
        row = {k: _plain(v) for k, v in table[crossed].iloc[0].items()}
        raise ValueError(
            f"twin table: pre-period row of user {row['user_id']!r} day {row['day']!r} has "
            f"life {row[LIFE]!r} but arm {row['arm']!r}; the pre-period is lived once, by the "
            "hash-assigned arm (life = arm)"
        )
    test = table.loc[~pre, ["user_id", "day", LIFE]]
    counts = test.groupby(["user_id", "day"], sort=False)[LIFE].nunique()
    single = counts[counts < 2]
    if len(single):
        user, day = (_plain(v) for v in single.index[0])
        lived = test.loc[(test["user_id"] == user) & (test["day"] == day), LIFE].iloc[0]
        raise ValueError(
            f"twin table: {len(single)} test user-day(s) lived by one policy only, first user "
            f"{user!r} day {day!r} (life {lived!r} only); every test user-day needs one row per "
            "life: re-run or drop the incomplete users"
        )


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value, so messages read ``7``, not ``np.int64(7)``."""
    return value.item() if isinstance(value, np.generic) else value


def life_frames(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The user-day rows of the control life and of the treatment life (pre-period in both).

    Rows are sorted by user, so :func:`flywheel.metrics.aggregate_users`, which numbers users
    in order of first appearance, gives both lives the same user order.
    """
    check_twin_table(table)
    pre = table[_is_pre(table)]
    test = table[~_is_pre(table)]
    frames = []
    for life in ARMS:
        rows = pd.concat([pre, test[(test[LIFE] == life).to_numpy()]], ignore_index=True)
        frames.append(rows.sort_values("user_id", kind="stable", ignore_index=True))
    return frames[0], frames[1]


def life_views(table: pd.DataFrame) -> tuple[UserTable, UserTable]:
    """Per-user aggregates of the control life and the treatment life, same user order.

    Each life is its test rows plus the shared pre-period rows. Raises ``ValueError`` when the
    table is not a complete twin table (see :func:`check_twin_table`).
    """
    control, treatment = (aggregate_users(rows) for rows in life_frames(table))
    if not np.array_equal(control.user_id, treatment.user_id):
        raise ValueError("twin table: the two lives have different users; check 'user_id'")
    return control, treatment


@dataclass(frozen=True)
class PairedEstimates:
    """Paired estimates of one metric, arrays over replicates (shape (R,))."""

    control: np.ndarray  # metric value in each life
    treatment: np.ndarray
    n: np.ndarray  # users the metric counts in either life
    ate: np.ndarray  # treatment - control
    ate_se: np.ndarray
    lift: np.ndarray  # treatment / control - 1
    lift_se: np.ndarray
    lift_sd: np.ndarray  # per-user sd of the lift's influence values (lift_se * sqrt(users))
    statistic: np.ndarray  # ate / ate_se
    df: np.ndarray  # t degrees of freedom (paired t), inf for the z-test
    p_value: np.ndarray  # two-sided test of ATE = 0

    def halfwidths(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Half-widths of the 1 - alpha CIs of the ATE (t or z) and of the lift (z)."""
        ate_q = stats.t.ppf(1 - alpha / 2, self.df)
        return ate_q * self.ate_se, stats.norm.ppf(1 - alpha / 2) * self.lift_se


def _influence(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Metric value ``sum(x) / sum(y)`` and per-user influence values (see module doc)."""
    mean_y = y.mean(-1)
    value = x.sum(-1) / y.sum(-1)
    return value, (x - value[..., None] * y) / mean_y[..., None]


def paired_compare(control: UserMetric, treatment: UserMetric) -> PairedEstimates:
    """Paired ATE and lift of one metric measured on the same users in both lives.

    Arrays may be (users,) or (replicates, users): a batch of independent twin experiments.
    """
    if np.shape(control.numerator) != np.shape(treatment.numerator):
        raise ValueError(
            f"metric {control.name!r}: control life has shape {np.shape(control.numerator)}, "
            f"treatment life {np.shape(treatment.numerator)}; pair the same users in both"
        )
    xc, yc = (np.atleast_2d(np.asarray(a, float)) for a in (control.numerator, control.denominator))
    xt, yt = (np.atleast_2d(np.asarray(a, float)) for a in (treatment.numerator, treatment.denominator))  # fmt: skip
    counted = ((yc > 0) | (yt > 0)).sum(-1)
    paired_t = control.kind == "mean" and bool((yc == 1).all() and (yt == 1).all())
    n_users = xc.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nobody counted: NaN, reported as such
        mc, ec = _influence(xc, yc)
        mt, et = _influence(xt, yt)
        ate = mt - mc
        ate_se = np.sqrt((et - ec).var(-1, ddof=1) / n_users)
        lift_sd = np.sqrt((et / mc[:, None] - mt[:, None] * ec / mc[:, None] ** 2).var(-1, ddof=1))
        statistic = ate / ate_se
        lift = mt / mc - 1
    df = np.full_like(ate, n_users - 1.0 if paired_t else np.inf)
    p_value = 2 * stats.t.sf(np.abs(statistic), df)
    return PairedEstimates(
        control=mc,
        treatment=mt,
        n=counted,
        ate=ate,
        ate_se=ate_se,
        lift=lift,
        lift_se=lift_sd / math.sqrt(n_users),
        lift_sd=lift_sd,
        statistic=statistic,
        df=df,
        p_value=np.asarray(p_value, dtype=float),
    )


@dataclass(frozen=True)
class PairedMetricResult(MetricResult):
    """One metric of a paired analysis: a :class:`MetricResult` (lift, CI and p-value are the
    paired ones; ``n_control`` = ``n_treatment`` = users counted; no CUPED, so the unadjusted
    fields repeat the adjusted ones) plus the absolute ATE and the variance ratio."""

    ate: float  # average treatment effect, treatment - control, in the metric's unit
    ate_ci_low: float
    ate_ci_high: float
    lift_se: float
    # standard-design / twin-design lift variance at equal generated tokens (module doc)
    variance_ratio: float


def paired_metric_result(
    metric: UserMetric,
    est: PairedEstimates,
    config: AnalysisConfig,
    *,
    ate_halfwidth: float,
    lift_halfwidth: float,
    p_value: float,
    p_value_adjusted: float,
    mde: float,
    variance_ratio: float = math.nan,
) -> PairedMetricResult:
    """A result record from replicate 0 of ``est`` with the given interval half-widths.

    The half-widths and p-values are arguments so the same record serves the fixed-horizon
    analysis (t / z quantiles) and the always-valid one (:mod:`flywheel.ab.sequential`).
    """
    lift = float(est.lift[0])
    low, high = lift - lift_halfwidth, lift + lift_halfwidth
    ate = float(est.ate[0])
    guard = noninferiority(metric, float(est.treatment[0]), high, ate + ate_halfwidth, config)
    return PairedMetricResult(
        name=metric.name,
        role=metric.role,
        kind=metric.kind,
        higher_is_better=metric.higher_is_better,
        control=float(est.control[0]),
        treatment=float(est.treatment[0]),
        n_control=int(est.n[0]),
        n_treatment=int(est.n[0]),
        lift=lift,
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        p_value_adjusted=p_value_adjusted,
        lift_unadjusted=lift,
        ci_low_unadjusted=low,
        ci_high_unadjusted=high,
        p_value_unadjusted=p_value,
        cuped_theta=0.0,
        cuped_variance_reduction=0.0,
        mde=mde,
        noninferiority_margin=guard.margin,
        noninferiority_scale=guard.scale,
        noninferiority_bound=guard.bound,
        noninferior=guard.noninferior,
        significant=bool(p_value_adjusted < config.alpha),
        ate=ate,
        ate_ci_low=ate - ate_halfwidth,
        ate_ci_high=ate + ate_halfwidth,
        lift_se=float(est.lift_se[0]),
        variance_ratio=variance_ratio,
    )


def family_adjusted(
    metrics: tuple[UserMetric, ...], p_values: list[float], config: AnalysisConfig
) -> list[float]:
    """p-values corrected within each role family, as :func:`flywheel.ab.analyze` does."""
    adjusted = [math.nan] * len(metrics)
    for role in ("success", "guardrail"):
        family = [i for i, m in enumerate(metrics) if m.role == role]
        corrected = adjust_p_values([p_values[i] for i in family], config.alpha, config.correction)
        for i, p in zip(family, corrected, strict=True):
            adjusted[i] = p
    return adjusted


@lru_cache(maxsize=256)
def _standardized_mde(n_users: int, alpha: float, power: float) -> float:
    """Paired-design effect in sd units detectable at this power (statsmodels TTestPower)."""
    if n_users < 3:
        return math.nan
    effect = TTestPower().solve_power(effect_size=None, nobs=n_users, alpha=alpha, power=power)
    return float(np.asarray(effect, dtype=float).item())


def paired_mde(est: PairedEstimates, n_users: int, alpha: float, power: float) -> float:
    """Relative minimum detectable effect of the paired design with ``n_users`` pairs."""
    return _standardized_mde(n_users, alpha, power) * float(est.lift_sd[0])


def design_cost(table: pd.DataFrame) -> tuple[float, float, str]:
    """Generated tokens of the standard and the twin design, and the unit they are in."""
    standard = standard_view(table)
    if TOKENS in table.columns:
        return float(standard[TOKENS].sum()), float(table[TOKENS].sum()), "generated tokens"
    return float(len(standard)), float(len(table)), "user-days"


@dataclass(frozen=True)
class PairedResult:
    """Result of :func:`analyze_paired`: the twin design beside the standard design."""

    metrics: tuple[PairedMetricResult, ...]
    standard: ABResult  # flywheel.ab.analyze on standard_view: what production would see
    decision: Decision
    reason: str
    alpha: float
    correction: str
    n_users: int
    n_test_days: int
    n_pre_days: int
    cost_unit: Literal["generated tokens", "user-days"]
    cost_standard: float  # what the standard design spent (its rows)
    cost_twin: float  # what the twin design spent (every row)

    def __getitem__(self, name: str) -> PairedMetricResult:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"no metric {name!r}; have {[m.name for m in self.metrics]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN and infinities become None)."""
        return json_ready(
            {
                "design": "twins",
                "decision": self.decision,
                "reason": self.reason,
                "metrics": {m.name: asdict(m) for m in self.metrics},
                "standard": self.standard.to_dict(),
                "alpha": self.alpha,
                "correction": self.correction,
                "n_users": self.n_users,
                "n_test_days": self.n_test_days,
                "n_pre_days": self.n_pre_days,
                "cost_unit": self.cost_unit,
                "cost_standard": self.cost_standard,
                "cost_twin": self.cost_twin,
            }
        )

    def to_json(self) -> str:
        """The result as strict JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def summary(self) -> str:
        """The twin estimates per metric, each with the standard design's CI and the ratio."""
        header = (
            f"{'metric':<16}{'role':<10}{'control':>10}{'treatment':>11}{'ATE':>10}{'lift':>9}"
            f"{'twin 95% CI':>20}{'standard 95% CI':>20}{'p':>9}{'p adj':>9}{'var ratio':>10}"
        )
        lines = [
            f"Twin analysis: {self.n_users} users lived both arms for {self.n_test_days} test "
            f"days; cost {self.cost_twin:.0f} vs {self.cost_standard:.0f} {self.cost_unit} "
            "for the standard design",
            header,
        ]
        for m in self.metrics:
            s = self.standard[m.name]
            twin = f"[{m.ci_low:+.1%}, {m.ci_high:+.1%}]"
            standard = f"[{s.ci_low:+.1%}, {s.ci_high:+.1%}]"
            lines.append(
                f"{m.name:<16}{m.role:<10}{m.control:>10.4g}{m.treatment:>11.4g}{m.ate:>+10.3g}"
                f"{m.lift:>+9.2%}{twin:>20}{standard:>20}{m.p_value:>9.2g}"
                f"{m.p_value_adjusted:>9.2g}{m.variance_ratio:>10.2f}"
            )
        lines.append(
            "var ratio: standard / twin variance of the lift at equal "
            f"{self.cost_unit} (> 1: twins are cheaper)"
        )
        lines.append(f"twin decision: {self.decision.upper()}: {self.reason}")
        return "\n".join(lines)


def analyze_paired(table: pd.DataFrame, config: AnalysisConfig | None = None) -> PairedResult:
    """Analyse a twin table: paired ATE and lift per metric, the decision, the variance ratio.

    The standard design's analysis (:func:`flywheel.ab.analyze` on :func:`standard_view`)
    comes along in ``standard``. Raises ``ValueError`` on a table that is not a complete twin
    table.
    """
    config = config or AnalysisConfig()
    control, treatment = life_views(table)
    standard = analyze(standard_view(table), config)
    pairs = tuple(
        zip(
            user_metrics(control, config.retention_day),
            user_metrics(treatment, config.retention_day),
            strict=True,
        )
    )
    metrics = tuple(c for c, _ in pairs)
    estimates = [paired_compare(c, t) for c, t in pairs]
    p_values = [float(est.p_value[0]) for est in estimates]
    adjusted = family_adjusted(metrics, p_values, config)
    cost_standard, cost_twin, unit = design_cost(table)
    z = stats.norm.ppf(1 - config.alpha / 2)
    results = []
    for metric, est, p, p_adj in zip(metrics, estimates, p_values, adjusted, strict=True):
        s = standard[metric.name]
        standard_se = (s.ci_high - s.ci_low) / (2 * z)
        twin_variance = float(est.lift_se[0]) ** 2 * cost_twin
        # lives that never disagreed leave no twin variance to compare with (only the
        # rounding of a zero, ~1e-18): NaN
        disagreed = float(est.lift_se[0]) > ZERO_TOLERANCE * standard_se
        ratio = standard_se**2 * cost_standard / twin_variance if disagreed else math.nan
        ate_halfwidth, lift_halfwidth = est.halfwidths(config.alpha)
        results.append(
            paired_metric_result(
                metric,
                est,
                config,
                ate_halfwidth=float(ate_halfwidth[0]),
                lift_halfwidth=float(lift_halfwidth[0]),
                p_value=p,
                p_value_adjusted=p_adj,
                mde=paired_mde(est, control.n_users, config.alpha, config.power),
                variance_ratio=float(ratio) if np.isfinite(ratio) else math.nan,
            )
        )
    # An SRM check is meaningless for twins: every user lived both arms, the split is exact by
    # construction (check_twin_table refused anything else); decide gets that exact split.
    exact = srm_test(control.n_users, control.n_users, 0.5, config.srm_alpha)
    decision, reason = decide(tuple(results), exact)
    return PairedResult(
        metrics=tuple(results),
        standard=standard,
        decision=decision,
        reason=reason,
        alpha=config.alpha,
        correction=config.correction,
        n_users=control.n_users,
        n_test_days=control.n_test_days,
        n_pre_days=control.n_pre_days,
        cost_unit=unit,
        cost_standard=cost_standard,
        cost_twin=cost_twin,
    )


def variance_ratio(table: pd.DataFrame, metric: str, config: AnalysisConfig | None = None) -> float:
    """Standard / twin variance of ``metric``'s lift at equal generated tokens (module doc)."""
    return analyze_paired(table, config)[metric].variance_ratio
