"""The tiny-scenario builder the end-to-end tests share (``conftest.tiny_scenario_toml``):
what it writes is the TOML document it was given, and a scenario the loader accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import CHARACTERS_DIR, tiny_scenario_toml, to_toml

from flywheel.scenario import load_scenario


# The default gates are sized for real runs; the loader's warning about them is not tested here.
@pytest.mark.filterwarnings("ignore::flywheel.scenario.ScenarioWarning")
def test_the_builder_merges_overrides_into_the_common_shape(tmp_path: Path) -> None:
    path = tiny_scenario_toml(
        tmp_path / "tiny.toml",
        user_model="models/base",
        name="shape",
        max_new_tokens=6,
        temperature=0.0,
        description="the common shape",
        world={"turn_cap": 3, "user_llm": {"temperature": None}},
        traffic={"slot_minutes": None, "bot_sampling": {"max_new_tokens": 9}},
        recipes=[{"name": "r", "kind": "grpo", "trainer": {"num_generations": 2}}],
    )
    assert tomllib.loads(path.read_text(encoding="utf-8")) == {
        "name": "shape",
        "seed": 3,
        "description": "the common shape",
        "world": {
            "characters_dir": str(CHARACTERS_DIR),
            "turn_cap": 3,
            "user_llm": {
                "max_new_tokens": 6,
                "policy": {"model": "models/base", "dtype": "float32"},
            },
        },
        "traffic": {
            "n_users": 16,
            "pre_days": 1,
            "test_days": 2,
            "treatment_share": 0.5,
            "bot_sampling": {"max_new_tokens": 9, "temperature": 0.0},
        },
        "recipes": [{"name": "r", "kind": "grpo", "trainer": {"num_generations": 2}}],
    }
    scenario = load_scenario(path)
    assert scenario.traffic.bot_sampling.max_new_tokens == 9 and scenario.recipes[0].name == "r"


def test_to_toml_round_trips_through_tomllib() -> None:
    document = {
        "title": 'say "hi"\\ \n\tthen 🙂 bye',
        "on": True,
        "rate": 1e-05,
        "weights": [0.0, 1.5],
        "a key": {"nested": {"deep": -2}},
        "mixed": [{"x": 1}, [1, 2], "s"],
        "steps": [{"name": "a", "sub": {"k": False}}, {"name": "b", "list": [{"y": 2}]}],
    }
    assert tomllib.loads(to_toml(document)) == document


def test_to_toml_refuses_a_value_toml_cannot_hold() -> None:
    with pytest.raises(TypeError, match=r"\{1\} \(set\) has no TOML form; fix: pass a bool"):
        to_toml({"bad": {1}})
