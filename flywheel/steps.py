"""What each step of the generation loop hands on, typed (``flywheel.loop``).

The ledger stores each step's outputs as JSON (``steps.outputs``) and a resumed run reads
them back instead of running the step again, so every record here has a ``to_dict`` that
writes exactly the JSON the loop has always stored and a ``from_dict`` that reads it (runs
written before these records resume unchanged, and the step fingerprints that take an
earlier step's outputs as inputs stay the same). The loop reads every step's outputs back
through ``from_dict``, so a fresh step and a resumed one hand on equal records.

=================  ==================================================================
``collect``        :class:`TrafficTotals` (``FlywheelRun.simulate``)
``curate``         :class:`CuratedData`
``reward_models``  :class:`RewardModels`
``candidate:R``    :class:`TrainedCandidate` (``flywheel.candidates.CandidateTraining``)
``offline:R``      :class:`OfflineOutput` (``flywheel.gates.Gate`` verdicts)
``ab``             :class:`ABStep` (an :class:`ABOutput`, or skipped)
``decide``         ``flywheel.records.GenerationRecord``
=================  ==================================================================

Parts that other modules define and the loop only passes on stay mappings, each with a
comment saying whose shape it is.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from flywheel.candidates import CandidateTraining
from flywheel.gates import Gate
from flywheel.persist import json_ready
from flywheel.records import (
    ABSummary,
    OfflineSummary,
    OracleSummary,
    RecordError,
    TrafficSummary,
    read_fields,
    read_list,
)

FIX = (
    "step outputs are written by `flywheel run` into the run store's steps table; resume "
    "a run with the flywheel release that started it, or run the scenario again into a new "
    "--out"
)

Split = Literal["train", "held_out"]
RewardModelName = Literal["naive", "style_controlled"]


def _read(cls: type, d: Any, where: str, **kwargs: Any) -> dict[str, Any]:
    return read_fields(cls, d, where, fix=FIX, **kwargs)


@dataclass(frozen=True)
class TrafficTotals:
    """One traffic experiment's totals: the ``collect`` step's outputs and an A/B test's
    ``simulation``."""

    experiment_id: str
    days: int
    turns: int
    sessions: int
    simulated_wall_s: float  # seconds the simulation took, summed over its days
    serving_events: Mapping[str, int]  # replies not served as generated, by event kind
    user_fallbacks: Mapping[str, Any]  # flywheel.store.fallback_totals

    def summary(self) -> TrafficSummary:
        """The generation record's ``traffic`` block: these totals less the wall time, so a
        resumed run's record equals an uninterrupted one's."""
        return TrafficSummary(
            experiment_id=self.experiment_id,
            days=self.days,
            turns=self.turns,
            sessions=self.sessions,
            serving_events=self.serving_events,
            user_fallbacks=self.user_fallbacks,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores: the record's block and the wall time (stored with
        sorted keys, so their order here does not matter)."""
        return {**self.summary().to_dict(), "simulated_wall_s": self.simulated_wall_s}

    @classmethod
    def from_dict(cls, d: Any, where: str = "collect") -> TrafficTotals:
        """Read what :meth:`to_dict` wrote (RecordError naming a missing / unknown field)."""
        return cls(**_read(cls, d, where))


@dataclass(frozen=True)
class CuratedData:
    """The ``curate`` step's outputs: the curated splits' files (relative to the run
    directory) and what curation kept, dropped and scrubbed."""

    train: str
    held_out: str
    n_input: int
    n_train: int
    n_held_out: int
    dropped: Mapping[str, int]  # turns dropped, by reason (training.curation)
    pii_spans_scrubbed: int
    pii_spans_after_scrubbing: int  # the privacy audit's count; 0, or the step fails

    def path(self, split: Split) -> str:
        """The file of a split."""
        return self.train if split == "train" else self.held_out

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores."""
        return {
            "train": self.train,
            "held_out": self.held_out,
            "n_input": self.n_input,
            "n_train": self.n_train,
            "n_held_out": self.n_held_out,
            "dropped": dict(self.dropped),
            "pii_spans_scrubbed": self.pii_spans_scrubbed,
            "pii_spans_after_scrubbing": self.pii_spans_after_scrubbing,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "curate") -> CuratedData:
        """Read what :meth:`to_dict` wrote (RecordError naming a missing / unknown field)."""
        return cls(**_read(cls, d, where))


@dataclass(frozen=True)
class RewardModelEval:
    """What the loop keeps of a reward model's evaluation (``flywheel.rm_eval``'s report)."""

    gold_pearson: float  # Pearson r with the gold utility on the held-out turns
    max_abs_style_r: float  # largest |r| of its score with a style feature
    n_train_rows: int

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> RewardModelEval:
        """The summary of ``flywheel.rm_eval.train_and_evaluate``'s report."""
        return cls(
            gold_pearson=report["gold_correlation"]["turns"]["pearson_r"],
            max_abs_style_r=report["max_abs_style_r"],
            n_train_rows=report["n_train_rows"],
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores."""
        return {
            "gold_pearson": self.gold_pearson,
            "max_abs_style_r": self.max_abs_style_r,
            "n_train_rows": self.n_train_rows,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RewardModelEval:
        """Read what :meth:`to_dict` wrote (RecordError naming a missing / unknown field)."""
        return cls(**_read(cls, d, where))


@dataclass(frozen=True)
class RewardModels:
    """The ``reward_models`` step's outputs: each model's folder (relative to the run
    directory) and its evaluation."""

    naive: str
    naive_eval: RewardModelEval
    style_controlled: str
    style_controlled_eval: RewardModelEval

    def path(self, which: RewardModelName) -> str:
        """The folder of the naive or the style-controlled model."""
        return self.naive if which == "naive" else self.style_controlled

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores (and the generation record's ``reward_models``)."""
        return {
            "naive": self.naive,
            "naive_eval": self.naive_eval.to_dict(),
            "style_controlled": self.style_controlled,
            "style_controlled_eval": self.style_controlled_eval.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "reward_models") -> RewardModels:
        """Read what :meth:`to_dict` wrote (RecordError naming a missing / unknown field)."""
        values = _read(cls, d, where)
        return cls(
            **{
                **values,
                "naive_eval": RewardModelEval.from_dict(
                    values["naive_eval"], f"{where}.naive_eval"
                ),
                "style_controlled_eval": RewardModelEval.from_dict(
                    values["style_controlled_eval"], f"{where}.style_controlled_eval"
                ),
            }
        )


@dataclass(frozen=True)
class TrainedCandidate:
    """A ``candidate:R`` step's outputs: the checkpoint's folder (relative to the run
    directory) and what training reported."""

    model_path: str
    training: CandidateTraining

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores: ``model_path`` beside the training's fields."""
        return {"model_path": self.model_path, **self.training.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str = "candidate") -> TrainedCandidate:
        """Read what :meth:`to_dict` wrote (RecordError naming a missing / unknown field)."""
        if not isinstance(d, Mapping) or "model_path" not in d:
            raise RecordError(f"{where} must be a JSON object with 'model_path', got {d!r}; {FIX}")
        training = {k: v for k, v in d.items() if k != "model_path"}
        return cls(d["model_path"], CandidateTraining.from_dict(training, where, fix=FIX))


@dataclass(frozen=True)
class OfflineOutput:
    """An ``offline:R`` step's outputs: a candidate's offline metrics, the oracle's view,
    its gates' verdicts and the files of both models' replies (relative to the run
    directory)."""

    offline: OfflineSummary  # flywheel.gates.OfflineReport.summary()
    oracle: OracleSummary | None
    gates: tuple[Gate, ...]  # in the order they ran
    replies: str
    ifbench_replies: str | None = None  # None with the IFBench gate off
    # False for outputs written before the loop measured the oracle's view: they have no
    # ``oracle`` key, and ``to_dict`` leaves it out again (as for GenerationRecord).
    oracle_recorded: bool = True

    def __post_init__(self) -> None:
        if not self.oracle_recorded and self.oracle is not None:
            raise RecordError(
                "offline output: oracle_recorded is False but an oracle is given; set "
                "oracle_recorded=True (the default) to record it"
            )

    @property
    def passed(self) -> bool:
        """Whether the candidate passed every offline gate."""
        return all(g.passed for g in self.gates)

    def gate_records(self) -> tuple[dict[str, Any], ...]:
        """The gates as the step stores them and the generation record keeps them."""
        return tuple(json_ready(g.to_dict()) for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores (strict JSON: NaN metrics read ``null``)."""
        out: dict[str, Any] = {
            "offline": json_ready(self.offline.to_dict()),
            "oracle": None if self.oracle is None else json_ready(self.oracle.to_dict()),
            "gates": list(self.gate_records()),
            "passed": self.passed,
            "replies": self.replies,
        }
        if self.ifbench_replies is not None:
            out["ifbench_replies"] = self.ifbench_replies
        if not self.oracle_recorded:
            del out["oracle"]
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "offline") -> OfflineOutput:
        """Read what :meth:`to_dict` wrote.

        Raises:
            RecordError: a field is missing or unknown, a gate does not read as a
                ``flywheel.gates.Gate``, or ``passed`` disagrees with the gates.
        """
        body = {k: v for k, v in d.items() if k != "passed"} if isinstance(d, Mapping) else d
        values = _read(cls, body, where, optional=("oracle", "ifbench_replies"))
        if "passed" not in d:
            raise RecordError(f"{where} has no field 'passed'; {FIX}")
        oracle = d.get("oracle")
        output = cls(
            **{
                **values,
                "offline": OfflineSummary.from_dict(values["offline"], f"{where}.offline", fix=FIX),
                "gates": _gates(values["gates"], f"{where}.gates"),
                "oracle": None
                if oracle is None
                else OracleSummary.from_dict(oracle, f"{where}.oracle", fix=FIX),
                "ifbench_replies": d.get("ifbench_replies"),
                "oracle_recorded": "oracle" in d,
            }
        )
        if d["passed"] != output.passed:
            raise RecordError(
                f"{where}.passed is {d['passed']!r} but its gates say {output.passed} (a "
                f"candidate passes when every gate does); {FIX}"
            )
        return output


def _gates(value: Any, where: str) -> tuple[Gate, ...]:
    gates = []
    for i, gate in enumerate(read_list(value, where, fix=FIX)):
        try:
            gates.append(Gate(**gate))
        except (TypeError, ValueError) as error:
            raise RecordError(f"{where}[{i}] is no gate verdict ({error}); {FIX}") from error
    return tuple(gates)


@dataclass(frozen=True)
class ABOutput:
    """An A/B test's result as the ``ab`` step records it (``flywheel.ab``'s analysis)."""

    experiment_id: str
    # Per metric name, ``flywheel.ab`` ``MetricResult`` as a dict (see ABSummary.metrics).
    metrics: Mapping[str, Mapping[str, Any]]
    srm_p_value: float | None  # a twin test has none of its own: its standard view's
    decision: str
    reason: str
    simulation: TrafficTotals
    files: Mapping[str, str]  # the A/B report's files by kind, relative to the run directory

    def summary(self) -> ABSummary:
        """The generation record's ``ab`` block."""
        return ABSummary(
            metrics=self.metrics,
            srm_p_value=self.srm_p_value,
            decision=self.decision,
            reason=self.reason,
            user_fallbacks=self.simulation.user_fallbacks,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores."""
        return {
            "experiment_id": self.experiment_id,
            "metrics": copy.deepcopy({k: dict(v) for k, v in self.metrics.items()}),
            "srm_p_value": self.srm_p_value,
            "decision": self.decision,
            "reason": self.reason,
            "simulation": self.simulation.to_dict(),
            "files": dict(self.files),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "ab") -> ABOutput:
        """Read what :meth:`to_dict` wrote (RecordError naming a missing / unknown field)."""
        values = _read(cls, d, where)
        simulation = TrafficTotals.from_dict(values["simulation"], f"{where}.simulation")
        return cls(**{**values, "simulation": simulation})


@dataclass(frozen=True)
class ABStep:
    """The ``ab`` step's outputs: the A/B test's result, or None when it was skipped (no
    candidate passed its gates)."""

    result: ABOutput | None

    @property
    def skipped(self) -> bool:
        """Whether no A/B test ran."""
        return self.result is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON the ledger stores: ``{"skipped": true}`` or the result's."""
        return {"skipped": True} if self.result is None else self.result.to_dict()

    @classmethod
    def from_dict(cls, d: Any, where: str = "ab") -> ABStep:
        """Read what :meth:`to_dict` wrote (RecordError naming a missing / unknown field)."""
        if isinstance(d, Mapping) and d.get("skipped"):
            if set(d) != {"skipped"}:
                raise RecordError(
                    f"{where} is skipped but has fields {sorted(set(d) - {'skipped'})}; {FIX}"
                )
            return cls(None)
        return cls(ABOutput.from_dict(d, where))
