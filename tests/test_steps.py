"""The loop's typed step outputs (``flywheel.steps``): every output the recorded run's
ledger holds reads back and writes back exactly (old runs resume, step fingerprints that
take earlier outputs as inputs stay the same), and a malformed output is a clear error
naming the step's field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from fixtures.dashboard_replay import DB_FILE, replay_run

from flywheel.candidates import CandidateTraining
from flywheel.gates import Gate
from flywheel.persist import to_json
from flywheel.records import (
    GenerationRecord,
    OfflineSummary,
    OracleSummary,
    RecordError,
    TrafficSummary,
)
from flywheel.steps import (
    FIX,
    ABStep,
    CuratedData,
    OfflineOutput,
    RewardModelEval,
    RewardModels,
    TrafficTotals,
    TrainedCandidate,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The reader of each step's outputs, by step name (``candidate:R`` / ``offline:R`` by kind);
# the same readers ``FlywheelRun.run_generation`` passes to its steps.
READERS: dict[str, Callable[[Any], Any]] = {
    "collect": TrafficTotals.from_dict,
    "curate": CuratedData.from_dict,
    "reward_models": RewardModels.from_dict,
    "candidate": TrainedCandidate.from_dict,
    "offline": OfflineOutput.from_dict,
    "ab": ABStep.from_dict,
    "decide": GenerationRecord.from_dict,
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], Any]:
    """The recorded dashboard run's step outputs, by (generation, step)."""
    run_dir = replay_run(tmp_path_factory.mktemp("steps"), generations=False, artifacts=False)
    con = duckdb.connect(str(run_dir / DB_FILE), read_only=True)
    try:
        rows = con.execute("SELECT generation, step, outputs FROM steps").fetchall()
    finally:
        con.close()
    return {(g, s): json.loads(o) for g, s, o in rows}


def test_every_recorded_step_output_reads_and_writes_back_exactly(recorded) -> None:
    kinds = {step.partition(":")[0] for _, step in recorded}
    assert kinds == set(READERS), kinds  # the recording has every kind of step
    for (generation, step), outputs in recorded.items():
        typed = READERS[step.partition(":")[0]](outputs)
        assert typed.to_dict() == outputs, (generation, step)
        # the ledger's JSON column: what a fingerprint over these outputs reads
        assert to_json(typed.to_dict()) == to_json(outputs), (generation, step)
        assert READERS[step.partition(":")[0]](json.loads(to_json(typed.to_dict()))) == typed


def test_typed_outputs_read_the_recorded_values(recorded) -> None:
    """Attribute access reads the values the nested keys it replaces read."""
    collect = recorded[1, "collect"]
    totals = TrafficTotals.from_dict(collect)
    assert totals.turns == collect["turns"] and totals.summary() == TrafficSummary.from_dict(
        {k: v for k, v in collect.items() if k != "simulated_wall_s"}
    )
    rms = RewardModels.from_dict(recorded[1, "reward_models"])
    assert rms.path("naive") == recorded[1, "reward_models"]["naive"]
    assert rms.path("style_controlled") == recorded[1, "reward_models"]["style_controlled"]
    assert rms.naive_eval.gold_pearson == recorded[1, "reward_models"]["naive_eval"]["gold_pearson"]
    curate = CuratedData.from_dict(recorded[1, "curate"])
    assert (curate.path("train"), curate.path("held_out")) == (
        recorded[1, "curate"]["train"],
        recorded[1, "curate"]["held_out"],
    )
    raw = recorded[1, "offline:violate"]
    offline = OfflineOutput.from_dict(raw)
    assert offline.passed is raw["passed"] is False
    assert (
        offline.offline.rm_win_rate_style_controlled
        == (raw["offline"]["rm_win_rate_style_controlled"])
    )
    assert offline.offline.rm_win_rate_ci == tuple(raw["offline"]["rm_win_rate_ci"])
    assert offline.offline.ifbench_prompts == raw["offline"]["ifbench_prompts"]
    assert offline.gates == tuple(Gate(**g) for g in raw["gates"])
    assert offline.oracle is None and not offline.oracle_recorded  # recorded before the oracle
    ab = ABStep.from_dict(recorded[1, "ab"])
    assert ab.result is not None and not ab.skipped
    assert ab.result.summary().user_fallbacks == recorded[1, "ab"]["simulation"]["user_fallbacks"]
    trained = TrainedCandidate.from_dict(recorded[1, "candidate:plain"])
    assert trained.training.examples == recorded[1, "candidate:plain"]["examples"]
    assert trained.training.grpo is None  # an rs+sft candidate


def offline_summary(*, ifbench: bool) -> OfflineSummary:
    """An offline block with a metric that could not be measured (NaN)."""
    measured = {"ifbench_following": 0.5, "parent_ifbench_following": 0.75, "ifbench_prompts": 11}
    return OfflineSummary(
        rm_win_rate=np.float64(0.5), rm_win_rate_ci=(0.25, 0.75),
        rm_win_rate_style_controlled=float("nan"), rm_win_rate_style_adjusted=0.5,
        instruction_following=0.5, violation_rate=0.0, parent_instruction_following=0.25,
        parent_violation_rate=0.0, style={"emoji_rate": 0.0}, parent_style={"emoji_rate": 0.5},
        unsafe_rate=0.0, parent_unsafe_rate=0.0, style_regression={"verdict": "pass"},
        steerability_by_character=({"group": "(overall)", "following_rate": 0.5},),
        **(measured if ifbench else {}),
    )  # fmt: skip


def offline_output(*, oracle: bool, ifbench: bool) -> OfflineOutput:
    gate = Gate.decided("safety", "inconclusive", value=float("nan"), threshold=0.1, reason="r")
    return OfflineOutput(
        offline=offline_summary(ifbench=ifbench),
        oracle=OracleSummary({"diff": 0.2, "ci_low": 0.1, "ci_high": 0.3}) if oracle else None,
        gates=(Gate.decided("rm_win_rate", "pass", value=0.5, threshold=0.4, reason="r"), gate),
        replies="artifacts/gen1/offline/r_replies.jsonl",
        ifbench_replies="artifacts/gen1/offline/r_ifbench.jsonl" if ifbench else None,
    )


@pytest.mark.parametrize("oracle", [True, False])
@pytest.mark.parametrize("ifbench", [True, False])
def test_offline_output_is_the_json_the_loop_stored(oracle: bool, ifbench: bool) -> None:
    """Strict JSON (NaN as null), ``ifbench_replies`` only with the gate on, an ``oracle``
    key (null without a measured view), and ``passed`` from the gates."""
    output = offline_output(oracle=oracle, ifbench=ifbench)
    stored = output.to_dict()
    assert stored["offline"]["rm_win_rate_style_controlled"] is None
    assert stored["gates"][1]["value"] is None and stored["gates"][1]["verdict"] == "inconclusive"
    assert stored["passed"] is False and not output.passed
    assert ("ifbench_replies" in stored) is ifbench
    assert ("ifbench_prompts" in stored["offline"]) is ifbench
    assert type(stored["offline"]["rm_win_rate"]) is float  # numpy scalars made plain
    assert stored["oracle"] == (
        {"gold": {"diff": 0.2, "ci_low": 0.1, "ci_high": 0.3}} if oracle else None
    )
    read = OfflineOutput.from_dict(json.loads(to_json(stored)))
    assert read.to_dict() == stored and read.oracle_recorded


def test_ab_step_skipped_and_candidate_training_round_trip() -> None:
    assert ABStep(None).to_dict() == {"skipped": True}
    assert ABStep.from_dict({"skipped": True}) == ABStep(None) and ABStep(None).skipped
    grpo = {"recipe": {"max_steps": 1}, "multiturn": {"users": 2}}
    training = CandidateTraining(
        examples=2, reward_names=("steerability",), weights={"steerability": 1.0},
        trainer_metrics={"global_step": 1}, grpo=grpo,
    )  # fmt: skip
    trained = TrainedCandidate(model_path="artifacts/gen1/models/g", training=training)
    assert trained.to_dict() == {
        "model_path": "artifacts/gen1/models/g", "examples": 2, "reward_names": ["steerability"],
        "weights": {"steerability": 1.0}, "trainer_metrics": {"global_step": 1}, "grpo": grpo,
    }  # fmt: skip
    assert TrainedCandidate.from_dict(json.loads(to_json(trained.to_dict()))) == trained
    assert "grpo" not in CandidateTraining(1, (), {}, {}).to_dict()


def broken(outputs: dict[str, Any], path: str, value: Any = None) -> dict[str, Any]:
    """``outputs`` with the field at dotted ``path`` removed (``value`` None) or replaced."""
    outputs = copy.deepcopy(outputs)
    *parents, last = path.split(".")
    block = outputs
    for key in parents:
        block = block[int(key)] if isinstance(block, list) else block[key]
    if value is None:
        del block[last]
    else:
        block[last] = value
    return outputs


@pytest.mark.parametrize(
    ("step", "path", "value", "message"),
    [
        ("collect", "turns", None, "collect has no field 'turns'"),
        ("curate", "n_train", None, "curate has no field 'n_train'"),
        (
            "reward_models",
            "naive_eval.gold_pearson",
            None,
            "reward_models.naive_eval has no field 'gold_pearson'",
        ),
        ("reward_models", "naive_eval", [1], "reward_models.naive_eval must be a JSON object"),
        ("candidate:plain", "model_path", None, "must be a JSON object with 'model_path'"),
        ("candidate:plain", "examples", None, "candidate has no field 'examples'"),
        ("candidate:plain", "reward_names", "rm", "candidate.reward_names must be a JSON list"),
        ("offline:plain", "passed", None, "offline has no field 'passed'"),
        ("offline:plain", "passed", "no", "offline.passed is 'no' but its gates say True"),
        ("offline:plain", "gates.0.verdict", "maybe", "offline.gates[0] is no gate verdict"),
        ("offline:plain", "gates.0.name", None, "offline.gates[0] is no gate verdict"),
        ("offline:plain", "replies", None, "offline has no field 'replies'"),
        ("ab", "simulation.days", None, "ab.simulation has no field 'days'"),
        ("ab", "files", None, "ab has no field 'files'"),
    ],
)
def test_malformed_step_output_names_the_field_and_the_fix(
    recorded, step: str, path: str, value: Any, message: str
) -> None:
    outputs = broken(recorded[1, step], path, value)
    with pytest.raises(RecordError) as err:
        READERS[step.partition(":")[0]](outputs)
    assert message in str(err.value) and FIX in str(err.value)


def test_unknown_fields_are_refused(recorded) -> None:
    with pytest.raises(RecordError, match=r"curate has unknown field 'n_test' \(known: train,"):
        CuratedData.from_dict({**recorded[1, "curate"], "n_test": 3})
    with pytest.raises(RecordError, match="unknown field 'grpo_settings'"):
        TrainedCandidate.from_dict({**recorded[1, "candidate:plain"], "grpo_settings": {}})
    with pytest.raises(RecordError, match=r"ab is skipped but has fields \['decision'\]"):
        ABStep.from_dict({"skipped": True, "decision": "ship"})
    with pytest.raises(RecordError, match="unknown field 'oracle_recorded'"):
        OfflineOutput.from_dict({**recorded[1, "offline:plain"], "oracle_recorded": False})
    with pytest.raises(RecordError, match="oracle_recorded is False but an oracle is given"):
        OfflineOutput(
            offline=offline_summary(ifbench=False),
            oracle=OracleSummary({}),
            gates=(),
            replies="r",
            oracle_recorded=False,
        )


def test_recorded_offline_blocks_read_and_write_back_exactly() -> None:
    """Every offline block of the recorded ``generations.json`` (the shape the loop has
    always written) reads as an OfflineSummary and writes back key for key."""
    document = json.loads((FIXTURES / "dashboard_run" / "generations.json").read_text())
    blocks = [g["offline"] for g in document["generations"]]
    assert blocks and all(OfflineSummary.from_dict(b).to_dict() == b for b in blocks)


def test_offline_summary_refuses_a_partial_ifbench_block_and_a_bad_interval() -> None:
    block = offline_summary(ifbench=True).to_dict()
    with pytest.raises(RecordError, match=r"are set together .* got ifbench_following = 0.5"):
        OfflineSummary.from_dict({k: v for k, v in block.items() if k != "ifbench_prompts"})
    with pytest.raises(RecordError, match=r"offline.rm_win_rate_ci must be \[low, high\]"):
        OfflineSummary.from_dict({**block, "rm_win_rate_ci": [0.1]})
    with pytest.raises(RecordError, match="offline has no field 'style'"):
        OfflineSummary.from_dict({k: v for k, v in block.items() if k != "style"})


def test_a_reward_model_eval_summarises_the_rm_eval_report() -> None:
    report = {
        "gold_correlation": {"turns": {"pearson_r": 0.3}, "sessions": {"pearson_r": 0.1}},
        "max_abs_style_r": 0.2,
        "n_train_rows": 55,
        "other": "left out",
    }
    assert RewardModelEval.from_report(report) == RewardModelEval(0.3, 0.2, 55)


def test_the_loop_names_the_step_whose_stored_output_is_malformed(tmp_path) -> None:
    """A resumed run reads each finished step's stored outputs through its record: a
    malformed one stops the run with the generation, the step and the field."""
    from flywheel.ledger import Ledger
    from flywheel.loop import FlywheelRun
    from flywheel.scenario import Scenario
    from flywheel.store import RunStore

    run = FlywheelRun(Scenario(), tmp_path, progress=False)
    curated = CuratedData("train.jsonl", "held_out.jsonl", 9, 6, 3, {"unsafe": 0}, 1, 0)
    with RunStore(tmp_path) as store:
        run.store, run.ledger = store, Ledger(store)  # what FlywheelRun.run opens
        step = {"config": {}, "inputs": {}, "read": CuratedData.from_dict}
        assert run._step(1, "curate", work=lambda seed: curated, **step) == curated
        store._con.execute(
            "UPDATE steps SET outputs = json_object('train', 'train.jsonl') WHERE step = 'curate'"
        )
        with pytest.raises(RecordError, match=r"generation 1, step 'curate' of .*: curate has no"):
            run._step(1, "curate", work=lambda seed: curated, **step)
