"""Always-valid monitoring: daily looks at a running A/B test with confidence sequences.

Look k analyses test days 0..k (every metric of :mod:`flywheel.metrics` on the users assigned
so far). A confidence sequence (CS) covers the true lift at every look simultaneously with
probability 1 - alpha, so one may stop at the first look where it excludes 0.

Boundary: the two-sided normal mixture of Howard, Ramdas, McAuliffe & Sekhon (2021),
"Time-uniform, nonparametric, nonasymptotic confidence sequences", eq. (14), the same
mixture as the mSPRT of Johari et al. and Lindon et al. For a process ``S`` with variance
(intrinsic time) ``v`` and mixing variance ``rho``::

    log M(S, v) = log(rho / (v + rho)) / 2 + S^2 / (2 (v + rho))
    P(exists v: |S_v| >= u(v)) <= alpha,  u(v) = sqrt((v + rho) (log(1 + v / rho) + 2 log(1 / alpha)))

and ``rho = v_opt / (2 log(1/alpha) + log(1 + 2 log(1/alpha)))`` makes ``u`` tight near
``v_opt`` (:func:`mixture_rho`; the values match confseq's reference implementation).

Looks: each look's relative lift ``L_k`` (as in :func:`flywheel.ab.analyze`, CUPED included;
paired for twin tables, :mod:`flywheel.ab.paired`) with standard error ``se_k`` has
information ``I_k = 1 / se_k^2``; ``S_k = L_k I_k`` has variance ``I_k``, so::

    CS_k = L_k +- se_k sqrt((1 + rho / I_k) (log(1 + I_k / rho) + 2 log(1 / alpha)))

This is valid when ``S`` has independent increments in ``I``, i.e. each look's estimate is
the efficient update of the previous one: exactly so for independent users arriving, and for
fixed users whose daily outcomes are a persistent user effect plus independent day noise
(then ``Cov(L_j, L_k) = Var(L_k)`` for ``j < k``). Day noise correlated over days beyond
that (a slowly drifting user state) makes looks more correlated still, which by Slepian's
inequality only lowers each side's crossing probability. The standard errors are plug-in
estimates (an asymptotic CS, Waudby-Smith et al. 2021); ``tests/test_ab_sequential.py``
checks the false-positive rate on A/A tables. ``rho`` is set from the first look with finite
information so that the CS is tightest at the planned horizon if information grew linearly
in days; every fixed ``rho`` is valid, the choice only moves where the CS is tightest.

Always-valid p-value: ``p_k = min(1, 1 / max_{j <= k} M_j)`` with ``M`` at lift 0; it is
below alpha exactly when some CS so far excluded 0. Per look the p-values are corrected per
metric family (``AnalysisConfig.correction``; valid because each is a valid p-value at any
stopping time) and :func:`flywheel.ab.decide` turns them into ship (stop: a success metric
better, every guardrail's CS within its non-inferiority margin), hold (stop: a metric worse)
or inconclusive (continue).

Sequential SRM (standard tables): the Dirichlet-multinomial mixture Bayes factor of Lindon &
Malek (2022), "Anytime-valid inference for multinomial count data", which for two arms is a
beta-binomial over a binomial; its always-valid p-value is ``min(1, 1 / max BF)``. Users count
from the first look their rows reach (a pre-period row: from the first look).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from flywheel.ab.analysis import (
    AnalysisConfig,
    Decision,
    MetricResult,
    SRMResult,
    decide,
    noninferiority,
    srm_test,
)
from flywheel.ab.delta import LiftEstimates, compare
from flywheel.ab.paired import (
    PairedEstimates,
    family_adjusted,
    is_twin_table,
    life_frames,
    paired_compare,
    paired_metric_result,
    standard_view,
)
from flywheel.metrics import COUNT_COLUMNS, UserMetric, UserTable, aggregate_users, user_metrics
from flywheel.persist import json_ready

Design = Literal["standard", "twins"]
SRM_CONCENTRATION = 100.0  # Dirichlet prior strength (x the designed shares), as in seqabpy
# Standard errors at or below this (relative lift units) are rounding noise of an exactly zero
# variance, e.g. twins whose lives never disagreed on the first day: no information yet.
MIN_SE = 1e-9


def mixture_rho(v_opt: float, alpha: float) -> float:
    """Mixing variance that makes the two-sided normal mixture boundary tight at ``v_opt``."""
    if not v_opt > 0 or not 0 < alpha < 1:
        raise ValueError(f"need v_opt > 0 and alpha in (0, 1), got {v_opt}, {alpha}")
    log_inv = math.log(1 / alpha)
    return v_opt / (2 * log_inv + math.log(1 + 2 * log_inv))


def normal_log_mixture(s: np.ndarray, v: np.ndarray, rho: float) -> np.ndarray:
    """Log of the two-sided normal mixture martingale at sum ``s`` and variance ``v``."""
    s, v = np.asarray(s, dtype=float), np.asarray(v, dtype=float)
    return 0.5 * np.log(rho / (v + rho)) + s**2 / (2 * (v + rho))


def normal_mixture_bound(v: np.ndarray, alpha: float, rho: float) -> np.ndarray:
    """Two-sided normal mixture boundary ``u(v)``: ``|S_v| < u(v)`` for all v w.p. 1 - alpha."""
    v = np.asarray(v, dtype=float)
    return np.sqrt((v + rho) * (np.log1p(v / rho) + 2 * math.log(1 / alpha)))


@dataclass(frozen=True)
class ConfidenceSequence:
    """A CS over looks (last axis) for an estimate: bounds, multiplier and always-valid p."""

    low: np.ndarray
    high: np.ndarray
    multiplier: np.ndarray  # half-width / se at each look (1.96 would be a fixed 95% CI)
    p_value: np.ndarray  # always-valid p-value of "true value = 0", non-increasing


def confidence_sequence(
    estimate: np.ndarray, se: np.ndarray, *, alpha: float, horizon: int
) -> ConfidenceSequence:
    """Normal mixture CS of an estimate observed at daily looks (see module doc).

    ``estimate`` and ``se`` have looks on the last axis (look k = days 0..k); ``horizon`` is
    the planned number of looks, where the CS is made tightest. Looks with a NaN or zero
    standard error get NaN bounds.
    """
    estimate, se = np.asarray(estimate, dtype=float), np.asarray(se, dtype=float)
    if estimate.shape != se.shape:
        raise ValueError(f"estimate has shape {estimate.shape}, se {se.shape}; give one se each")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 look, got {horizon}")
    with np.errstate(divide="ignore", invalid="ignore"):
        info = np.where(se > MIN_SE, 1 / se**2, np.nan)
    usable = np.isfinite(info)
    first = np.argmax(usable, axis=-1)
    first_info = np.take_along_axis(info, first[..., None], axis=-1)
    # information at the horizon if it grew linearly in days from the first usable look
    planned = first_info * horizon / (first[..., None] + 1)
    log_inv = math.log(1 / alpha)
    rho = planned / (2 * log_inv + math.log(1 + 2 * log_inv))
    with np.errstate(divide="ignore", invalid="ignore"):
        multiplier = np.sqrt((1 + rho / info) * (np.log1p(info / rho) + 2 * log_inv))
        log_m = 0.5 * np.log(rho / (info + rho)) + (estimate * info) ** 2 / (2 * (info + rho))
    running = np.fmax.accumulate(np.where(usable, log_m, -np.inf), axis=-1)
    p_value = np.where(np.isfinite(running), np.minimum(1.0, np.exp(-running)), np.nan)
    return ConfidenceSequence(
        low=estimate - multiplier * se,
        high=estimate + multiplier * se,
        multiplier=multiplier,
        p_value=p_value,
    )


def sequential_srm_p_values(
    n_control: np.ndarray, n_treatment: np.ndarray, treatment_share: float
) -> np.ndarray:
    """Always-valid SRM p-values over looks (running minimum of 1 / Bayes factor)."""
    n_control, n_treatment = np.asarray(n_control), np.asarray(n_treatment)
    n = n_control + n_treatment
    a, b = SRM_CONCENTRATION * treatment_share, SRM_CONCENTRATION * (1 - treatment_share)
    log_bf = stats.betabinom.logpmf(n_treatment, n, a, b) - stats.binom.logpmf(
        n_treatment, n, treatment_share
    )
    return np.minimum(1.0, np.exp(-np.maximum.accumulate(log_bf, axis=-1)))


@dataclass(frozen=True)
class DailyLooks:
    """Per-look metrics and estimates of one design; look k covers test days 0..k."""

    design: Design
    metrics: tuple[tuple[UserMetric, ...], ...]  # [look][metric] (control life for twins)
    estimates: tuple[tuple[LiftEstimates | PairedEstimates, ...], ...]  # [look][metric]
    n_control: np.ndarray  # users assigned by each look (both = all users for twins)
    n_treatment: np.ndarray

    @property
    def n_looks(self) -> int:
        """Number of looks (test days)."""
        return len(self.metrics)

    def lift_and_se(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The relative lift and its standard error of metric ``name`` at every look."""
        index = [m.name for m in self.metrics[0]].index(name)
        lifts, ses = [], []
        for estimates in self.estimates:
            est = estimates[index]
            lifts.append(float(est.lift[0]))
            ses.append(float(est.se[0] if isinstance(est, LiftEstimates) else est.lift_se[0]))
        return np.array(lifts), np.array(ses)


def _daily_cube(table: pd.DataFrame) -> tuple[UserTable, np.ndarray, np.ndarray]:
    """The full-period aggregates, per-user per-test-day counts and each user's first look."""
    users = aggregate_users(table)
    codes = pd.Index(users.user_id).get_indexer(table["user_id"])
    is_pre = (
        (table["period"] == "pre").to_numpy()
        if "period" in table.columns
        else (table["day"] < 0).to_numpy()
    )
    day = table["day"].to_numpy().astype(np.int64) - users.first_test_day
    columns = ("active", *COUNT_COLUMNS)
    cube = np.zeros((users.n_users, users.n_test_days, len(columns)))
    test = ~is_pre
    cube[codes[test], day[test]] = table.loc[test, list(columns)].to_numpy(np.float64)
    first_look = np.full(users.n_users, users.n_test_days, dtype=np.int64)
    np.minimum.at(first_look, codes, np.where(is_pre, 0, day))
    return users, cube, first_look


def _look(users: UserTable, cube: np.ndarray, k: int) -> UserTable:
    """The users' aggregates over test days 0..k."""
    columns = ("active", *COUNT_COLUMNS)
    so_far = cube[:, : k + 1].sum(axis=1)
    with np.errstate(invalid="ignore"):
        exposed = np.where(users.first_exposure <= k, users.first_exposure, np.nan)
    return UserTable(
        user_id=users.user_id,
        treatment=users.treatment,
        test={c: so_far[:, j] for j, c in enumerate(columns)},
        pre=users.pre,
        active_by_day=users.active_by_day[:, : k + 1],
        first_exposure=exposed,
        first_test_day=users.first_test_day,
        n_pre_days=users.n_pre_days,
    )


def daily_looks(
    table: pd.DataFrame, config: AnalysisConfig | None = None, *, design: Design | None = None
) -> DailyLooks:
    """Every metric's estimates at each daily look of the table.

    ``design`` None analyses a twin table as twins (paired) and any other as standard;
    ``"standard"`` on a twin table analyses its :func:`flywheel.ab.paired.standard_view`.
    """
    config = config or AnalysisConfig()
    twins = is_twin_table(table)
    design = design or ("twins" if twins else "standard")
    if design not in ("standard", "twins"):
        raise ValueError(f"design must be 'standard' or 'twins', got {design!r}")
    if design == "twins":
        return _twin_looks(table, config)
    users, cube, first_look = _daily_cube(standard_view(table))
    cuped = config.cuped and users.n_pre_days > 0
    metrics, estimates, n_control, n_treatment = [], [], [], []
    for k in range(users.n_test_days):
        look = _look(users, cube, k)
        metrics.append(user_metrics(look, config.retention_day))
        seen = first_look <= k
        estimates.append(
            tuple(compare(m, look.treatment, alpha=config.alpha, cuped=cuped) for m in metrics[-1])
        )
        n_treatment.append(int((seen & users.treatment).sum()))
        n_control.append(int((seen & ~users.treatment).sum()))
    return DailyLooks(
        "standard", tuple(metrics), tuple(estimates), np.array(n_control), np.array(n_treatment)
    )


def _twin_looks(table: pd.DataFrame, config: AnalysisConfig) -> DailyLooks:
    lives = [_daily_cube(frame) for frame in life_frames(table)]
    n_users, n_days = lives[0][0].n_users, lives[0][0].n_test_days
    metrics, estimates = [], []
    for k in range(n_days):
        control, treatment = (
            user_metrics(_look(u, c, k), config.retention_day) for u, c, _ in lives
        )
        metrics.append(control)
        estimates.append(
            tuple(paired_compare(c, t) for c, t in zip(control, treatment, strict=True))
        )
    everyone = np.full(n_days, n_users)
    return DailyLooks("twins", tuple(metrics), tuple(estimates), everyone, everyone)


@dataclass(frozen=True)
class Look:
    """One daily look: always-valid lifts (``ci_low`` / ``ci_high`` are the CS, ``p_value``
    the always-valid p-value, ``mde`` the lift this look would detect with the configured
    power), the sequential SRM check (None for twins) and the early-stop decision."""

    day: int  # last test day included (0 = first test day)
    metrics: tuple[MetricResult, ...]
    srm: SRMResult | None  # p_value is the always-valid one; chi2 is descriptive
    decision: Decision  # ship / hold = stop now; inconclusive = continue
    reason: str

    def __getitem__(self, name: str) -> MetricResult:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"no metric {name!r}; have {[m.name for m in self.metrics]}")


@dataclass(frozen=True)
class SequentialResult:
    """Result of :func:`sequential_monitor`: every look and the first stop, if any."""

    design: Design
    looks: tuple[Look, ...]
    stopped_at: int | None  # day of the first look that said ship or hold
    decision: Decision  # at the stop, or the last look's (inconclusive) without one
    reason: str
    alpha: float
    horizon_days: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN and infinities become None)."""
        return json_ready(
            {
                "design": self.design,
                "stopped_at": self.stopped_at,
                "decision": self.decision,
                "reason": self.reason,
                "alpha": self.alpha,
                "horizon_days": self.horizon_days,
                "looks": [
                    {
                        "day": look.day,
                        "decision": look.decision,
                        "reason": look.reason,
                        "srm": None if look.srm is None else asdict(look.srm),
                        "metrics": {m.name: asdict(m) for m in look.metrics},
                    }
                    for look in self.looks
                ],
            }
        )

    def to_json(self) -> str:
        """The result as strict JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def summary(self) -> str:
        """Day-by-day always-valid CIs as a rich table (plain text), then the stop decision."""
        from rich.console import Console
        from rich.table import Table

        names = [m.name for m in self.looks[0].metrics]
        table = Table(
            title=f"Always-valid {1 - self.alpha:.0%} CIs of the lift by day ({self.design})"
        )
        table.add_column("day", justify="right")
        for name in names:
            table.add_column(name, justify="right")
        table.add_column("SRM p", justify="right")
        table.add_column("look", justify="left")
        for look in self.looks:
            cells = [
                f"{m.lift:+.1%} [{m.ci_low:+.1%}, {m.ci_high:+.1%}]"
                if math.isfinite(m.ci_low)
                else "n/a"
                for m in look.metrics
            ]
            srm = "-" if look.srm is None else f"{look.srm.p_value:.2g}"
            verdict = {"ship": "STOP: ship", "hold": "STOP: hold"}.get(look.decision, "continue")
            table.add_row(str(look.day), *cells, srm, verdict)
        console = Console(width=200, record=True, force_terminal=False, color_system=None)
        with console.capture() as capture:
            console.print(table)
        stop = (
            f"stopped at day {self.stopped_at}: {self.decision.upper()}"
            if self.stopped_at is not None
            else f"no stop by day {self.looks[-1].day}: continue"
        )
        return f"{capture.get().rstrip()}\n{stop}: {self.reason}"


def _secondary(looks: DailyLooks, index: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The estimate monitored beside the lift at every look, with its standard error: the
    ATE for twins, the lift without CUPED for the standard design."""
    z = stats.norm.ppf(1 - alpha / 2)
    values, ses = [], []
    for estimates in looks.estimates:
        est = estimates[index]
        if isinstance(est, PairedEstimates):
            values.append(float(est.ate[0]))
            ses.append(float(est.ate_se[0]))
        else:
            values.append(float(est.lift_unadjusted[0]))
            ses.append(float(est.ci_high_unadjusted[0] - est.ci_low_unadjusted[0]) / (2 * z))
    return np.array(values), np.array(ses)


def _record(
    metric: UserMetric,
    est: LiftEstimates | PairedEstimates,
    config: AnalysisConfig,
    lift: tuple[ConfidenceSequence, int],
    secondary: tuple[ConfidenceSequence, int],
    p_adjusted: float,
    mde: float,
) -> MetricResult:
    """One look's result record: the always-valid CS as CI, the always-valid p-value."""
    (cs, k), (cs2, _) = lift, secondary
    p_value = float(cs.p_value[k])
    if isinstance(est, PairedEstimates):
        return paired_metric_result(
            metric,
            est,
            config,
            ate_halfwidth=float(cs2.high[k] - cs2.low[k]) / 2,
            lift_halfwidth=float(cs.high[k] - cs.low[k]) / 2,
            p_value=p_value,
            p_value_adjusted=p_adjusted,
            mde=mde,
        )
    control, treatment = float(est.control[0]), float(est.treatment[0])
    # sequential_monitor refuses absolute margins here: no interval of the difference
    guard = noninferiority(metric, treatment, float(cs.high[k]), math.nan, config)
    return MetricResult(
        name=metric.name,
        role=metric.role,
        kind=metric.kind,
        higher_is_better=metric.higher_is_better,
        control=control,
        treatment=treatment,
        n_control=int(est.n_control[0]),
        n_treatment=int(est.n_treatment[0]),
        lift=float(est.lift[0]),
        ci_low=float(cs.low[k]),
        ci_high=float(cs.high[k]),
        p_value=p_value,
        p_value_adjusted=p_adjusted,
        lift_unadjusted=float(est.lift_unadjusted[0]),
        ci_low_unadjusted=float(cs2.low[k]),
        ci_high_unadjusted=float(cs2.high[k]),
        p_value_unadjusted=float(cs2.p_value[k]),
        cuped_theta=float(est.theta[0]),
        cuped_variance_reduction=float(est.variance_reduction[0]),
        mde=mde,
        noninferiority_margin=guard.margin,
        noninferiority_scale=guard.scale,
        noninferiority_bound=guard.bound,
        noninferior=guard.noninferior,
        significant=bool(p_adjusted < config.alpha),
    )


def _look_results(
    looks: DailyLooks, config: AnalysisConfig, horizon: int
) -> list[tuple[MetricResult, ...]]:
    """Per look, every metric's record with its always-valid CS and corrected p-value."""
    z_power = stats.norm.ppf(config.power)
    names = [m.name for m in looks.metrics[0]]
    lifts = [looks.lift_and_se(name) for name in names]
    lift_cs = [confidence_sequence(*ls, alpha=config.alpha, horizon=horizon) for ls in lifts]
    second_cs = [
        confidence_sequence(
            *_secondary(looks, i, config.alpha), alpha=config.alpha, horizon=horizon
        )
        for i in range(len(names))
    ]
    results = []
    for k in range(looks.n_looks):
        p_values = [float(cs.p_value[k]) for cs in lift_cs]
        adjusted = family_adjusted(looks.metrics[k], p_values, config)
        results.append(
            tuple(
                _record(
                    looks.metrics[k][i],
                    looks.estimates[k][i],
                    config,
                    (lift_cs[i], k),
                    (second_cs[i], k),
                    adjusted[i],
                    float((lift_cs[i].multiplier[k] + z_power) * lifts[i][1][k]),
                )
                for i in range(len(names))
            )
        )
    return results


def _sequential_srm(looks: DailyLooks, config: AnalysisConfig) -> list[SRMResult | None]:
    """Per look, the always-valid SRM check of the standard design (None for twins)."""
    if looks.design == "twins":
        return [None] * looks.n_looks
    p_values = sequential_srm_p_values(looks.n_control, looks.n_treatment, config.treatment_share)
    checks = []
    for n_c, n_t, p in zip(looks.n_control, looks.n_treatment, p_values, strict=True):
        chi2 = srm_test(int(n_c), int(n_t), config.treatment_share, config.srm_alpha).chi2
        checks.append(
            SRMResult(int(n_c), int(n_t), config.treatment_share, chi2, float(p), config.srm_alpha)
        )
    return checks


def _decision(
    metrics: tuple[MetricResult, ...], srm: SRMResult | None, n_users: int
) -> tuple[Decision, str]:
    """:func:`flywheel.ab.decide` on one look, after the sequential SRM check."""
    if srm is not None and srm.flagged:
        return "inconclusive", (
            f"sample ratio mismatch: {srm.n_control} control vs {srm.n_treatment} treatment "
            f"users where {srm.expected_treatment_share:.1%} treatment was designed "
            f"(always-valid p = {srm.p_value:.2g} < {srm.alpha}); find the assignment or "
            "logging bug first"
        )
    # The split was checked just above (twins: exact by construction), so decide gets an
    # exact one and applies its metric rules only.
    return decide(metrics, srm_test(n_users, n_users))


def sequential_monitor(
    table: pd.DataFrame,
    config: AnalysisConfig | None = None,
    *,
    design: Design | None = None,
    horizon_days: int | None = None,
) -> SequentialResult:
    """Always-valid daily monitoring of a user-day or twin table (see module doc).

    ``design``: None monitors a twin table as twins and any other table as standard;
    ``"standard"`` on a twin table monitors its :func:`flywheel.ab.paired.standard_view`.
    ``horizon_days``: the planned test length, where the CS is tightest (default: the
    table's test days).
    """
    config = config or AnalysisConfig()
    looks = daily_looks(table, config, design=design)
    if looks.design == "standard" and config.absolute_margins:
        raise ValueError(
            f"AnalysisConfig.absolute_margins {dict(config.absolute_margins)}: the standard "
            "design's monitor has an always-valid interval of the lift only; give these "
            "guardrails relative margins (noninferiority_margins) or monitor a twin table"
        )
    horizon = horizon_days or looks.n_looks
    if horizon < 1:
        raise ValueError(f"horizon_days must be >= 1 test day, got {horizon_days}")
    records = _look_results(looks, config, horizon)
    srms = _sequential_srm(looks, config)
    results = []
    for k, (metrics, srm) in enumerate(zip(records, srms, strict=True)):
        n_users = int(looks.n_control[k] + looks.n_treatment[k])
        decision, reason = _decision(metrics, srm, n_users)
        results.append(Look(k, metrics, srm, decision, reason))
    stop = next((look for look in results if look.decision != "inconclusive"), None)
    final = stop or results[-1]
    return SequentialResult(
        design=looks.design,
        looks=tuple(results),
        stopped_at=None if stop is None else stop.day,
        decision=final.decision,
        reason=final.reason,
        alpha=config.alpha,
        horizon_days=horizon,
    )
