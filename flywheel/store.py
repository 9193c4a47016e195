"""The run store: one DuckDB file per run plus an artifacts folder.

Layout of a run directory::

    RUN_DIR/run.duckdb     every table below
    RUN_DIR/artifacts/     files too big or too binary for a table (models, plots, reports)

A run can hold several experiments (the generation loop runs one A/B test per generation);
every traffic table carries ``experiment_id``. Simulated days are written in ONE transaction
each, together with the simulator checkpoint taken at the end of that day, so a run that is
killed loses at most the day in progress and resumes from the last committed day.

Writers: one process at a time (DuckDB's file lock). Readers (dashboards, rewards, training)
open the store with ``read_only=True`` once the writer is done and use the ``read_*`` helpers,
which return pandas DataFrames.

Tables (schema version ``SCHEMA_VERSION``; column types in ``TABLES``, those of the
simulator's day tables in ``sim.tables``):

``meta``          key, value (JSON). Holds ``schema_version`` and ``created_at``.
``experiments``   experiment_id, fingerprint (sha256 of the canonical config JSON; a resume
                  with a different config is refused), config (JSON: scenario, policies, seed),
                  started_at, finished_at (NULL while running).
``users``         experiment_id, user_id, segment, generation (population generation the user
                  was drawn in), traits (JSON of the latent, fixed traits; ORACLE, like gold).
``assignments``   experiment_id, user_id, arm ('control' | 'treatment'), bucket (the user's
                  hash position in [0, 1)), salt.
``sessions``      experiment_id, day, period ('pre' | 'test'), arm, life, policy (name of the
                  policy that served it), session_id, user_id, character, start_hour,
                  end_hour (simulated hours of the day), n_user_messages, n_bot_turns, likes,
                  reported (any reply reported), ended_by_user (False = hit the turn cap).
``turns``         one row per bot reply. experiment_id, day, period, arm, life, policy,
                  session_id, user_id, character, turn_index, hour, user_message, bot_reply,
                  completion_tokens, features (JSON: style features from rewards.features),
                  checks (JSON: checker name -> passed), follows_all, violates_any, unsafe
                  (the reply the policy attempted was unsafe: blocked by serving, whose
                  fallback is the bot_reply shown, or offensive as shown),
                  gold_satisfaction (ORACLE: only sim/ and flywheel/ evaluation may read it),
                  novelty (additive satisfaction offset the traffic model applied), continued,
                  liked, reported.
``user_days``     one row per assigned user and simulated day, active or not: experiment_id,
                  user_id, arm, life, day, period, weekday (0 = Monday), active, sessions,
                  messages (user messages), bot_replies, likes, reports, violations (replies breaking
                  a prohibition), follows (replies following every instruction),
                  unsafe_replies (attempted unsafe replies, blocked ones included),
                  completion_tokens, gold_satisfaction (ORACLE, sum over the
                  day's replies), novelty (offset applied that day). The A/B analysis reads it.
                  ``arm`` is the user's hashed arm; ``life`` the arm whose policy served
                  the row's user life on test days: ``arm`` itself in a standard test, and
                  both arms on every test day of a twin test (``sim.traffic``), which
                  stores two rows per user and test day (``flywheel.ab.paired``).
``days``          one row per committed day: experiment_id, day, period, weekday,
                  active_users, sessions, turns, bot_calls, user_calls, bot_tokens,
                  user_tokens, user_messages (messages the user LLM was asked to write),
                  user_fallbacks (of those, how many were unusable and replaced by a real
                  human message, see ``sim.user_llm``), user_redrafts (drafts that sounded
                  like an assistant and were sampled again), max_bot_batch, bot_seconds (wall
                  time inside bot turns: generation and scoring), wall_s, committed_at.
                  ``RunStore.user_fallbacks`` totals them per experiment.
``checkpoints``   experiment_id, day (last finished day; -1 = before the first day), state
                  (BLOB: pickled simulator state, see ``sim.traffic.SimState``). Only the
                  latest per experiment is kept; it is replaced in the day's transaction.
``analyses``      experiment_id, name, created_at, result (JSON, e.g. the A/B result).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pandas as pd
from pydantic import BaseModel

from flywheel.persist import to_json, utc_now
from sim import tables

if TYPE_CHECKING:
    from sim.characters import Character
    from sim.traffic import DayLog
    from sim.world import WorldConfig

SCHEMA_VERSION = 3
DB_FILE = "run.duckdb"
ARTIFACTS_DIR = "artifacts"

TABLES: dict[str, dict[str, str]] = {
    "meta": {"key": "VARCHAR PRIMARY KEY", "value": "JSON"},
    "experiments": {
        "experiment_id": "VARCHAR PRIMARY KEY",
        "fingerprint": "VARCHAR",
        "config": "JSON",
        "started_at": "TIMESTAMP",
        "finished_at": "TIMESTAMP",
    },
    "users": {
        "experiment_id": "VARCHAR",
        "user_id": "VARCHAR",
        "segment": "VARCHAR",
        "generation": "INTEGER",
        "traits": "JSON",
    },
    "assignments": {
        "experiment_id": "VARCHAR",
        "user_id": "VARCHAR",
        "arm": "VARCHAR",
        "bucket": "DOUBLE",
        "salt": "VARCHAR",
    },
    "sessions": {"experiment_id": "VARCHAR", **tables.SESSIONS},
    "turns": {"experiment_id": "VARCHAR", **tables.TURNS},
    "user_days": {"experiment_id": "VARCHAR", **tables.USER_DAYS},
    "days": {
        "experiment_id": "VARCHAR",
        "day": "INTEGER",
        "period": "VARCHAR",
        "weekday": "INTEGER",
        "active_users": "INTEGER",
        "sessions": "INTEGER",
        "turns": "INTEGER",
        "bot_calls": "INTEGER",
        "user_calls": "INTEGER",
        "bot_tokens": "BIGINT",
        "user_tokens": "BIGINT",
        "user_messages": "INTEGER",
        "user_fallbacks": "INTEGER",
        "user_redrafts": "INTEGER",
        "max_bot_batch": "INTEGER",
        "bot_seconds": "DOUBLE",
        "wall_s": "DOUBLE",
        "committed_at": "TIMESTAMP",
    },
    "checkpoints": {"experiment_id": "VARCHAR PRIMARY KEY", "day": "INTEGER", "state": "BLOB"},
    "analyses": {
        "experiment_id": "VARCHAR",
        "name": "VARCHAR",
        "created_at": "TIMESTAMP",
        "result": "JSON",
    },
}

# Columns stored as JSON text; the read helpers parse them back into dicts.
_JSON_COLUMNS = {"traits", "features", "checks", "config", "result", "value"}
# Day-level tables written by ``commit_day``; their columns must match exactly.
DAY_TABLES = ("sessions", "turns", "user_days")
FALLBACK_FIELDS = ("user_messages", "user_fallbacks", "fallback_share")


def fallback_totals(days: pd.DataFrame) -> dict[str, Any]:
    """Simulated-user fallbacks in rows of the days table, JSON-ready.

    ``user_messages`` (messages the user LLM was asked to write), ``user_fallbacks``
    (unusable ones replaced by a real human message, see ``sim.user_llm``) and
    ``fallback_share`` (None when the user LLM wrote nothing). A high share means the
    conversations ran on canned human text, not on the simulated users' own words.
    """
    written = int(days["user_messages"].sum())
    fallbacks = int(days["user_fallbacks"].sum())
    share = fallbacks / written if written else None
    return {"user_messages": written, "user_fallbacks": fallbacks, "fallback_share": share}


def fallback_text(totals: Mapping[str, Any]) -> str:
    """``fallback_totals`` in words: '3 of 120 user messages (2.5%)'."""
    if not totals.get("user_messages"):
        return "no user message written by the user LLM"
    # int(): a row of a DataFrame (``RunStore.user_fallbacks``) holds the counts as floats.
    return (
        f"{int(totals['user_fallbacks'])} of {int(totals['user_messages'])} user messages "
        f"({float(totals['fallback_share']):.1%})"
    )


def fingerprint(config: Mapping[str, Any]) -> str:
    """Return the sha256 of ``config`` as canonical JSON (sorted keys): the resume key.

    A pydantic model in ``config`` (a scenario table) counts as its JSON record, anything
    else JSON cannot hold as its text."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


@dataclass(frozen=True)
class ExperimentStatus:
    """Where a stored experiment stands: the last committed day (-1 = none) and if it ended."""

    experiment_id: str
    fingerprint: str
    last_day: int
    finished: bool


class RunStore:
    """A run directory: ``run.duckdb`` and ``artifacts/``. Use as a context manager.

    Args:
        run_dir: the run directory; created when missing (unless ``read_only``).
        read_only: open the database read-only (dashboards, analysis of a finished run).
    """

    def __init__(self, run_dir: str | Path, *, read_only: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DB_FILE
        self.artifacts = self.run_dir / ARTIFACTS_DIR
        if read_only and not self.path.exists():
            raise FileNotFoundError(
                f"run store {self.path} does not exist; pass the RUN_DIR of a run that started"
            )
        if not read_only:
            self.artifacts.mkdir(parents=True, exist_ok=True)
        self.read_only = read_only
        self._con = duckdb.connect(str(self.path), read_only=read_only)
        if not read_only:
            self._create_schema()
        self._check_schema_version()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the database connection."""
        self._con.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create_schema(self) -> None:
        with self._transaction():
            for table, columns in TABLES.items():
                cols = ", ".join(f"{name} {kind}" for name, kind in columns.items())
                self._con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
            present = self._con.execute(
                "SELECT count(*) FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            if present is not None and present[0] == 0:
                now = json.dumps(utc_now().isoformat())
                self._con.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?), ('created_at', ?)",
                    [json.dumps(SCHEMA_VERSION), now],
                )

    def _check_schema_version(self) -> None:
        row = self._con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = None if row is None else json.loads(row[0])
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"run store {self.path} has schema version {version}, this code reads version "
                f"{SCHEMA_VERSION}; start a new run directory (--out) or use the matching release"
            )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._con.execute("COMMIT")

    def _insert(self, table: str, frame: pd.DataFrame) -> None:
        expected = list(TABLES[table])
        missing = [c for c in expected if c not in frame.columns]
        extra = [c for c in frame.columns if c not in TABLES[table]]
        if missing or extra:
            raise ValueError(
                f"rows for table {table!r} do not match its schema: missing {missing}, "
                f"unexpected {extra}; build them with the columns documented in flywheel/store.py"
            )
        if frame.empty:
            return
        rows = frame[expected].copy()
        for column in _JSON_COLUMNS.intersection(expected):
            rows[column] = [to_json(value) for value in rows[column]]
        self._con.register("_rows", rows)
        try:
            self._con.execute(f"INSERT INTO {table} SELECT * FROM _rows")
        finally:
            self._con.unregister("_rows")

    # ------------------------------------------------------------------ experiments
    def experiment_status(self, experiment_id: str) -> ExperimentStatus | None:
        """Return the stored state of ``experiment_id``, or None when it never started."""
        row = self._con.execute(
            "SELECT fingerprint, finished_at IS NOT NULL FROM experiments WHERE experiment_id = ?",
            [experiment_id],
        ).fetchone()
        if row is None:
            return None
        day = self._con.execute(
            "SELECT day FROM checkpoints WHERE experiment_id = ?", [experiment_id]
        ).fetchone()
        return ExperimentStatus(
            experiment_id=experiment_id,
            fingerprint=row[0],
            last_day=-1 if day is None else int(day[0]),
            finished=bool(row[1]),
        )

    def begin_experiment(
        self,
        experiment_id: str,
        config: Mapping[str, Any],
        users: pd.DataFrame,
        assignments: pd.DataFrame,
        checkpoint: bytes,
    ) -> None:
        """Record a new experiment, its users, assignments and day -1 checkpoint, atomically.

        Raises:
            ValueError: the experiment already exists (resume it instead, see ``open_sink``).
        """
        if self.experiment_status(experiment_id) is not None:
            raise ValueError(
                f"experiment {experiment_id!r} already exists in {self.path}; resume it or "
                f"use another run directory"
            )
        with self._transaction():
            self._con.execute(
                "INSERT INTO experiments VALUES (?, ?, ?, ?, NULL)",
                [experiment_id, fingerprint(config), to_json(config), utc_now()],
            )
            self._insert("users", users.assign(experiment_id=experiment_id))
            self._insert("assignments", assignments.assign(experiment_id=experiment_id))
            self._put_checkpoint(experiment_id, -1, checkpoint)

    def commit_day(self, experiment_id: str, log: DayLog, checkpoint: bytes) -> None:
        """Write one finished day and the checkpoint taken after it, in one transaction."""
        status = self.experiment_status(experiment_id)
        if status is None:
            raise ValueError(f"experiment {experiment_id!r} was never begun in {self.path}")
        if log.day != status.last_day + 1:
            raise ValueError(
                f"experiment {experiment_id!r}: day {log.day} committed after day "
                f"{status.last_day}; days must be committed in order without gaps"
            )
        stats = dict(log.stats)
        with self._transaction():
            for table in DAY_TABLES:
                frame: pd.DataFrame = getattr(log, table)
                self._insert(table, frame.assign(experiment_id=experiment_id))
            day_row = {
                "experiment_id": experiment_id,
                "day": log.day,
                "period": log.period,
                "weekday": log.weekday,
                **{k: stats.get(k, 0) for k in TABLES["days"] if k not in _DAY_KEYS},
                "committed_at": utc_now(),
            }
            self._insert("days", pd.DataFrame([day_row]))
            self._put_checkpoint(experiment_id, log.day, checkpoint)

    def finish_experiment(self, experiment_id: str) -> None:
        """Mark ``experiment_id`` finished (all days committed)."""
        self._con.execute(
            "UPDATE experiments SET finished_at = ? WHERE experiment_id = ?",
            [utc_now(), experiment_id],
        )

    def _put_checkpoint(self, experiment_id: str, day: int, state: bytes) -> None:
        self._con.execute("DELETE FROM checkpoints WHERE experiment_id = ?", [experiment_id])
        self._con.execute("INSERT INTO checkpoints VALUES (?, ?, ?)", [experiment_id, day, state])

    def latest_checkpoint(self, experiment_id: str) -> tuple[int, bytes] | None:
        """Return ``(last finished day, pickled state)`` or None when nothing is stored."""
        row = self._con.execute(
            "SELECT day, state FROM checkpoints WHERE experiment_id = ?", [experiment_id]
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def open_sink(
        self,
        experiment_id: str,
        config: Mapping[str, Any],
    ) -> ExperimentSink:
        """Return the sink the traffic model writes ``experiment_id`` through.

        If the experiment exists, its fingerprint must match ``config`` (same scenario,
        policies and seed), otherwise resuming would splice two different runs together.
        """
        status = self.experiment_status(experiment_id)
        if status is not None and status.fingerprint != fingerprint(config):
            raise ValueError(
                f"{self.run_dir} already holds experiment {experiment_id!r} with a different "
                f"scenario, policies or seed (fingerprint {status.fingerprint[:12]} vs "
                f"{fingerprint(config)[:12]}); rerun with the original arguments to resume, "
                f"or choose a new --out"
            )
        return ExperimentSink(self, experiment_id, dict(config))

    # ------------------------------------------------------------------ analyses
    def write_analysis(self, experiment_id: str, name: str, result: Mapping[str, Any]) -> None:
        """Store an analysis result (JSON), replacing an earlier one of the same name."""
        with self._transaction():
            self._con.execute(
                "DELETE FROM analyses WHERE experiment_id = ? AND name = ?", [experiment_id, name]
            )
            self._con.execute(
                "INSERT INTO analyses VALUES (?, ?, ?, ?)",
                [experiment_id, name, utc_now(), to_json(result)],
            )

    def read_analysis(self, experiment_id: str, name: str) -> dict[str, Any] | None:
        """Return the stored analysis result, or None."""
        row = self._con.execute(
            "SELECT result FROM analyses WHERE experiment_id = ? AND name = ?",
            [experiment_id, name],
        ).fetchone()
        return None if row is None else json.loads(row[0])

    # ------------------------------------------------------------------ readers
    def read_table(self, table: str, experiment_id: str | None = None) -> pd.DataFrame:
        """Return a whole table (optionally one experiment's rows), JSON columns parsed."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
        order = _ORDER.get(table, "")
        if experiment_id is None or "experiment_id" not in TABLES[table]:
            frame = self._con.execute(f"SELECT * FROM {table} {order}").df()
        else:
            frame = self._con.execute(
                f"SELECT * FROM {table} WHERE experiment_id = ? {order}", [experiment_id]
            ).df()
        for column in _JSON_COLUMNS.intersection(frame.columns):
            frame[column] = [None if v is None else json.loads(v) for v in frame[column]]
        return frame

    def read_turns(self, experiment_id: str | None = None, *, flat: bool = False) -> pd.DataFrame:
        """Return the turns table, one row per bot reply.

        Args:
            experiment_id: restrict to one experiment.
            flat: expand ``features`` into ``feature_<name>`` and ``checks`` into
                ``check_<name>`` columns (NaN where a character has no such checker), the
                shape reward models and curation take.
        """
        turns = self.read_table("turns", experiment_id)
        if not flat or turns.empty:
            return turns
        features = pd.DataFrame(list(turns.pop("features")), index=turns.index).add_prefix(
            "feature_"
        )
        checks = pd.DataFrame(list(turns.pop("checks")), index=turns.index).add_prefix("check_")
        return pd.concat([turns, features, checks], axis=1)

    def read_sessions(self, experiment_id: str | None = None) -> pd.DataFrame:
        """Return the sessions table."""
        return self.read_table("sessions", experiment_id)

    def read_user_days(self, experiment_id: str | None = None) -> pd.DataFrame:
        """Return the user-day table (every assigned user x simulated day): the A/B input."""
        return self.read_table("user_days", experiment_id)

    def analysis_table(self, experiment_id: str) -> pd.DataFrame:
        """The user-day table in ``flywheel.metrics``' format, ready for the A/B analysis.

        Days are renumbered from the first test day (day 0); pre-period days are negative.
        ``active`` is 0/1; every other column of ``user_days`` is kept.
        """
        table = self.read_user_days(experiment_id)
        if table.empty:
            raise ValueError(
                f"experiment {experiment_id!r} has no committed days in {self.path}; "
                f"run the experiment before analysing it"
            )
        test_days = table.loc[table["period"] == "test", "day"]
        if test_days.empty:
            raise ValueError(
                f"experiment {experiment_id!r} has only pre-period days so far; "
                f"the analysis needs at least one test day"
            )
        table["day"] = table["day"] - int(test_days.min())
        table["active"] = table["active"].astype("int64")
        return table.drop(columns=["experiment_id"])

    def read_days(self, experiment_id: str | None = None) -> pd.DataFrame:
        """Return the per-day progress table (throughput, batch sizes, wall time)."""
        return self.read_table("days", experiment_id)

    def read_users(self, experiment_id: str | None = None) -> pd.DataFrame:
        """Return users joined with their assignment (arm, bucket, salt)."""
        users = self.read_table("users", experiment_id)
        assignments = self.read_table("assignments", experiment_id)
        return users.merge(assignments, on=["experiment_id", "user_id"], how="left")

    def experiments(self) -> pd.DataFrame:
        """Return the experiments table."""
        return self.read_table("experiments")

    def user_fallbacks(self, experiment_id: str | None = None) -> pd.DataFrame:
        """Simulated-user fallbacks per experiment with committed days (optionally one):
        experiment_id, user_messages, user_fallbacks, fallback_share (``fallback_totals``
        of the experiment's rows of the days table)."""
        rows = [
            {"experiment_id": experiment, **fallback_totals(days)}
            for experiment, days in self.read_days(experiment_id).groupby("experiment_id")
        ]
        return pd.DataFrame(rows, columns=["experiment_id", *FALLBACK_FIELDS])


class ExperimentSink:
    """Binds a ``RunStore`` to one experiment; implements ``sim.traffic.TrafficSink``."""

    def __init__(self, store: RunStore, experiment_id: str, config: dict[str, Any]) -> None:
        self.store = store
        self.experiment_id = experiment_id
        self.config = config

    def resume_point(self) -> tuple[int, bytes] | None:
        """Return the latest checkpoint ``(day, state)``, or None for a fresh experiment."""
        return self.store.latest_checkpoint(self.experiment_id)

    def begin(self, users: pd.DataFrame, assignments: pd.DataFrame, checkpoint: bytes) -> None:
        """Record the population and the day -1 checkpoint."""
        self.store.begin_experiment(self.experiment_id, self.config, users, assignments, checkpoint)

    def commit_day(self, log: DayLog, checkpoint: bytes) -> None:
        """Write a finished day and its checkpoint atomically."""
        self.store.commit_day(self.experiment_id, log, checkpoint)

    def finish(self) -> None:
        """Mark the experiment finished."""
        self.store.finish_experiment(self.experiment_id)


_DAY_KEYS = {"experiment_id", "day", "period", "weekday", "committed_at"}
_ORDER = {
    "turns": "ORDER BY day, session_id, turn_index",
    "sessions": "ORDER BY day, start_hour, session_id",
    "user_days": "ORDER BY day, user_id",
    "days": "ORDER BY day",
    "users": "ORDER BY user_id",
    "assignments": "ORDER BY user_id",
}


@dataclass(frozen=True)
class LoggedWorld:
    """A run's logged conversations and the world they were logged in: what training and
    best-of-n commands read to rebuild prompts, checkers and the gold replay."""

    turns: pd.DataFrame  # the ``turns`` table of the experiment(s) read
    characters: dict[str, Character]  # the world's cast, by name
    world: WorldConfig  # the world config the experiment recorded


def read_logged_world(run_dir: str | Path, experiment: str | None = None) -> LoggedWorld:
    """The logged turns of ``run_dir`` (every experiment's, or ``experiment``'s) and the
    world of its first experiment (of ``experiment``, if named).

    Raises:
        ValueError: the run has no logged turns (nothing to train on or replay), or its
            experiment records no world.
    """
    from sim.characters import load_characters, select_characters

    with RunStore(run_dir, read_only=True) as store:
        turns = store.read_turns(experiment)
        experiments = store.experiments()
    if turns.empty:
        raise ValueError(f"run {run_dir} has no logged turns; run traffic (flywheel ab) first")
    config = (
        experiments["config"].iloc[0]
        if experiment is None
        else experiments.set_index("experiment_id").loc[experiment, "config"]
    )
    world = stored_world(config)
    if world is None:
        raise ValueError(
            f"run {run_dir}: the experiment's config records no world, so its characters are "
            "unknown; fix: read a run whose traffic flywheel ab / flywheel run logged"
        )
    characters = select_characters(load_characters(world.characters_dir), world.characters)
    return LoggedWorld(turns=turns, characters=characters, world=world)


def stored_world(config: Mapping[str, Any]) -> WorldConfig | None:
    """The world an experiment's stored ``config`` records, or None where it records none
    (a store written by something other than the simulator, as in unit tests).

    ``flywheel run`` records the world beside the scenario's name; ``flywheel ab`` records
    the whole scenario, world included.
    """
    from sim.world import WorldConfig

    scenario = config.get("scenario")
    world = config.get("world") or (scenario.get("world") if isinstance(scenario, dict) else None)
    return None if world is None else WorldConfig.from_stored(world)
