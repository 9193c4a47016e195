"""Steerability metrics, defined once for sim, offline evaluation, GRPO rewards and dashboards.

- **Instruction-following rate**: the share of replies that satisfy *every* instruction of
  their character (``follows_all``; a character without instructions follows vacuously).
- **Violation rate**: the share of replies that break *at least one prohibition* of their
  character (``violates_any``; prohibitions are the "never do X" checkers, see
  ``rewards.checkers.Checker.prohibition``).

Both are computed per character and overall (pooled over replies, not averaged over
characters), with Wilson 95% intervals from statsmodels. The input is a DataFrame of logged
replies with the columns ``character`` (str), ``follows_all`` (bool) and ``violates_any``
(bool), as ``sim.conversation.TurnRecord.to_row()`` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from statsmodels.stats.proportion import proportion_confint

from rewards.checkers import Checker, run_checkers

REQUIRED_COLUMNS = ("character", "follows_all", "violates_any")
OVERALL = "(overall)"


def instruction_following_rate(follows_all: Sequence[bool]) -> float:
    """Share of replies that satisfy every instruction of their character (NaN if none)."""
    return float(pd.Series(follows_all, dtype=float).mean()) if len(follows_all) else float("nan")


def violation_rate(violates_any: Sequence[bool]) -> float:
    """Share of replies that break at least one prohibition (NaN if none)."""
    return float(pd.Series(violates_any, dtype=float).mean()) if len(violates_any) else float("nan")


def score_replies(replies: Sequence[str], checkers: Sequence[Checker]) -> pd.DataFrame:
    """Check each reply against one character's checkers: columns ``follows_all``,
    ``violates_any`` and one boolean column per instruction kind."""
    rows = []
    for reply in replies:
        result = run_checkers(reply, checkers)
        rows.append(
            {"follows_all": result.follows_all, "violates_any": result.violates_any}
            | {f"check/{k}": v for k, v in result.checks.items()}
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SteerabilityResult:
    """Per-character and overall steerability, one row per group in ``table``.

    ``table`` columns: ``group``, ``n``, ``following_rate``, ``following_low``,
    ``following_high``, ``violation_rate``, ``violation_low``, ``violation_high``; the
    last row is ``OVERALL``.
    """

    table: pd.DataFrame

    @property
    def following_rate(self) -> float:
        """Overall instruction-following rate."""
        return float(self.table.set_index("group").loc[OVERALL, "following_rate"])

    @property
    def violation_rate(self) -> float:
        """Overall violation rate."""
        return float(self.table.set_index("group").loc[OVERALL, "violation_rate"])

    def summary(self) -> str:
        """A fixed-width table for terminals and logs."""
        lines = [f"{'character':<22}{'n':>6}{'following (95% CI)':>28}{'violation (95% CI)':>28}"]
        for row in self.table.itertuples(index=False):
            follow = f"{row.following_rate:.3f} [{row.following_low:.3f}, {row.following_high:.3f}]"
            viol = f"{row.violation_rate:.3f} [{row.violation_low:.3f}, {row.violation_high:.3f}]"
            lines.append(f"{row.group:<22}{row.n:>6}{follow:>28}{viol:>28}")
        return "\n".join(lines)


def _rates(group: str, follows: pd.Series, violates: pd.Series) -> dict[str, object]:
    n = len(follows)
    k_f, k_v = int(follows.sum()), int(violates.sum())
    f_low, f_high = proportion_confint(k_f, n, alpha=0.05, method="wilson")
    v_low, v_high = proportion_confint(k_v, n, alpha=0.05, method="wilson")
    return {
        "group": group,
        "n": n,
        "following_rate": k_f / n,
        "following_low": float(f_low),
        "following_high": float(f_high),
        "violation_rate": k_v / n,
        "violation_low": float(v_low),
        "violation_high": float(v_high),
    }


def steerability(replies: pd.DataFrame) -> SteerabilityResult:
    """Instruction-following and violation rates per character and overall.

    ``replies`` needs the columns in ``REQUIRED_COLUMNS``; it must not be empty.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in replies.columns]
    if missing:
        raise ValueError(
            f"steerability needs columns {list(REQUIRED_COLUMNS)}; missing {missing}; "
            "fix: pass TurnRecord rows (sim.conversation.TurnRecord.to_row())"
        )
    if replies.empty:
        raise ValueError("steerability got no replies; fix: log at least one bot reply first")
    follows = replies["follows_all"].astype(bool)
    violates = replies["violates_any"].astype(bool)
    rows = [
        _rates(str(name), follows[idx], violates[idx])
        for name, idx in replies.groupby("character").groups.items()
    ]
    rows.append(_rates(OVERALL, follows, violates))
    return SteerabilityResult(pd.DataFrame(rows))
