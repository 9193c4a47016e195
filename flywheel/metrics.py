"""A/B metric definitions, computed from a user-day table.

The user-day table
------------------
The input of the A/B analysis (``flywheel.ab.analyze``, ``flywheel analyze TABLE``): one row
per user and day, as a pandas DataFrame in code, or a Parquet (``.parquet``/``.pq``) or CSV
(``.csv``) file on disk.

Required columns:

==================  ============  ============================================================
column              type          meaning
==================  ============  ============================================================
``user_id``         int or str    stable user identifier
``arm``             str           ``"control"`` or ``"treatment"``; one arm per user
``day``             int           day index; ``day >= 0`` are test days (day 0 = first day of
                                  the test), ``day < 0`` are pre-period days (CUPED covariates)
``active``          0/1           the user opened at least one session that day
``messages``        int >= 0      messages the user sent that day
``bot_replies``     int >= 0      replies the character sent to the user that day
``reports``         int >= 0      bot replies the user reported that day
``violations``      int >= 0      bot replies that broke at least one of their character's
                                  instructions (see ``rewards`` violation rate)
``unsafe_replies``  int >= 0      bot replies the character *attempted* that were unsafe:
                                  blocked by the serving safety check (the user saw a
                                  fallback instead, ``sim.serving``) or offensive as shown
==================  ============  ============================================================

Optional columns:

- ``period`` (``"pre"`` / ``"test"``): when present it decides the period instead of the sign of
  ``day`` (then pre-period days may be numbered from 0 too).
- ``first_exposure_day`` (int, empty = never exposed): the test day the user first met their
  arm, numbered like ``day``; by default the user's first active test day. Used by retention.

Other columns (``sessions``, ...) are ignored. Missing user-days count as inactive with zero
counts, so a log may list active days only; but every *assigned* user needs at least one row
(an all-zero row for a user who never came), because the users in the table are the
denominator of breadth and of the sample-ratio-mismatch check. The test period spans the
smallest to the largest test day in the table, the pre-period likewise.

Metrics
-------
Every metric is a ratio of per-user sums, ``sum(numerator) / sum(denominator)`` over the users
of an arm (:class:`UserMetric`). A ``"mean"`` metric has a 0/1 denominator (which users count)
and is a mean of per-user values, analysed with Welch's t-test; a ``"ratio"`` metric has a
count as denominator (active days, bot replies) and needs the delta method, because its
analysis unit (the user) is not its denominator unit. Each metric carries the same quantity
over the pre-period as its CUPED covariate (retention, which has no pre-period analogue, uses
pre-period breadth). The definitions are the functions below, one each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

ARMS = ("control", "treatment")
COUNT_COLUMNS = ("messages", "bot_replies", "reports", "violations", "unsafe_replies")
REQUIRED_COLUMNS = ("user_id", "arm", "day", "active", *COUNT_COLUMNS)
PERIODS = ("pre", "test")
DEFAULT_RETENTION_DAY = 1  # days after first exposure


def load_table(path: str | Path) -> pd.DataFrame:
    """Read a user-day table from Parquet (``.parquet``/``.pq``) or CSV (``.csv``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"user-day table {str(path)!r} does not exist; pass a file path")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix == ".csv":
        return pd.read_csv(path)
    raise ValueError(
        f"user-day table {str(path)!r} has suffix {suffix!r}; "
        "save it as .parquet, .pq or .csv (see flywheel.metrics for the columns)"
    )


def validate_table(table: pd.DataFrame) -> None:
    """Check a user-day table against the documented format; raise ``ValueError`` naming the fix."""
    _check_columns(table)
    _check_values(table, pd.factorize(table["user_id"])[0])


def _check_columns(table: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"user-day table is missing column(s) {missing}; add them (0 where a count was not "
            f"logged). Required: {list(REQUIRED_COLUMNS)}; see flywheel.metrics for their meaning"
        )
    if len(table) == 0:
        raise ValueError("user-day table has no rows; it needs one row per assigned user and day")


def _check_values(table: pd.DataFrame, codes: np.ndarray) -> None:
    """Value checks; ``codes`` are the factorised user ids (computed once by the caller)."""
    bad_arms = sorted(set(pd.unique(table["arm"])) - set(ARMS), key=str)
    if bad_arms:
        raise ValueError(
            f"user-day table column 'arm' has values {bad_arms[:5]}; "
            f"use exactly {list(ARMS)} (rename your arm labels)"
        )
    for column in ("day", "active", *COUNT_COLUMNS):
        values = table[column]
        if not pd.api.types.is_numeric_dtype(values):
            values = pd.to_numeric(values, errors="coerce")  # text becomes NaN, reported below
        values = values.to_numpy()
        bad = values < 0 if column != "day" else np.zeros(len(values), dtype=bool)
        if pd.api.types.is_float_dtype(values):  # floats may be NaN or fractional
            bad |= ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"user-day table column {column!r} must hold "
                f"{'integers' if column == 'day' else 'non-negative integers'}; row {row} has "
                f"{table[column].iloc[row]!r} ({int(bad.sum())} bad rows); fill or fix them"
            )
    active = table["active"].to_numpy()
    if (active > 1).any():
        row = int(np.flatnonzero(active > 1)[0])
        raise ValueError(
            f"user-day table column 'active' must be 0 or 1; row {row} has {active[row]!r}; "
            "store whether the user was active that day, not a count"
        )
    if "period" in table.columns:
        bad_periods = sorted(set(pd.unique(table["period"])) - set(PERIODS), key=str)
        if bad_periods:
            raise ValueError(
                f"user-day table column 'period' has values {bad_periods[:5]}; use "
                f"{list(PERIODS)} or drop the column and mark pre-period days with day < 0"
            )
    treated = (table["arm"] == "treatment").to_numpy()
    user_treated = np.zeros(codes.max() + 1, dtype=bool)
    user_treated[codes] = treated
    switched = user_treated[codes] != treated
    if switched.any():
        user = table["user_id"].iloc[int(np.flatnonzero(switched)[0])]
        raise ValueError(
            f"user-day table: user {user!r} appears in both arms; every user needs one arm "
            "(drop users with conflicting assignments and report them as an SRM cause)"
        )
    # One int64 key per (user, day[, period]) row: hashing it is ~4x faster than row tuples.
    day = table["day"].to_numpy().astype(np.int64)
    key = codes.astype(np.int64) * (int(day.max() - day.min()) + 1) + (day - day.min())
    if "period" in table.columns:
        key = key * 2 + _is_pre(table)
    if pd.Index(key).has_duplicates:
        duplicated = pd.Index(key).duplicated()
        row = int(np.flatnonzero(duplicated)[0])
        raise ValueError(
            f"user-day table has {int(duplicated.sum())} repeated (user_id, day) rows, first "
            f"user {table['user_id'].iloc[row]!r} day {table['day'].iloc[row]!r}; "
            "sum the rows per user and day (active = max) before the analysis"
        )


def _is_pre(table: pd.DataFrame) -> np.ndarray:
    if "period" in table.columns:
        return (table["period"] == "pre").to_numpy()
    return (table["day"] < 0).to_numpy()


@dataclass(frozen=True)
class UserTable:
    """Per-user aggregates of a validated user-day table (one entry per user, same order).

    ``test`` and ``pre`` map each count column (and ``active``) to its per-user sum over the
    test and the pre-period; ``active_by_day`` is the users x test-days activity matrix (day
    index 0 = first test day); ``first_exposure`` is a test-day index, NaN for never exposed.
    """

    user_id: np.ndarray
    treatment: np.ndarray
    test: dict[str, np.ndarray]
    pre: dict[str, np.ndarray]
    active_by_day: np.ndarray
    first_exposure: np.ndarray
    first_test_day: int
    n_pre_days: int

    @property
    def n_users(self) -> int:
        """Number of assigned users."""
        return len(self.user_id)

    @property
    def n_test_days(self) -> int:
        """Number of days in the test period."""
        return self.active_by_day.shape[1]

    def with_treatment(self, treatment: np.ndarray) -> UserTable:
        """The same users under another assignment (for A/A re-randomisation)."""
        return UserTable(
            self.user_id,
            np.asarray(treatment, dtype=bool),
            self.test,
            self.pre,
            self.active_by_day,
            self.first_exposure,
            self.first_test_day,
            self.n_pre_days,
        )


def aggregate_users(table: pd.DataFrame) -> UserTable:
    """Validate a user-day table and sum it per user over the test and the pre-period."""
    _check_columns(table)
    codes, user_ids = pd.factorize(table["user_id"])
    _check_values(table, codes)
    n_users = len(user_ids)
    treated = (table["arm"] == "treatment").to_numpy()
    treatment = np.zeros(n_users, dtype=bool)
    treatment[codes] = treated
    is_pre = _is_pre(table)
    if is_pre.all():
        raise ValueError(
            "user-day table has pre-period rows only; test days need day >= 0 (or period = 'test')"
        )
    day = table["day"].to_numpy().astype(np.int64)
    test_rows, pre_rows = ~is_pre, is_pre
    # One bincount per column over (user, period) cells: column 0 test, column 1 pre-period.
    cell = codes.astype(np.int64) * 2 + is_pre
    sums = {
        c: np.bincount(cell, table[c].to_numpy(np.float64), 2 * n_users).reshape(n_users, 2)
        for c in ("active", *COUNT_COLUMNS)
    }
    test = {c: v[:, 0] for c, v in sums.items()}
    pre = {c: v[:, 1] for c, v in sums.items()}
    first_test_day = int(day[test_rows].min())
    n_test_days = int(day[test_rows].max()) - first_test_day + 1
    n_pre_days = int(day[pre_rows].max() - day[pre_rows].min() + 1) if pre_rows.any() else 0
    active_rows = test_rows & (table["active"].to_numpy() > 0)
    active_by_day = np.zeros((n_users, n_test_days), dtype=bool)
    active_by_day[codes[active_rows], day[active_rows] - first_test_day] = True
    if "first_exposure_day" in table.columns:
        exposure = pd.to_numeric(table["first_exposure_day"], errors="coerce").to_numpy(float)
        first_exposure = np.full(n_users, np.inf)
        np.minimum.at(first_exposure, codes, np.where(np.isnan(exposure), np.inf, exposure))
        first_exposure = np.where(np.isinf(first_exposure), np.nan, first_exposure)
        first_exposure -= first_test_day
    else:
        ever = active_by_day.any(axis=1)
        first_exposure = np.where(ever, active_by_day.argmax(axis=1), np.nan).astype(float)
    return UserTable(
        user_id=np.asarray(user_ids),
        treatment=treatment,
        test=test,
        pre=pre,
        active_by_day=active_by_day,
        first_exposure=first_exposure,
        first_test_day=first_test_day,
        n_pre_days=n_pre_days,
    )


@dataclass(frozen=True)
class UserMetric:
    """One metric as per-user arrays: its value in an arm is ``sum(numerator) / sum(denominator)``.

    ``pre_numerator`` / ``pre_denominator`` are the same quantity over the pre-period: the CUPED
    covariate. Arrays have one entry per user, or shape (experiments, users) for a batch of
    independent experiments of equal size (simulation studies).
    """

    name: str
    kind: Literal["mean", "ratio"]
    role: Literal["success", "guardrail"]
    higher_is_better: bool
    numerator: np.ndarray
    denominator: np.ndarray
    pre_numerator: np.ndarray
    pre_denominator: np.ndarray
    description: str

    def __post_init__(self) -> None:
        shape = np.shape(self.numerator)
        for field in ("denominator", "pre_numerator", "pre_denominator"):
            if np.shape(getattr(self, field)) != shape:
                raise ValueError(
                    f"metric {self.name!r}: {field} has shape {np.shape(getattr(self, field))}, "
                    f"numerator has {shape}; give every array one entry per user"
                )
        if self.kind == "mean" and not np.isin(self.denominator, (0, 1)).all():
            raise ValueError(
                f"metric {self.name!r} of kind 'mean' needs a 0/1 denominator (which users "
                "count); use kind='ratio' for a count denominator"
            )

    def value(self, users: np.ndarray | None = None) -> float:
        """The metric over the users selected by a boolean mask (all users by default)."""
        keep = slice(None) if users is None else users
        denominator = float(np.sum(self.denominator[..., keep]))
        return float(np.sum(self.numerator[..., keep])) / denominator if denominator else np.nan


def engagement_breadth(users: UserTable) -> UserMetric:
    """Engagement breadth: share of assigned users active on a test day, averaged over test days.

    Per user: active test days / test days; the arm's mean of that is the daily active share
    averaged over days (every assigned user counts every day). Covariate: the same share over
    the pre-period.
    """
    ones = np.ones(users.n_users)
    pre_days = max(users.n_pre_days, 1)  # no pre-period: covariate is 0 and CUPED does nothing
    return UserMetric(
        "breadth",
        "mean",
        "success",
        True,
        users.test["active"] / users.n_test_days,
        ones,
        users.pre["active"] / pre_days,
        ones,
        "share of assigned users active per test day, averaged over test days",
    )


def engagement_depth(users: UserTable) -> UserMetric:
    """Engagement depth: user messages per active user-day (a ratio metric: delta method).

    Numerator: the user's messages over the test days; denominator: their active test days.
    Users never active count in the variance with 0 / 0. Covariate: pre-period depth.
    """
    return UserMetric(
        "depth",
        "ratio",
        "success",
        True,
        users.test["messages"],
        users.test["active"],
        users.pre["messages"],
        users.pre["active"],
        "user messages per active user-day",
    )


def retention(users: UserTable, day: int = DEFAULT_RETENTION_DAY) -> UserMetric:
    """Retention: share of exposed users active on day ``day`` after their first exposure.

    Counts users whose first exposure plus ``day`` falls inside the test period (later ones
    cannot be observed yet). Covariate: pre-period breadth of the same users.
    """
    if day < 1:
        raise ValueError(f"retention day must be >= 1 (days after first exposure), got {day}")
    exposure = users.first_exposure
    with np.errstate(invalid="ignore"):
        eligible = (exposure >= 0) & (exposure + day <= users.n_test_days - 1)
    target = np.where(eligible, exposure + day, 0).astype(np.int64)
    returned = users.active_by_day[np.arange(users.n_users), target] & eligible
    pre_breadth = users.pre["active"] / max(users.n_pre_days, 1)
    weight = eligible.astype(float)
    return UserMetric(
        f"retention_d{day}",
        "mean",
        "success",
        True,
        returned.astype(float),
        weight,
        pre_breadth * weight,
        weight,
        f"share of exposed users active {day} day(s) after first exposure",
    )


def _per_reply_rate(users: UserTable, name: str, column: str, what: str) -> UserMetric:
    return UserMetric(
        name,
        "ratio",
        "guardrail",
        False,
        users.test[column],
        users.test["bot_replies"],
        users.pre[column],
        users.pre["bot_replies"],
        what,
    )


def report_rate(users: UserTable) -> UserMetric:
    """Report rate (guardrail): user reports per bot reply over the test days. Lower is better."""
    return _per_reply_rate(users, "report_rate", "reports", "user reports per bot reply")


def violation_rate(users: UserTable) -> UserMetric:
    """Violation rate (guardrail): share of bot replies breaking at least one instruction.

    The per-reply flag is ``rewards``' violation definition; the table carries its daily count.
    """
    return _per_reply_rate(
        users, "violation_rate", "violations", "bot replies breaking an instruction, per reply"
    )


def unsafe_rate(users: UserTable) -> UserMetric:
    """Unsafe-reply rate (guardrail): share of bot replies the arm's policy attempted that
    were unsafe, blocked ones included (serving replaces them, but the attempt counts, or
    the fail-closed check would hide an unsafe treatment). Lower is better."""
    return _per_reply_rate(users, "unsafe_rate", "unsafe_replies", "unsafe bot replies per reply")


SUCCESS_METRICS: tuple[Callable[[UserTable], UserMetric], ...] = (
    engagement_breadth,
    engagement_depth,
)
GUARDRAIL_METRICS: tuple[Callable[[UserTable], UserMetric], ...] = (
    report_rate,
    violation_rate,
    unsafe_rate,
)


def user_metrics(
    users: UserTable, retention_day: int = DEFAULT_RETENTION_DAY
) -> tuple[UserMetric, ...]:
    """All metrics of the analysis, success metrics first, then guardrails."""
    return (
        *(m(users) for m in SUCCESS_METRICS),
        retention(users, retention_day),
        *(m(users) for m in GUARDRAIL_METRICS),
    )


def daily_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per arm and day (pre-period included): breadth, depth and the guardrail rates.

    Breadth divides by all assigned users of the arm, so days missing from a sparse log count
    as inactive. Columns: arm, day, period, users, breadth, depth, report_rate,
    violation_rate, unsafe_rate.
    """
    validate_table(table)
    frame = table.assign(period=np.where(_is_pre(table), "pre", "test"))
    arm_users = frame.groupby("arm")["user_id"].nunique()
    sums = frame.groupby(["arm", "period", "day"])[["active", *COUNT_COLUMNS]].sum()
    # Every day of each period for every arm: a day nobody logged is a day nobody was active.
    days = frame.groupby("period")["day"].agg(["min", "max"])
    full = pd.MultiIndex.from_tuples(
        [
            (arm, period, day)
            for arm in arm_users.index
            for period, (low, high) in days.iterrows()
            for day in range(int(low), int(high) + 1)
        ],
        names=["arm", "period", "day"],
    )
    sums = sums.reindex(full, fill_value=0).reset_index()
    sums["users"] = sums["arm"].map(arm_users).astype(int)
    with np.errstate(divide="ignore", invalid="ignore"):
        sums["breadth"] = sums["active"] / sums["users"]
        sums["depth"] = sums["messages"] / sums["active"]
        replies = sums["bot_replies"].where(sums["bot_replies"] > 0)
        sums["report_rate"] = sums["reports"] / replies
        sums["violation_rate"] = sums["violations"] / replies
        sums["unsafe_rate"] = sums["unsafe_replies"] / replies
    columns = ["arm", "day", "period", "users", "breadth", "depth"]
    columns += ["report_rate", "violation_rate", "unsafe_rate"]
    # "pre" sorts before "test", so this puts each arm's days in time order
    sums = sums.sort_values(["arm", "period", "day"])
    return sums[columns].reset_index(drop=True)
