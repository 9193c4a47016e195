"""A/A mode: re-randomise the assignment of a logged table and check the tests' calibration.

Each replicate draws a fresh random split of the same users with the logged arm sizes and
runs the same per-metric analysis as :func:`flywheel.ab.analyze` (CUPED included). Labels are
exchangeable under re-randomisation, so whatever the logged treatment did, every replicate
is a true null: p-values must be uniform and fall below alpha in an alpha share of replicates.

Speed: an assignment enters the estimators only through per-arm sums of 15 per-user moment
columns (:mod:`flywheel.ab.delta`), so a chunk of replicates is one matrix product
(replicates x users) @ (users x 15 * metrics) and the tests run vectorised over replicates.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from flywheel.ab.analysis import (
    AnalysisConfig,
    adjust_p_values,
    as_user_table,
    check_arms,
)
from flywheel.ab.delta import N_MOMENTS, compare_sums, moment_matrix
from flywheel.metrics import UserTable
from flywheel.metrics import user_metrics as build_metrics
from flywheel.persist import json_ready

CHUNK_CELLS = 2**24  # assignment-matrix entries per chunk (128 MiB of float64)
CALIBRATION_ALPHA = 0.01  # level of the FPR and uniformity checks themselves


@dataclass(frozen=True)
class AAMetricResult:
    """Calibration of one metric's test over the A/A replicates."""

    name: str
    false_positive_rate: float  # share of replicates with p < alpha
    fpr_ci_low: float  # 95% Clopper-Pearson interval of that share (scipy binomtest)
    fpr_ci_high: float
    binom_p_value: float  # two-sided binomial test that the share equals alpha
    ks_statistic: float  # Kolmogorov-Smirnov distance of the p-values from Uniform(0, 1)
    ks_p_value: float
    n_valid: int  # replicates with a defined p-value
    # Both checks of every metric form one family (2 x metrics tests): Holm-adjusted, so that
    # a perfectly calibrated analysis is not flagged somewhere one time in ten by chance.
    binom_p_adjusted: float
    ks_p_adjusted: float

    @property
    def calibrated(self) -> bool:
        """Neither check rejects at 1% after the Holm correction across all checks."""
        return bool(
            self.binom_p_adjusted > CALIBRATION_ALPHA and self.ks_p_adjusted > CALIBRATION_ALPHA
        )


@dataclass(frozen=True)
class AAResult:
    """Result of :func:`aa_test`."""

    metrics: tuple[AAMetricResult, ...]
    n_replicates: int
    alpha: float
    seed: int
    n_users: int
    n_treatment: int
    cuped: bool

    @property
    def calibrated(self) -> bool:
        """Every metric's test is calibrated (see :attr:`AAMetricResult.calibrated`)."""
        return all(m.calibrated for m in self.metrics)

    def __getitem__(self, name: str) -> AAMetricResult:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"no metric {name!r}; have {[m.name for m in self.metrics]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN becomes None)."""
        body = {k: v for k, v in asdict(self).items() if k != "metrics"}
        metrics = {m.name: {**asdict(m), "calibrated": m.calibrated} for m in self.metrics}
        return json_ready({**body, "calibrated": self.calibrated, "metrics": metrics})

    def to_json(self) -> str:
        """The result as strict JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def summary(self) -> str:
        """A plain-text table: false-positive rate with its CI and the KS test per metric."""
        lines = [
            f"A/A: {self.n_replicates} re-randomisations of {self.n_users} users "
            f"({self.n_treatment} treatment), alpha {self.alpha}, seed {self.seed}",
            f"{'metric':<16}{'FPR':>8}{'95% CI':>18}{'KS D':>8}{'KS p':>9}  calibrated",
        ]
        for m in self.metrics:
            ci = f"[{m.fpr_ci_low:.3f}, {m.fpr_ci_high:.3f}]"
            lines.append(
                f"{m.name:<16}{m.false_positive_rate:>8.3f}{ci:>18}{m.ks_statistic:>8.3f}"
                f"{m.ks_p_value:>9.3g}  {'yes' if m.calibrated else 'NO'}"
            )
        lines.append(
            "calibrated: the binomial test of the FPR and the KS test both keep p > 0.01 after "
            "a Holm correction over all metrics' checks"
        )
        return "\n".join(lines)


def aa_p_values(
    users: UserTable,
    n_replicates: int,
    *,
    seed: int = 0,
    config: AnalysisConfig | None = None,
    progress: bool = False,
) -> tuple[tuple[str, ...], np.ndarray]:
    """Metric names and their p-values (metrics x replicates) over random re-assignments."""
    config = config or AnalysisConfig()
    if n_replicates < 1:
        raise ValueError(f"n_replicates must be >= 1, got {n_replicates}")
    metrics = build_metrics(users, config.retention_day)
    matrices = [moment_matrix(m) for m in metrics]
    stacked = np.concatenate([matrix for matrix, _ in matrices], axis=1)
    totals = stacked.sum(axis=0)
    cuped = config.cuped and users.n_pre_days > 0
    rng = np.random.default_rng(seed)
    logged = users.treatment.astype(np.float64)
    chunk = max(1, min(n_replicates, CHUNK_CELLS // users.n_users))
    p_values = np.empty((len(metrics), n_replicates))
    bar = tqdm(total=n_replicates, desc="A/A", unit="replicate", disable=not progress)
    for start in range(0, n_replicates, chunk):
        size = min(chunk, n_replicates - start)
        treated = rng.permuted(np.tile(logged, (size, 1)), axis=1) @ stacked
        for k, (metric, (_, center)) in enumerate(zip(metrics, matrices, strict=True)):
            cols = slice(k * N_MOMENTS, (k + 1) * N_MOMENTS)
            est = compare_sums(
                metric.kind, treated[:, cols], totals[cols], center, config.alpha, cuped
            )
            p_values[k, start : start + size] = est.p_value
        bar.update(size)
    bar.close()
    return tuple(m.name for m in metrics), p_values


def aa_test(
    table: pd.DataFrame | UserTable,
    n_replicates: int = 1000,
    *,
    seed: int = 0,
    config: AnalysisConfig | None = None,
    progress: bool = False,
) -> AAResult:
    """Re-randomise the assignment ``n_replicates`` times; false-positive rate and KS per metric."""
    config = config or AnalysisConfig()
    users = as_user_table(table)
    check_arms(users)
    names, p_values = aa_p_values(users, n_replicates, seed=seed, config=config, progress=progress)
    results = []
    for name, p in zip(names, p_values, strict=True):
        p = p[np.isfinite(p)]
        if len(p) == 0:
            results.append(AAMetricResult(name, *[np.nan] * 6, 0, np.nan, np.nan))
            continue
        hits = int((p < config.alpha).sum())
        binom = stats.binomtest(hits, len(p), config.alpha)
        ci = binom.proportion_ci(confidence_level=0.95)
        ks = stats.kstest(p, "uniform")
        results.append(
            AAMetricResult(
                name,
                hits / len(p),
                float(ci.low),
                float(ci.high),
                float(binom.pvalue),
                float(ks.statistic),
                float(ks.pvalue),
                len(p),
                np.nan,
                np.nan,
            )
        )
    checks = [p for m in results for p in (m.binom_p_value, m.ks_p_value)]
    adjusted = adjust_p_values(checks, CALIBRATION_ALPHA, "holm")
    results = [
        replace(m, binom_p_adjusted=adjusted[2 * i], ks_p_adjusted=adjusted[2 * i + 1])
        for i, m in enumerate(results)
    ]
    return AAResult(
        tuple(results),
        n_replicates,
        config.alpha,
        seed,
        users.n_users,
        int(users.treatment.sum()),
        config.cuped and users.n_pre_days > 0,
    )
