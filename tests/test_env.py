"""The chat environment, the conversation engine and the world config, on a tiny model."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import sim
from policies import Policy, SamplingParams, load_policy
from policies.base import Chat, Generation
from sim.characters import load_characters
from sim.conversation import END_LEFT, END_REPORTED, END_TURN_CAP
from sim.env import CHARSET, ChatEnv, VectorChatEnv, sanitize
from sim.world import World, WorldConfig, load_world_config, parse_world

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


class CountingPolicy:
    """Wraps a real policy and records every generate call (to prove batching)."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[int] = []

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        self.calls.append(len(chats))
        return self.inner.generate(chats, params)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> CountingPolicy:
    return CountingPolicy(load_policy(str(tiny_llama_dir)))


@pytest.fixture(scope="module")
def world(tiny: CountingPolicy) -> World:
    config = load_world_config(SCENARIOS / "world_example.toml")
    config = config.model_copy(
        update={
            "turn_cap": 3,
            "pii_rate": 0.3,
            "user_llm": config.user_llm.model_copy(update={"max_new_tokens": 8}),
        }
    )
    return World.build(config, seed=0, user_policy=tiny)


def test_shipped_characters_load_and_combine_instructions() -> None:
    characters = load_characters(SCENARIOS / "characters")
    assert len(characters) >= 8
    kinds = {c.__name__ for ch in characters.values() for c in ch.checkers}
    assert kinds == {
        "max_words", "min_words", "max_sentences", "no_emoji", "catchphrase",
        "ends_with_question", "forbidden_words", "no_ai_reference", "language", "no_urls",
        "lowercase_only", "starts_with",
    }  # fmt: skip
    for ch in characters.values():
        assert len(ch.checkers) >= 3
        prompt = ch.system_prompt()
        assert ch.name in prompt and all(c.instruction in prompt for c in ch.checkers)


def test_character_file_errors_name_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "X"\npersona = "Someone nice enough"\n[instructions]\nmax_words = 0\n')
    with pytest.raises(ValueError, match=r"bad\.toml: instructions\.max_words"):
        load_characters(bad)
    bad.write_text('name = "X"\npersona = "Someone nice enough"\nmood = "sunny"\n')
    with pytest.raises(ValueError, match="mood"):
        load_characters(bad)


def test_world_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="turn_cpa"):
        parse_world({"turn_cpa": 3})
    with pytest.raises(ValueError, match="pii_rate"):
        parse_world({"pii_rate": 1.5})
    with pytest.raises(ValueError, match="not defined"):
        World.build(WorldConfig(characters=["Nobody"]), user_policy=object())  # type: ignore[arg-type]
    for field in WorldConfig.model_fields.values():
        assert field.description


def test_engine_batches_bot_and_user_turns(world: World, tiny: CountingPolicy) -> None:
    engine = world.engine
    users = world.sampler.sample(4)
    sessions = engine.open_sessions(users, day=0, hour=9.0, rng=np.random.default_rng(0))
    assert all(s.messages[0]["role"] == "user" for s in sessions)
    before = len(tiny.calls)
    records = engine.bot_turn(sessions, tiny, SamplingParams(max_new_tokens=8, seed=1))
    assert tiny.calls[before:] == [4]  # ONE call for all four sessions
    assert len(records) == 4
    row = records[0].to_row()
    assert {"gold_satisfaction", "follows_all", "violates_any", "feature_words"} <= set(row)
    live = [s for s in sessions if not s.ended]
    engine.user_turn(sessions, world.user_params(2))
    assert tiny.calls[before + 1 :] == ([len(live)] if live else [])
    with pytest.raises(ValueError, match="waiting for"):
        engine.user_turn(live, world.user_params(3))
    engine.run_sessions(live, tiny, SamplingParams(max_new_tokens=8, seed=4), world.user_params(5))
    for s in sessions:
        assert s.ended and s.end_reason in (END_LEFT, END_REPORTED, END_TURN_CAP)
        assert len(s.turns) <= world.config.turn_cap
        summary = engine.close_session(s)
        assert summary.n_turns == len(s.turns)
        assert summary.n_user_messages == sum(m["role"] == "user" for m in s.messages)
        assert s.user.state.n_sessions == 1 and s.user.state.last_character == s.character.name
        assert 0.0 < engine.return_probability(s.user, 1) < 1.0
        with pytest.raises(ValueError, match="already closed"):
            engine.close_session(s)
    pickle.dumps([s.user for s in sessions])  # traffic checkpoints pickle users


def test_check_env_passes_on_the_registered_env(world: World) -> None:
    env = gymnasium.make(sim.ENV_ID, world=world)
    check_env(env.unwrapped)
    assert isinstance(env.unwrapped, ChatEnv)


def rollout(env: ChatEnv, seed: int, actions: list[str]) -> list[tuple]:
    obs, info = env.reset(seed=seed)
    steps: list[tuple] = [(obs, info["character"], info["user_id"])]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        steps.append((obs, reward, terminated, truncated, info["signals"], info["oracle"]))
        if terminated or truncated:
            break
    return steps


def test_same_seed_and_actions_give_identical_rollouts(world: World) -> None:
    env = ChatEnv(world=world)
    actions = ["Ahoy! Where to next?", "Tell me more 😊", "Lovely. What else?"]
    first = rollout(env, 11, actions)
    second = rollout(env, 11, actions)
    assert first == second
    assert rollout(env, 12, actions)[0] != first[0]


def test_episode_ends_and_info(world: World) -> None:
    env = ChatEnv(world=world, character="Coach Kim", render_mode="ansi")
    obs, info = env.reset(seed=3)
    assert info["character"] == "Coach Kim"
    assert obs.startswith("system: You are Coach Kim") and env.observation_space.contains(obs)
    done, steps = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step("How did your run feel today?")
        steps += 1
        assert env.observation_space.contains(obs)
        assert set(info) >= {"signals", "features", "checks", "oracle", "follows_all"}
        assert info["checks"]["ends_with_question"] is True
        expected = (
            info["signals"]["continued"]
            + info["signals"]["liked"]
            - 5 * info["signals"]["reported"]
        )
        assert reward == expected
        done = terminated or truncated
    assert steps <= world.config.turn_cap
    assert truncated == (info["session"]["end_reason"] == END_TURN_CAP)
    assert "Coach Kim" in env.render()
    with pytest.raises(RuntimeError, match="reset"):
        env.step("more?")


def test_sanitize_keeps_emoji_and_replaces_the_rest() -> None:
    text = "Hola ¿qué tal? 👍🏽 👨‍👩‍👧 中文"
    clean = sanitize(text)
    assert clean.startswith("Hola ¿qué tal? 👍🏽 👨‍👩‍👧 ")
    assert clean.endswith("\ufffd\ufffd") and all(c in CHARSET for c in clean)


def test_vector_env_steps_many_conversations_with_one_user_call(
    world: World, tiny: CountingPolicy
) -> None:
    venv = gymnasium.make_vec(
        sim.ENV_ID, num_envs=3, vectorization_mode="vector_entry_point", world=world
    )
    assert isinstance(venv, VectorChatEnv)
    obs, infos = venv.reset(seed=0)
    assert len(obs) == 3 and venv.observation_space.contains(obs)
    ended_seen = False
    for step in range(4):
        before = len(tiny.calls)
        actions = [g.text for g in tiny.generate(venv.chats(), SamplingParams(8, seed=step))]
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        user_calls = tiny.calls[before + 1 :]
        assert len(user_calls) <= 1  # at most ONE user-LLM call per vector step
        assert rewards.shape == (3,) and venv.observation_space.contains(obs)
        if "signals" in infos:  # absent only when every conversation restarted this step
            stepped = infos["_signals"]
            assert set(infos["signals"]) >= {"continued", "liked", "reported"}
            np.testing.assert_array_equal(rewards[~stepped], 0.0)
        ended_seen = ended_seen or bool((terminated | truncated).any())
    assert ended_seen  # with a 3-turn cap some conversation ends within 4 steps


def test_flywheel_chat_smoke(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`flywheel chat` end to end in a subprocess, tiny model as bot and user LLM."""
    import os
    import subprocess
    import sys

    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        f'[world]\nturn_cap = 2\ncharacters_dir = "{SCENARIOS / "characters"}"\n'
        f'[world.user_llm]\nmax_new_tokens = 6\n[world.user_llm.policy]\nmodel = "{tiny_llama_dir}"\n'
    )
    cmd = [sys.executable, "-m", "flywheel.cli", "chat", str(scenario), "--users", "2",
           "--show", "1", "--bot-model", str(tiny_llama_dir), "--max-new-tokens", "6"]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "steerability:" in out and "(overall)" in out and "like rate / reply" in out
    assert "user: " in out and "oracle gold=" in out
    bad = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "chat", str(tmp_path / "missing.toml")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "does not exist" in bad.stderr
