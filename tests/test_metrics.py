"""Metric definitions and the user-day table format (flywheel.metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel import metrics
from flywheel.ab.synthetic import synthetic_user_days

COLUMNS = ["user_id", "arm", "day", "active", "messages", "bot_replies", "reports", "violations",
           "unsafe_replies"]  # fmt: skip
# Hand-made log: 4 users, pre-period days -2..-1, test days 0..2. Inactive days are zeros.
ROWS = [
    ("a", "control", -2, 1, 2, 2, 0, 1, 0),
    ("a", "control", -1, 0, 0, 0, 0, 0, 0),
    ("a", "control", 0, 1, 4, 4, 1, 1, 0),
    ("a", "control", 1, 1, 2, 2, 0, 0, 1),
    ("a", "control", 2, 0, 0, 0, 0, 0, 0),
    ("b", "control", -2, 0, 0, 0, 0, 0, 0),
    ("b", "control", -1, 0, 0, 0, 0, 0, 0),
    ("b", "control", 0, 0, 0, 0, 0, 0, 0),
    ("b", "control", 1, 1, 6, 5, 0, 2, 0),
    ("b", "control", 2, 0, 0, 0, 0, 0, 0),
    ("c", "treatment", -2, 0, 0, 0, 0, 0, 0),
    ("c", "treatment", -1, 1, 3, 3, 0, 0, 0),
    ("c", "treatment", 0, 1, 1, 1, 0, 0, 0),
    ("c", "treatment", 1, 0, 0, 0, 0, 0, 0),
    ("c", "treatment", 2, 1, 3, 3, 0, 1, 0),
    ("d", "treatment", -2, 0, 0, 0, 0, 0, 0),
    ("d", "treatment", -1, 0, 0, 0, 0, 0, 0),
    ("d", "treatment", 0, 0, 0, 0, 0, 0, 0),
    ("d", "treatment", 1, 0, 0, 0, 0, 0, 0),
    ("d", "treatment", 2, 0, 0, 0, 0, 0, 0),
]
# By hand: value per arm (control, treatment) of each metric on ROWS.
EXPECTED = {
    "breadth": ((2 / 3 + 1 / 3) / 2, (2 / 3 + 0) / 2),
    "depth": ((4 + 2 + 6) / 3, (1 + 3) / 2),
    "retention_d1": (1 / 2, 0 / 1),  # a returns on day 1, b not on day 2; c not; d never came
    "report_rate": (1 / 11, 0 / 4),
    "violation_rate": (3 / 11, 1 / 4),
    "unsafe_rate": (1 / 11, 0 / 4),
}


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(ROWS, columns=COLUMNS)


def values(table: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """(control, treatment) value of every metric."""
    users = metrics.aggregate_users(table)
    return {
        m.name: (m.value(~users.treatment), m.value(users.treatment))
        for m in metrics.user_metrics(users)
    }


def flat(table: pd.DataFrame) -> dict[str, float]:
    """Every metric value of both arms, keyed "metric/arm" (pytest.approx compares flat dicts)."""
    return {
        f"{name}/{arm}": value
        for name, pair in values(table).items()
        for arm, value in zip(("control", "treatment"), pair, strict=True)
    }


def test_definitions_match_hand_computation(table: pd.DataFrame) -> None:
    got = values(table)
    assert got.keys() == EXPECTED.keys()
    for name, expected in EXPECTED.items():
        assert got[name] == pytest.approx(expected), name


def test_metric_kinds_roles_and_pre_period_covariates(table: pd.DataFrame) -> None:
    users = metrics.aggregate_users(table)
    by_name = {m.name: m for m in metrics.user_metrics(users)}
    assert {n: m.kind for n, m in by_name.items()} == {
        "breadth": "mean", "depth": "ratio", "retention_d1": "mean",
        "report_rate": "ratio", "violation_rate": "ratio", "unsafe_rate": "ratio",
    }  # fmt: skip
    assert [m.role for m in by_name.values()].count("guardrail") == 3
    # pre-period breadth per user a, b, c, d: active pre days / 2 pre days
    np.testing.assert_allclose(by_name["breadth"].pre_numerator, [0.5, 0, 0.5, 0])
    np.testing.assert_allclose(by_name["depth"].pre_numerator, [2, 0, 3, 0])
    assert users.n_pre_days == 2 and users.n_test_days == 3


def test_sparse_log_and_period_column_give_the_same_metrics(table: pd.DataFrame) -> None:
    # Logs may list active days only, as long as every assigned user has a row.
    sparse = table[(table["active"] == 1) | (table["user_id"] == "d")]
    assert flat(sparse) == pytest.approx(flat(table))
    # A period column replaces the sign of day; pre-period days may then count from 0.
    period = table.assign(period=np.where(table["day"] < 0, "pre", "test"))
    period.loc[period["period"] == "pre", "day"] += 10
    assert flat(period) == pytest.approx(flat(table))


def test_first_exposure_day_column_drives_retention(table: pd.DataFrame) -> None:
    # c first exposed on day 1 (inactive) -> returns on day 2; d exposed day 1, never returns.
    exposure = {"a": 0, "b": 1, "c": 1, "d": 1}
    got = values(table.assign(first_exposure_day=table["user_id"].map(exposure)))
    assert got["retention_d1"] == pytest.approx((1 / 2, 1 / 2))
    with pytest.raises(ValueError, match="retention day must be >= 1"):
        metrics.retention(metrics.aggregate_users(table), day=0)


def test_daily_curves_divide_by_all_assigned_users(table: pd.DataFrame) -> None:
    curves = metrics.daily_curves(table[(table["active"] == 1) | (table["user_id"] == "d")])
    treat = curves[curves["arm"] == "treatment"].set_index("day")
    assert treat.loc[0, "breadth"] == pytest.approx(1 / 2)  # c of c, d
    assert treat.loc[2, "violation_rate"] == pytest.approx(1 / 3)
    control = curves[curves["arm"] == "control"].set_index("day")
    assert control.loc[1, "depth"] == pytest.approx((2 + 6) / 2)
    # day -1 has no control rows in the sparse log: still a day, with nobody active
    assert list(control["period"].iloc[:2]) == ["pre", "pre"]
    assert control.loc[-1, "breadth"] == 0 and np.isnan(control.loc[-1, "report_rate"])
    assert len(curves) == 2 * 5


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop(columns=["violations"]), r"missing column\(s\) \['violations'\]"),
        (lambda t: t.assign(arm=t["arm"].replace("treatment", "B")), "column 'arm' has values"),
        (lambda t: t.assign(messages=t["messages"] - 3), "'messages' must hold non-negative"),
        (lambda t: t.assign(active=t["active"] * 2), "'active' must be 0 or 1"),
        (lambda t: t.assign(day=t["day"] + 0.5), "'day' must hold integers"),
        (lambda t: pd.concat([t, t.iloc[[3]]]), r"repeated \(user_id, day\) rows"),
        (lambda t: t.assign(arm=np.where(t.index == 2, "treatment", t["arm"])), "both arms"),
        (lambda t: t.assign(period="later"), "column 'period' has values"),
        (lambda t: t[t["day"] < 0], "pre-period rows only"),
    ],
)
def test_validation_names_the_problem_and_the_fix(
    table: pd.DataFrame, mutate, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.aggregate_users(mutate(table))


def test_load_table_reads_parquet_and_csv(tmp_path: Path) -> None:
    table = synthetic_user_days(50, np.random.default_rng(0), n_test_days=3, n_pre_days=2)
    table.to_parquet(tmp_path / "t.parquet")
    table.to_csv(tmp_path / "t.csv", index=False)
    for name in ("t.parquet", "t.csv"):
        loaded = metrics.load_table(tmp_path / name)
        assert flat(loaded) == pytest.approx(flat(table))
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match=r"save it as \.parquet, \.pq or \.csv"):
        metrics.load_table(tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metrics.load_table(tmp_path / "missing.csv")


def test_synthetic_table_has_the_planted_lifts_on_average() -> None:
    table = synthetic_user_days(
        20_000, np.random.default_rng(1), lifts={"breadth": 0.1, "violation_rate": 0.5}
    )
    got = values(table)
    assert got["breadth"][1] / got["breadth"][0] - 1 == pytest.approx(0.1, abs=0.03)
    assert got["violation_rate"][1] / got["violation_rate"][0] - 1 == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="unknown metric"):
        synthetic_user_days(10, np.random.default_rng(0), lifts={"joy": 1.0})
