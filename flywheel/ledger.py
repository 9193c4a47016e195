"""The generation loop's ledger: what ran, with which config, seed, inputs and outputs.

Three tables live in the run store's DuckDB file next to the traffic tables
(``flywheel/store.py``), created here on first use:

``steps``           one row per (generation, step): status ('running' | 'done'), seed,
                    config (JSON), fingerprint (sha256 of the config: a finished step is
                    reused only under the same config), inputs (JSON), outputs (JSON: paths
                    relative to the run directory, metrics), started_at, finished_at, wall_s.
``generations``     one row per generation: its record (JSON, its entry in
                    ``generations.json``), written when the generation's decision is made.
``serving_events``  one row per reply the serving path did not serve as generated
                    (``sim.serving.ServingEvent``: blocked, checker error or timeout), keyed
                    by (experiment_id, event_id) so a replayed day records each event once.
``run_meta``        key, value (JSON): the scenario fingerprint a run was started with.

A step is idempotent: ``Ledger.run_step`` returns the stored outputs of a finished step
and runs an unfinished one again from the start (its outputs are written atomically, so a
half-written output never stands in for a finished one). Step seeds are derived from the
scenario seed, the generation and the step name (``derive_seed``), never from the order in
which steps happened to run, so a resumed run draws exactly what an uninterrupted one drew.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from flywheel.persist import to_json, utc_now
from flywheel.store import RunStore, fingerprint

_SCHEMA = {
    "steps": (
        "generation INTEGER, step VARCHAR, status VARCHAR, seed BIGINT, config JSON, "
        "fingerprint VARCHAR, inputs JSON, outputs JSON, started_at TIMESTAMP, "
        "finished_at TIMESTAMP, wall_s DOUBLE, PRIMARY KEY (generation, step)"
    ),
    "generations": "generation INTEGER PRIMARY KEY, record JSON, updated_at TIMESTAMP",
    "serving_events": (
        "experiment_id VARCHAR, event_id VARCHAR, policy VARCHAR, kind VARCHAR, "
        "categories VARCHAR, detail VARCHAR, seed BIGINT, batch_index INTEGER, "
        "original_reply VARCHAR, served_reply VARCHAR, PRIMARY KEY (experiment_id, event_id)"
    ),
    "run_meta": "key VARCHAR PRIMARY KEY, value JSON",
}
SERVING_EVENT_COLUMNS = (
    "experiment_id", "event_id", "policy", "kind", "categories", "detail", "seed",
    "batch_index", "original_reply", "served_reply",
)  # fmt: skip


def derive_seed(seed: int, generation: int, step: str) -> int:
    """A 31-bit seed for one step: sha256 of (scenario seed, generation, step name)."""
    digest = hashlib.sha256(f"{seed}:{generation}:{step}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


class StepConflictError(RuntimeError):
    """A finished step was recorded with another configuration than the one asked for now."""


class Ledger:
    """The loop's tables in a ``RunStore`` (see the module docstring)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        # The store exposes no public connection; the ledger shares its single writer
        # connection so every table of a run stays in one DuckDB file with one lock.
        self.con = store._con
        for table, columns in _SCHEMA.items():
            self.con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")

    # ------------------------------------------------------------------ run
    def bind_scenario(self, config: Mapping[str, Any]) -> None:
        """Record the scenario a run started with; refuse a different one on resume."""
        wanted = fingerprint(config)
        row = self.con.execute("SELECT value FROM run_meta WHERE key = 'scenario'").fetchone()
        if row is None:
            self.con.execute(
                "INSERT INTO run_meta VALUES ('scenario', ?)",
                [to_json({"fingerprint": wanted, "config": config})],
            )
            return
        stored = json.loads(row[0])["fingerprint"]
        if stored != wanted:
            raise StepConflictError(
                f"{self.store.run_dir} was started with another scenario (fingerprint "
                f"{stored[:12]}, now {wanted[:12]}); rerun with the original scenario file "
                f"to resume, or choose a new --out"
            )

    # ------------------------------------------------------------------ steps
    def step(self, generation: int, step: str) -> dict[str, Any] | None:
        """The stored row of a step as a dict (JSON columns parsed), or None."""
        frame = self.con.execute(
            "SELECT * FROM steps WHERE generation = ? AND step = ?", [generation, step]
        ).df()
        if frame.empty:
            return None
        row = frame.iloc[0].to_dict()
        for column in ("config", "inputs", "outputs"):
            row[column] = None if row[column] is None else json.loads(row[column])
        return row

    def run_step(
        self,
        generation: int,
        step: str,
        seed: int,
        config: Mapping[str, Any],
        inputs: Mapping[str, Any],
        work: Callable[[], Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Return the outputs of (generation, step), running ``work`` unless it finished.

        Raises:
            StepConflictError: the step finished under another config.
        """
        key = fingerprint({"config": config, "inputs": inputs, "seed": seed})
        done = self.step(generation, step)
        if done is not None and done["status"] == "done":
            if done["fingerprint"] != key:
                raise StepConflictError(
                    f"step {step!r} of generation {generation} finished with another config "
                    f"or inputs; rerun with the original scenario or use a new --out"
                )
            return done["outputs"]
        started = time.perf_counter()
        self.con.execute("DELETE FROM steps WHERE generation = ? AND step = ?", [generation, step])
        self.con.execute(
            "INSERT INTO steps VALUES (?, ?, 'running', ?, ?, ?, ?, NULL, ?, NULL, NULL)",
            [generation, step, seed, to_json(config), key, to_json(inputs), utc_now()],
        )
        outputs = dict(work())
        self.con.execute(
            "UPDATE steps SET status = 'done', outputs = ?, finished_at = ?, wall_s = ? "
            "WHERE generation = ? AND step = ?",
            [to_json(outputs), utc_now(), time.perf_counter() - started, generation, step],
        )
        return json.loads(to_json(outputs))

    def steps(self) -> pd.DataFrame:
        """Every step row, in the order they started."""
        return self.con.execute("SELECT * FROM steps ORDER BY started_at").df()

    # ------------------------------------------------------------------ generations
    def put_generation(self, generation: int, record: Mapping[str, Any]) -> None:
        """Store (replace) a generation's record."""
        self.con.execute("DELETE FROM generations WHERE generation = ?", [generation])
        self.con.execute(
            "INSERT INTO generations VALUES (?, ?, ?)", [generation, to_json(record), utc_now()]
        )

    def generations(self) -> list[dict[str, Any]]:
        """Every stored generation record, in generation order."""
        rows = self.con.execute("SELECT record FROM generations ORDER BY generation").fetchall()
        return [json.loads(r[0]) for r in rows]

    # ------------------------------------------------------------------ serving events
    def record_serving_event(self, experiment_id: str, row: Mapping[str, Any]) -> None:
        """Store one serving event once (a replayed event with the same id is ignored)."""
        values = {"experiment_id": experiment_id, **row}
        self.con.execute(
            f"INSERT OR IGNORE INTO serving_events VALUES ({', '.join('?' * len(SERVING_EVENT_COLUMNS))})",
            [values[c] for c in SERVING_EVENT_COLUMNS],
        )

    def serving_events(self, experiment_id: str | None = None) -> pd.DataFrame:
        """Serving events, optionally of one experiment."""
        if experiment_id is None:
            return self.con.execute("SELECT * FROM serving_events ORDER BY experiment_id").df()
        return self.con.execute(
            "SELECT * FROM serving_events WHERE experiment_id = ? ORDER BY seed, batch_index",
            [experiment_id],
        ).df()
