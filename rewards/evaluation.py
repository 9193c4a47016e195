"""Offline evaluation of reward models on logged data (no oracle here).

- :func:`pairwise_accuracy`: share of held-out comparisons the model orders as the
  annotator did (ties count half), with a Wilson 95% interval.
- :func:`calibration`: how well predicted probabilities match observed signals: AUC
  (Mann-Whitney U), Brier score, log loss and expected calibration error (ECE, equal-width
  bins, weighted by bin size).
- :func:`style_correlations` (from ``rewards.style_control``): correlation of the reward
  with each style feature.
- :func:`style_sensitivity`: what a policy gains by style alone: the mean change of the
  reward when the same reply gets emoji, "!" for every ".", or a content-free filler
  sentence appended (:data:`STYLE_PROBES`), in units of the reward's spread. Correlation
  understates this: when content moves the reward a lot, a sizeable per-reply style bonus
  shows as a small r, and RL finds the bonus anyway.
- :func:`win_rate`: how often a candidate policy's reply beats the baseline's reply to the
  same context under a reward model (ties half), with a Wilson interval.
- :func:`style_controlled_win_rates`: the raw and the style-controlled win rate side by
  side, with a warning when they differ by more than :data:`WIN_RATE_GAP_WARNING`: then
  style, not content, explains much of the candidate's apparent gain (the length-controlled
  AlpacaEval check).

Correlation with the gold utility needs the oracle and lives in ``flywheel.rm_eval``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from rewards.datasets import as_lists, require_columns
from rewards.rm.base import RewardModel
from rewards.style_control import StyleCorrelation, style_correlations

WIN_RATE_GAP_WARNING = 0.10  # 10 points between raw and style-controlled win rate
_PROB_CLIP = 1e-7

__all__ = [
    "STYLE_PROBES",
    "WIN_RATE_GAP_WARNING",
    "Accuracy",
    "Calibration",
    "StyleCorrelation",
    "StyleSensitivity",
    "WinRate",
    "WinRateComparison",
    "calibration",
    "evaluate_pairwise",
    "pairwise_accuracy",
    "style_controlled_win_rates",
    "style_correlations",
    "style_sensitivity",
    "win_rate",
]


def _ties_half(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return (first > second).astype(float) + 0.5 * (first == second)


def _wilson(successes: float, n: int) -> tuple[float, float]:
    low, high = proportion_confint(successes, n, alpha=0.05, method="wilson")
    return float(low), float(high)


@dataclass(frozen=True)
class Accuracy:
    """Share of pairs ordered as labelled, with a Wilson 95% interval."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int

    def summary(self) -> str:
        """One line for logs and reports."""
        return (
            f"pairwise accuracy {self.accuracy:.3f} "
            f"[{self.ci_low:.3f}, {self.ci_high:.3f}] on {self.n} pairs"
        )

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return asdict(self)


def pairwise_accuracy(
    scores_chosen: Sequence[float] | np.ndarray, scores_rejected: Sequence[float] | np.ndarray
) -> Accuracy:
    """Share of pairs where the chosen reply scores higher (ties count half)."""
    chosen = np.asarray(scores_chosen, dtype=float)
    rejected = np.asarray(scores_rejected, dtype=float)
    if chosen.shape != rejected.shape or chosen.ndim != 1 or len(chosen) == 0:
        raise ValueError(
            f"pairwise_accuracy needs two equal-length, non-empty 1-d score arrays, got "
            f"shapes {chosen.shape} and {rejected.shape}"
        )
    wins = _ties_half(chosen, rejected)
    low, high = _wilson(wins.sum(), len(wins))
    return Accuracy(float(wins.mean()), low, high, len(wins))


def evaluate_pairwise(model: RewardModel, pairs: pd.DataFrame) -> Accuracy:
    """Pairwise accuracy of ``model`` on a pairwise table (``rewards.datasets``)."""
    require_columns(pairs, ("context", "chosen", "rejected"), "pairwise")
    contexts = as_lists(pairs["context"])
    scores = model.score(contexts * 2, as_lists(pairs["chosen"]) + as_lists(pairs["rejected"]))
    n = len(pairs)
    return pairwise_accuracy(scores[:n], scores[n:])


@dataclass(frozen=True)
class Calibration:
    """How predicted probabilities match binary outcomes.

    ``bins`` lists, per equal-width probability bin with rows in it: lower edge, rows,
    mean predicted probability, observed rate.
    """

    auc: float
    brier: float
    log_loss: float
    ece: float
    base_rate: float
    n: int
    bins: tuple[tuple[float, int, float, float], ...]

    def summary(self) -> str:
        """One line for logs and reports."""
        return (
            f"AUC {self.auc:.3f}, Brier {self.brier:.4f}, log loss {self.log_loss:.4f}, "
            f"ECE {self.ece:.4f} (base rate {self.base_rate:.3f}, n={self.n})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["bins"] = [
            {"low": b[0], "n": b[1], "mean_predicted": b[2], "observed": b[3]} for b in self.bins
        ]
        return out


def calibration(
    probabilities: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    n_bins: int = 10,
) -> Calibration:
    """AUC, Brier, log loss and ECE of ``probabilities`` against binary ``labels``.

    Rows with a missing label (NaN) are skipped. AUC is NaN when only one class remains.
    """
    p = np.asarray(probabilities, dtype=float)
    y_raw = np.asarray(labels, dtype=float)
    if p.shape != y_raw.shape or p.ndim != 1:
        raise ValueError(
            f"calibration needs equal-length 1-d arrays, got {p.shape} and {y_raw.shape}"
        )
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    keep = np.isfinite(y_raw)
    p, y = p[keep], y_raw[keep].astype(bool)
    if len(p) == 0:
        raise ValueError("calibration got no labelled rows")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]; pass predict_proba output")
    if y.all() or not y.any():
        auc = float("nan")
    else:
        u = stats.mannwhitneyu(p[y], p[~y], alternative="two-sided").statistic
        auc = float(u / (y.sum() * (~y).sum()))
    clipped = np.clip(p, _PROB_CLIP, 1 - _PROB_CLIP)
    log_loss = float(-np.mean(np.where(y, np.log(clipped), np.log1p(-clipped))))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        member = index == b
        if not member.any():
            continue
        mean_p, rate = float(p[member].mean()), float(y[member].mean())
        ece += member.sum() / len(p) * abs(mean_p - rate)
        bins.append((float(edges[b]), int(member.sum()), mean_p, rate))
    return Calibration(
        auc=auc,
        brier=float(np.mean((p - y) ** 2)),
        log_loss=log_loss,
        ece=float(ece),
        base_rate=float(y.mean()),
        n=len(p),
        bins=tuple(bins),
    )


@dataclass(frozen=True)
class WinRate:
    """Share of contexts where the candidate's reply scores above the baseline's."""

    win_rate: float
    ci_low: float
    ci_high: float
    n: int

    def summary(self) -> str:
        """One line for logs and reports."""
        return f"win rate {self.win_rate:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}], n={self.n}"

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return asdict(self)


def win_rate(
    scores_candidate: Sequence[float] | np.ndarray, scores_baseline: Sequence[float] | np.ndarray
) -> WinRate:
    """Candidate-vs-baseline win rate from paired scores (ties count half)."""
    acc = pairwise_accuracy(scores_candidate, scores_baseline)
    return WinRate(acc.accuracy, acc.ci_low, acc.ci_high, acc.n)


@dataclass(frozen=True)
class WinRateComparison:
    """Raw and style-controlled win rate of one candidate against one baseline."""

    raw: WinRate
    style_controlled: WinRate
    gap: float  # raw minus style-controlled, in share points (0.10 = 10 points)
    warning: str | None

    def summary(self) -> str:
        """Two lines for logs and reports."""
        text = (
            f"raw {self.raw.summary()}\nstyle-controlled {self.style_controlled.summary()}"
            f"\ngap {100 * self.gap:+.1f} points"
        )
        return f"{text}\nWARNING: {self.warning}" if self.warning else text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "raw": self.raw.to_dict(),
            "style_controlled": self.style_controlled.to_dict(),
            "gap": self.gap,
            "warning": self.warning,
        }


def style_controlled_win_rates(
    contexts: Sequence[str],
    candidate: Sequence[str],
    baseline: Sequence[str],
    model: RewardModel,
    naive_model: RewardModel | None = None,
    threshold: float = WIN_RATE_GAP_WARNING,
) -> WinRateComparison:
    """Candidate-vs-baseline win rate raw and style-controlled, warning on a large gap.

    ``model`` must be style-controlled. The raw win rate uses ``naive_model`` when given,
    else ``model`` with its style term kept (what it learned style is worth, as
    length-controlled AlpacaEval reports both from one fitted model).
    """
    if not model.style_controlled:
        raise ValueError(
            f"style_controlled_win_rates needs a style-controlled model, got {model.name}; "
            "train one with --style-controlled"
        )
    contexts, candidate, baseline = as_lists(contexts), as_lists(candidate), as_lists(baseline)
    if not len(contexts) == len(candidate) == len(baseline):
        raise ValueError(
            f"need one candidate and one baseline reply per context, got {len(contexts)} "
            f"contexts, {len(candidate)} candidate and {len(baseline)} baseline replies"
        )
    n = len(contexts)
    both = candidate + baseline
    controlled_scores = model.score(contexts * 2, both)
    if naive_model is None:
        raw_scores = model.score(contexts * 2, both, with_style=True)
    else:
        raw_scores = naive_model.score(contexts * 2, both)
    raw = win_rate(raw_scores[:n], raw_scores[n:])
    controlled = win_rate(controlled_scores[:n], controlled_scores[n:])
    gap = raw.win_rate - controlled.win_rate
    message = None
    if abs(gap) > threshold:
        message = (
            f"raw win rate {raw.win_rate:.3f} and style-controlled win rate "
            f"{controlled.win_rate:.3f} differ by {100 * abs(gap):.1f} points "
            f"(> {100 * threshold:.0f}): style, not content, drives the difference"
        )
        warnings.warn(message, stacklevel=2)
    return WinRateComparison(raw, controlled, gap, message)


def _add_emoji(reply: str) -> str:
    return f"{reply} 😀🎉"


def _exclaim(reply: str) -> str:
    return reply.replace(".", "!")


def _add_filler(reply: str) -> str:
    return f"{reply} Anyway, that is what I think, and I could keep talking about this for ages."


# Content-free edits a policy could learn; module-level functions so the dict pickles.
STYLE_PROBES = {"emoji": _add_emoji, "exclamation": _exclaim, "filler": _add_filler}


@dataclass(frozen=True)
class StyleSensitivity:
    """Reward change from one content-free style edit, over a set of replies."""

    probe: str
    mean_delta: float  # in reward units
    mean_delta_sd: float  # in units of the reward's standard deviation over the replies
    share_raised: float  # share of replies the edit scores higher
    n: int

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-ready form."""
        return asdict(self)


def style_sensitivity(
    model: RewardModel, contexts: Sequence[str], replies: Sequence[str]
) -> dict[str, StyleSensitivity]:
    """The reward gained by each of :data:`STYLE_PROBES` applied to the same replies."""
    contexts, replies = as_lists(contexts), as_lists(replies)
    if len(contexts) != len(replies) or len(replies) < 2:
        raise ValueError(
            f"style_sensitivity needs >= 2 replies with one context each, got {len(replies)} "
            f"replies and {len(contexts)} contexts"
        )
    n = len(replies)
    edited = [probe(r) for probe in STYLE_PROBES.values() for r in replies]
    scores = model.score(contexts * (1 + len(STYLE_PROBES)), replies + edited)
    base, spread = scores[:n], float(np.std(scores[:n]))
    out = {}
    for i, name in enumerate(STYLE_PROBES):
        delta = scores[n * (i + 1) : n * (i + 2)] - base
        out[name] = StyleSensitivity(
            probe=name,
            mean_delta=float(delta.mean()),
            mean_delta_sd=float(delta.mean() / spread) if spread > 0 else float("nan"),
            share_raised=float(np.mean(delta > 0)),
            n=n,
        )
    return out
