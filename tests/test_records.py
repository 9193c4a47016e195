"""The typed generation record (``flywheel.records``): it reads and writes back exactly the
``generations.json`` entries the loop has written, and a malformed entry is a clear error
naming the field, in the reader and in the dashboards."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from flywheel.persist import to_json
from flywheel.records import (
    ABSummary,
    CandidateSummary,
    GenerationRecord,
    Interval,
    OracleSummary,
    RecordError,
    TrafficSummary,
)
from flywheel.report import JSON_FILE, table_rows, text_table

RECORDING = Path(__file__).resolve().parent / "fixtures" / "dashboard_run" / JSON_FILE


def recorded() -> dict[str, Any]:
    """The recorded dashboard run's ``generations.json`` document."""
    return json.loads(RECORDING.read_text(encoding="utf-8"))


def gate(name: str, passed: bool = True, verdict: str | None = None) -> dict[str, Any]:
    """A gate entry as ``flywheel.gates.Gate.to_dict()`` writes it."""
    return {
        "name": name,
        "passed": passed,
        "value": 0.4,
        "threshold": 0.5,
        "reason": f"{name} reason",
        "verdict": verdict or ("pass" if passed else "fail"),
        "power": 0.9,
        "n": 36,
        "n_needed": 12,
    }


def typed_record(*, gated: bool = False) -> GenerationRecord:
    """A record built field by field, as ``FlywheelRun.decide`` builds one."""
    fallbacks = {"user_messages": 60, "user_fallbacks": 3, "fallback_share": 0.05}
    gates = (gate("rm_win_rate"), gate("steerability", not gated, "inconclusive"))
    ab = ABSummary(
        metrics={
            "breadth": {"name": "breadth", "lift": 0.05, "ci_low": -0.01, "ci_high": 0.11},
            "depth": {"name": "depth", "lift": -0.02, "ci_low": None, "ci_high": 0.04},
        },
        srm_p_value=0.4,
        decision="ship",
        reason="breadth up",
        user_fallbacks=fallbacks,
    )
    return GenerationRecord(
        generation=2,
        parent="gen1-rs",
        candidate="gen2-rs",
        recipe="rs+sft",
        recipe_name="rs",
        model_path="artifacts/gen2/models/rs",
        traffic_experiment_id="gen2-traffic",
        ab_experiment_id=None if gated else "gen2-ab",
        offline={"rm_win_rate": 0.6, "style": {"mean_words": 7.0}, "rm_win_rate_ci": [0.4, 0.7]},
        oracle=OracleSummary(
            gold={
                "candidate": 0.3,
                "parent": 0.1,
                "diff": 0.2,
                "ci_low": 0.05,
                "ci_high": 0.35,
                "p_value": 0.01,
                "n": 12,
            }
        ),
        gates=gates,
        ab=None if gated else ab,
        decision="gated" if gated else "ship",
        reason="no candidate passed" if gated else "A/B ship: breadth up",
        deployed_after="gen1-rs" if gated else "gen2-rs",
        candidates=(
            CandidateSummary(
                candidate="gen2-rs",
                recipe="rs+sft",
                model_path="artifacts/gen2/models/rs",
                passed_gates=not gated,
                gates=gates,
                rm_win_rate=0.6,
                rm_win_rate_style_controlled=0.55,
            ),
        ),
        reward_models={"naive": "artifacts/gen2/rm/naive", "naive_eval": {"gold_pearson": 0.2}},
        traffic=TrafficSummary(
            experiment_id="gen2-traffic",
            days=2,
            turns=94,
            sessions=34,
            serving_events={"blocked": 1},
            user_fallbacks=fallbacks,
        ),
    )


@pytest.mark.parametrize("gated", [False, True])
def test_typed_record_round_trips(gated: bool) -> None:
    record = typed_record(gated=gated)
    assert GenerationRecord.from_dict(record.to_dict()) == record
    # ... and through the ledger's JSON column, which is how the loop stores it.
    assert GenerationRecord.from_dict(json.loads(to_json(record.to_dict()))) == record


def test_recorded_generations_read_and_write_back_exactly() -> None:
    """The recorded dashboard run's records (written before the oracle's view existed, so
    without an ``oracle`` key) come back from ``to_dict`` key for key, and through the
    ledger and the report's writer byte for byte."""
    text = RECORDING.read_text(encoding="utf-8")
    document = json.loads(text)
    records = [GenerationRecord.from_dict(r) for r in document["generations"]]
    assert [r.to_dict() for r in records] == document["generations"]
    assert not any(r.oracle_recorded for r in records)
    # generations.json holds what the ledger stored (sorted keys), indented by the report.
    stored = [json.loads(to_json(r.to_dict())) for r in records]
    written = json.dumps({**document, "generations": stored}, indent=2, allow_nan=False)
    assert written + "\n" == text


def test_readers_see_the_recorded_values() -> None:
    """Attribute access reads the same values as the nested keys it replaces."""
    for raw in recorded()["generations"]:
        record = GenerationRecord.from_dict(raw)
        assert (
            record.offline["rm_win_rate_style_controlled"]
            == (raw["offline"]["rm_win_rate_style_controlled"])
        )
        breadth = raw["ab"]["metrics"]["breadth"]
        assert record.ab is not None
        assert record.ab.lift("breadth") == Interval(
            breadth["lift"], breadth["ci_low"], breadth["ci_high"]
        )
        assert record.ab.lift("no such metric") is None
        assert record.traffic.user_fallbacks == raw["traffic"]["user_fallbacks"]
        assert [c.candidate for c in record.candidates] == [
            c["candidate"] for c in raw["candidates"]
        ]
        assert record.gold_vs_parent is None
    assert typed_record().gold_vs_parent == Interval(0.2, 0.05, 0.35)


def test_report_reads_typed_and_stored_records_alike() -> None:
    records = [typed_record(), typed_record(gated=True)]
    stored = [json.loads(to_json(r.to_dict())) for r in records]
    assert text_table(records) == text_table(stored)
    shipped, gated = table_rows(records)
    assert shipped["gold vs parent [95% CI]"] == "+0.20 [+0.05, +0.35]"
    assert shipped["depth lift [95% CI]"] == "-2.0% [-, +4.0%]"
    assert gated["breadth lift [95% CI]"] == "-"
    assert gated["gates"] == "steerability?"


def broken(path: str, how: str) -> dict[str, Any]:
    """The first recorded generation with the field at ``path`` (dotted) removed or
    replaced by a list."""
    record = copy.deepcopy(recorded()["generations"][0])
    *parents, last = path.split(".")
    block = record
    for key in parents:
        block = block[int(key)] if isinstance(block, list) else block[key]
    if how == "remove":
        del block[last]
    else:
        block[last] = ["not", "an", "object"]
    return record


@pytest.mark.parametrize(
    ("path", "how", "message"),
    [
        ("offline", "remove", "generation record 1 has no field 'offline'"),
        ("ab.metrics", "remove", "generation record 1.ab has no field 'metrics'"),
        ("traffic.days", "remove", "generation record 1.traffic has no field 'days'"),
        (
            "candidates.1.passed_gates",
            "remove",
            "generation record 1.candidates[1] has no field 'passed_gates'",
        ),
        ("ab", "replace", "generation record 1.ab must be a JSON object, got list"),
    ],
)
def test_malformed_record_names_the_field_and_the_fix(path: str, how: str, message: str) -> None:
    with pytest.raises(RecordError) as err:
        GenerationRecord.from_dict(broken(path, how))
    assert message in str(err.value)
    assert "`flywheel run SCENARIO --out NEW_DIR`" in str(err.value)


def test_unknown_fields_and_values_are_refused() -> None:
    record = recorded()["generations"][0]
    with pytest.raises(RecordError, match="unknown field 'oracle_recorded'"):
        GenerationRecord.from_dict({**record, "oracle_recorded": False})
    with pytest.raises(RecordError, match=r"decision must be one of .*got 'maybe'"):
        GenerationRecord.from_dict({**record, "decision": "maybe"})
    with pytest.raises(RecordError, match=r"gates\[0\] must be a gate object with at least"):
        GenerationRecord.from_dict({**record, "gates": [{"passed": True}]})
    with pytest.raises(RecordError, match="ab and ab_experiment_id must both be set"):
        GenerationRecord.from_dict({**record, "ab_experiment_id": None})


def test_dashboard_names_a_malformed_record(tmp_path: Path) -> None:
    """The dashboards read records through ``from_dict``: a malformed one is the page's error
    (``RunUnavailable``) with the field in its message, not a half-filled table."""
    from dashboards import data

    document = recorded()
    document["generations"][1] = broken("ab.metrics", "remove")
    (tmp_path / JSON_FILE).write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(data.RunUnavailable) as err:
        data.generations(str(tmp_path))
    assert err.value.title == "generations.json holds a malformed generation record"
    assert "generation record 1.ab has no field 'metrics'" in str(err.value)
