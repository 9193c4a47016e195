"""Style-artifact regression suite: did the candidate win on content, or on style?

A candidate and the deployed model answer the same held-out contexts. The suite compares
their replies pair by pair on four style axes, each with a paired test:

==========================  ======================================================  ==============
check                       statistic (candidate vs deployed)                       paired test
==========================  ======================================================  ==============
``length``                  mean words ratio; shift when outside                    Wilcoxon
                            [1 / max_length_ratio, max_length_ratio]                signed-rank
``emoji_rate``              share of replies with at least one emoji; shift when    McNemar
                            it rises significantly; power at a rise of              (exact,
                            max_emoji_rate_increase                                 one-sided)
``question_rate``           share ending in a question, over characters NOT told    McNemar
                            to ask one; shift when it rises significantly; power    (exact,
                            at a rise of max_question_rate_increase                 one-sided)
``catchphrase_repetition``  share of replies containing the candidate's most        McNemar
                            frequent word trigram (the character's own catchphrase  (exact,
                            and first word excluded); shift when it rises           one-sided)
                            significantly; power at a rise of
                            max_catchphrase_increase
==========================  ======================================================  ==============

The length shift counts when its test is significant at ``alpha`` and the ratio is outside
its band. A binary axis shifts when its one-sided test is significant at ``alpha``; its
threshold is the rise the test must be able to see: with power below ``min_power`` at that
rise (``flywheel.gate_power.paired_power``) the axis cannot tell, and a suite that found no
failure on such a sample is *inconclusive*, not passed. The length and ``rm_style_term``
checks (Wilcoxon, continuous) are not sized by power.

A fifth check reads style the way the reward model does: ``rm_style_term`` is the
style-controlled model's own style term (``score(with_style=True) - score()``, what its
fitted style coefficients say each reply's length, emoji, questions and exclamations are
worth). A shift is flagged when the candidate's replies are worth significantly more on that
term than the deployed model's (Wilcoxon, one pair per context), so a style change spread
thinly over several features is still caught when, together, the reward pays for it.

Then the reward-model win rate of the candidate over the deployed model is measured twice
(``rewards.evaluation.style_controlled_win_rates``): *raw*, with the naive reward model
(which reads style), and *style-controlled*, with the model whose style term is dropped at
scoring (``rewards.style_control``). As in length-controlled AlpacaEval, a third number
regresses the naive model's pairwise preferences on the style differences (a binomial GLM
in statsmodels: ``win ~ 1 + d_log_words + d_emoji + d_question``) and reads the win rate at
zero style difference, ``expit(intercept)``.

The suite FAILS when a style shift explains the gain: at least one shift is flagged and
the raw win rate exceeds the style-controlled or the style-adjusted one by at least
``max_win_rate_gap``. It also FAILS when the candidate learned the reward's style: a surface
axis (length, emoji, questions, catchphrase) shifted AND ``rm_style_term`` shifted, so the
candidate moved in the direction the reward pays for, even if it also won on content (best
of n under a naive reward selects both). A candidate that changed style without the reward
paying for it, or that won without changing style, passes when every binary axis had the
power to see its threshold, and is inconclusive otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import expit

from flywheel.gate_power import DEFAULT_MIN_POWER, mcnemar_greater, paired_power
from flywheel.persist import json_ready
from flywheel.scenario import StyleGateConfig
from rewards.checkers import Catchphrase, EndsWithQuestion, StartsWith, emoji_list, words
from rewards.features import style_features

TRIGRAM = 3


@dataclass(frozen=True)
class StyleCheck:
    """One style axis: candidate and deployed values, the paired test, and the verdict."""

    name: str
    candidate: float
    deployed: float
    change: float  # candidate - deployed (ratio for length)
    threshold: float
    p_value: float
    shifted: bool
    detail: str
    power: float | None = None  # to see a rise of ``threshold`` (binary axes only)
    n_needed: int | None = None  # pairs that reach the suite's min_power
    n_pairs: int = 0  # pairs the check compared

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None)."""
        return json_ready(asdict(self))


@dataclass(frozen=True)
class StyleRegressionResult:
    """Everything the suite measured and its verdict (see the module docstring)."""

    checks: tuple[StyleCheck, ...]
    raw_win_rate: float
    style_controlled_win_rate: float
    style_adjusted_win_rate: float
    glm_coefficients: dict[str, float]
    n: int
    passed: bool  # verdict == "pass"
    reason: str
    verdict: str = "pass"  # pass / fail / inconclusive (module docstring)
    min_power: float = DEFAULT_MIN_POWER

    @property
    def shifts(self) -> list[StyleCheck]:
        """The checks that found a significant style shift."""
        return [c for c in self.checks if c.shifted]

    @property
    def power(self) -> float | None:
        """The least power of the binary axes (None without any)."""
        powers = [c.power for c in self.checks if c.power is not None]
        return min(powers) if powers else None

    @property
    def n_needed(self) -> int | None:
        """Paired replies the binary axes need to reach ``min_power`` (None without any),
        scaled from each axis's own sample to all pairs (the question axis counts only
        characters not told to ask)."""
        needs = [
            math.ceil(c.n_needed * self.n / max(c.n_pairs, 1))
            for c in self.checks
            if c.n_needed is not None
        ]
        return max(needs) if needs else None

    def __getitem__(self, name: str) -> StyleCheck:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no style check {name!r}; have {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "reason": self.reason,
            "n": self.n,
            "power": self.power,
            "n_needed": self.n_needed,
            "raw_win_rate": json_ready(self.raw_win_rate),
            "style_controlled_win_rate": json_ready(self.style_controlled_win_rate),
            "style_adjusted_win_rate": json_ready(self.style_adjusted_win_rate),
            "glm_coefficients": {k: json_ready(v) for k, v in self.glm_coefficients.items()},
            "checks": {c.name: c.to_dict() for c in self.checks},
        }

    def summary(self) -> str:
        """A fixed-width table for terminals and reports."""
        lines = [f"style regression over {self.n} paired replies: {self.verdict.upper()}"]
        for c in self.checks:
            flag = "SHIFT" if c.shifted else "ok"
            lines.append(
                f"  {c.name:<24}{c.deployed:>9.3f} -> {c.candidate:<9.3f}p={c.p_value:<8.2g}{flag}"
            )
        lines.append(
            f"  RM win rate raw {self.raw_win_rate:.3f}, style-controlled "
            f"{self.style_controlled_win_rate:.3f}, style-adjusted (GLM) "
            f"{self.style_adjusted_win_rate:.3f}"
        )
        lines.append(f"  {self.reason}")
        return "\n".join(lines)


def wilcoxon_p(candidate: np.ndarray, deployed: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (scipy); 1.0 if all equal."""
    diff = np.asarray(candidate, dtype=float) - np.asarray(deployed, dtype=float)
    if not np.any(diff != 0):
        return 1.0
    return float(stats.wilcoxon(candidate, deployed, zero_method="wilcox").pvalue)


def _own_phrases(checkers: Sequence[Any]) -> list[list[str]]:
    """Word sequences a character is TOLD to repeat (catchphrase, first word)."""
    phrases = []
    for checker in checkers:
        if isinstance(checker, Catchphrase):
            phrases.append([w.lower() for w in words(checker.phrase)])
        elif isinstance(checker, StartsWith):
            phrases.append([checker.word.lower()])
    return phrases


def _trigrams(reply: str, excluded: list[list[str]]) -> set[tuple[str, ...]]:
    tokens = [w.lower() for w in words(reply)]
    grams = {tuple(tokens[i : i + TRIGRAM]) for i in range(len(tokens) - TRIGRAM + 1)}
    # A trigram that overlaps a phrase the character must say is the instruction, not a tic.
    return {g for g in grams if not any(set(g) & set(p) for p in excluded)}


def top_phrase(
    replies: Sequence[str], excluded: Sequence[list[list[str]]]
) -> tuple[str, ...] | None:
    """The word trigram found in the most replies (each reply counted once), or None."""
    counts: Counter[tuple[str, ...]] = Counter()
    for reply, own in zip(replies, excluded, strict=True):
        counts.update(_trigrams(reply, own))
    if not counts:
        return None
    # Ties go to the alphabetically first trigram: set order varies between processes.
    return min(counts, key=lambda gram: (-counts[gram], gram))


def _binary_check(
    name: str,
    cand: np.ndarray,
    dep: np.ndarray,
    threshold: float,
    alpha: float,
    min_power: float,
    what: str,
) -> StyleCheck:
    """A binary axis: shifted when the candidate's rate rises significantly (one-sided exact
    McNemar); its power is that test's at a rise of ``threshold`` from the deployed rate."""
    n = len(cand)
    c_rate = float(cand.mean()) if n else float("nan")
    d_rate = float(dep.mean()) if n else float("nan")
    p = mcnemar_greater(cand, dep) if n else 1.0
    change = c_rate - d_rate if n else 0.0
    shifted = bool(n and p < alpha)
    power = paired_power(n, d_rate if n else 0.0, threshold, +1, alpha, min_power)
    detail = (
        f"{what}: {d_rate:.2f} -> {c_rate:.2f} (one-sided McNemar p = {p:.2g}, n = {n}; power "
        f"{power.power:.2f} to see a rise of {threshold:.2f})"
    )
    return StyleCheck(
        name, c_rate, d_rate, change, threshold, p, shifted, detail,
        power=power.power, n_needed=power.n_needed, n_pairs=n,
    )  # fmt: skip


def style_checks(
    candidate: Sequence[str],
    deployed: Sequence[str],
    checkers: Sequence[Sequence[Any]],
    config: StyleGateConfig,
    min_power: float = DEFAULT_MIN_POWER,
) -> tuple[StyleCheck, ...]:
    """The four style checks of paired replies; ``checkers`` is each pair's character's."""
    n = len(candidate)
    if not n == len(deployed) == len(checkers):
        raise ValueError(
            f"style_checks needs paired replies: {len(candidate)} candidate, {len(deployed)} "
            f"deployed and {len(checkers)} checker lists"
        )
    c_words = np.array([len(words(r)) for r in candidate], dtype=float)
    d_words = np.array([len(words(r)) for r in deployed], dtype=float)
    ratio = float((c_words.mean() + 1) / (d_words.mean() + 1))
    p_len = wilcoxon_p(c_words, d_words)
    limit = config.max_length_ratio
    length = StyleCheck(
        "length", float(c_words.mean()), float(d_words.mean()), ratio, limit, p_len,
        bool((ratio > limit or ratio < 1 / limit) and p_len < config.alpha),
        f"mean words {d_words.mean():.1f} -> {c_words.mean():.1f} (x{ratio:.2f}, Wilcoxon "
        f"p = {p_len:.2g})", n_pairs=n,
    )  # fmt: skip

    emoji = _binary_check(
        "emoji_rate",
        np.array([bool(emoji_list(r)) for r in candidate]),
        np.array([bool(emoji_list(r)) for r in deployed]),
        config.max_emoji_rate_increase, config.alpha, min_power, "replies with emoji",
    )  # fmt: skip

    free = [
        i for i, cs in enumerate(checkers) if not any(isinstance(c, EndsWithQuestion) for c in cs)
    ]
    asks = lambda reply: bool(style_features(reply)["ends_with_question"])  # noqa: E731
    question = _binary_check(
        "question_rate",
        np.array([asks(candidate[i]) for i in free]),
        np.array([asks(deployed[i]) for i in free]),
        config.max_question_rate_increase, config.alpha, min_power,
        "replies ending in a question (characters not told to ask)",
    )  # fmt: skip

    excluded = [_own_phrases(cs) for cs in checkers]
    phrase = top_phrase(candidate, excluded)
    if phrase is None:
        has_c = has_d = np.zeros(n, dtype=bool)
    else:
        has_c = np.array(
            [phrase in _trigrams(r, e) for r, e in zip(candidate, excluded, strict=True)]
        )
        has_d = np.array(
            [phrase in _trigrams(r, e) for r, e in zip(deployed, excluded, strict=True)]
        )
    shown = " ".join(phrase) if phrase else "-"
    catch = _binary_check(
        "catchphrase_repetition", has_c, has_d, config.max_catchphrase_increase, config.alpha,
        min_power, f"replies containing {shown!r}",
    )  # fmt: skip
    return (length, emoji, question, catch)


def style_term_check(
    contexts: Sequence[str],
    candidate: Sequence[str],
    deployed: Sequence[str],
    style_model: Any,
    alpha: float,
) -> StyleCheck:
    """The style-controlled reward model's own style term, candidate vs deployed (paired)."""
    contexts = list(contexts)

    def term(replies: Sequence[str]) -> np.ndarray:
        replies = list(replies)
        with_style = style_model.score(contexts, replies, with_style=True)
        return np.asarray(with_style - style_model.score(contexts, replies), dtype=float)

    c, d = term(candidate), term(deployed)
    diff = c - d
    p = wilcoxon_p(c, d)
    shifted = bool(np.median(diff) > 0 and p < alpha)
    return StyleCheck(
        "rm_style_term", float(c.mean()), float(d.mean()), float(diff.mean()), 0.0, p, shifted,
        f"reward-model style term {d.mean():+.3f} -> {c.mean():+.3f} (median paired gain "
        f"{np.median(diff):+.3f}, Wilcoxon p = {p:.2g})", n_pairs=len(diff),
    )  # fmt: skip


def style_adjusted_win_rate(
    raw_candidate: np.ndarray,
    raw_deployed: np.ndarray,
    candidate: Sequence[str],
    deployed: Sequence[str],
) -> tuple[float, dict[str, float]]:
    """LC-AlpacaEval-style win rate: binomial GLM of the naive RM's preference on style
    differences, read at zero difference (``expit(intercept)``). Ties count as half a win
    (the response is a proportion). Covariates constant over the sample are left out; a
    separable sample falls back to a lightly ridge-penalised fit."""
    import statsmodels.api as sm

    win = (np.sign(np.asarray(raw_candidate) - np.asarray(raw_deployed)) + 1) / 2
    diffs = {}
    for name, feature in (
        ("d_log_words", "words"),
        ("d_emoji", "emoji"),
        ("d_question", "ends_with_question"),
    ):
        c = np.array([style_features(r)[feature] for r in candidate], dtype=float)
        d = np.array([style_features(r)[feature] for r in deployed], dtype=float)
        diffs[name] = np.log1p(c) - np.log1p(d) if name == "d_log_words" else c - d
    names = [k for k, v in diffs.items() if np.std(v) > 1e-12]
    x = np.column_stack([np.ones(len(win)), *[diffs[k] for k in names]])
    model = sm.GLM(win, x, family=sm.families.Binomial())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            params = np.asarray(model.fit().params)
            if not np.all(np.isfinite(params)) or np.max(np.abs(params)) > 30:
                raise ValueError("separation")
        except (ValueError, np.linalg.LinAlgError):
            params = np.asarray(model.fit_regularized(alpha=1e-2, L1_wt=0.0).params)
    return float(expit(params[0])), {
        "intercept": float(params[0]),
        **dict(zip(names, map(float, params[1:]), strict=True)),
    }


@dataclass(frozen=True)
class _WinRates:
    """The naive reward model's win rate of the candidate, measured three ways."""

    raw: float  # naive reward model, reads style
    style_controlled: float  # style-controlled model, style term dropped
    style_adjusted: float  # naive model's preferences read at zero style difference (GLM)
    glm_coefficients: dict[str, float]

    @property
    def gap(self) -> float:
        """How much of the raw win rate the lower style-free rate does not keep."""
        return self.raw - min(self.style_controlled, self.style_adjusted)


def _win_rates(
    contexts: Sequence[str],
    candidate: Sequence[str],
    deployed: Sequence[str],
    *,
    naive_model: Any,
    style_model: Any,
) -> _WinRates:
    """Raw, style-controlled and style-adjusted win rates of ``candidate`` over ``deployed``."""
    from rewards.evaluation import style_controlled_win_rates

    with warnings.catch_warnings():
        # The comparison warns on a large gap; the suite reports it in its reason instead.
        warnings.simplefilter("ignore")
        rates = style_controlled_win_rates(
            contexts, candidate, deployed, style_model, naive_model, threshold=1.0
        )
    n = len(contexts)
    raw_scores = naive_model.score(list(contexts) * 2, list(candidate) + list(deployed))
    adjusted, coefficients = style_adjusted_win_rate(
        raw_scores[:n], raw_scores[n:], candidate, deployed
    )
    return _WinRates(
        raw=rates.raw.win_rate,
        style_controlled=rates.style_controlled.win_rate,
        style_adjusted=adjusted,
        glm_coefficients=coefficients,
    )


def _fail_reason(
    checks: Sequence[StyleCheck], rates: _WinRates, config: StyleGateConfig
) -> str | None:
    """Why the suite fails (module docstring), or None when it does not."""
    shifts = [c for c in checks if c.shifted]
    explained = rates.gap >= config.max_win_rate_gap
    # A surface axis moved AND the reward's own style term says the candidate gained from
    # it: the candidate learned what the reward pays for style, whatever else it improved.
    paid_for = checks[-1].shifted and any(c.shifted for c in checks[:-1])
    if not (shifts and (explained or paid_for)):
        return None
    return (
        ("style shift explains the gain: " if explained else "learned the reward's style: ")
        + "; ".join(c.detail for c in shifts)
        + f"; RM win rate raw {rates.raw:.2f} vs style-controlled {rates.style_controlled:.2f} "
        f"/ style-adjusted {rates.style_adjusted:.2f} (gap {rates.gap:+.2f}, limit "
        f"{config.max_win_rate_gap:.2f})"
    )


def _shift_summary(checks: Sequence[StyleCheck], rates: _WinRates) -> str:
    """What the suite saw when nothing failed: the shifts, if any, and the win rates."""
    shifts = [c for c in checks if c.shifted]
    if shifts:
        return (
            "style shifted (" + ", ".join(c.name for c in shifts) + f") but does not explain "
            f"the RM win rate (raw {rates.raw:.2f}, style-controlled "
            f"{rates.style_controlled:.2f}, style-adjusted {rates.style_adjusted:.2f})"
        )
    return (
        f"no significant style shift; RM win rate raw {rates.raw:.2f}, style-controlled "
        f"{rates.style_controlled:.2f}, style-adjusted {rates.style_adjusted:.2f}"
    )


def _verdict(
    checks: Sequence[StyleCheck], rates: _WinRates, config: StyleGateConfig, min_power: float
) -> tuple[str, str]:
    """(verdict, reason): fail, else inconclusive when a silent binary axis lacked power,
    else pass."""
    failure = _fail_reason(checks, rates, config)
    if failure is not None:
        return "fail", failure
    reason = _shift_summary(checks, rates)
    # An axis that shifted has seen what it looks for; only a silent one can be blind.
    blind = [c for c in checks if not c.shifted and c.power is not None and c.power < min_power]
    if not blind:
        return "pass", reason
    blind_reasons = "; ".join(_blind_reason(c, config.alpha) for c in blind)
    return "inconclusive", f"inconclusive: {blind_reasons}; {reason}"


def run_style_regression(
    contexts: Sequence[str],
    candidate: Sequence[str],
    deployed: Sequence[str],
    checkers: Sequence[Sequence[Any]],
    naive_model: Any,
    style_model: Any,
    config: StyleGateConfig | None = None,
    min_power: float = DEFAULT_MIN_POWER,
) -> StyleRegressionResult:
    """Run the suite on paired replies (module docstring) and decide pass / fail /
    inconclusive.

    Args:
        contexts: the user message each pair answers (reward-model context).
        candidate, deployed: the two models' replies, paired with ``contexts``.
        checkers: each pair's character's instruction checkers.
        naive_model: a reward model that reads style (``style_controlled=False``).
        style_model: a style-controlled reward model.
        config: thresholds; default ``StyleGateConfig()``.
        min_power: least power each binary axis needs at its threshold for a pass.
    """
    config = config or StyleGateConfig()
    if len(contexts) < 4:
        raise ValueError(
            f"the style regression suite needs at least 4 paired replies, got {len(contexts)}"
        )
    checks = (
        *style_checks(candidate, deployed, checkers, config, min_power),
        style_term_check(contexts, candidate, deployed, style_model, config.alpha),
    )
    rates = _win_rates(
        contexts, candidate, deployed, naive_model=naive_model, style_model=style_model
    )
    verdict, reason = _verdict(checks, rates, config, min_power)
    return StyleRegressionResult(
        checks=checks,
        raw_win_rate=rates.raw,
        style_controlled_win_rate=rates.style_controlled,
        style_adjusted_win_rate=rates.style_adjusted,
        glm_coefficients=rates.glm_coefficients,
        n=len(contexts),
        passed=verdict == "pass",
        reason=reason,
        verdict=verdict,
        min_power=min_power,
    )


def _blind_reason(check: StyleCheck, alpha: float) -> str:
    """Why one binary axis cannot tell: its sample, power and the sample it needs."""
    return (
        f"{check.n_pairs} pairs detect a {check.threshold:.2f} rise in {check.name} with power "
        f"{check.power:.2f} at alpha {alpha:g}; needs n >= {check.n_needed}"
    )


def style_profile(
    replies: Sequence[str], checkers: Sequence[Sequence[Any]] | None = None
) -> dict[str, float]:
    """Mean words, emoji rate and question rate of a set of replies (the contract's
    ``style`` block); the question rate skips characters told to end with a question."""
    feats = [style_features(r) for r in replies]
    if checkers is None:
        asked = [f["ends_with_question"] for f in feats]
    else:
        asked = [
            f["ends_with_question"]
            for f, cs in zip(feats, checkers, strict=True)
            if not any(isinstance(c, EndsWithQuestion) for c in cs)
        ]
    return {
        "mean_words": float(np.mean([f["words"] for f in feats])) if feats else float("nan"),
        "emoji_rate": float(np.mean([f["emoji"] > 0 for f in feats])) if feats else float("nan"),
        "question_rate": float(np.mean(asked)) if asked else float("nan"),
    }


def checkers_by_character(
    characters: Mapping[str, Any], names: Sequence[str]
) -> list[tuple[Any, ...]]:
    """Each name's character checkers (empty for an unknown name)."""
    return [tuple(characters[n].checkers) if n in characters else () for n in names]
