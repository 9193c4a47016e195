"""flywheel.persist: atomic writes keep the old file on failure; JSON conversion is strict."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pytest

from flywheel.persist import atomic_write, atomic_write_text, json_ready, to_json, utc_now


@dataclass(frozen=True)
class _Point:
    name: str
    where: Path
    score: np.float32


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "generations.json"
    path.write_text("old\n", encoding="utf-8")
    # A lone surrogate cannot be encoded as UTF-8: the write fails after the file is opened,
    # which is where a plain ``path.write_text`` would already have emptied ``path``.
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "new \ud800\n")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generations.json"]


def test_a_write_that_stops_half_way_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_the_temporary_file_keeps_the_suffix_and_a_good_write_replaces(tmp_path: Path) -> None:
    seen: list[str] = []

    def write(tmp: Path) -> None:
        seen.append(tmp.name)
        tmp.write_text("new", encoding="utf-8")

    path = tmp_path / "qq.png"
    path.write_text("old", encoding="utf-8")
    assert atomic_write(path, write) == path
    assert seen == [".qq.tmp.png"]  # matplotlib picks the format by the suffix
    assert path.read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qq.png"]


def test_json_ready_converts_numpy_dataclasses_paths_and_non_finite_floats() -> None:
    value = {
        "count": np.int64(7),
        "flag": np.bool_(True),
        "rate": np.float64("nan"),
        "big": float("inf"),
        "array": np.array([[1.5, np.nan], [2.0, 3.0]]),
        "point": _Point("a", Path("runs") / "x", np.float32(0.5)),
        "pair": (np.float32(-np.inf), "b"),
    }
    ready = json_ready(value)
    assert ready == {
        "count": 7,
        "flag": True,
        "rate": None,
        "big": None,
        "array": [[1.5, None], [2.0, 3.0]],
        "point": {"name": "a", "where": str(Path("runs") / "x"), "score": 0.5},
        "pair": [None, "b"],
    }
    assert type(ready["count"]) is int and type(ready["flag"]) is bool
    json.dumps(ready, allow_nan=False)  # strict JSON: raises on anything left over


def test_to_json_sorts_keys_keeps_python_nan_and_reads_back_through_duckdb() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5)
    text = to_json({"b": np.int64(2), "a": float("nan"), "when": when, "p": Path("x")})
    assert text == '{"a": NaN, "b": 2, "p": "x", "when": "2024-01-02 03:04:05"}'
    con = duckdb.connect()
    con.execute("CREATE TABLE t (v JSON)")
    con.execute("INSERT INTO t VALUES (?)", [text])
    back = json.loads(con.execute("SELECT v FROM t").fetchone()[0])
    assert math.isnan(back["a"]) and back["b"] == 2


def test_utc_now_is_naive_utc() -> None:
    before = datetime.now(UTC).replace(tzinfo=None)
    now = utc_now()
    after = datetime.now(UTC).replace(tzinfo=None)
    assert now.tzinfo is None
    assert before <= now <= after
