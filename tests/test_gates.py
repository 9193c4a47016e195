"""Offline gates that can fail: the power of their tests against references, and the
three-valued verdicts (pass / fail / inconclusive) on paired samples of known size."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flywheel.gate_power import (
    allowance_power,
    binomial_less_p,
    binomial_less_power,
    mcnemar_greater,
    mcnemar_power,
    mcnemar_sample_size,
    paired_rate_drop_p,
    paired_rate_power,
    rate_difference_sd,
    worst_case_discordance,
)
from flywheel.gates import (
    Gate,
    OfflineReport,
    rm_win_rate_gate,
    safety_gate,
    steerability_gate,
)
from flywheel.scenario import SCENARIOS_DIR, GatesConfig, ScenarioWarning, load_scenario
from rewards.steerability import steerability


# ----------------------------------------------------------------------------- power
def test_mcnemar_greater_is_half_of_statsmodels_exact_two_sided() -> None:
    from statsmodels.stats.contingency_tables import mcnemar

    x = np.array([1] * 9 + [0] * 2 + [1] * 10 + [0] * 10, dtype=bool)
    y = np.array([0] * 9 + [1] * 2 + [1] * 10 + [0] * 10, dtype=bool)
    table = [[10, 9], [2, 10]]
    assert mcnemar_greater(x, y) == pytest.approx(mcnemar(table, exact=True).pvalue / 2)
    assert mcnemar_greater(y, x) > 0.9


def test_exact_mcnemar_power_matches_a_seeded_simulation_of_statsmodels_test() -> None:
    from statsmodels.stats.contingency_tables import mcnemar

    n, effect, discordance, alpha = 60, 0.2, 0.4, 0.05
    rng = np.random.default_rng(0)
    rejected, reps = 0, 3000
    for _ in range(reps):
        u = rng.random(n)
        up = int(np.sum(u < (discordance + effect) / 2))
        down = int(np.sum((u >= (discordance + effect) / 2) & (u < discordance)))
        if up > down:
            p = mcnemar([[0, up], [down, 0]], exact=True).pvalue / 2
            rejected += p < alpha
    simulated = rejected / reps
    exact = mcnemar_power(n, effect, discordance, alpha)
    assert exact == pytest.approx(simulated, abs=3 * math.sqrt(exact * (1 - exact) / reps))


@pytest.mark.parametrize("effect", [0.1, 0.2, 0.3])
def test_mcnemar_sample_size_is_near_connors_formula(effect: float) -> None:
    """Connor (1987): n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2, one-sided."""
    psi = worst_case_discordance(effect)
    za, zb = stats.norm.isf(0.05), stats.norm.isf(0.2)
    connor = (za * math.sqrt(psi) + zb * math.sqrt(psi - effect**2)) ** 2 / effect**2
    exact = mcnemar_sample_size(effect, psi, 0.05, 0.8)
    assert (
        mcnemar_power(exact, effect, psi, 0.05) >= 0.8 > mcnemar_power(exact - 1, effect, psi, 0.05)
    )
    assert exact == pytest.approx(connor, rel=0.15)


def test_binomial_and_allowance_power_equal_their_enumerated_definitions() -> None:
    n, bar, rate, alpha = 37, 0.5, 0.3, 0.05
    enumerated = sum(
        stats.binom.pmf(k, n, rate) for k in range(n + 1) if binomial_less_p(k, n, bar) < alpha
    )
    assert binomial_less_power(n, bar, rate, alpha) == pytest.approx(enumerated)
    assert binomial_less_power(n, bar, rate, alpha) >= 0.8
    over = sum(stats.binom.pmf(k, 56, 0.1) for k in range(57) if k / 56 > 0.02)
    assert allowance_power(56, 0.02, 0.1) == pytest.approx(over)


# ----------------------------------------------------------------------------- verdicts
def steer_report(deployed_follows: list[bool], candidate_follows: list[bool]) -> OfflineReport:
    """An offline report of a steerability benchmark (four characters, no violations)."""
    n = len(deployed_follows)
    names = [f"c{i % 4}" for i in range(n)]

    def table(follows: list[bool]) -> pd.DataFrame:
        checks = pd.DataFrame({"character": names, "follows_all": follows, "violates_any": False})
        return steerability(checks).table

    pairs = pd.DataFrame({
        "character": names, "candidate_follows": candidate_follows,
        "deployed_follows": deployed_follows, "candidate_violates": False,
        "deployed_violates": False,
    })  # fmt: skip
    return OfflineReport(
        rm_win_rate=0.5, rm_win_rate_ci=(0.0, 1.0), rm_win_rate_style_controlled=0.5,
        steerability=table(candidate_follows), parent_steerability=table(deployed_follows),
        style_regression=None, style={}, parent_style={}, unsafe_rate=0.0,
        parent_unsafe_rate=0.0, replies=pd.DataFrame(), steerability_pairs=pairs,
    )  # fmt: skip


def halves(n: int) -> list[bool]:
    return [i % 2 == 0 for i in range(n)]


def test_paired_rate_test_and_power_match_statsmodels_and_a_seeded_simulation() -> None:
    """The IFBench gate's test: per-prompt follow rates over k replies of each model."""
    from statsmodels.stats.weightstats import DescrStatsW

    n, k, p, q, trials = 12, 4, 0.6, 0.35, 4000
    rng = np.random.default_rng(0)
    deployed = rng.binomial(k, p, size=(trials, n)) / k
    candidate = rng.binomial(k, q, size=(trials, n)) / k
    for a, b in zip(deployed[:5], candidate[:5], strict=True):
        reference = DescrStatsW(a - b).ttest_mean(alternative="larger")[1]
        assert paired_rate_drop_p(a, b) == pytest.approx(reference)
    diff = deployed - candidate
    assert rate_difference_sd(p, q, k) == pytest.approx(diff.std(ddof=1), rel=0.02)
    pvalues = stats.ttest_rel(deployed, candidate, axis=1, alternative="greater").pvalue
    power = paired_rate_power(n, k, p, p - q, 0.05, 0.8)
    assert abs(np.mean(pvalues < 0.05) - power.power) < 0.03
    assert paired_rate_power(power.n_needed, k, p, p - q, 0.05, 0.8).enough
    assert not paired_rate_power(power.n_needed - 1, k, p, p - q, 0.05, 0.8).enough
    # No spread to test: every prompt fell alike is a fall, none moved is none.
    assert paired_rate_drop_p([1.0, 1.0], [0.5, 0.5]) == 0.0
    assert paired_rate_drop_p([0.5, 0.5], [0.5, 0.5]) == 1.0


def test_24_pairs_cannot_see_a_20_point_drop_so_steerability_is_inconclusive() -> None:
    config = GatesConfig()  # max_following_drop 0.20, power 0.8 at alpha 0.05
    gate = steerability_gate(steer_report(halves(24), halves(24)), config)
    assert gate.verdict == "inconclusive" and not gate.passed
    assert gate.n == 24 and gate.power < 0.5 and gate.n_needed == 83
    assert gate.reason.startswith(
        "inconclusive: 24 paired prompts detect a 0.20 drop (and a 0.20 violation rise) with "
        "power 0.3"
    )
    assert "needs n >= 83: raise gates.steerability.prompts_per_character to 21" in gate.reason


def test_96_unchanged_pairs_pass_and_a_real_drop_fails() -> None:
    config = GatesConfig()
    same = steerability_gate(steer_report(halves(96), halves(96)), config)
    assert same.verdict == "pass" and same.passed and same.power >= 0.8
    # The candidate stops following on a quarter of the prompts the deployed model followed.
    dropped = [f and i % 8 != 0 for i, f in enumerate(halves(96))]
    fell = steerability_gate(steer_report(halves(96), dropped), config)
    assert fell.verdict == "fail" and "following fell significantly" in fell.reason


def test_a_drop_that_cannot_happen_needs_no_power() -> None:
    """From a following rate of 0.1 a 0.2 fall cannot happen: nothing to miss."""
    from flywheel.gate_power import paired_power

    cannot = paired_power(4, 0.1, 0.2, -1, 0.05, 0.8)
    assert cannot.power == 1.0 and not cannot.possible and cannot.enough
    assert not paired_power(4, 0.5, 0.2, -1, 0.05, 0.8).enough


def rm_report(wins: int, losses: int) -> OfflineReport:
    c = [1.0] * wins + [0.0] * losses
    d = [0.0] * wins + [1.0] * losses
    replies = pd.DataFrame({"set": "logged", "candidate_rm": c, "deployed_rm": d})
    base = steer_report([False] * 4, [False] * 4)
    n = wins + losses
    return replace(base, rm_win_rate=wins / n, replies=replies)


def test_rm_win_rate_gate_is_three_valued() -> None:
    config = GatesConfig(eval_prompts=10)  # bar 0.5, margin 0.2
    small = rm_win_rate_gate(rm_report(6, 4), config)
    assert small.verdict == "inconclusive" and "raise gates.eval_prompts to 37" in small.reason
    # Asked for 48 contexts, curation held out 10: the fix is more held-out logs.
    short = rm_win_rate_gate(rm_report(6, 4), config.model_copy(update={"eval_prompts": 48}))
    assert short.verdict == "inconclusive"
    assert "curation held out only 10 logged contexts (gates.eval_prompts = 48)" in short.reason
    assert "raise gates.eval_prompts" not in short.reason
    assert rm_win_rate_gate(rm_report(22, 18), config).verdict == "pass"
    low = rm_win_rate_gate(rm_report(8, 32), config)
    assert low.verdict == "fail" and "significantly below 0.50" in low.reason


def safety_report(unsafe: int, n: int) -> OfflineReport:
    replies = pd.DataFrame({"candidate_unsafe": [True] * unsafe + [False] * (n - unsafe)})
    base = steer_report([False] * 4, [False] * 4)
    return replace(base, replies=replies, unsafe_rate=unsafe / n)


def test_safety_gate_says_inconclusive_when_too_few_replies_could_show_harm() -> None:
    config = GatesConfig()  # max 2%, must catch 10%
    few = safety_gate(safety_report(0, 8), config)
    assert few.verdict == "inconclusive" and f"needs n >= {few.n_needed}" in few.reason
    assert safety_gate(safety_report(0, 60), config).verdict == "pass"
    assert safety_gate(safety_report(3, 60), config).verdict == "fail"


def test_gate_records_without_a_verdict_still_load() -> None:
    old = {"name": "safety", "passed": False, "value": 0.1, "threshold": 0.02, "reason": "x"}
    assert Gate(**old).verdict == "fail"
    new = Gate.decided("safety", "inconclusive", value=0.0, threshold=0.02, reason="y")
    assert set(old) < set(new.to_dict()) and Gate(**new.to_dict()) == new
    with pytest.raises(ValueError, match="contradicts verdict"):
        Gate(**{**old, "verdict": "pass"})


# ----------------------------------------------------------------------------- scenarios
def test_quickstart_steerability_benchmark_has_the_stated_power() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScenarioWarning)
        scenario = load_scenario(SCENARIOS_DIR / "quickstart.toml")
    steer = scenario.gates.steerability
    n = steer.prompts_per_character * 4
    drop = steer.max_following_drop
    power = mcnemar_power(n, drop, worst_case_discordance(drop), scenario.gates.style.alpha)
    assert n == 96 and drop == 0.2 and power >= scenario.gates.min_power


def test_validator_says_the_sample_an_underpowered_gate_needs(tmp_path) -> None:
    text = (SCENARIOS_DIR / "quickstart.toml").read_text(encoding="utf-8")
    path = tmp_path / "small.toml"
    path.write_text(
        text.replace(
            'characters_dir = "characters"', f'characters_dir = "{SCENARIOS_DIR / "characters"}"'
        ).replace("prompts_per_character = 24", "prompts_per_character = 6"),
        encoding="utf-8",
    )
    with pytest.warns(
        ScenarioWarning,
        match=r"24 paired prompts .* needs n >= 86: raise "
        r"gates.steerability.prompts_per_character to 22",
    ):
        load_scenario(path)


# ----------------------------------------------------------------------------- offline block
OFFLINE_KEYS = [
    "rm_win_rate", "rm_win_rate_ci", "rm_win_rate_style_controlled",
    "rm_win_rate_style_adjusted", "instruction_following", "violation_rate",
    "parent_instruction_following", "parent_violation_rate", "style", "parent_style",
    "unsafe_rate", "parent_unsafe_rate", "style_regression", "steerability_by_character",
]  # fmt: skip
IFBENCH_KEYS = ["ifbench_following", "parent_ifbench_following", "ifbench_prompts"]


def test_offline_summary_is_the_generation_records_offline_block() -> None:
    """``OfflineReport.summary()`` holds what the report measured, and its ``to_dict`` is the
    ``offline`` block the loop stores: the ifbench_* keys only where the IFBench gate ran."""
    from flywheel.persist import to_json
    from flywheel.records import OfflineSummary
    from flywheel.style_regression import StyleRegressionResult

    suite = StyleRegressionResult(
        checks=(), raw_win_rate=0.75, style_controlled_win_rate=0.5,
        style_adjusted_win_rate=0.625, glm_coefficients={"emoji_rate": 0.1}, n=8,
        passed=True, reason="no significant style shift",
    )  # fmt: skip
    report = replace(
        steer_report([True, False, True, True], [True, True, True, False]),
        style_regression=suite, style={"emoji_rate": 0.25}, parent_style={"emoji_rate": 0.0},
    )  # fmt: skip
    summary = report.summary()
    assert (summary.instruction_following, summary.parent_instruction_following) == (0.75, 0.75)
    assert summary.rm_win_rate_style_adjusted == 0.625 and not summary.ifbench_measured
    block = summary.to_dict()
    assert list(block) == OFFLINE_KEYS
    assert block["style_regression"] == suite.to_dict()
    assert block["steerability_by_character"] == report.steerability.to_dict(orient="records")
    follows = pd.DataFrame({
        "key": [1, 1, 2, 2], "candidate_follows": [True, False, True, True],
        "deployed_follows": [True, True, True, True],
    })  # fmt: skip
    gated = replace(report, ifbench=follows).summary()
    assert list(gated.to_dict()) == OFFLINE_KEYS + IFBENCH_KEYS
    assert (gated.ifbench_following, gated.parent_ifbench_following) == (0.75, 1.0)
    assert gated.ifbench_prompts == 2
    for typed in (summary, gated):  # as the ledger stores and the loop reads it back
        stored = json.loads(to_json(typed.to_dict()))
        assert OfflineSummary.from_dict(stored).to_dict() == stored
