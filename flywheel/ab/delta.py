"""Lift estimation for one metric: delta method, CUPED, Welch / z tests, vectorised.

The input is a :class:`flywheel.metrics.UserMetric` (per-user numerator, denominator and their
pre-period values) and a per-user treatment flag; the user is the unit of randomisation and of
analysis. An assignment enters every formula below only through per-arm sums of 15 per-user
moment columns (count, four values, ten products), so many assignments of the same users
(A/A) are one matrix product, and everything after it is vectorised over replicates.

Statistics (the delta-method algebra is ours; distributions, tests, power and multiplicity
come from scipy and statsmodels):

Each metric in an arm is ``M = sum(x) / sum(y)`` over the arm's n users, its pre-period
covariate ``P = sum(u) / sum(v)``. With per-user means ``mu`` and sample covariances ``C``
(ddof 1) over those users, the delta method (Deng, Knoblich & Lu 2018, "Applying the delta
method in metric analytics") gives::

    n Var(M)    = (Cxx - 2 M Cxy + M^2 Cyy) / mu_y^2
    n Var(P)    = (Cuu - 2 P Cuv + P^2 Cvv) / mu_v^2
    n Cov(M, P) = (Cxu - M Cyu - P Cxv + M P Cyv) / (mu_y mu_v)

A ``"mean"`` metric counts the users with ``y = 1`` only (``v = y``), where this is the sample
variance of the per-user values over n.

CUPED (Deng, Xu, Kohavi & Walker 2013): ``M_cuped = M - theta (P - P_pooled)`` with
``theta = Cov(M, P) / Var(P)`` estimated on both arms pooled, so ``theta`` is one number that
does not depend on the assignment; ``Var(M_cuped) = Var(M) - 2 theta Cov(M, P) + theta^2 Var(P)``.
The reported ``cuped_variance_reduction`` is ``1 - Var(Mt_cuped - Mc_cuped) / Var(Mt - Mc)``.

Relative lift ``L = M_t / M_c - 1`` with independent arms::

    Var(L) = Var(M_t) / M_c^2 + M_t^2 Var(M_c) / M_c^4

95% CI: ``L +- z Var(L)^0.5``; that of the difference ``M_t - M_c`` (what an absolute
non-inferiority margin is held to): ``+- z (Var(M_t) + Var(M_c))^0.5``. The p-value tests
``M_t = M_c`` (CUPED-adjusted when CUPED is on): Welch's t-test
(``scipy.stats.ttest_ind_from_stats``, per-user means and standard deviations) for mean
metrics, a normal z-test with ``Var(M_t) + Var(M_c)`` for ratio metrics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from flywheel.metrics import UserMetric

# Per-user moment columns: the count, the four centred values, their ten pairwise products.
_PAIRS = tuple((i, j) for i in range(4) for j in range(i, 4))
N_MOMENTS = 1 + 4 + len(_PAIRS)
# Relative to the pooled mean: an arm mean this small is the centring's rounding of zero.
ZERO_TOLERANCE = 1e-12


@dataclass(frozen=True)
class LiftEstimates:
    """Arm estimates and relative lift of one metric, arrays over replicates (shape (R,))."""

    control: np.ndarray  # unadjusted metric value per arm
    treatment: np.ndarray
    n_control: np.ndarray  # users counted by the metric in the arm
    n_treatment: np.ndarray
    lift: np.ndarray  # CUPED-adjusted relative lift (unadjusted when CUPED is off)
    ci_low: np.ndarray
    ci_high: np.ndarray
    se: np.ndarray  # standard error of the lift
    difference_ci_high: np.ndarray  # upper CI end of treatment - control (CUPED-adjusted)
    p_value: np.ndarray
    lift_unadjusted: np.ndarray
    ci_low_unadjusted: np.ndarray
    ci_high_unadjusted: np.ndarray
    p_value_unadjusted: np.ndarray
    sd_control: np.ndarray  # per-user (linearised, adjusted) standard deviation
    sd_treatment: np.ndarray
    theta: np.ndarray
    variance_reduction: np.ndarray


def moment_matrix(metric: UserMetric) -> tuple[np.ndarray, np.ndarray]:
    """Per-user moment columns (..., users, 15) and the pooled means they are centred on."""
    values = np.stack(
        [metric.numerator, metric.denominator, metric.pre_numerator, metric.pre_denominator],
        axis=-1,
    ).astype(np.float64)
    if metric.kind == "mean":
        counted = np.asarray(metric.denominator, dtype=np.float64)
    else:
        counted = np.ones(np.shape(metric.numerator))
    # Centring on the pooled means keeps the sums of squares well conditioned at 10^6 users.
    with np.errstate(divide="ignore", invalid="ignore"):  # nobody counted: NaN, reported as such
        center = np.einsum("...n,...nk->...k", counted, values) / counted.sum(-1)[..., None]
    centred = (values - center[..., None, :]) * counted[..., None]
    products = np.stack([centred[..., i] * centred[..., j] for i, j in _PAIRS], axis=-1)
    return np.concatenate([counted[..., None], centred, products], axis=-1), center


def _delta_moments(sums: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]:
    """Metric, covariate and their per-user (co)variances from moment sums (see module doc)."""
    n = sums[..., 0]
    first = sums[..., 1:5]
    mu = center + first / n[..., None]
    # An arm without a single event sums its centred values to -n * center, and adding the
    # center back leaves rounding (~1e-18) instead of 0, which a ratio then blows up into
    # a lift of thousands of percent: such a mean is exactly zero.
    mu = np.where(np.abs(mu) <= ZERO_TOLERANCE * np.abs(center), 0.0, mu)
    cov = {}
    for k, (i, j) in enumerate(_PAIRS):
        cov[i, j] = (sums[..., 5 + k] - first[..., i] * first[..., j] / n) / (n - 1)
    mx, my, mu_u, mv = (mu[..., i] for i in range(4))
    m, p = mx / my, mu_u / mv
    # Rounding can leave a zero variance at -1e-17; clip so square roots stay defined.
    var_m = np.maximum((cov[0, 0] - 2 * m * cov[0, 1] + m**2 * cov[1, 1]) / my**2, 0.0)
    var_p = np.maximum((cov[2, 2] - 2 * p * cov[2, 3] + p**2 * cov[3, 3]) / mv**2, 0.0)
    cov_mp = (cov[0, 2] - m * cov[1, 2] - p * cov[0, 3] + m * p * cov[1, 3]) / (my * mv)
    return {"n": n, "m": m, "p": p, "var_m": var_m, "var_p": var_p, "cov_mp": cov_mp}


def _lift_test(
    kind: str,
    mt: np.ndarray,
    mc: np.ndarray,
    vt: np.ndarray,
    vc: np.ndarray,
    nt: np.ndarray,
    nc: np.ndarray,
    z: float,
) -> tuple[np.ndarray, ...]:
    """Relative lift, its delta-method CI and SE, and the p-value, from per-user variances."""
    var_t, var_c = vt / nt, vc / nc  # variances of the arm estimates
    lift = mt / mc - 1
    se = np.sqrt(var_t / mc**2 + mt**2 * var_c / mc**4)
    if kind == "mean":
        p_value = stats.ttest_ind_from_stats(
            mt, np.sqrt(vt), nt, mc, np.sqrt(vc), nc, equal_var=False
        ).pvalue
    else:
        p_value = 2 * stats.norm.sf(np.abs(mt - mc) / np.sqrt(var_t + var_c))
    # An arm without events has a per-user variance of 0, and the delta method would call
    # its lift exact (a CI of [-100%, -100%]): no interval where either arm has no events.
    se = np.where((mt == 0) | (mc == 0), np.nan, se)
    return lift, lift - z * se, lift + z * se, se, np.asarray(p_value, dtype=float)


def compare_sums(
    kind: str,
    treated: np.ndarray,
    total: np.ndarray,
    center: np.ndarray,
    alpha: float,
    cuped: bool,
) -> LiftEstimates:
    """Lift estimates from moment sums of the treatment arm and of all users."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = _delta_moments(treated, center)
        c = _delta_moments(total - treated, center)
        pooled = _delta_moments(total, center)
        theta = pooled["cov_mp"] / pooled["var_p"] if cuped else np.zeros_like(pooled["m"])
        # No usable covariate (no pre-period, or a constant one): CUPED must change nothing.
        theta = np.broadcast_to(np.where(np.isfinite(theta), theta, 0.0), t["m"].shape)
        # An arm without events stays at zero: shifting it would invent events (or negative
        # ones), and a control arm's ~0 would turn into a lift of any size.
        theta = np.where((t["m"] == 0) | (c["m"] == 0), 0.0, theta)

        def adjusted(arm: dict[str, np.ndarray], th: np.ndarray) -> tuple[np.ndarray, ...]:
            shift = np.where(th != 0, th * (arm["p"] - pooled["p"]), 0.0)
            var = np.maximum(arm["var_m"] - 2 * th * arm["cov_mp"] + th**2 * arm["var_p"], 0.0)
            return arm["m"] - shift, np.where(th != 0, var, arm["var_m"])

        mt, vt = adjusted(t, theta)
        mc, vc = adjusted(c, theta)
        z = stats.norm.ppf(1 - alpha / 2)
        lift, lo, hi, se, p = _lift_test(kind, mt, mc, vt, vc, t["n"], c["n"], z)
        raw = _lift_test(kind, t["m"], c["m"], t["var_m"], c["var_m"], t["n"], c["n"], z)
        difference_high = mt - mc + z * np.sqrt(vt / t["n"] + vc / c["n"])
        reduction = 1 - (vt / t["n"] + vc / c["n"]) / (t["var_m"] / t["n"] + c["var_m"] / c["n"])
        sd_control, sd_treatment = np.sqrt(vc), np.sqrt(vt)
    return LiftEstimates(
        control=c["m"],
        treatment=t["m"],
        n_control=c["n"],
        n_treatment=t["n"],
        lift=lift,
        ci_low=lo,
        ci_high=hi,
        se=se,
        difference_ci_high=difference_high,
        p_value=p,
        lift_unadjusted=raw[0],
        ci_low_unadjusted=raw[1],
        ci_high_unadjusted=raw[2],
        p_value_unadjusted=raw[4],
        sd_control=sd_control,
        sd_treatment=sd_treatment,
        theta=theta,
        variance_reduction=np.where(np.isfinite(reduction), reduction, 0.0),
    )


def compare(
    metric: UserMetric, treatment: np.ndarray, *, alpha: float = 0.05, cuped: bool = True
) -> LiftEstimates:
    """Lift of one metric, vectorised over assignments.

    ``treatment`` is a boolean per user, shape (users,) or (replicates, users): several
    assignments of the same users (A/A re-randomisation) or, when the metric's arrays are
    (replicates, users) too, one assignment per independent experiment.
    """
    matrix, center = moment_matrix(metric)
    assignment = np.atleast_2d(np.asarray(treatment, dtype=np.float64))
    if assignment.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"treatment has {assignment.shape[-1]} users, metric {metric.name!r} has "
            f"{matrix.shape[-2]}; pass one assignment flag per user"
        )
    if matrix.ndim == 2:
        treated, total = assignment @ matrix, matrix.sum(axis=0)
    else:
        treated, total = np.einsum("rn,rnk->rk", assignment, matrix), matrix.sum(axis=-2)
    return compare_sums(metric.kind, treated, total, center, alpha, cuped)
