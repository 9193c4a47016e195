"""Cached, read-only loaders over a run directory, shared by every dashboard page.

A run directory (``flywheel run --out``) holds ``run.duckdb`` (``flywheel.store``),
``generations.json`` and ``artifacts/``. The dashboard never writes to it:

- the store is opened with ``RunStore(read_only=True)`` for each cached read and closed
  again at once, so a dashboard left open never holds DuckDB's file lock against the
  generation loop that writes the run; while a writer holds the lock (DuckDB then admits
  no reader), the pages read a snapshot copy of the store as of its last commit;
- cached reads (``st.cache_data``) are keyed by the run's *version* (modification time and
  size of the database, its write-ahead log and ``generations.json``), so a page shows new
  days and generations on the next rerun, and repeats nothing in between;
- reward models are loaded once per folder (``st.cache_resource``).

Analysis is not written here: lifts, CUPED and SRM come from ``flywheel.ab``, daily curves
from ``flywheel.metrics``, steerability from ``rewards.steerability``, reward-model
correlations from ``flywheel.rm_eval`` and ``rewards.style_control``, style profiles from
``flywheel.style_regression`` (whose verdicts the loop records in ``generations.json``). This module finds the recorded
results, recomputes them with those functions when a run did not record them, and shapes
them into tables for the pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import streamlit as st

from flywheel.records import (
    RECORD_VERSION,
    GenerationRecord,
    Interval,
    RecordError,
    gate_verdict,
    read_records,
)
from flywheel.store import ARTIFACTS_DIR, DB_FILE, SCHEMA_VERSION, RunStore

if TYPE_CHECKING:
    from flywheel.ab import AnalysisConfig

RUN_DIR_ENV = "FLYWHEEL_RUN_DIR"
RUN_DIR_KEY = "run_dir"  # st.session_state key of the run directory
GENERATIONS_FILE = "generations.json"
GENERATIONS_SCHEMA_VERSION = RECORD_VERSION
RM_EVAL_FILE = "rm_eval.json"
RM_META_FILE = "reward_model.json"
BON_FILES = ("bon.json", "sweep.json")  # contract name, and what `flywheel bon` writes
BON_CANDIDATES_FILE = "candidates.parquet"
SUCCESS_METRICS = ("breadth", "depth")
TWINS, STANDARD = "twins", "standard"  # traffic designs (sim.traffic.TrafficConfig.design)
# Display format of the rate columns of rewards.steerability tables.
RATE_COLUMNS = {
    column: st.column_config.NumberColumn(format="%.3f")
    for column in (
        "following_rate",
        "following_low",
        "following_high",
        "violation_rate",
        "violation_low",
        "violation_high",
    )
}
STEERABILITY_COLUMNS = ("character", "follows_all", "violates_any")
SNAPSHOT_ROOT = Path(tempfile.gettempdir()) / "flywheel-dashboard-snapshots"
# run directory -> the snapshot its reads use while a writer holds the store (see check_run)
_SNAPSHOTS: dict[str, Path] = {}


class RunUnavailable(Exception):
    """The run cannot be shown; ``title`` and the message say why and what to do."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(message)
        self.title = title


# ---------------------------------------------------------------------------- which run
def run_dir_from_argv(argv: list[str] | None = None) -> str | None:
    """``--run-dir PATH`` from the script's arguments (``streamlit run app.py -- --run-dir``)."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--run-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--run-dir="):
            return arg.split("=", 1)[1]
    return None


def default_run_dir() -> str:
    """The run to open first: ``--run-dir``, else ``$FLYWHEEL_RUN_DIR``, else empty."""
    return run_dir_from_argv() or os.environ.get(RUN_DIR_ENV, "")


def current_run_dir() -> str:
    """The run directory the session looks at (the sidebar field edits it)."""
    if RUN_DIR_KEY not in st.session_state:
        st.session_state[RUN_DIR_KEY] = default_run_dir()
    return str(st.session_state[RUN_DIR_KEY]).strip()


def run_version(run_dir: str) -> str:
    """Changes whenever the run's files change: the cache key of every read."""
    root = Path(run_dir)
    parts = []
    for name in (DB_FILE, DB_FILE + ".wal", GENERATIONS_FILE):
        path = root / name
        if path.exists():
            stat = path.stat()
            parts.append(f"{name}:{stat.st_mtime_ns}:{stat.st_size}")
    return "|".join(parts)


def check_run(run_dir: str) -> tuple[str, str] | None:
    """(title, message) when the run cannot be opened, None when it can.

    Not cached: opening read-only takes milliseconds, and a lock held by a writer must be
    noticed again as soon as the writer lets go.
    """
    if not run_dir:
        return (
            "No run selected",
            "Pass a run directory: `flywheel dashboard RUN_DIR`, or type its path in the "
            "sidebar. A run directory holds `run.duckdb` (written by `flywheel ab` or "
            "`flywheel run`).",
        )
    root = Path(run_dir)
    if not root.is_dir():
        return (
            "Run directory not found",
            f"`{run_dir}` does not exist. Check the path, or start a run there with "
            "`flywheel run SCENARIO --out RUN_DIR`.",
        )
    if not (root / DB_FILE).is_file():
        return (
            "No run store in this directory",
            f"`{root / DB_FILE}` does not exist: no run has started in `{run_dir}` yet. "
            "Start one with `flywheel run SCENARIO --out RUN_DIR` (or `flywheel ab`).",
        )
    try:
        RunStore(root, read_only=True).close()
    except RuntimeError as err:
        # flywheel.store refuses another schema version with a message naming both.
        return (
            "Run store from another version",
            f"{err}. This dashboard reads run-store schema version {SCHEMA_VERSION}; open "
            "the run with the release that wrote it, or rerun the scenario into a new "
            "directory.",
        )
    except Exception as err:  # duckdb raises its own IOException for a held lock
        if "lock" not in str(err).lower():
            return ("Run store cannot be read", f"`{root / DB_FILE}`: {err}")
        try:
            _SNAPSHOTS[run_dir] = _snapshot(run_dir)
        except Exception as copy_err:  # a copy torn by a write in progress fails to open
            return (
                "Run store is being written",
                f"Another process holds `{root / DB_FILE}` for writing (a running "
                "`flywheel run` or `flywheel ab`); DuckDB lets no reader in meanwhile, and a "
                f"snapshot copy could not be opened ({copy_err}). Reload this page in a "
                f"moment. ({err})",
            )
        return None
    _SNAPSHOTS.pop(run_dir, None)
    return None


def _snapshot(run_dir: str) -> Path:
    """A read-only copy of the store of a run that a writer holds, one per run version.

    DuckDB admits no reader while a process writes, and ``flywheel run`` keeps its store
    open for the whole run; a copy of the database and its write-ahead log shows the run as
    of its last commit. Older copies of the same run are removed.
    """
    root = Path(run_dir).resolve()
    run_key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    version_key = hashlib.sha256(run_version(run_dir).encode()).hexdigest()[:16]
    target = SNAPSHOT_ROOT / run_key / version_key
    if not (target / DB_FILE).is_file():
        staging = target.with_name(f".{version_key}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in (DB_FILE, DB_FILE + ".wal"):
            if (root / name).is_file():
                shutil.copy2(root / name, staging / name)
        RunStore(staging, read_only=True).close()  # a torn copy fails here, not in a page
        os.replace(staging, target)
    for old in target.parent.iterdir():
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def snapshot_of(run_dir: str) -> Path | None:
    """The snapshot the pages read while a writer holds ``run_dir``'s store, else None."""
    return _SNAPSHOTS.get(run_dir)


def _store(run_dir: str) -> RunStore:
    """The run's store opened read-only (its snapshot while a writer holds it)."""
    return RunStore(_SNAPSHOTS.get(run_dir, run_dir), read_only=True)


def require_run() -> str:
    """The current run directory, or render a clear page and stop when it cannot be read."""
    run_dir = current_run_dir()
    problem = check_run(run_dir)
    if problem is not None:
        title, message = problem
        st.error(f"**{title}**", icon=":material/block:")
        st.markdown(message)
        st.stop()
    snapshot = snapshot_of(run_dir)
    if snapshot is not None:
        st.warning(
            "**Live run**: another process is writing this run store, so the pages show a "
            f"snapshot of its last commit (copied to `{snapshot}`); reload for newer data.",
            icon=":material/sync:",
        )
    return run_dir


# ---------------------------------------------------------------------------- store reads
@st.cache_data(show_spinner=False)
def _read(run_dir: str, version: str, method: str, experiment_id: str | None) -> pd.DataFrame:
    with _store(run_dir) as store:
        return getattr(store, method)(experiment_id)


@st.cache_data(show_spinner=False)
def _experiments(run_dir: str, version: str) -> pd.DataFrame:
    with _store(run_dir) as store:
        frame = store.experiments()
        logged = store.read_days()
        store_fallbacks = store.user_fallbacks()
    if frame.empty:
        return frame
    committed = logged.groupby("experiment_id")["day"].count()
    frame["days_committed"] = frame["experiment_id"].map(committed).fillna(0).astype(int)
    frame["finished"] = frame["finished_at"].notna()
    frame["treatment_share"] = [design_share(c) for c in frame["config"]]
    frame["design"] = [traffic_design(c) for c in frame["config"]]
    arms = [arm_policies(c) for c in frame["config"]]
    frame["control"] = [a[0] for a in arms]
    frame["treatment"] = [a[1] for a in arms]
    frame["same_policy"] = [a[0] is not None and a[0] == a[1] for a in arms]
    shares = store_fallbacks.set_index("experiment_id")["fallback_share"]
    frame["user_fallback_share"] = frame["experiment_id"].map(shares)
    return frame


def experiments(run_dir: str) -> pd.DataFrame:
    """The experiments table, with each experiment's committed days, designed share, traffic
    ``design`` (standard or twins), arm policies, ``same_policy`` (both arms served by one model: production traffic or an
    A/A test, where no lift is expected) and ``user_fallback_share`` (share of simulated
    users' messages that were canned human text because the user LLM's was unusable)."""
    return _experiments(run_dir, run_version(run_dir))


def arm_policies(config: Any) -> tuple[str | None, str | None]:
    """(control, treatment) policy labels an experiment's stored config records, if any."""
    if not isinstance(config, dict):
        return None, None
    control, treatment = config.get("control"), config.get("treatment")
    return (None if control is None else str(control)), (
        None if treatment is None else str(treatment)
    )


def _traffic(config: Any) -> dict[str, Any]:
    """The ``[traffic]`` settings an experiment's stored config records (``flywheel ab``
    keeps them under ``scenario``, the loop at the top level), else an empty dict."""
    if not isinstance(config, dict):
        return {}
    for holder in (config.get("scenario", {}), config):
        traffic = holder.get("traffic") if isinstance(holder, dict) else None
        if isinstance(traffic, dict):
            return traffic
    return {}


def design_share(config: Any) -> float | None:
    """The designed treatment share in an experiment's stored config, if it records one."""
    traffic = _traffic(config)
    return float(traffic["treatment_share"]) if "treatment_share" in traffic else None


def traffic_design(config: Any) -> str:
    """``twins`` when the experiment's stored config says every user lived both arms
    (``[traffic] design = "twins"``), else ``standard`` (also for configs from before twins)."""
    return TWINS if _traffic(config).get("design") == TWINS else STANDARD


def sessions(run_dir: str, experiment_id: str) -> pd.DataFrame:
    """One experiment's sessions."""
    return _read(run_dir, run_version(run_dir), "read_sessions", experiment_id)


def turns(run_dir: str, experiment_id: str) -> pd.DataFrame:
    """One experiment's turns (``features`` and ``checks`` as dicts)."""
    return _read(run_dir, run_version(run_dir), "read_turns", experiment_id)


def days(run_dir: str, experiment_id: str) -> pd.DataFrame:
    """One experiment's per-day progress rows."""
    return _read(run_dir, run_version(run_dir), "read_days", experiment_id)


def user_fallbacks(run_dir: str, experiment_id: str | None = None) -> pd.DataFrame:
    """Simulated-user fallbacks per experiment (``RunStore.user_fallbacks``)."""
    return _read(run_dir, run_version(run_dir), "user_fallbacks", experiment_id)


@st.cache_data(show_spinner=False)
def _analysis_table(run_dir: str, version: str, experiment_id: str) -> pd.DataFrame:
    with _store(run_dir) as store:
        return store.analysis_table(experiment_id)


def analysis_table(run_dir: str, experiment_id: str) -> pd.DataFrame:
    """The experiment's user-day table in ``flywheel.metrics``' format."""
    return _analysis_table(run_dir, run_version(run_dir), experiment_id)


def ab_experiments(run_dir: str) -> list[str]:
    """Experiments with at least one test day: the ones an A/B analysis can read."""
    frame = _read(run_dir, run_version(run_dir), "read_days", None)
    if frame.empty:
        return []
    tested = frame.loc[frame["period"] == "test", "experiment_id"]
    return sorted(tested.unique().tolist())


# ---------------------------------------------------------------------------- A/B
def metric_frame(result: dict[str, Any]) -> pd.DataFrame:
    """One row per metric of a result dict's ``metrics``: the fields of ``MetricResult``.

    Stored JSON loses the analysis' metric order (the run store sorts keys), so the
    success family comes first, then the guardrails, each in name order; JSON nulls (NaN in
    the analysis: no events in either arm) are NaN again.
    """
    rows = [{"metric": name, **values} for name, values in result["metrics"].items()]
    frame = pd.DataFrame(rows).replace({None: np.nan})
    if "noninferiority_scale" not in frame:  # stored before absolute margins: all relative
        guardrail = frame["role"] == "guardrail"
        frame["noninferiority_scale"] = np.where(guardrail, "relative", None)
        frame["noninferiority_bound"] = frame["ci_high"].where(guardrail)
    order = frame["role"].map({"success": 0, "guardrail": 1}).fillna(2)
    return frame.assign(_order=order).sort_values(["_order", "metric"]).drop(columns="_order")


@dataclass(frozen=True)
class ABView:
    """An experiment's A/B result as the dashboard shows it.

    ``result`` has the shape of ``flywheel.ab.ABResult.to_dict()``, or for a twin experiment
    of ``flywheel.ab.PairedResult.to_dict()``: ``design`` "twins", the paired estimates in
    ``metrics`` and the standard view's ``ABResult`` dict under ``standard``. ``source`` says
    where it came from (the run's record, or computed here by ``flywheel.ab``).
    """

    experiment_id: str
    result: dict[str, Any]
    source: str

    @property
    def design(self) -> str:
        """``twins`` for a paired result, ``standard`` otherwise."""
        return TWINS if self.result.get("design") == TWINS else STANDARD

    @property
    def standard(self) -> dict[str, Any]:
        """The standard design's result: the result itself, or a twin result's standard view
        (what production would have seen: each user in their hash-assigned arm only).

        Raises:
            ValueError: a twin result that does not carry its standard view.
        """
        if self.design == STANDARD:
            return self.result
        standard = self.result.get("standard")
        if not _is_ab_result(standard):
            raise ValueError(
                f"the twin analysis of experiment {self.experiment_id!r} ({self.source}) has "
                f"no standard view ('standard' is {type(standard).__name__}); re-analyse it "
                "with this release (`flywheel ab SCENARIO --design twins --out RUN_DIR` "
                "resumes the run and records both)"
            )
        return standard

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per metric (a twin result's paired estimates); see :func:`metric_frame`."""
        return metric_frame(self.result)

    @property
    def standard_metrics(self) -> pd.DataFrame:
        """One row per metric of the standard design's result (:attr:`standard`)."""
        return metric_frame(self.standard)

    def lift_chart(self) -> tuple[pd.DataFrame, str]:
        """The metrics for ``charts.metric_lifts`` and what its grey intervals are: without
        CUPED for a standard result; for a twin result (which has no CUPED) the standard
        design's CIs, as ``flywheel.ab_report``'s lift plot draws them."""
        if self.design == STANDARD:
            return self.metrics, "without CUPED"
        metrics = self.metrics
        standard = self.standard_metrics.set_index("metric")
        grey = {
            f"{field}_unadjusted": metrics["metric"].map(standard[field])
            for field in ("lift", "ci_low", "ci_high")
        }
        return metrics.assign(**grey), "standard design"


def _is_ab_result(value: Any) -> bool:
    return (
        isinstance(value, dict) and isinstance(value.get("metrics"), dict) and ("decision" in value)
    )


def analysis_config(config: Any, recorded: dict[str, Any] | None = None) -> AnalysisConfig:
    """The ``flywheel.ab.AnalysisConfig`` an experiment was analysed with, as far as the run
    records it.

    In order: the ``[analysis]`` settings of the stored config (``flywheel ab`` keeps its
    scenario there; the loop does not), then what the recorded result shows of its own
    settings (alpha, correction, CUPED, SRM level, guardrail margins), the designed treatment
    share; ``flywheel.ab`` defaults for the rest (power, retention day).
    """
    from flywheel.ab import AnalysisConfig

    scenario = config.get("scenario") if isinstance(config, dict) else None
    analysis = scenario.get("analysis") if isinstance(scenario, dict) else None
    settings = dict(analysis) if isinstance(analysis, dict) else {}
    standard = recorded.get("standard", recorded) if isinstance(recorded, dict) else None
    if _is_ab_result(standard):
        for key in ("alpha", "correction", "cuped"):
            if standard.get(key) is not None:
                settings.setdefault(key, standard[key])
        srm_alpha = (standard.get("srm") or {}).get("alpha")
        if srm_alpha is not None:
            settings.setdefault("srm_alpha", srm_alpha)
        for scale, key in (
            ("relative", "noninferiority_margins"),
            ("absolute", "absolute_margins"),
        ):
            margins = {
                name: values["noninferiority_margin"]
                for name, values in standard["metrics"].items()
                if values.get("role") == "guardrail"
                and values.get("noninferiority_margin")
                and values.get("noninferiority_scale", "relative") == scale
            }
            if margins:
                settings.setdefault(key, margins)
    share = design_share(config)
    if share is not None:
        settings["treatment_share"] = share
    return AnalysisConfig(**settings)


def _config(run_dir: str, experiment_id: str) -> Any:
    """The config an experiment was stored with (None for an unknown experiment)."""
    return experiments(run_dir).set_index("experiment_id")["config"].get(experiment_id)


@st.cache_data(show_spinner="Analysing the A/B test with flywheel.ab ...")
def _ab_view(run_dir: str, version: str, experiment_id: str) -> ABView:
    with _store(run_dir) as store:
        recorded = store.read_table("analyses", experiment_id)
    if len(recorded):
        recorded = recorded.sort_values("created_at")
        for row in recorded.iloc[::-1].itertuples(index=False):
            if _is_ab_result(row.result):
                return ABView(experiment_id, row.result, f"recorded in the run store ({row.name})")
    from flywheel.ab import analyze, analyze_paired, is_twin_table

    config = _config(run_dir, experiment_id)
    table = analysis_table(run_dir, experiment_id)
    settings = analysis_config(config)
    # The dispatch of flywheel.experiment.analyze_experiment, which would import the simulator.
    if is_twin_table(table):
        result, how = analyze_paired(table, settings).to_dict(), "flywheel.ab.analyze_paired"
    else:
        result, how = analyze(table, settings).to_dict(), "flywheel.ab.analyze"
    note = (
        ""
        if design_share(config) is not None
        else " (designed treatment share not recorded: SRM vs 50%)"
    )
    return ABView(experiment_id, result, f"computed by the dashboard with {how}{note}")


def ab_view(run_dir: str, experiment_id: str) -> ABView:
    """The recorded A/B result of ``experiment_id``, or one computed by ``flywheel.ab``
    (the paired analysis for a twin experiment)."""
    return _ab_view(run_dir, run_version(run_dir), experiment_id)


@st.cache_data(show_spinner=False)
def _daily(run_dir: str, version: str, experiment_id: str) -> pd.DataFrame:
    from flywheel.ab import standard_view
    from flywheel.metrics import daily_curves

    return daily_curves(standard_view(analysis_table(run_dir, experiment_id)))


def daily(run_dir: str, experiment_id: str) -> pd.DataFrame:
    """Per arm and day: breadth, depth and guardrail rates (``flywheel.metrics.daily_curves``);
    of a twin experiment, its standard view (each user in their hash-assigned arm), as
    ``flywheel.ab_report`` plots it."""
    return _daily(run_dir, run_version(run_dir), experiment_id)


# ---------------------------------------------------------------------------- twins
TWIN_LABEL = "twin (paired)"  # design labels of the twin-vs-standard chart
STANDARD_LABEL = "standard (production view)"


def twin_experiments(run_dir: str) -> list[str]:
    """Experiments with a test day whose traffic design is twins."""
    stored = experiments(run_dir)
    if stored.empty:
        return []
    twins = set(stored.loc[stored["design"] == TWINS, "experiment_id"])
    return [e for e in ab_experiments(run_dir) if e in twins]


def twin_comparison(view: ABView) -> pd.DataFrame:
    """One row per metric of a twin experiment, both designs side by side.

    Columns: ``metric``, ``role``; ``twin_lift`` / ``twin_ci_low`` / ``twin_ci_high`` (the
    paired estimate) and ``standard_*`` (the standard view's, CUPED as configured); each CI's
    ``*_width``; ``width_ratio`` (standard / twin width in this run, where the twin design
    spent more tokens); ``variance_ratio`` (standard / twin lift variance at equal generated
    tokens, as ``flywheel.ab.paired`` computes it); the ``ate`` with its CI; both designs'
    corrected p-values.

    Raises:
        ValueError: the result is not a twin result, or lacks its standard view.
    """
    if view.design != TWINS:
        raise ValueError(
            f"experiment {view.experiment_id!r} has a standard A/B result ({view.source}), "
            "not a twin one; a twin experiment comes from `flywheel ab SCENARIO --design "
            'twins` or a scenario with `[traffic] design = "twins"`'
        )
    twin = view.metrics.set_index("metric")
    standard = view.standard_metrics.set_index("metric").reindex(twin.index)
    out = pd.DataFrame({"metric": twin.index, "role": twin["role"].to_numpy()})
    for prefix, frame in (("twin", twin), ("standard", standard)):
        out[f"{prefix}_lift"] = frame["lift"].to_numpy(dtype=float)
        out[f"{prefix}_ci_low"] = frame["ci_low"].to_numpy(dtype=float)
        out[f"{prefix}_ci_high"] = frame["ci_high"].to_numpy(dtype=float)
        out[f"{prefix}_width"] = out[f"{prefix}_ci_high"] - out[f"{prefix}_ci_low"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["width_ratio"] = out["standard_width"] / out["twin_width"]
    for column in ("variance_ratio", "ate", "ate_ci_low", "ate_ci_high"):
        out[column] = twin[column].to_numpy(dtype=float)
    out["twin_p_adjusted"] = twin["p_value_adjusted"].to_numpy(dtype=float)
    out["standard_p_adjusted"] = standard["p_value_adjusted"].to_numpy(dtype=float)
    return out


def twin_ci_rows(comparison: pd.DataFrame) -> pd.DataFrame:
    """Long form of :func:`twin_comparison` for the chart: one row per metric and design."""
    frames = [
        pd.DataFrame(
            {
                "metric": comparison["metric"],
                "role": comparison["role"],
                "design": label,
                "lift": comparison[f"{prefix}_lift"],
                "ci_low": comparison[f"{prefix}_ci_low"],
                "ci_high": comparison[f"{prefix}_ci_high"],
                "variance_ratio": comparison["variance_ratio"],
            }
        )
        for prefix, label in (("twin", TWIN_LABEL), ("standard", STANDARD_LABEL))
    ]
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------- sequential
ALWAYS_VALID_LABEL = "always-valid CI"  # interval labels of the sequential chart
NAIVE_LABEL = "naive fixed-horizon CI"


@dataclass(frozen=True)
class SequentialView:
    """Daily looks at one experiment: ``flywheel.ab.sequential_monitor``'s always-valid CIs
    beside the naive fixed-horizon CI of each look.

    ``looks`` has one row per look and metric: ``day`` (the last test day the look
    includes, 0 = first), ``metric``, ``role``, ``lift``, ``cs_low`` / ``cs_high`` (the
    always-valid CI: covers the true lift at every look at once), ``p_value`` /
    ``p_value_adjusted`` (always-valid), ``naive_low`` / ``naive_high`` and
    ``naive_p_value`` (what a fixed-horizon analysis run that day would report: valid for
    one pre-planned look only), ``decision`` (the look's: ship or hold would stop the test).
    ``srm`` has one row per look of the standard design's sequential SRM check (empty for
    twins, whose split is exact).
    """

    experiment_id: str
    design: str
    alpha: float
    horizon_days: int
    stopped_at: int | None
    decision: str
    reason: str
    looks: pd.DataFrame
    srm: pd.DataFrame

    def first_excluding_zero(self, interval: str) -> dict[str, int]:
        """Per metric, the first look whose ``interval`` (``cs`` or ``naive``) excludes 0;
        metrics whose interval never does are left out."""
        low, high = self.looks[f"{interval}_low"], self.looks[f"{interval}_high"]
        excludes = self.looks[(low > 0) | (high < 0)]
        return {str(k): int(v) for k, v in excludes.groupby("metric")["day"].min().items()}

    def naive_ahead(self) -> dict[str, tuple[int, int | None]]:
        """Metrics whose naive CI excluded 0 at an earlier look than the always-valid CI:
        metric -> (naive look, always-valid look or None). What daily peeking would have
        claimed too early, or falsely."""
        naive, valid = self.first_excluding_zero("naive"), self.first_excluding_zero("cs")
        return {
            m: (day, valid.get(m)) for m, day in naive.items() if m not in valid or day < valid[m]
        }


def planned_test_days(config: Any) -> int | None:
    """The experiment's planned test days (``[traffic] test_days``), if its config records
    them: the sequential monitor's horizon while the test is still running."""
    days = _traffic(config).get("test_days")
    return int(days) if isinstance(days, int) and days > 0 else None


@st.cache_data(show_spinner="Monitoring the test day by day with flywheel.ab.sequential ...")
def _sequential_view(run_dir: str, version: str, experiment_id: str, design: str) -> SequentialView:
    from scipy import stats

    from flywheel.ab.sequential import daily_looks, sequential_monitor

    config = _config(run_dir, experiment_id)
    table = analysis_table(run_dir, experiment_id)
    settings = analysis_config(config, ab_view(run_dir, experiment_id).result)
    horizon = planned_test_days(config)
    monitor = sequential_monitor(table, settings, design=design, horizon_days=horizon)
    # sequential_monitor keeps the per-look standard errors to itself; daily_looks is the
    # same computation, and lift +- z se is the fixed-horizon CI of each look.
    looks = daily_looks(table, settings, design=design)
    z = float(stats.norm.ppf(1 - settings.alpha / 2))
    names = [m.name for m in looks.metrics[0]]
    estimates = {name: looks.lift_and_se(name) for name in names}
    rows = []
    for k, look in enumerate(monitor.looks):
        for metric in look.metrics:
            lift, se = (values[k] for values in estimates[metric.name])
            naive = looks.estimates[k][names.index(metric.name)]
            if not np.isfinite(lift):  # a control value of 0: no relative lift, no CI
                lift = se = np.nan
            rows.append(
                {
                    "day": look.day,
                    "metric": metric.name,
                    "role": metric.role,
                    "lift": metric.lift if np.isfinite(metric.lift) else np.nan,
                    "cs_low": metric.ci_low,
                    "cs_high": metric.ci_high,
                    "p_value": metric.p_value,
                    "p_value_adjusted": metric.p_value_adjusted,
                    "naive_low": lift - z * se,
                    "naive_high": lift + z * se,
                    "naive_p_value": float(naive.p_value[0]),
                    "decision": look.decision,
                }
            )
    srm = pd.DataFrame(
        [
            {
                "day": look.day,
                "n_control": look.srm.n_control,
                "n_treatment": look.srm.n_treatment,
                "p_value": look.srm.p_value,
                "flagged": look.srm.flagged,
            }
            for look in monitor.looks
            if look.srm is not None
        ],
        columns=["day", "n_control", "n_treatment", "p_value", "flagged"],
    )
    return SequentialView(
        experiment_id=experiment_id,
        design=monitor.design,
        alpha=monitor.alpha,
        horizon_days=monitor.horizon_days,
        stopped_at=monitor.stopped_at,
        decision=monitor.decision,
        reason=monitor.reason,
        looks=pd.DataFrame(rows),
        srm=srm,
    )


def sequential_view(run_dir: str, experiment_id: str, design: str) -> SequentialView:
    """Day-by-day always-valid monitoring of an experiment in ``design`` (``twins``: the
    paired looks of a twin experiment; ``standard``: any experiment, a twin one through its
    standard view).

    Raises:
        ValueError: the user-day table cannot be monitored (its message names the problem).
    """
    return _sequential_view(run_dir, run_version(run_dir), experiment_id, design)


# ---------------------------------------------------------------------------- generations
@dataclass(frozen=True)
class RunGenerations:
    """``generations.json`` as the pages read it: its scenario and seed, and the typed
    generation records (``flywheel.records``) in generation order."""

    scenario: str  # "?" where the file names none (as seed)
    seed: int | str
    records: tuple[GenerationRecord, ...]


@st.cache_data(show_spinner=False)
def _generations(run_dir: str, version: str) -> RunGenerations | None:
    path = Path(run_dir) / GENERATIONS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunUnavailable(
            "generations.json is not valid JSON",
            f"`{path}`: {err}. The loop rewrites it atomically, so this is a damaged file; "
            "rerun `flywheel report RUN_DIR` or the last generation.",
        ) from err
    version_seen = data.get("schema_version") if isinstance(data, dict) else None
    if version_seen != GENERATIONS_SCHEMA_VERSION:
        raise RunUnavailable(
            "generations.json from another version",
            f"`{path}` has schema_version {version_seen!r}; this dashboard reads version "
            f"{GENERATIONS_SCHEMA_VERSION}. Open the run with the release that wrote it.",
        )
    try:
        records = read_records(data.get("generations", []))
    except RecordError as err:
        raise RunUnavailable(
            "generations.json holds a malformed generation record", f"`{path}`: {err}"
        ) from err
    return RunGenerations(data.get("scenario", "?"), data.get("seed", "?"), tuple(records))


def generations(run_dir: str) -> RunGenerations | None:
    """``generations.json`` (None when the loop has not written one).

    Raises:
        RunUnavailable: the file is damaged, from another schema version, or holds a
            record ``GenerationRecord.from_dict`` cannot read.
    """
    return _generations(run_dir, run_version(run_dir))


def _num(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan
    )


def _interval_columns(prefix: str, interval: Interval | None, estimate: str) -> dict[str, float]:
    """``{prefix}{estimate}``, ``{prefix}ci_low``, ``{prefix}ci_high`` (NaN where not measured)."""
    values = (
        (None,) * 3 if interval is None else (interval.estimate, interval.ci_low, interval.ci_high)
    )
    names = (estimate, "ci_low", "ci_high")
    return {f"{prefix}{name}": _num(v) for name, v in zip(names, values, strict=True)}


def generation_table(data: RunGenerations) -> pd.DataFrame:
    """One row per generation: candidate, recipe, offline metrics, the oracle's gold
    utility vs the parent, lifts, decision."""
    rows = []
    for gen in data.records:
        offline = gen.offline
        row = {
            "generation": gen.generation,
            "candidate": gen.candidate,
            "recipe": gen.recipe,
            "parent": gen.parent,
            "rm_win_rate": _num(offline.get("rm_win_rate")),
            "rm_win_rate_sc": _num(offline.get("rm_win_rate_style_controlled")),
            "instruction_following": _num(offline.get("instruction_following")),
            "violation_rate": _num(offline.get("violation_rate")),
            "gates_failed": ", ".join(
                g["name"] + ("" if verdict == "fail" else f" ({verdict})")
                for g in gen.gates
                if (verdict := gate_verdict(g)) != "pass"
            ),
            **_interval_columns("gold_", gen.gold_vs_parent, "diff"),
        }
        for metric in SUCCESS_METRICS:
            lift = None if gen.ab is None else gen.ab.lift(metric)
            row.update(_interval_columns(f"{metric}_", lift, "lift"))
        row["decision"] = gen.decision
        row["reason"] = gen.reason
        row["deployed_after"] = gen.deployed_after
        row["ab_experiment_id"] = gen.ab_experiment_id
        rows.append(row)
    return pd.DataFrame(rows)


def _pct(value: float) -> str:
    return f"{value:+.1%}" if np.isfinite(value) else "n/a"


def _signed(value: float) -> str:
    return f"{value:+.2f}" if np.isfinite(value) else "n/a"


def _rate(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def generation_display(table: pd.DataFrame) -> pd.DataFrame:
    """The generation table as text, one column per figure of the report's table:
    lifts as ``+x.x% [low, high]``, n/a where a generation has no such figure."""
    out = pd.DataFrame(
        {
            "gen": table["generation"].astype(str),
            "candidate": table["candidate"],
            "recipe": table["recipe"],
            "parent": table["parent"],
            "RM win (raw / style-ctl)": [
                f"{_rate(a, 2)} / {_rate(b, 2)}"
                for a, b in zip(table["rm_win_rate"], table["rm_win_rate_sc"], strict=True)
            ],
            "instr. following": [_rate(v) for v in table["instruction_following"]],
            "violations": [_rate(v) for v in table["violation_rate"]],
        }
    )
    out["gold vs parent (oracle)"] = [
        "n/a" if not np.isfinite(d) else f"{d:+.2f} [{_signed(low)}, {_signed(high)}]"
        for d, low, high in zip(
            table["gold_diff"], table["gold_ci_low"], table["gold_ci_high"], strict=True
        )
    ]
    for metric in SUCCESS_METRICS:
        out[f"{metric} lift [95% CI]"] = [
            "n/a" if not np.isfinite(lift) else f"{_pct(lift)} [{_pct(low)}, {_pct(high)}]"
            for lift, low, high in zip(
                table[f"{metric}_lift"],
                table[f"{metric}_ci_low"],
                table[f"{metric}_ci_high"],
                strict=True,
            )
        ]
    out["decision"] = table["decision"].astype(str).str.upper()
    out["failed gates"] = table["gates_failed"]
    return out


def lift_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Long form of the success-metric lifts per generation (one row per metric), for plots."""
    rows = []
    for row in table.itertuples(index=False):
        for metric in SUCCESS_METRICS:
            lift = getattr(row, f"{metric}_lift")
            if np.isfinite(lift):
                rows.append(
                    {
                        "generation": row.generation,
                        "candidate": row.candidate,
                        "metric": metric,
                        "lift": lift,
                        "ci_low": getattr(row, f"{metric}_ci_low"),
                        "ci_high": getattr(row, f"{metric}_ci_high"),
                        "decision": row.decision,
                    }
                )
    return pd.DataFrame(
        rows, columns=["generation", "candidate", "metric", "lift", "ci_low", "ci_high", "decision"]
    )


def steerability_rows(data: RunGenerations) -> pd.DataFrame:
    """Instruction following and violations per generation, candidate and parent (long)."""
    rows = []
    for gen in data.records:
        for who, prefix in (("candidate", ""), ("parent", "parent_")):
            for metric in ("instruction_following", "violation_rate"):
                value = _num(gen.offline.get(prefix + metric))
                if np.isfinite(value):
                    rows.append(
                        {
                            "generation": gen.generation,
                            "model": who,
                            "metric": metric,
                            "value": value,
                            "decision": gen.decision,
                        }
                    )
    return pd.DataFrame(rows, columns=["generation", "model", "metric", "value", "decision"])


def gates_table(gen: GenerationRecord) -> pd.DataFrame:
    """A generation's offline gates: name, verdict, value, threshold, then every other
    scalar field the gates record (power, sample sizes, p-values ...), the reason last.

    Columns come from the records, so a field the loop adds to its gates shows up here
    without a change; nested fields (a suite's per-check table) are left to their pages.
    """
    gates = gen.gates
    first, last = ["name", "verdict", "value", "threshold"], ["reason"]
    extra = []
    for gate in gates:
        for key, value in gate.items():
            scalar = value is None or isinstance(value, str | int | float | bool)
            if scalar and key not in (*first, *last, "passed", *extra):
                extra.append(key)
    rows = [
        {**{k: g.get(k) for k in first + extra + last}, "verdict": gate_verdict(g)} for g in gates
    ]
    return pd.DataFrame(rows, columns=first + extra + last)


@st.cache_data(show_spinner=False)
def _steerability_by_policy(run_dir: str, version: str, experiment_id: str) -> pd.DataFrame:
    from rewards.steerability import OVERALL, steerability

    logged = turns(run_dir, experiment_id)
    frames = []
    for (period, arm, policy), group in logged.groupby(["period", "arm", "policy"]):
        table = steerability(group[list(STEERABILITY_COLUMNS)]).table
        overall = table[table["group"] == OVERALL].drop(columns="group")
        frames.append(overall.assign(period=period, arm=arm, policy=policy))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    first = ["period", "arm", "policy"]
    return table[first + [c for c in table.columns if c not in first]]


def steerability_by_policy(run_dir: str, experiment_id: str) -> pd.DataFrame:
    """Logged steerability per period, arm and serving policy (``rewards.steerability``)."""
    return _steerability_by_policy(run_dir, run_version(run_dir), experiment_id)


# ---------------------------------------------------------------------------- artifacts
def _artifacts(run_dir: str) -> Path:
    return Path(run_dir) / ARTIFACTS_DIR


def _label(run_dir: str, path: Path) -> str:
    return str(path.relative_to(run_dir))


@st.cache_data(show_spinner=False)
def _json_files(run_dir: str, version: str, names: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        for path in sorted(Path(run_dir).rglob(name)):
            try:
                out[_label(run_dir, path)] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                out[_label(run_dir, path)] = {"error": f"{path}: {err}"}
    return out


def _artifact_version(run_dir: str) -> str:
    # Artifacts are written before the database commit that records their step, so the
    # run's version also moves when they do; the folder listing catches files added later.
    root = _artifacts(run_dir)
    count = sum(1 for _ in root.rglob("*")) if root.is_dir() else 0
    return f"{run_version(run_dir)}|{count}"


def rm_evals(run_dir: str) -> dict[str, dict[str, Any]]:
    """Every ``rm_eval.json`` in the run (``flywheel.rm_eval``'s report), by relative path."""
    return _json_files(run_dir, _artifact_version(run_dir), (RM_EVAL_FILE,))


def reward_models(run_dir: str) -> dict[str, dict[str, Any]]:
    """Every saved reward-model folder in the run: relative folder -> its metadata."""
    found = _json_files(run_dir, _artifact_version(run_dir), (RM_META_FILE,))
    return {str(Path(k).parent): v for k, v in found.items()}


def bon_sweeps(run_dir: str) -> dict[str, dict[str, Any]]:
    """Every recorded best-of-n sweep (``bon.json`` / ``sweep.json``), by relative path."""
    found = _json_files(run_dir, _artifact_version(run_dir), BON_FILES)
    return {k: v for k, v in found.items() if isinstance(v.get("table"), list)}


def rm_eval_table(evals: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per ``rm_eval.json``: model, accuracy, gold correlation, style |r|."""
    rows = []
    for path, report in evals.items():
        gold = (report.get("gold_correlation") or {}).get("turns") or {}
        accuracy = report.get("pairwise_accuracy") or {}
        calibration = report.get("calibration") or {}
        engaged = calibration.get("engaged") or next(iter(calibration.values()), {})
        rows.append(
            {
                "file": path,
                "model": report.get("model"),
                "style_controlled": report.get("style_controlled"),
                "pairwise_accuracy": _num(accuracy.get("accuracy")),
                "auc": _num(engaged.get("auc")),
                "gold_pearson_r": _num(gold.get("pearson_r")),
                "gold_spearman_rho": _num(gold.get("spearman_rho")),
                "max_abs_style_r": _num(report.get("max_abs_style_r")),
                "n_test_turns": report.get("n_test_turns"),
                "train_seconds": _num(report.get("train_seconds")),
            }
        )
    return pd.DataFrame(rows)


def style_correlation_rows(evals: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Long form of each report's reward-vs-style correlations (Pearson r per feature)."""
    rows = []
    for path, report in evals.items():
        for feature, values in (report.get("style_correlations") or {}).items():
            r = _num((values or {}).get("pearson_r"))
            rows.append(
                {
                    "model": report.get("model") or path,
                    "feature": feature,
                    "pearson_r": r,
                    "spearman_rho": _num((values or {}).get("spearman_rho")),
                    "n": (values or {}).get("n"),
                }
            )
    return pd.DataFrame(rows, columns=["model", "feature", "pearson_r", "spearman_rho", "n"])


def bon_table(sweep: dict[str, Any]) -> pd.DataFrame:
    """A sweep's rows (n, kl, sqrt_kl, proxy, gold, standard errors) as recorded by
    ``training.rejection.SweepResult``, plus both curves as gain over n = 1 in n = 1
    standard deviations (the scale of ``SweepResult.plot``)."""
    table = pd.DataFrame(sweep["table"]).sort_values("n").reset_index(drop=True)
    if "sqrt_kl" not in table and "kl" in table:
        table["sqrt_kl"] = np.sqrt(table["kl"])
    for column in ("proxy", "gold"):
        scale = _num(sweep.get(f"{column}_sd"))
        scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        table[f"{column}_gain"] = (table[column] - table[column].iloc[0]) / scale
        se = table.get(f"{column}_se", 0.0)
        table[f"{column}_gain_low"] = table[f"{column}_gain"] - se / scale
        table[f"{column}_gain_high"] = table[f"{column}_gain"] + se / scale
    return table


def bon_candidates(run_dir: str, sweep_path: str) -> pd.DataFrame | None:
    """The scored samples next to a sweep (proxy and gold per reply), if recorded."""
    path = Path(run_dir) / sweep_path
    file = path.parent / BON_CANDIDATES_FILE
    return _parquet(str(file), _artifact_version(run_dir)) if file.is_file() else None


@st.cache_data(show_spinner=False)
def _parquet(path: str, version: str) -> pd.DataFrame:
    return pd.read_parquet(path)


@st.cache_resource(show_spinner="Loading the reward model ...")
def reward_model(folder: str) -> Any:
    """A saved reward model (``rewards.rm.base.load_reward_model``), loaded once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rewards.rm.base import load_reward_model

    return load_reward_model(folder)


@st.cache_data(show_spinner="Scoring logged replies with the reward model ...")
def _proxy_vs_gold(
    run_dir: str, version: str, model_folder: str, experiment_id: str, n: int, seed: int
) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    from flywheel.rm_eval import gold_correlation
    from rewards.style_control import style_correlations

    logged = turns(run_dir, experiment_id)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(logged), size=min(n, len(logged)), replace=False))
    sample = logged.iloc[pick]
    model = reward_model(str(Path(run_dir) / model_folder))
    contexts = sample["user_message"].astype(str).tolist()
    replies = sample["bot_reply"].astype(str).tolist()
    scores = model.score(contexts, replies)
    frame = pd.DataFrame(
        {
            "proxy": scores,
            "gold": sample["gold_satisfaction"].to_numpy(dtype=float),
            "words": [f.get("words", np.nan) for f in sample["features"]],
            "emoji": [f.get("emoji", np.nan) for f in sample["features"]],
            "arm": sample["arm"].to_numpy(),
            "character": sample["character"].to_numpy(),
            "context": contexts,
            "reply": replies,
        }
    )
    correlation = gold_correlation(scores, frame["gold"].to_numpy()).to_dict()
    styles = pd.DataFrame([c.to_dict() for c in style_correlations(scores, replies).values()])
    return frame, correlation, styles


def proxy_vs_gold(
    run_dir: str, model_folder: str, experiment_id: str, n: int, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Score ``n`` logged replies (seeded sample) with a reward model next to their gold
    utility (the ORACLE the store keeps for evaluation): the scatter's rows, the
    ``flywheel.rm_eval.gold_correlation`` and ``rewards.style_control.style_correlations``."""
    return _proxy_vs_gold(run_dir, run_version(run_dir), model_folder, experiment_id, n, seed)


# ---------------------------------------------------------------------------- style
def style_frame(logged: pd.DataFrame) -> pd.DataFrame:
    """Per reply: period, arm, policy, character, words, emoji, ends_with_question."""
    features = pd.DataFrame(list(logged["features"]), index=logged.index)
    frame = logged[["period", "arm", "policy", "character"]].copy()
    for column in ("words", "emoji", "ends_with_question", "question_marks"):
        frame[column] = features.get(column, np.nan)
    return frame


@st.cache_data(show_spinner=False)
def _style_profiles(run_dir: str, version: str, experiment_id: str) -> pd.DataFrame:
    from flywheel.style_regression import style_profile

    logged = turns(run_dir, experiment_id)
    rows = []
    for (period, arm, policy), group in logged.groupby(["period", "arm", "policy"]):
        rows.append(
            {
                "period": period,
                "arm": arm,
                "policy": policy,
                "replies": len(group),
                **style_profile(group["bot_reply"].astype(str).tolist()),
            }
        )
    return pd.DataFrame(rows)


def style_profiles(run_dir: str, experiment_id: str) -> pd.DataFrame:
    """Mean words, emoji rate and question rate of logged replies per period, arm and
    policy (``flywheel.style_regression.style_profile``)."""
    return _style_profiles(run_dir, run_version(run_dir), experiment_id)


# ---------------------------------------------------------------------------- conversations
OUTCOMES = ("left", "reported", "turn cap")


def session_outcomes(frame: pd.DataFrame) -> pd.Series:
    """How each session ended: reported, hit the turn cap, or the user left."""
    reported = frame["reported"].astype(bool)
    capped = ~frame["ended_by_user"].astype(bool)
    return pd.Series(
        np.where(reported, "reported", np.where(capped, "turn cap", "left")), index=frame.index
    )
