"""Style control: keep reward models from paying for length and emoji.

A reward model fitted on engagement signals learns whatever raises them, including style
tricks (long replies, emoji spam, exclamation marks) that earn a like today and cost
satisfaction later. Following length-controlled AlpacaEval (Dubois et al., 2024) and ODIN
(Chen et al., 2024), a *style-controlled* model splits its score into two terms during
training::

    logit = content(context, reply) + beta . style(reply)

``style`` holds standardised style covariates of the reply; ``beta`` is fitted jointly
with the content term, so the style term absorbs what style alone explains. At scoring
time the style term is dropped (style set to its training mean, i.e. zero after
standardisation) and only ``content`` is the reward.

A flexible content term can still read style in the text itself, and a low correlation
does not rule that out: when content varies a lot, a sizeable per-reply bonus for emoji
hides behind |r| < 0.1, and RL would find it. So the content term reads the reply through
:func:`strip_style`, which removes what can be removed without changing what is said
(emoji; "!" becomes "."): appending emoji or exclamation marks cannot raise a
style-controlled reward at all. Length and questions cannot be removed that way; for them
(and for whatever emoji leave in the embedding of the rest) training adds ODIN's
decorrelation penalty: the squared Pearson correlation between the content score and each
covariate within a batch. What correlation remains on held-out replies is reported by
:func:`style_correlations`.

Style covariates (:data:`STYLE_FEATURES`), taken from ``rewards.features.style_features``
so that they count exactly what the rest of the project counts:

- ``length``: words in the reply (``words``);
- ``emoji``: emoji in the reply (``emoji``);
- ``questions``: question marks (``question_marks``);
- ``exclamations``: exclamation marks (``exclamations``).

Each enters twice, raw and ``log1p``, both standardised with training statistics: the raw
form is what the reported (Pearson) correlation measures, the log form lets the linear
style term follow diminishing returns (the tenth emoji adds less than the first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import emoji
import numpy as np
import torch
from scipy import stats
from torch import nn

from rewards.checkers import TEXT_SYMBOLS
from rewards.features import style_features

# Reported name -> key in rewards.features.style_features.
FEATURE_KEYS: dict[str, str] = {
    "length": "words",
    "emoji": "emoji",
    "questions": "question_marks",
    "exclamations": "exclamations",
}
STYLE_FEATURES: tuple[str, ...] = tuple(FEATURE_KEYS)
COVARIATES: tuple[str, ...] = tuple(
    f"{form}{name}" for form in ("", "log_") for name in STYLE_FEATURES
)
_EPS = 1e-8
_SPACES_RE = re.compile(r"[ \t]{2,}")
_EXCLAIM_RE = re.compile(r"[.!?]*![.!?]*")


def strip_style(reply: str) -> str:
    """The reply with its removable style taken out: emoji dropped, "!" made ".".

    A run of terminal punctuation holding any "!" ("!!", "?!", ".!") becomes one ".", so
    "Great!!" and "Great." read the same. Emoji are those ``rewards.checkers.emoji_list``
    counts (©, ® and ™ stay), so the stripped text has no emoji by the project's own rule.
    """
    text = emoji.replace_emoji(
        reply, replace=lambda chars, _: chars if chars in TEXT_SYMBOLS else ""
    )
    text = _EXCLAIM_RE.sub(".", text.replace("！", "!"))
    return _SPACES_RE.sub(" ", text).strip()


def style_counts(replies: Sequence[str]) -> np.ndarray:
    """Raw style counts, shape ``(len(replies), 4)``, columns :data:`STYLE_FEATURES`."""
    rows = []
    for reply in replies:
        features = style_features(reply)
        rows.append([features[key] for key in FEATURE_KEYS.values()])
    return np.asarray(rows, dtype=np.float64).reshape(len(replies), len(STYLE_FEATURES))


@dataclass(frozen=True)
class StyleScaler:
    """Standardises style counts into covariates with statistics fixed at training time."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, counts: np.ndarray) -> StyleScaler:
        """Fit on the training replies' counts (``style_counts`` output)."""
        raw = _expand(counts)
        std = raw.std(axis=0)
        # A feature constant in training (say, no reply ever has "!") gets unit scale so it
        # maps to 0 instead of dividing by zero; its coefficient then stays at zero.
        std = np.where(std < _EPS, 1.0, std)
        return cls(tuple(raw.mean(axis=0).tolist()), tuple(std.tolist()))

    def transform(self, counts: np.ndarray) -> np.ndarray:
        """Covariates, shape ``(n, len(COVARIATES))``, float32."""
        z = (_expand(counts) - np.asarray(self.mean)) / np.asarray(self.std)
        return z.astype(np.float32)

    def covariates(self, replies: Sequence[str]) -> np.ndarray:
        """Covariates straight from reply texts."""
        return self.transform(style_counts(replies))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form, read back by :meth:`from_dict`."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StyleScaler:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["mean"]), tuple(data["std"]))


def _expand(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != len(STYLE_FEATURES):
        raise ValueError(
            f"style counts must have shape (n, {len(STYLE_FEATURES)}) with columns "
            f"{STYLE_FEATURES}, got {counts.shape}; build them with style_counts(replies)"
        )
    return np.concatenate([counts, np.log1p(counts)], axis=1)


class StyleTerm(nn.Module):
    """The separate style term ``beta . style``: one linear map, no intercept.

    No intercept so that dropping the term at scoring time means "style at its training
    mean" (covariates are zero there), leaving the content term's calibration intact.
    """

    def __init__(self, n_outputs: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(len(COVARIATES), n_outputs, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, covariates: torch.Tensor) -> torch.Tensor:
        """Style contribution to each output's logit, shape ``(n, n_outputs)``."""
        return self.linear(covariates)

    def coefficients(self) -> dict[str, list[float]]:
        """Fitted beta per covariate (one value per output), for reports and tests."""
        weight = self.linear.weight.detach().cpu().numpy()
        return {name: weight[:, j].tolist() for j, name in enumerate(COVARIATES)}


def decorrelation_penalty(scores: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
    """ODIN's penalty: sum over score columns and covariates of the squared batch Pearson r.

    ``scores`` is ``(n,)`` or ``(n, k)``; ``covariates`` is ``(n, c)``. Columns without
    variance in the batch contribute zero rather than NaN.
    """
    s = scores.reshape(scores.shape[0], -1)
    s = s - s.mean(dim=0, keepdim=True)
    c = covariates - covariates.mean(dim=0, keepdim=True)
    cov = s.T @ c / s.shape[0]
    denom = s.pow(2).mean(dim=0).sqrt()[:, None] * c.pow(2).mean(dim=0).sqrt()[None, :]
    corr = cov / (denom + _EPS)
    return corr.pow(2).sum()


@dataclass(frozen=True)
class StyleCorrelation:
    """Correlation of a reward with one style feature over a set of replies."""

    feature: str
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    n: int

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-ready form."""
        return {
            "feature": self.feature,
            "pearson_r": self.pearson_r,
            "pearson_p": self.pearson_p,
            "spearman_rho": self.spearman_rho,
            "n": self.n,
        }


def style_correlations(
    scores: Sequence[float] | np.ndarray, replies: Sequence[str]
) -> dict[str, StyleCorrelation]:
    """Pearson and Spearman correlation of ``scores`` with each raw style count.

    A feature without variance over ``replies`` (no reply has "!") reports NaN: there is
    nothing a reward could have learned from it there.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(replies),):
        raise ValueError(
            f"scores must have one value per reply: got shape {scores.shape} for "
            f"{len(replies)} replies"
        )
    counts = style_counts(replies)
    out: dict[str, StyleCorrelation] = {}
    for j, name in enumerate(STYLE_FEATURES):
        x = counts[:, j]
        if len(x) < 3 or x.std() < _EPS or scores.std() < _EPS:
            out[name] = StyleCorrelation(name, float("nan"), float("nan"), float("nan"), len(x))
            continue
        pearson = stats.pearsonr(scores, x)
        spearman = stats.spearmanr(scores, x)
        out[name] = StyleCorrelation(
            name,
            float(pearson.statistic),
            float(pearson.pvalue),
            float(spearman.statistic),
            len(x),
        )
    return out


def max_abs_style_correlation(correlations: dict[str, StyleCorrelation]) -> float:
    """Largest |Pearson r| over the features that vary (NaN ones skipped; 0.0 if none)."""
    values = [abs(c.pearson_r) for c in correlations.values() if np.isfinite(c.pearson_r)]
    return max(values, default=0.0)
