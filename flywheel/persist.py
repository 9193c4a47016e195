"""How the flywheel writes its files and JSON columns: atomically, as JSON, in UTC.

A run can be interrupted at any moment and resumed (``flywheel run`` reads its own outputs
back), so a file it reads back must be the old one or the new one, never half of each:
those go through :func:`atomic_write`. Records carry numpy scalars, NaN metrics,
dataclasses, pydantic models (scenario tables) and paths: :func:`json_ready` turns them into
values strict JSON accepts (a missing metric reads ``null``), :func:`to_json` writes the run
store's JSON columns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden sibling of ``path``, then rename it over ``path``.

    The rename is atomic on one file system, so readers (and a resumed run) see the old
    file or the new one; if ``write`` fails, ``path`` is untouched and the sibling is
    removed. The sibling keeps ``path``'s suffix so writers that pick a format by it
    (matplotlib's ``savefig``) still do.
    """
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def utc_now() -> datetime:
    """The current time in UTC, without a time zone (DuckDB ``TIMESTAMP`` columns hold none)."""
    return datetime.now(UTC).replace(tzinfo=None)


def json_ready(value: Any) -> Any:
    """``value`` with every part strict JSON can hold, recursively.

    Mappings and sequences are walked; numpy scalars and arrays become Python values,
    dataclass instances their fields, pydantic models their JSON record (``model_dump``),
    paths their text, and non-finite floats ``None``.
    Anything else is returned as it is (``json.dumps`` decides).
    """
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, BaseModel):
        return json_ready(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_ready({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value: Any) -> str:
    """Compact JSON with sorted keys, for the JSON columns of the run store and ledger.

    Python floats are written as they are, NaN included: DuckDB's JSON type reads ``NaN``
    back as NaN, so a resumed run sees the values an uninterrupted one saw. Numpy scalars,
    dataclasses and paths go through :func:`json_ready`; anything else (dates, enums) is
    written as its text.
    """
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    ready = json_ready(value)
    return str(value) if ready is value else ready
