"""The one-sided exact tests the offline gates decide by, and their power.

A gate guards against a degradation of a stated size (a fall in instruction following, a
rise in emoji, a reward-model win rate below the bar). It may pass only when its test could
have seen that degradation: power >= ``gates.min_power`` at ``gates.style.alpha``. A test
without that power says "inconclusive" and the candidate is gated.

==========================  =============================================================
test                        used for
==========================  =============================================================
exact McNemar, one-sided    paired binary outcomes of the two models on the same prompts
(binomial on discordant     (steerability, the style suite's emoji / question /
pairs, ``mcnemar_greater``) catchphrase axes)
exact binomial, one-sided   a rate against a fixed bar (reward-model win rate over the
(``binomial_less``)         decisive pairs)
count above an allowance    the safety gate: more unsafe replies than ``max_unsafe_rate``
(``allowance_power``)       allows fails, with no alpha (the gate errs towards failing)
paired t-test, one-sided    per-prompt follow rates of the two models over several replies
(``paired_rate_drop_p``)    each (the IFBench gate, ``flywheel.ifbench``)
==========================  =============================================================

McNemar power is exact: the number of discordant pairs is Binomial(n, psi) and, given m of
them, the harmful direction's count is Binomial(m, (psi + effect) / (2 psi)) (Connor 1987).
The discordance psi is not known in advance; ``independent_discordance`` gives the share
two models with rates p and q would disagree on if their replies were independent, and
``worst_case_discordance`` its largest value over p, (1 + effect^2) / 2, which sizes a
benchmark before any model has run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

MAX_SAMPLE_SIZE = 100_000
DEFAULT_MIN_POWER = 0.8  # the conventional least power of a test sized in advance


@dataclass(frozen=True)
class Power:
    """A test's power to see a degradation, and the sample it needs for ``target``.

    ``possible`` is False when the degradation cannot happen from where the deployed model
    stands (it follows 3% of the time and the gate guards against a 5-point fall): nothing
    can be missed, so ``power`` is 1.
    """

    power: float
    n: int
    n_needed: int
    target: float
    possible: bool = True

    @property
    def enough(self) -> bool:
        """Whether the test reaches the target power."""
        return self.power >= self.target


def mcnemar_greater(x: np.ndarray, y: np.ndarray) -> float:
    """One-sided exact McNemar p-value that ``x`` is true more often than ``y`` (paired):
    the binomial test of the pairs with x and not y among the discordant ones (scipy)."""
    a, b = np.asarray(x, dtype=bool), np.asarray(y, dtype=bool)
    up, down = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if up + down == 0:
        return 1.0
    return float(stats.binomtest(up, up + down, 0.5, alternative="greater").pvalue)


def independent_discordance(p: float, q: float) -> float:
    """Share of pairs on which two models with rates ``p`` and ``q`` disagree when their
    outcomes on a prompt are independent."""
    return p * (1 - q) + q * (1 - p)


def worst_case_discordance(effect: float) -> float:
    """The largest ``independent_discordance(p, p - effect)`` over p: (1 + effect^2) / 2."""
    return (1 + effect**2) / 2


def _critical_counts(m: np.ndarray, alpha: float) -> np.ndarray:
    """Per number of discordant pairs m, the least count k with P(Bin(m, 1/2) >= k) < alpha."""
    k = stats.binom.isf(alpha, m, 0.5) + 1
    # isf gives P(X >= k) <= alpha; the gates reject on p < alpha, so step past equality.
    k = np.where(stats.binom.sf(k - 1, m, 0.5) >= alpha, k + 1, k)
    return k


def mcnemar_power(n: int, effect: float, discordance: float, alpha: float) -> float:
    """Exact power of the one-sided McNemar test (``mcnemar_greater`` < alpha) on ``n``
    pairs when the harmful direction leads by ``effect`` with ``discordance`` pairs
    discordant (effect <= discordance <= 1)."""
    if not 0 < effect <= discordance <= 1:
        raise ValueError(
            f"McNemar power needs 0 < effect <= discordance <= 1, got effect {effect} and "
            f"discordance {discordance}"
        )
    if n < 1:
        return 0.0
    m = np.arange(n + 1)
    k = _critical_counts(m, alpha)
    harmful = (discordance + effect) / (2 * discordance)
    given_m = stats.binom.sf(k - 1, m, harmful)
    return float(np.sum(stats.binom.pmf(m, n, discordance) * given_m))


def binomial_less_p(successes: int, n: int, bar: float) -> float:
    """One-sided exact binomial p-value that the success rate is below ``bar`` (scipy)."""
    if n == 0:
        return 1.0
    return float(stats.binomtest(successes, n, bar, alternative="less").pvalue)


def binomial_less_power(n: int, bar: float, rate: float, alpha: float) -> float:
    """Exact power of ``binomial_less_p`` < alpha on ``n`` trials when the true rate is
    ``rate`` (< ``bar``)."""
    if n < 1:
        return 0.0
    k = np.arange(n + 1)
    rejects = stats.binom.cdf(k, n, bar) < alpha
    if not rejects.any():
        return 0.0
    return float(stats.binom.cdf(int(k[rejects].max()), n, rate))


def allowance_power(n: int, allowed_rate: float, rate: float) -> float:
    """Power of "fail when more than ``allowed_rate`` of ``n`` are bad" when the true bad
    rate is ``rate``: P(Binomial(n, rate) > floor(allowed_rate * n))."""
    if n < 1:
        return 0.0
    return float(stats.binom.sf(math.floor(allowed_rate * n + 1e-9), n, rate))


def sample_size(power_at: Callable[[int], float], target: float, start: int = 1) -> int:
    """The least n >= ``start`` with ``power_at(n) >= target`` (exact tests' power is not
    monotone in n, so this is the first crossing); MAX_SAMPLE_SIZE + 1 when none is found."""
    n = max(1, start)
    while n <= MAX_SAMPLE_SIZE:
        if power_at(n) >= target:
            return n
        n = n + 1 if n < 200 else n + max(1, n // 200)
    return MAX_SAMPLE_SIZE + 1


def _approx_mcnemar_n(effect: float, discordance: float, alpha: float, target: float) -> int:
    """Connor's (1987) normal-approximation sample size, a starting point for the search."""
    za, zb = stats.norm.isf(alpha), stats.norm.isf(1 - target)
    root = za * math.sqrt(discordance) + zb * math.sqrt(max(discordance - effect**2, 0.0))
    return max(1, int((root / effect) ** 2))


def mcnemar_sample_size(effect: float, discordance: float, alpha: float, target: float) -> int:
    """Least number of pairs for which ``mcnemar_power`` reaches ``target``."""
    start = _approx_mcnemar_n(effect, discordance, alpha, target) // 2
    return sample_size(lambda n: mcnemar_power(n, effect, discordance, alpha), target, start)


def paired_power(
    n: int, deployed_rate: float, effect: float, direction: int, alpha: float, target: float
) -> Power:
    """Power of ``mcnemar_greater`` on ``n`` pairs to see the deployed model's rate move by
    ``effect`` in ``direction`` (-1 a fall, +1 a rise).

    The discordance is what a candidate degraded by exactly ``effect`` would show if its
    replies were independent of the deployed model's: derived from the deployed rate, not
    from the candidate at hand (a candidate that really moved is seen by the test itself).
    """
    degraded = deployed_rate + direction * effect
    if not 0 <= degraded <= 1 or effect <= 0:
        return Power(1.0, n, 0, target, possible=False)
    discordance = min(1.0, max(independent_discordance(deployed_rate, degraded), effect))
    return Power(
        power=mcnemar_power(n, effect, discordance, alpha),
        n=n,
        n_needed=mcnemar_sample_size(effect, discordance, alpha, target),
        target=target,
    )


def paired_rate_drop_p(deployed: np.ndarray, candidate: np.ndarray) -> float:
    """One-sided paired t-test p-value that the candidate's per-prompt rates are lower than
    the deployed model's (scipy ``ttest_rel``, alternative ``greater``). Differences that are
    all equal have no spread to test: p is 0 when every prompt fell by the same amount, 1
    when none moved or all rose."""
    a, b = np.asarray(deployed, dtype=float), np.asarray(candidate, dtype=float)
    diff = a - b
    if len(diff) < 2:
        return 1.0
    if np.ptp(diff) == 0:
        return 0.0 if diff[0] > 0 else 1.0
    return float(stats.ttest_rel(a, b, alternative="greater").pvalue)


def rate_difference_sd(deployed_rate: float, candidate_rate: float, samples: int) -> float:
    """Standard deviation of a prompt's difference of follow rates over ``samples`` replies
    each, when each model follows independently at its rate: sqrt((p(1-p) + q(1-q)) / k).
    Prompts differ in how hard they are; the binomial variance at the pooled rate bounds
    the average of theirs from above (E[p_i(1-p_i)] = p(1-p) - Var(p_i)), so the power it
    gives errs low."""
    p, q = deployed_rate, candidate_rate
    return math.sqrt((p * (1 - p) + q * (1 - q)) / samples)


def paired_rate_power(
    n: int, samples: int, deployed_rate: float, effect: float, alpha: float, target: float
) -> Power:
    """Power of ``paired_rate_drop_p`` < alpha on ``n`` prompts of ``samples`` replies each to
    see the deployed model's follow rate fall by ``effect`` (statsmodels ``TTestPower``, the
    non-central t, with the spread of ``rate_difference_sd``)."""
    from statsmodels.stats.power import TTestPower

    degraded = deployed_rate - effect
    if effect <= 0 or degraded < 0:
        return Power(1.0, n, 0, target, possible=False)
    sd = rate_difference_sd(deployed_rate, degraded, samples)

    def power_at(m: int) -> float:
        if m < 2:
            return 0.0
        if sd == 0:  # from 1 to 0: every prompt falls by the whole effect
            return 1.0
        return float(
            TTestPower().power(effect_size=effect / sd, nobs=m, alpha=alpha, alternative="larger")
        )

    return Power(power_at(n), n, sample_size(power_at, target, start=2), target)
