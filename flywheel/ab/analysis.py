"""A/B analysis of a user-day table: lifts with CIs, SRM, power / MDE, guardrails, decision.

The statistics of one metric live in :mod:`flywheel.ab.delta`; this module runs them over the
metrics of :mod:`flywheel.metrics`, corrects for multiple comparisons (per family: success
metrics, guardrails), checks the sample ratio and decides ship / hold / inconclusive.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests, multitest_alias
from statsmodels.stats.power import TTestIndPower

from flywheel.ab.delta import LiftEstimates, compare
from flywheel.metrics import DEFAULT_RETENTION_DAY, UserMetric, UserTable, aggregate_users
from flywheel.metrics import user_metrics as build_metrics
from flywheel.persist import json_ready

Decision = Literal["ship", "hold", "inconclusive"]
Scale = Literal["relative", "absolute"]  # of a guardrail's non-inferiority margin
DEFAULT_MARGINS = MappingProxyType(
    {"report_rate": 0.10, "violation_rate": 0.10, "unsafe_rate": 0.10}
)  # relative increase a guardrail may show and still count as non-inferior


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of one A/B analysis; every field is validated at construction."""

    alpha: float = field(
        default=0.05,
        metadata={"help": "Two-sided level of the tests (and 1 - level of the CIs), in (0, 1)."},
    )
    treatment_share: float = field(
        default=0.5,
        metadata={"help": "Designed share of users in treatment (for the SRM check), in (0, 1)."},
    )
    srm_alpha: float = field(
        default=0.001,
        metadata={"help": "Flag a sample-ratio mismatch below this chi-square p-value."},
    )
    cuped: bool = field(
        default=True, metadata={"help": "Adjust with the pre-period covariate when there is one."}
    )
    correction: str = field(
        default="holm",
        metadata={
            "help": "statsmodels multipletests method applied per metric family, e.g. "
            "'holm', 'bonferroni' or 'fdr_bh'."
        },
    )
    power: float = field(
        default=0.8, metadata={"help": "Power at which the minimum detectable effect is reported."}
    )
    retention_day: int = field(
        default=DEFAULT_RETENTION_DAY,
        metadata={"help": "Retention = active this many days (>= 1) after exposure."},
    )
    noninferiority_margins: Mapping[str, float] = field(
        default_factory=lambda: DEFAULT_MARGINS,
        metadata={
            "help": "Relative increase (0.1 = +10%) each guardrail (report_rate, "
            "violation_rate, unsafe_rate) may show and still count as non-inferior."
        },
    )
    absolute_margins: Mapping[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Absolute increase (0.005 = +0.5 percentage points) a guardrail may show "
            "and still count as non-inferior; a guardrail named here is judged on the CI of "
            "treatment - control instead of its relative margin. For rare events: no "
            "affordable test bounds a +10% change of a 0.5% rate."
        },
    )
    target_mde: float | None = field(
        default=None,
        metadata={
            "help": "Relative lift on the success metrics the test is designed to detect "
            "(0.05 = +5%); unset = not stated. Scenario validation warns when the "
            "test's size cannot reach it."
        },
    )

    def __post_init__(self) -> None:
        for name in ("alpha", "treatment_share", "srm_alpha", "power"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"AnalysisConfig.{name} must be in (0, 1), got {value}")
        if self.retention_day < 1:
            raise ValueError(
                f"AnalysisConfig.retention_day must be >= 1 day, got {self.retention_day}"
            )
        if self.correction.lower() not in multitest_alias:
            raise ValueError(
                f"AnalysisConfig.correction {self.correction!r} is not a statsmodels "
                "multipletests method; use e.g. 'holm', 'bonferroni' or 'fdr_bh'"
            )
        if self.target_mde is not None and not 0 < self.target_mde < 10:
            raise ValueError(
                f"AnalysisConfig.target_mde must be a relative lift in (0, 10) (0.05 = +5%), "
                f"got {self.target_mde}"
            )
        for key, example in (
            ("noninferiority_margins", "relative increase (0.1 = +10%)"),
            ("absolute_margins", "absolute increase (0.005 = +0.5 percentage points)"),
        ):
            margins = getattr(self, key)
            unknown = sorted(set(margins) - set(DEFAULT_MARGINS))
            if unknown:
                raise ValueError(
                    f"AnalysisConfig.{key} has unknown guardrail(s) {unknown}; "
                    f"the guardrails are {sorted(DEFAULT_MARGINS)}"
                )
            for name, margin in margins.items():
                if not margin > 0:
                    raise ValueError(
                        f"AnalysisConfig.{key}[{name!r}] must be a positive {example}, got {margin}"
                    )

    def margin(self, guardrail: str) -> tuple[float, Scale]:
        """A guardrail's non-inferiority margin and its scale: absolute where one is set."""
        if guardrail in self.absolute_margins:
            return self.absolute_margins[guardrail], "absolute"
        return self.noninferiority_margins.get(guardrail, DEFAULT_MARGINS[guardrail]), "relative"


@dataclass(frozen=True)
class SRMResult:
    """Sample-ratio-mismatch check: chi-square of user counts against the designed split."""

    n_control: int
    n_treatment: int
    expected_treatment_share: float
    chi2: float
    p_value: float
    alpha: float

    @property
    def flagged(self) -> bool:
        """True when the split is too unlikely under the design to trust the experiment."""
        return self.p_value < self.alpha


def srm_test(
    n_control: int, n_treatment: int, treatment_share: float = 0.5, alpha: float = 0.001
) -> SRMResult:
    """Chi-square goodness-of-fit of the arm sizes against the designed treatment share."""
    total = n_control + n_treatment
    expected = [total * (1 - treatment_share), total * treatment_share]
    chi2, p_value = stats.chisquare([n_control, n_treatment], f_exp=expected)
    return SRMResult(
        int(n_control), int(n_treatment), treatment_share, float(chi2), float(p_value), alpha
    )


@dataclass(frozen=True)
class MetricResult:
    """One metric of an A/B analysis. ``lift`` and its CI are relative (0.05 = +5%)."""

    name: str
    role: Literal["success", "guardrail"]
    kind: Literal["mean", "ratio"]
    higher_is_better: bool
    control: float  # observed (unadjusted) metric values
    treatment: float
    n_control: int  # users the metric counts in each arm
    n_treatment: int
    lift: float  # CUPED-adjusted when cuped is on
    ci_low: float
    ci_high: float
    p_value: float
    p_value_adjusted: float  # multiple-comparison corrected within the metric's role family
    lift_unadjusted: float
    ci_low_unadjusted: float
    ci_high_unadjusted: float
    p_value_unadjusted: float
    cuped_theta: float
    cuped_variance_reduction: float  # share of the lift estimator's variance CUPED removed
    mde: float  # relative minimum detectable effect at the configured power and alpha
    noninferiority_margin: float | None  # guardrails: largest tolerated worsening, in its scale
    noninferiority_scale: Scale | None  # relative (of the lift) or absolute (treatment - control)
    noninferiority_bound: float | None  # the CI's upper end on that scale, held to the margin
    noninferior: bool | None  # guardrails: the CI excludes a worsening beyond the margin
    significant: bool  # adjusted p-value below alpha

    @property
    def improved(self) -> bool:
        """Whether the treatment moved the metric in its good direction (CUPED-adjusted)."""
        # The sign of the adjusted lift, which the p-value tests. Every metric is >= 0, so a
        # lift below -100% means CUPED pushed a control mean of ~0 (a guardrail with no
        # control events) to or below 0, where a relative lift has no sign: compare the
        # observed values then, as for 0 / 0.
        if math.isfinite(self.lift) and self.lift >= -1:
            went_up = self.lift > 0
        else:
            went_up = self.treatment > self.control
        return went_up == self.higher_is_better


@dataclass(frozen=True)
class ABResult:
    """Result of :func:`analyze`: per-metric lifts, the SRM check and the ship decision."""

    metrics: tuple[MetricResult, ...]
    srm: SRMResult
    decision: Decision
    reason: str
    alpha: float
    correction: str
    cuped: bool
    n_users: int
    n_test_days: int
    n_pre_days: int

    @property
    def srm_p_value(self) -> float:
        """p-value of the sample-ratio-mismatch chi-square test."""
        return self.srm.p_value

    def __getitem__(self, name: str) -> MetricResult:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"no metric {name!r}; have {[m.name for m in self.metrics]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN and infinities become None)."""
        return json_ready(
            {
                "decision": self.decision,
                "reason": self.reason,
                "srm_p_value": self.srm_p_value,
                "srm": {**asdict(self.srm), "flagged": self.srm.flagged},
                "metrics": {m.name: asdict(m) for m in self.metrics},
                "alpha": self.alpha,
                "correction": self.correction,
                "cuped": self.cuped,
                "n_users": self.n_users,
                "n_test_days": self.n_test_days,
                "n_pre_days": self.n_pre_days,
            }
        )

    def to_json(self) -> str:
        """The result as strict JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def summary(self) -> str:
        """A plain-text table of the metrics followed by the SRM check and the decision."""
        header = (
            f"{'metric':<16}{'role':<10}{'control':>10}{'treatment':>11}{'lift':>10}"
            f"{'95% CI':>20}{'p':>9}{'p adj':>9}{'CUPED':>7}{'MDE':>8}"
        )
        lines = [f"A/B analysis: {self.n_users} users, {self.n_test_days} test days", header]
        for m in self.metrics:
            # A relative lift over a control arm without events is undefined.
            ci = (
                f"[{m.ci_low:+.1%}, {m.ci_high:+.1%}]"
                if m.control and m.treatment
                else _no_events(m)
            )
            lift = f"{m.lift:+.2%}" if m.control else "n/a"
            mde = f"{m.mde:.1%}" if math.isfinite(m.mde) else "n/a"
            lines.append(
                f"{m.name:<16}{m.role:<10}{m.control:>10.4g}{m.treatment:>11.4g}{lift:>10}"
                f"{ci:>20}{m.p_value:>9.2g}{m.p_value_adjusted:>9.2g}"
                f"{m.cuped_variance_reduction:>7.0%}{mde:>8}"
            )
        srm = self.srm
        lines.append(
            f"SRM: {srm.n_control} control / {srm.n_treatment} treatment, expected treatment "
            f"share {srm.expected_treatment_share:.1%}, p = {srm.p_value:.3g}"
            + (" (MISMATCH)" if srm.flagged else "")
        )
        lines.append(f"decision: {self.decision.upper()}: {self.reason}")
        return "\n".join(lines)


def _mde(est: LiftEstimates, alpha: float, power: float) -> float:
    """Relative minimum detectable effect for these arm sizes (statsmodels TTestIndPower)."""
    nc, nt = float(est.n_control[0]), float(est.n_treatment[0])
    sc, st, control = float(est.sd_control[0]), float(est.sd_treatment[0]), est.control[0]
    if min(nc, nt) < 2 or not (np.isfinite(sc) and np.isfinite(st)) or control == 0:
        return math.nan
    sd = math.sqrt(((nc - 1) * sc**2 + (nt - 1) * st**2) / (nc + nt - 2))
    return _standardized_mde(nc, nt, alpha, power) * sd / abs(float(control))


@lru_cache(maxsize=256)
def _standardized_mde(n_control: float, n_treatment: float, alpha: float, power: float) -> float:
    """Cohen's d detectable at this power; cached since most metrics share the arm sizes."""
    effect = TTestIndPower().solve_power(
        effect_size=None, nobs1=n_control, alpha=alpha, power=power, ratio=n_treatment / n_control
    )
    # solve_power answers a scalar or, when it falls back to its second root finder, a 1-array
    return float(np.asarray(effect, dtype=float).item())


def adjust_p_values(p_values: list[float], alpha: float, method: str) -> list[float]:
    """Multiple-comparison adjusted p-values; NaN entries stay NaN and do not count."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=alpha, method=method)[1]
    return out.tolist()


def _no_events(m: MetricResult) -> str:
    return f"no {'control' if not m.control else 'treatment'} events"


class Noninferiority(NamedTuple):
    """A guardrail's margin, its scale, the CI end held to it and the verdict (all None for a
    success metric)."""

    margin: float | None = None
    scale: Scale | None = None
    bound: float | None = None
    noninferior: bool | None = None


def noninferiority(
    metric: UserMetric,
    treatment: float,
    lift_high: float,
    difference_high: float,
    config: AnalysisConfig,
) -> Noninferiority:
    """Whether a guardrail's CI stays below its margin: the relative lift's upper end, or
    under an absolute margin that of treatment - control."""
    if metric.role != "guardrail":
        return Noninferiority()
    margin, scale = config.margin(metric.name)
    bound = difference_high if scale == "absolute" else lift_high
    # A treatment arm without events cannot be worse than its control.
    return Noninferiority(margin, scale, bound, bool(treatment == 0 or bound < margin))


def margin_label(margin: float, scale: Scale) -> str:
    """A margin as written in a scenario: "+10%" (relative) or "+0.5 pp" (absolute)."""
    return f"+{margin * 100:g}" + (" pp" if scale == "absolute" else "%")


def on_scale(value: float, scale: Scale) -> str:
    """A relative change as a percentage, an absolute one in percentage points."""
    return f"{value * 100:+.2f} pp" if scale == "absolute" else f"{value:+.1%}"


def _not_shown(m: MetricResult) -> str:
    """Why a guardrail is not shown non-inferior: its margin and where its CI reaches."""
    scale = m.noninferiority_scale or "relative"
    bound = m.noninferiority_bound
    reach = (
        on_scale(bound, scale)
        if bound is not None and math.isfinite(bound)
        else "?: no control events"
    )
    margin = margin_label(m.noninferiority_margin or math.nan, scale)
    return f"{m.name} not shown within {margin} (CI up to {reach})"


def _percent(m: MetricResult) -> str:
    if not (m.control and m.treatment):  # no interval beside an arm without events
        return (
            f"{m.name} {m.control:.4g} -> {m.treatment:.4g} ({_no_events(m)}), "
            f"adj. p = {m.p_value_adjusted:.2g}"
        )
    ci = f"[{m.ci_low:+.1%}, {m.ci_high:+.1%}]"
    return f"{m.name} {m.lift:+.1%} {ci}, adj. p = {m.p_value_adjusted:.2g}"


def decide(metrics: tuple[MetricResult, ...], srm: SRMResult) -> tuple[Decision, str]:
    """Ship / hold / inconclusive, with the reason.

    1. A sample-ratio mismatch makes every number suspect: inconclusive.
    2. Any metric significantly worse (adjusted p) than control: hold.
    3. A success metric significantly better and every guardrail non-inferior: ship.
    4. Otherwise inconclusive, naming what is missing.
    """
    if srm.flagged:
        return "inconclusive", (
            f"sample ratio mismatch: {srm.n_control} control vs {srm.n_treatment} treatment users "
            f"where {srm.expected_treatment_share:.1%} treatment was designed (chi-square p = "
            f"{srm.p_value:.2g} < {srm.alpha}); find the assignment or logging bug first"
        )
    harmed = [m for m in metrics if m.significant and not m.improved]
    if harmed:
        return "hold", "significantly worse: " + "; ".join(_percent(m) for m in harmed)
    wins = [m for m in metrics if m.role == "success" and m.significant and m.improved]
    unproven = [m for m in metrics if m.role == "guardrail" and not m.noninferior]
    if wins and not unproven:
        return "ship", (
            "significantly better: "
            + "; ".join(_percent(m) for m in wins)
            + "; every guardrail within its non-inferiority margin"
        )
    if wins:
        return "inconclusive", (
            "significantly better: "
            + "; ".join(_percent(m) for m in wins)
            + "; but "
            + "; ".join(_not_shown(m) for m in unproven)
            + "; run longer or with more traffic"
        )
    mdes = ", ".join(f"{m.name} {m.mde:.1%}" for m in metrics if m.role == "success")
    return "inconclusive", (
        f"no success metric moved significantly; minimum detectable effects here: {mdes}"
    )


def as_user_table(table: pd.DataFrame | UserTable) -> UserTable:
    """Aggregate a user-day DataFrame per user; pass a :class:`UserTable` through."""
    return table if isinstance(table, UserTable) else aggregate_users(table)


def check_arms(users: UserTable) -> None:
    """Refuse a table with fewer than two users in an arm: nothing to compare."""
    n_treatment = int(users.treatment.sum())
    n_control = users.n_users - n_treatment
    if min(n_treatment, n_control) < 2:
        raise ValueError(
            f"the table has {n_control} control and {n_treatment} treatment users; an A/B "
            "analysis needs at least 2 per arm (check the 'arm' column)"
        )


def analyze(table: pd.DataFrame | UserTable, config: AnalysisConfig | None = None) -> ABResult:
    """Analyse an A/B test from a user-day table (see :mod:`flywheel.metrics` for columns)."""
    config = config or AnalysisConfig()
    users = as_user_table(table)
    check_arms(users)
    srm = srm_test(
        users.n_users - int(users.treatment.sum()),
        int(users.treatment.sum()),
        config.treatment_share,
        config.srm_alpha,
    )
    cuped = config.cuped and users.n_pre_days > 0
    metrics = build_metrics(users, config.retention_day)
    estimates = [compare(m, users.treatment, alpha=config.alpha, cuped=cuped) for m in metrics]
    adjusted = [math.nan] * len(metrics)
    for role in ("success", "guardrail"):
        family = [i for i, m in enumerate(metrics) if m.role == role]
        p_adj = adjust_p_values(
            [estimates[i].p_value[0] for i in family], config.alpha, config.correction
        )
        for i, p in zip(family, p_adj, strict=True):
            adjusted[i] = p
    results = []
    for metric, est, p_adj in zip(metrics, estimates, adjusted, strict=True):
        guard = noninferiority(
            metric,
            float(est.treatment[0]),
            float(est.ci_high[0]),
            float(est.difference_ci_high[0]),
            config,
        )
        results.append(
            MetricResult(
                name=metric.name,
                role=metric.role,
                kind=metric.kind,
                higher_is_better=metric.higher_is_better,
                control=float(est.control[0]),
                treatment=float(est.treatment[0]),
                n_control=int(est.n_control[0]),
                n_treatment=int(est.n_treatment[0]),
                lift=float(est.lift[0]),
                ci_low=float(est.ci_low[0]),
                ci_high=float(est.ci_high[0]),
                p_value=float(est.p_value[0]),
                p_value_adjusted=float(p_adj),
                lift_unadjusted=float(est.lift_unadjusted[0]),
                ci_low_unadjusted=float(est.ci_low_unadjusted[0]),
                ci_high_unadjusted=float(est.ci_high_unadjusted[0]),
                p_value_unadjusted=float(est.p_value_unadjusted[0]),
                cuped_theta=float(est.theta[0]),
                cuped_variance_reduction=float(est.variance_reduction[0]),
                mde=_mde(est, config.alpha, config.power),
                noninferiority_margin=guard.margin,
                noninferiority_scale=guard.scale,
                noninferiority_bound=guard.bound,
                noninferior=guard.noninferior,
                significant=bool(p_adj < config.alpha),
            )
        )
    decision, reason = decide(tuple(results), srm)
    return ABResult(
        metrics=tuple(results),
        srm=srm,
        decision=decision,
        reason=reason,
        alpha=config.alpha,
        correction=config.correction,
        cuped=cuped,
        n_users=users.n_users,
        n_test_days=users.n_test_days,
        n_pre_days=users.n_pre_days,
    )
