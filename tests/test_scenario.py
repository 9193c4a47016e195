"""Scenario files: the shipped ones load, and every bad field is an error naming the field
path, the value seen and the fix."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import pytest

from flywheel.ab import AnalysisConfig
from flywheel.persist import to_json
from flywheel.scenario import (
    HELDOUT_CHARACTERS_DIR,
    SCENARIOS_DIR,
    Scenario,
    ScenarioError,
    check_heldout,
    load_scenario,
)
from flywheel.store import fingerprint
from rewards.rm import LLMConfig, MiniLMConfig
from training.curation import CurationConfig

SHIPPED = ("quickstart", "artifact_trap", "gpu_large", "seven_day")


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenarios_load(name: str) -> None:
    scenario = load_scenario(SCENARIOS_DIR / f"{name}.toml")
    assert scenario.name == name
    assert scenario.world.characters_dir.is_dir()
    assert scenario.gates.steerability.characters_dir == HELDOUT_CHARACTERS_DIR


def test_quickstart_tests_its_candidate_on_twins() -> None:
    scenario = load_scenario(SCENARIOS_DIR / "quickstart.toml")
    assert scenario.generations >= 1 and scenario.traffic.design == "twins"
    assert scenario.policy.model == "smollm2" and scenario.policy.backend == "hf_engine"


def test_artifact_trap_has_a_naive_and_a_mitigated_recipe() -> None:
    scenario = load_scenario(SCENARIOS_DIR / "artifact_trap.toml")
    recipes = {r.name: r for r in scenario.recipes}
    assert recipes["naive"].reward_model == "naive"
    assert recipes["naive"].artifact_penalty_weight == 0
    assert recipes["mitigated"].reward_model == "style_controlled"
    assert recipes["mitigated"].artifact_penalty_weight > 0
    assert scenario.world.gold.like_emoji_appeal > 0 and scenario.world.gold.like_length_appeal > 0


def test_gpu_scenario_switches_engines_by_config() -> None:
    scenario = load_scenario(SCENARIOS_DIR / "gpu_large.toml")
    assert scenario.policy.backend == "vllm"
    assert scenario.world.user_llm.policy.backend == "openai"
    grpo = next(r for r in scenario.recipes if r.kind == "grpo")
    assert grpo.trainer_file is not None and grpo.trainer_file.name == "grpo_vllm.yaml"


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    message = error_of(tmp_path, "generations = 2\n[gates]\nmin_rm_winrate = 0.6\n")
    assert "scenario.gates.min_rm_winrate = 0.6" in message
    assert "unknown key" in message


def test_bad_value_names_path_value_and_fix(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[[recipes]]\nname = "x"\nkind = "ppo"\n')
    line = next(m for m in message.splitlines() if "recipes.0.kind" in m)
    assert "'ppo'" in line and "rs+sft" in line and "fix:" in line


def test_nested_traffic_value(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[traffic]\ntreatment_share = 1.5\n")
    assert re.search(r"scenario\.traffic\.treatment_share = 1\.5: .*less than 1", message)


def segments(*shares: tuple[str, float]) -> str:
    """``[[world.population.segments]]`` tables with these names and shares."""
    return "".join(
        f'[[world.population.segments]]\nname = "{name}"\nshare = {share}\n'
        for name, share in shares
    )


def test_segment_shares_must_sum_to_one(tmp_path: Path) -> None:
    message = error_of(tmp_path, segments(("casual", 0.6), ("deep", 0.6)))
    line = next(m for m in message.splitlines() if "scenario.world.population" in m)
    assert "segments[*].share must sum to 1" in line
    assert "casual 0.6 + deep 0.6 = 1.2" in line
    assert "fix:" in line and "casual 0.5, deep 0.5" in line
    assert "= 0.9" in error_of(tmp_path, segments(("casual", 0.5), ("deep", 0.4)))
    # Thirds written to seven digits are float dust away from 1, not a mistake.
    thirds = segments(("a", 0.3333333), ("b", 0.3333333), ("c", 0.3333334))
    scenario = load_scenario(write(tmp_path, thirds, "thirds.toml"))
    assert [s.name for s in scenario.world.population.segments] == ["a", "b", "c"]


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    message = error_of(tmp_path, "generations = 0\nseed = -1\n")
    assert "scenario.generations = 0" in message and "scenario.seed = -1" in message


def test_trainer_fields_must_belong_to_the_recipes_trl_config(tmp_path: Path) -> None:
    text = '[[recipes]]\nname = "g"\nkind = "grpo"\ntrainer = { num_generatons = 4 }\n'
    message = error_of(tmp_path, text)
    assert "num_generatons" in message and "GRPOConfig" in message
    ok = '[[recipes]]\nname = "g"\nkind = "grpo"\ntrainer = { num_generations = 4 }\n'
    assert load_scenario(write(tmp_path, ok, "ok.toml")).recipes[0].trainer["num_generations"] == 4


def test_trainer_file_is_checked_and_resolved(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("use_vlm: true\n")
    text = '[[recipes]]\nname = "g"\nkind = "grpo"\ntrainer_file = "bad.yaml"\n'
    message = error_of(tmp_path, text)
    assert "scenario.recipes.0.trainer_file" in message and "use_vlm" in message
    missing = '[[recipes]]\nname = "g"\nkind = "grpo"\ntrainer_file = "nope.yaml"\n'
    assert "no such file" in error_of(tmp_path, missing)


def test_analysis_and_curation_settings_are_validated(tmp_path: Path) -> None:
    assert "analysis" in error_of(tmp_path, "[analysis]\nalpah = 0.1\n")
    assert "traffic.treatment_share" in error_of(tmp_path, "[analysis]\ntreatment_share = 0.5\n")
    message = error_of(tmp_path, "[curation]\nheld_out_share = 1.5\n")
    assert "scenario.curation" in message and "held_out_share" in message and "1.5" in message
    message = error_of(tmp_path, "[reward_models]\nminilm = { hiden = 3 }\n")
    assert "hiden" in message and "MiniLMConfig" in message


def test_settings_tables_give_their_consumers_the_dataclass_configs(tmp_path: Path) -> None:
    text = (
        "[traffic]\ntreatment_share = 0.4\n[analysis]\nalpha = 0.1\ncuped = false\n"
        "[curation]\nheld_out_share = 0.25\n[reward_models]\n"
        "minilm = { max_epochs = 60 }\nllm = { max_pairs = 10 }\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a power warning of the A/B test is beside the point
        scenario = load_scenario(write(tmp_path, text))
    assert scenario.analysis.alpha == 0.1 and scenario.curation.held_out_share == 0.25
    assert scenario.analysis_config() == AnalysisConfig(alpha=0.1, cuped=False, treatment_share=0.4)
    assert scenario.curation_config() == CurationConfig(held_out_share=0.25)
    assert scenario.reward_models.minilm_config() == MiniLMConfig(max_epochs=60)
    assert scenario.reward_models.llm_config() == LLMConfig(max_pairs=10)
    assert Scenario().curation_config() == CurationConfig()


def test_settings_tables_check_each_key_and_type_at_load(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[curation]\nmin_reply_words = "two"\n')
    assert "scenario.curation.min_reply_words = 'two'" in message
    assert "valid integer" in message and "fix: Shortest reply kept, in words" in message
    message = error_of(tmp_path, '[reward_models]\nllm = { epochs = "x" }\n')
    assert "scenario.reward_models.llm.epochs = 'x'" in message and "Passes over" in message
    message = error_of(tmp_path, "[analysis]\nalpah = 0.1\n")
    assert "scenario.analysis.alpah = 0.1: unknown key" in message
    assert "one of AnalysisConfig's keys: alpha, srm_alpha" in message
    assert "treatment_share" not in message.split("keys:")[1]  # it is the traffic's
    message = error_of(tmp_path, '[analysis]\ncorrection = "holmes"\n')
    assert "scenario.analysis" in message and "'holmes' is not a statsmodels" in message


def test_a_settings_table_records_only_the_keys_its_file_set(tmp_path: Path) -> None:
    """The record (scenario and step fingerprints) is what it was while these tables were
    plain mappings, so a run started from the same file still resumes."""
    text = (
        "[analysis]\nalpha = 0.05\n[curation]\nheld_out_share = 0.25\n"
        "[reward_models]\nminilm = { max_epochs = 60, decorrelation = 0 }\n"
    )
    scenario = load_scenario(write(tmp_path, text))
    record = scenario.model_dump(mode="json")
    assert record["analysis"] == {"alpha": 0.05} and record["curation"] == {"held_out_share": 0.25}
    # A float written as an integer stays that integer, in the record and in the config.
    assert json.dumps(record["reward_models"]["minilm"]) == '{"max_epochs": 60, "decorrelation": 0}'
    assert type(scenario.reward_models.minilm_config().decorrelation) is int
    assert record["reward_models"]["llm"] == {}
    assert Scenario.model_validate(record).model_dump(mode="json") == record
    assert pickle.loads(pickle.dumps(scenario)) == scenario  # as when the tables were dicts
    step = {"curation": scenario.curation, "analysis": scenario.analysis}
    as_written = {"curation": {"held_out_share": 0.25}, "analysis": {"alpha": 0.05}}
    assert fingerprint(step) == fingerprint(as_written)
    assert to_json(step) == to_json(as_written)


def test_recipe_names_are_unique_and_some_reward_is_on(tmp_path: Path) -> None:
    dupes = '[[recipes]]\nname = "a"\nkind = "dpo"\n[[recipes]]\nname = "a"\nkind = "grpo"\n'
    assert "repeat" in error_of(tmp_path, dupes)
    nothing = (
        '[[recipes]]\nname = "a"\nkind = "dpo"\nreward_model = "none"\nsteerability_weight = 0\n'
    )
    assert "no reward" in error_of(tmp_path, nothing)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="quickstart"):
        load_scenario(tmp_path / "nope.toml")
    assert "not valid TOML" in error_of(tmp_path, "seed = = 1\n")


def test_unknown_character_names_are_errors(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[world]\ncharacters = ["Captain Mara", "Whiskers"]\n')
    assert "scenario.world.characters" in message and "'Whiskers'" in message
    assert "Dr. Whiskers" in message


def test_relative_folders_resolve_next_to_the_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[world]\ncharacters_dir = "cast"\n')
    assert f"{tmp_path / 'cast'}" in message and "no such folder" in message


def test_heldout_characters_must_be_new(tmp_path: Path) -> None:
    from sim.characters import load_characters

    world = load_characters(SCENARIOS_DIR / "characters")
    heldout = load_characters(HELDOUT_CHARACTERS_DIR)
    check_heldout(world, heldout)  # the shipped benchmark is really held out
    (tmp_path / "cast").mkdir()
    (tmp_path / "cast" / "copy.toml").write_text(
        'name = "Copycat"\npersona = "a sailor who tells stories"\n'
        "[instructions]\nmax_words = 45\nno_emoji = true\n"
    )
    with pytest.raises(ValueError, match=r"Copycat.*max_words"):
        check_heldout(world, load_characters(tmp_path / "cast"))
    text = f'[gates.steerability]\ncharacters_dir = "{tmp_path / "cast"}"\n'
    assert "reuses instruction" in error_of(tmp_path, text)


def test_derived_traffic_configs() -> None:
    scenario = Scenario()
    collect = scenario.collect_traffic(3)
    assert collect.pre_days == 0 and collect.test_days == scenario.collect.days
    assert collect.generation == 3
    assert scenario.ab_traffic(1).salt != scenario.ab_traffic(2).salt
    assert scenario.ab_traffic(2).treatment_share == scenario.traffic.treatment_share


def test_cli_reports_a_bad_scenario_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    path = write(tmp_path, "[gates]\nmin_rm_win_rate = 2\n")
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "scenario.gates.min_rm_win_rate = 2" in result.output
    assert not (tmp_path / "run").exists()


def test_hold_rates_names_known_features_of_grpo_recipes_only(tmp_path: Path) -> None:
    grpo = '[[recipes]]\nname = "g"\nkind = "grpo"\n'
    ok = load_scenario(write(tmp_path, grpo + 'hold_rates = ["emoji"]\n', "ok.toml"))
    assert ok.recipes[0].hold_rates == ["emoji"]
    message = error_of(tmp_path, grpo + 'hold_rates = ["words"]\n')
    assert "scenario.recipes.0.hold_rates" in message and "'words'" in message
    assert "'emoji'" in message  # the fix lists the features it can hold
    dpo = '[[recipes]]\nname = "d"\nkind = "dpo"\nhold_rates = ["emoji"]\n'
    message = error_of(tmp_path, dpo)
    assert "hold_rates" in message and "kind = 'grpo'" in message and "'dpo'" in message


def test_artifact_tolerance_is_one_value_or_one_per_known_feature(tmp_path: Path) -> None:
    recipe = '[[recipes]]\nname = "g"\nkind = "grpo"\n'
    ok = recipe + "artifact_tolerance = { words = 0, emoji = 1 }\n"
    assert load_scenario(write(tmp_path, ok, "ok.toml")).recipes[0].artifact_tolerance == {
        "words": 0,
        "emoji": 1,
    }
    message = error_of(tmp_path, recipe + "artifact_tolerance = { emojis = 1 }\n")
    assert "scenario.recipes.0.artifact_tolerance" in message and "emojis" in message
    assert "'emoji'" in message  # the fix lists the known features
    message = error_of(tmp_path, recipe + "artifact_tolerance = -1\n")
    assert "artifact_tolerance" in message and "-1" in message and ">= 0" in message


def test_a_standard_test_too_small_for_its_target_mde_warns(tmp_path: Path) -> None:
    from flywheel.experiment import load_scenario as load_ab_scenario
    from flywheel.scenario import ScenarioWarning

    small = "[traffic]\nn_users = 80\ntest_days = 2\ntreatment_share = 0.5\n"
    with pytest.warns(ScenarioWarning, match=r"target_mde = 0.05.*80 users x 2 test days"):
        load_scenario(write(tmp_path, small + "[analysis]\ntarget_mde = 0.05\n"))
    twins = small.replace("test_days = 2", 'test_days = 2\ndesign = "twins"')
    big = "[traffic]\nn_users = 200000\ntest_days = 7\ntreatment_share = 0.5\n"
    for quiet in (twins, big, small):  # twins, a big enough test, or no target: no warning
        target = "" if quiet is small else "[analysis]\ntarget_mde = 0.05\n"
        with warnings.catch_warnings():  # flywheel ab's loader: no offline gates to warn about
            warnings.simplefilter("error", ScenarioWarning)
            load_ab_scenario(write(tmp_path, quiet + target, name="quiet.toml"))
    with pytest.warns(ScenarioWarning, match="target_mde"):
        load_ab_scenario(write(tmp_path, small + "[analysis]\ntarget_mde = 0.05\n"))
    assert "target_mde" in error_of(tmp_path, "[analysis]\ntarget_mde = -0.1\n")


def test_the_breadth_floor_is_statsmodels_minimum_detectable_effect() -> None:
    from statsmodels.stats.power import NormalIndPower

    from flywheel.scenario import breadth_mde_floor
    from sim.population import PopulationConfig, SegmentConfig, TraitDist
    from sim.traffic import TrafficConfig
    from sim.world import WorldConfig

    p, sd = 0.6, 0.1
    segment = SegmentConfig(name="all", share=1.0, return_propensity=TraitDist(mean=p, sd=sd))
    world = WorldConfig(population=PopulationConfig(segments=[segment]))
    traffic = TrafficConfig(n_users=300, test_days=3, treatment_share=0.3,
                            weekday_factors=(1.0,) * 7)  # fmt: skip
    within = p * (1 - p) - sd**2
    effect = NormalIndPower().solve_power(
        nobs1=300 * 0.3, ratio=0.7 / 0.3, alpha=0.05, power=0.8, alternative="two-sided"
    )
    # statsmodels' effect is in sd units of the per-user variance within / days
    expected = effect * (within / 3) ** 0.5 / p
    assert breadth_mde_floor(world, traffic, 0.05, 0.8) == pytest.approx(expected, rel=1e-3)


def test_a_stored_world_with_a_retired_key_still_reads_but_a_scenario_file_may_not_set_it() -> None:
    from sim.world import WorldConfig, parse_world

    stored = {"turn_cap": 3, "user_llm": {"max_new_tokens": 24, "length_cap_factor": 2.0}}
    world = WorldConfig.from_stored(stored)
    assert world.turn_cap == 3 and world.user_llm.max_new_tokens == 24
    with pytest.raises(ValueError, match="length_cap_factor"):
        parse_world(stored)


def test_seven_day_tests_the_demos_world_at_production_shape() -> None:
    """scenarios/seven_day.toml A/B-tests the demo's candidate in the world it was trained in:
    its [world] must stay the quickstart's, with a 7 + 7 day test on 10% of users."""
    seven_day = load_scenario(SCENARIOS_DIR / "seven_day.toml")
    quickstart = load_scenario(SCENARIOS_DIR / "quickstart.toml")
    assert seven_day.world == quickstart.world
    traffic = seven_day.traffic
    assert (traffic.pre_days, traffic.test_days, traffic.treatment_share) == (7, 7, 0.1)
    assert traffic.design == "twins"
    assert traffic.bot_sampling == quickstart.traffic.bot_sampling
