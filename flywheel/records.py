"""The generation record: one entry of ``generations.json``, typed.

``flywheel run`` decides each generation in ``FlywheelRun.decide`` (``flywheel.loop``),
which builds a :class:`GenerationRecord`; the ledger stores its :meth:`~GenerationRecord.to_dict`
and the report (``flywheel.report``) and the dashboards (``dashboards.data``) read it back
with :meth:`~GenerationRecord.from_dict`. ``to_dict`` writes exactly the JSON shape the
loop has always written, so existing runs and ``generations.json`` files read and write
back unchanged.

Parts that readers look up by field are dataclasses here. Parts that other modules define
and the readers only pass on or look up by a name chosen at run time stay mappings, each
with a comment saying whose shape it is and why it is not retyped here.

:class:`OfflineSummary` is the ``offline`` block typed (what the offline step stores). The
loop's other step outputs are typed in ``flywheel.steps``, which reads them with
:func:`read_fields` too.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

# The version of the record's shape, written as generations.json's ``schema_version``; a
# change of a field's name, type or meaning bumps it (readers refuse other versions).
RECORD_VERSION = 1

Decision = Literal["ship", "hold", "gated"]
DECISIONS: tuple[str, ...] = get_args(Decision)

_NOT_IN_JSON = ("oracle_recorded",)  # fields said by the JSON's shape, not by a key
_FIX = (
    f"records of this version (RECORD_VERSION {RECORD_VERSION}) are written by `flywheel run`; "
    "restore the field if the file was edited by hand, or write the run again with the "
    "current `flywheel run SCENARIO --out NEW_DIR`"
)
# The offline block's keys written only where the IFBench gate ran.
_IFBENCH_FIELDS = ("ifbench_following", "parent_ifbench_following", "ifbench_prompts")

# Gate records are ``flywheel.gates.Gate.to_dict()`` as the loop wrote them. Not retyped:
# Gate lives with the offline evaluation (importing it loads torch), the dashboards' gate
# table shows every field a gate records (so a field added to Gate shows without a change
# here), and records written before gates had verdicts carry only ``passed``.
GateDict = Mapping[str, Any]


class RecordError(ValueError):
    """A generation record that does not have the shape of :data:`RECORD_VERSION`."""


def gate_verdict(gate: GateDict) -> str:
    """A recorded gate's verdict (pass / fail / inconclusive); records written before
    verdicts existed say only ``passed``, which reads as pass / fail."""
    return str(gate.get("verdict") or ("pass" if gate.get("passed") else "fail"))


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% confidence interval (a bound is None where not measured)."""

    estimate: float
    ci_low: float | None
    ci_high: float | None

    @classmethod
    def read(cls, block: Mapping[str, Any] | None, estimate: str) -> Interval | None:
        """``block[estimate]`` with ``ci_low`` / ``ci_high``; None without the estimate."""
        if not block or block.get(estimate) is None:
            return None
        return cls(block[estimate], block.get("ci_low"), block.get("ci_high"))


@dataclass(frozen=True)
class OfflineSummary:
    """What the offline evaluation measured for a candidate, as its offline step stores it
    (``flywheel.gates.OfflineReport.summary``) and the generation record's ``offline`` block
    holds it (rates in [0, 1]; a metric that could not be measured reads None)."""

    rm_win_rate: float  # naive RM's win rate over the deployed model, logged contexts
    rm_win_rate_ci: tuple[float, float]  # its 95% CI
    rm_win_rate_style_controlled: float  # the same under the style-controlled RM
    rm_win_rate_style_adjusted: float | None  # the style regression's GLM-adjusted win rate
    instruction_following: float  # held-out steerability benchmark, candidate
    violation_rate: float
    parent_instruction_following: float  # the same, deployed model
    parent_violation_rate: float
    style: Mapping[str, float]  # style profile of the candidate's logged replies, by feature
    parent_style: Mapping[str, float]  # the same, deployed model
    unsafe_rate: float  # share of replies (both sets) the safety checker blocks, candidate
    parent_unsafe_rate: float
    # ``flywheel.style_regression.StyleRegressionResult.to_dict()``, passed on as written.
    style_regression: Mapping[str, Any]
    # Rows of the candidate's ``rewards.steerability`` table (group, rates), as written.
    steerability_by_character: tuple[Mapping[str, Any], ...]
    # With the IFBench gate on (all three or none): per-prompt follow rates and prompts.
    ifbench_following: float | None = None
    parent_ifbench_following: float | None = None
    ifbench_prompts: int | None = None

    def __post_init__(self) -> None:
        measured = [getattr(self, n) is not None for n in _IFBENCH_FIELDS]
        if any(measured) and not all(measured):
            raise RecordError(
                f"offline summary: {', '.join(_IFBENCH_FIELDS)} are set together (the IFBench "
                f"gate ran) or not at all, got "
                + ", ".join(f"{n} = {getattr(self, n)!r}" for n in _IFBENCH_FIELDS)
            )

    @property
    def ifbench_measured(self) -> bool:
        """Whether the IFBench gate ran."""
        return self.ifbench_prompts is not None

    def to_dict(self) -> dict[str, Any]:
        """The ``offline`` block (the ifbench_* keys only where the IFBench gate ran)."""
        out: dict[str, Any] = {
            "rm_win_rate": self.rm_win_rate,
            "rm_win_rate_ci": list(self.rm_win_rate_ci),
            "rm_win_rate_style_controlled": self.rm_win_rate_style_controlled,
            "rm_win_rate_style_adjusted": self.rm_win_rate_style_adjusted,
            "instruction_following": self.instruction_following,
            "violation_rate": self.violation_rate,
            "parent_instruction_following": self.parent_instruction_following,
            "parent_violation_rate": self.parent_violation_rate,
            "style": dict(self.style),
            "parent_style": dict(self.parent_style),
            "unsafe_rate": self.unsafe_rate,
            "parent_unsafe_rate": self.parent_unsafe_rate,
            "style_regression": copy.deepcopy(dict(self.style_regression)),
            "steerability_by_character": [dict(r) for r in self.steerability_by_character],
        }
        if self.ifbench_measured:
            out.update({n: getattr(self, n) for n in _IFBENCH_FIELDS})
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "offline", *, fix: str = _FIX) -> OfflineSummary:
        """Read an ``offline`` block (see :meth:`GenerationRecord.from_dict` for errors)."""
        values = read_fields(cls, d, where, optional=_IFBENCH_FIELDS, fix=fix)
        ci = read_list(values["rm_win_rate_ci"], f"{where}.rm_win_rate_ci", fix=fix)
        if len(ci) != 2:
            raise RecordError(f"{where}.rm_win_rate_ci must be [low, high], got {ci!r}; {fix}")
        rows = read_list(
            values["steerability_by_character"], f"{where}.steerability_by_character", fix=fix
        )
        return cls(
            **{
                **values,
                **{n: d[n] for n in _IFBENCH_FIELDS if n in d},
                "rm_win_rate_ci": (ci[0], ci[1]),
                "steerability_by_character": tuple(rows),
            }
        )


@dataclass(frozen=True)
class OracleSummary:
    """The ORACLE's view of a candidate's offline evaluation (shown, never decided on)."""

    # ``sim.replay.GoldComparison`` as a dict (candidate, parent, diff, ci_low, ci_high,
    # p_value, n). Kept as written: importing sim.replay loads the world's embedder and gold
    # model, and readers need only the difference and its interval (``gold_vs_parent``).
    gold: Mapping[str, Any]

    @property
    def gold_vs_parent(self) -> Interval | None:
        """Mean gold utility of the candidate minus its parent's, with the paired t CI."""
        return Interval.read(self.gold, "diff")

    def to_dict(self) -> dict[str, Any]:
        """The ``oracle`` block of ``generations.json``."""
        return {"gold": copy.deepcopy(dict(self.gold))}

    @classmethod
    def from_dict(cls, d: Any, where: str = "oracle", *, fix: str = _FIX) -> OracleSummary:
        """Read an ``oracle`` block (see :meth:`GenerationRecord.from_dict` for errors)."""
        return cls(**read_fields(cls, d, where, fix=fix))


@dataclass(frozen=True)
class ABSummary:
    """What a generation's record keeps of its A/B test (``flywheel.ab``'s result)."""

    # Per metric name, ``flywheel.ab`` ``MetricResult`` as a dict (a twin test's metric
    # carries more fields). Kept as written: the report and the dashboards pick metrics by
    # name and read only the lift with its CI (``lift``).
    metrics: Mapping[str, Mapping[str, Any]]
    srm_p_value: float | None
    decision: str
    reason: str
    # ``flywheel.store.fallback_totals``; passed on to ``flywheel.store.fallback_text``.
    user_fallbacks: Mapping[str, Any]

    def lift(self, metric: str) -> Interval | None:
        """Relative lift of ``metric`` with its 95% CI; None where it was not measured."""
        return Interval.read(self.metrics.get(metric), "lift")

    def to_dict(self) -> dict[str, Any]:
        """The ``ab`` block of ``generations.json``."""
        return {
            "metrics": copy.deepcopy({k: dict(v) for k, v in self.metrics.items()}),
            "srm_p_value": self.srm_p_value,
            "decision": self.decision,
            "reason": self.reason,
            "user_fallbacks": dict(self.user_fallbacks),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "ab") -> ABSummary:
        """Read an ``ab`` block (see :meth:`GenerationRecord.from_dict` for errors)."""
        return cls(**read_fields(cls, d, where))


@dataclass(frozen=True)
class TrafficSummary:
    """The production traffic a generation's data came from (``FlywheelRun.simulate``'s
    totals, less the wall time, so a resumed run's record equals an uninterrupted one's)."""

    experiment_id: str
    days: int
    turns: int
    sessions: int
    serving_events: Mapping[str, int]  # replies not served as generated, by event kind
    user_fallbacks: Mapping[str, Any]  # flywheel.store.fallback_totals, as for ABSummary

    def to_dict(self) -> dict[str, Any]:
        """The ``traffic`` block of ``generations.json``."""
        return {
            "experiment_id": self.experiment_id,
            "days": self.days,
            "turns": self.turns,
            "sessions": self.sessions,
            "serving_events": dict(self.serving_events),
            "user_fallbacks": dict(self.user_fallbacks),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "traffic") -> TrafficSummary:
        """Read a ``traffic`` block (see :meth:`GenerationRecord.from_dict` for errors)."""
        return cls(**read_fields(cls, d, where))


@dataclass(frozen=True)
class CandidateSummary:
    """One recipe's candidate of a generation, as the record lists every candidate."""

    candidate: str
    recipe: str  # the recipe's kind (rs+sft, grpo, ...)
    model_path: str  # relative to the run directory
    passed_gates: bool
    gates: tuple[GateDict, ...]
    rm_win_rate: float | None
    rm_win_rate_style_controlled: float | None

    def to_dict(self) -> dict[str, Any]:
        """One entry of the record's ``candidates`` list."""
        return {
            "candidate": self.candidate,
            "recipe": self.recipe,
            "model_path": self.model_path,
            "passed_gates": self.passed_gates,
            "gates": _gate_list(self.gates),
            "rm_win_rate": self.rm_win_rate,
            "rm_win_rate_style_controlled": self.rm_win_rate_style_controlled,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "candidates[]") -> CandidateSummary:
        """Read one ``candidates`` entry (see :meth:`GenerationRecord.from_dict`)."""
        values = read_fields(cls, d, where)
        return cls(**{**values, "gates": _gate_tuple(values["gates"], f"{where}.gates")})


@dataclass(frozen=True)
class GenerationRecord:
    """One generation of ``flywheel run``: what was tried, how it did, what was decided."""

    generation: int
    parent: str  # the model deployed during the generation
    candidate: str  # the candidate shown: the A/B one, else the best by style-controlled RM
    recipe: str  # the shown candidate's recipe kind
    recipe_name: str  # and the recipe's name in the scenario
    model_path: str  # the shown candidate's checkpoint, relative to the run directory
    traffic_experiment_id: str
    ab_experiment_id: str | None  # None when no candidate passed the gates (no A/B test)
    # ``OfflineSummary.to_dict()`` of the shown candidate (``OfflineSummary.from_dict`` reads
    # it typed). Kept a mapping here: the report and the dashboards look metrics up by a
    # name chosen at run time (the deployed model's as ``parent_<name>``).
    offline: Mapping[str, Any]
    oracle: OracleSummary | None
    gates: tuple[GateDict, ...]  # the shown candidate's gates, in the order they ran
    ab: ABSummary | None
    decision: Decision
    reason: str
    deployed_after: str
    candidates: tuple[CandidateSummary, ...]
    # Paths of the generation's reward models and their evaluation summaries, by label
    # (naive, style_controlled, <label>_eval). Kept as written: no reader looks inside.
    reward_models: Mapping[str, Any]
    traffic: TrafficSummary
    # False for records written before the loop measured the oracle's view: they have no
    # ``oracle`` key at all (the recorded dashboard fixture is one), and ``to_dict`` leaves
    # it out again so such a record is written back exactly as it was read.
    oracle_recorded: bool = True

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise RecordError(
                f"generation {self.generation}: decision must be one of {DECISIONS}, "
                f"got {self.decision!r}"
            )
        if (self.ab is None) != (self.ab_experiment_id is None):
            raise RecordError(
                f"generation {self.generation}: ab and ab_experiment_id must both be set (an "
                f"A/B test ran) or both be None (gated), got ab_experiment_id = "
                f"{self.ab_experiment_id!r} with ab {'missing' if self.ab is None else 'set'}"
            )
        if not self.oracle_recorded and self.oracle is not None:
            raise RecordError(
                f"generation {self.generation}: oracle_recorded is False but an oracle is "
                f"given; set oracle_recorded=True (the default) to record it"
            )

    @property
    def passed_gates(self) -> bool:
        """Whether the shown candidate passed every offline gate."""
        return all(g["passed"] for g in self.gates)

    @property
    def gold_vs_parent(self) -> Interval | None:
        """The oracle's gold utility of the candidate minus its parent's, if measured."""
        return None if self.oracle is None else self.oracle.gold_vs_parent

    def to_dict(self) -> dict[str, Any]:
        """The record as ``generations.json`` holds it (the shape of :data:`RECORD_VERSION`)."""
        out: dict[str, Any] = {
            "generation": self.generation,
            "parent": self.parent,
            "candidate": self.candidate,
            "recipe": self.recipe,
            "recipe_name": self.recipe_name,
            "model_path": self.model_path,
            "traffic_experiment_id": self.traffic_experiment_id,
            "ab_experiment_id": self.ab_experiment_id,
            "offline": copy.deepcopy(dict(self.offline)),
            "oracle": None if self.oracle is None else self.oracle.to_dict(),
            "gates": _gate_list(self.gates),
            "ab": None if self.ab is None else self.ab.to_dict(),
            "decision": self.decision,
            "reason": self.reason,
            "deployed_after": self.deployed_after,
            "candidates": [c.to_dict() for c in self.candidates],
            "reward_models": copy.deepcopy(dict(self.reward_models)),
            "traffic": self.traffic.to_dict(),
        }
        if not self.oracle_recorded:
            del out["oracle"]
        return out

    @classmethod
    def from_dict(cls, d: Any) -> GenerationRecord:
        """Read a record in the shape :meth:`to_dict` writes.

        Raises:
            RecordError: a field is missing, unknown, or not an object where one is
                needed; the message names the field (``ab.metrics``) and the fix.
        """
        where = _record_label(d)
        values = read_fields(cls, d, where, optional=("oracle",))
        oracle = d.get("oracle")
        return cls(
            **{
                **values,
                "oracle": None
                if oracle is None
                else OracleSummary.from_dict(oracle, f"{where}.oracle"),
                "oracle_recorded": "oracle" in d,
                "gates": _gate_tuple(values["gates"], f"{where}.gates"),
                "ab": None
                if values["ab"] is None
                else ABSummary.from_dict(values["ab"], f"{where}.ab"),
                "candidates": tuple(
                    CandidateSummary.from_dict(c, f"{where}.candidates[{i}]")
                    for i, c in enumerate(read_list(values["candidates"], f"{where}.candidates"))
                ),
                "traffic": TrafficSummary.from_dict(values["traffic"], f"{where}.traffic"),
            }
        )


def read_records(records: Sequence[Mapping[str, Any] | GenerationRecord]) -> list[GenerationRecord]:
    """``records`` as :class:`GenerationRecord` (dicts read with ``from_dict``)."""
    return [
        r if isinstance(r, GenerationRecord) else GenerationRecord.from_dict(r) for r in records
    ]


# ---------------------------------------------------------------------------- reading helpers


def _record_label(d: Any) -> str:
    generation = d.get("generation") if isinstance(d, Mapping) else None
    return "generation record" + ("" if generation is None else f" {generation}")


def read_fields(
    cls: type, d: Any, where: str, *, optional: Sequence[str] = (), fix: str = _FIX
) -> dict[str, Any]:
    """The values of dataclass ``cls``'s fields in mapping ``d``, for its ``from_dict``.

    Every field but ``optional`` (and those the JSON's shape says, such as
    ``oracle_recorded``) must be a key of ``d``, and no other key may be.

    Raises:
        RecordError: ``d`` is no mapping, lacks a field or has an unknown one; the message
            names ``where`` (the record and field path), the keys, and ``fix``.
    """
    if not isinstance(d, Mapping):
        raise RecordError(f"{where} must be a JSON object, got {type(d).__name__}; {fix}")
    names = [f.name for f in fields(cls) if f.name not in _NOT_IN_JSON]
    missing = [n for n in names if n not in d and n not in optional]
    if missing:
        raise RecordError(f"{where} has no field {', '.join(map(repr, missing))}; {fix}")
    unknown = [k for k in d if k not in names]
    if unknown:
        raise RecordError(
            f"{where} has unknown field {', '.join(map(repr, unknown))} (known: "
            f"{', '.join(names)}); it comes from another record version: open it with the "
            f"flywheel release that wrote it"
        )
    return {n: d[n] for n in names if n in d and n not in optional}


def read_list(value: Any, where: str, *, fix: str = _FIX) -> list[Any]:
    """``value`` as a list; RecordError naming ``where`` and ``fix`` when it is none."""
    if not isinstance(value, list | tuple):
        raise RecordError(f"{where} must be a JSON list, got {type(value).__name__}; {fix}")
    return list(value)


def _gate_tuple(value: Any, where: str) -> tuple[GateDict, ...]:
    gates = read_list(value, where)
    for i, gate in enumerate(gates):
        if not isinstance(gate, Mapping) or "name" not in gate or "passed" not in gate:
            raise RecordError(
                f"{where}[{i}] must be a gate object with at least 'name' and 'passed', got "
                f"{gate!r}; {_FIX}"
            )
    return tuple(gates)


def _gate_list(gates: Sequence[GateDict]) -> list[dict[str, Any]]:
    return [copy.deepcopy(dict(g)) for g in gates]
