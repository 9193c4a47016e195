"""Multi-turn GRPO on the tiny random Llama, with tiny-LLM simulated users on the other side:
the loss sees exactly the policy's tokens, groups share their user's random numbers, a run
is reproducible and a step moves only the LoRA weights; a scenario's grpo_multiturn recipe
trains the loop's candidate that way, and its config refuses what it cannot train."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_scenario_toml

from flywheel.candidates import grpo_recipe, train_candidate
from flywheel.multiturn import SimulatedUsers, draw_users
from flywheel.scenario import RecipeConfig, ScenarioError, load_scenario
from policies import SamplingParams, load_policy
from rewards.checkers import build_checkers
from sim.world import World, load_world_config
from training.models import TRAINING_MARKER, model_config
from training.multiturn import (
    ConversationReturn,
    MultiTurnGRPOTrainer,
    MultiTurnSettings,
    conversation_rewards,
    roll_out,
    train_multiturn,
    user_turn_ids,
)
from training.recipes import GRPORecipe, ReferenceReplies, build_grpo
from training.rewards import RateConstraint, SteerabilityReward

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
GROUP = 2  # conversations per group (num_generations)
TURNS = 3  # most policy replies per training conversation


@pytest.fixture(scope="module")
def world(tiny_llama_dir: Path) -> World:
    config = load_world_config(SCENARIOS / "world_example.toml")
    config = config.model_copy(
        update={
            "turn_cap": 4,
            "pii_rate": 0.0,
            "user_llm": config.user_llm.model_copy(update={"max_new_tokens": 8}),
        }
    )
    return World.build(config, seed=0, user_policy=load_policy(str(tiny_llama_dir)))


@pytest.fixture(scope="module")
def logged_turns(tiny_llama_dir: Path, world: World) -> pd.DataFrame:
    """Turns the tiny model logged with four users of ``world`` (what curation reads)."""
    engine = world.engine
    logged = draw_users(world, 4, np.random.default_rng(3), "logged-")
    sessions = engine.open_sessions(logged, 0, 12.0, np.random.default_rng(4))
    params = SamplingParams(max_new_tokens=8, seed=0)
    records = engine.run_sessions(
        sessions, load_policy(str(tiny_llama_dir)), params, world.user_params(0)
    )
    return pd.DataFrame([r.to_row() for r in records])


def _users(world: World, n: int = 2) -> SimulatedUsers:
    return SimulatedUsers(world, draw_users(world, n, np.random.default_rng(0), "train-"))


def _build(world: World, work: Path, seed: int = 0, steps: int = 1):
    """The single-turn builder's rewards, credit mask and GRPOConfig, sized for the tiny
    model; the emoji rate held by counting (multi-turn has no token estimates)."""
    names = sorted(world.characters)
    replies = ["Hello there, how are you? 😀", "Nice to meet you!", "Tell me more about it."]
    chats = [[{"role": "user", "content": f"hi {i}"}] for i in range(len(replies))]
    reference = ReferenceReplies(
        chats * len(names), replies * len(names),
        [n for n in names for _ in replies], 0.8, 0.95,
    )  # fmt: skip
    recipe = GRPORecipe(
        max_steps=steps, rate_estimate="count", max_new_tokens=8, learning_rate=1e-2,
        trainer={"per_device_train_batch_size": 2 * GROUP, "num_generations": GROUP},
    )  # fmt: skip
    checkers = {name: ch.checkers for name, ch in world.characters.items()}
    return build_grpo(recipe, checkers, reference, work, seed)


@pytest.fixture(scope="module")
def trainer(tiny_llama_dir: Path, world: World, tmp_path_factory) -> MultiTurnGRPOTrainer:
    """A multi-turn trainer on the tiny model with two users of the world (one group each)."""
    from datasets import Dataset
    from trl import get_peft_config

    from training.models import load_model_and_tokenizer, seed_everything

    users = _users(world)
    rows = users.rows(np.random.default_rng(1))
    build = _build(world, tmp_path_factory.mktemp("multiturn") / "work")
    seed_everything(0)
    model_args = model_config(str(tiny_llama_dir))
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = MultiTurnGRPOTrainer(
        model=model, args=build.args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=get_peft_config(model_args),
        reward_funcs=conversation_rewards(build.rewards), credit_masks=build.credit_masks,
        users=users, settings=MultiTurnSettings(max_bot_turns=TURNS),
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    return trainer


def _batch(trainer: MultiTurnGRPOTrainer) -> list[dict]:
    """Two groups of GROUP conversations, as TRL's sampler lays them out."""
    rows = list(trainer.train_dataset)
    return [dict(row) for row in rows for _ in range(GROUP)]


def _render(tokenizer, chat) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False)


def test_masks_cover_exactly_the_policys_sampled_tokens(trainer, monkeypatch):
    tokenizer = trainer.processing_class
    sampled: list[list[list[int]]] = []  # per policy turn, the ids of each live conversation
    generate = trainer._generate_single_turn

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        sampled.append([list(ids) for ids in out[0]])
        return out

    monkeypatch.setattr(trainer, "_generate_single_turn", recording)
    rows = _batch(trainer)
    out = roll_out(rows, trainer, trainer.users, TURNS)
    turns = out["turns"]
    assert max(len(t) for t in turns) >= 2, "no user answered; the test needs a second turn"
    for i, (prompt, completion, mask) in enumerate(
        zip(out["prompt_ids"], out["completion_ids"], out["env_mask"], strict=True)
    ):
        assert len(mask) == len(completion) and set(mask) <= {0, 1}
        # The prompt is the system prompt and the opener, as the trainer tokenises prompts.
        assert prompt == trainer._tokenize_prompts([rows[i]["prompt"]])[0][0]
        # Mask 1 = the tokens the policy sampled, in order, and nothing else.
        live_at = [[j for j, t in enumerate(turns) if len(t) > turn] for turn in range(TURNS)]
        mine = [
            token
            for t, ids in enumerate(sampled)
            for j, reply in zip(live_at[t], ids, strict=True)
            if j == i
            for token in reply
        ]
        assert [t for t, m in zip(completion, mask, strict=True) if m] == mine
        # The whole sequence is the chat template's rendering of the conversation, so the
        # mask-0 tokens are the users' turns with their headers (and the end-of-turn token
        # that closes a reply cut at max_completion_length).
        chat = [*turns[i][-1]["context"], {"role": "assistant", "content": turns[i][-1]["reply"]}]
        text, full = tokenizer.decode(prompt + completion), _render(tokenizer, chat)
        assert full.startswith(text) and full[len(text) :] in ("\n", "<|im_end|>\n")
        users_said = [m["content"] for m in chat[2:] if m["role"] == "user"]
        assert len(users_said) == len(turns[i]) - 1
        user_text = tokenizer.decode([t for t, m in zip(completion, mask, strict=True) if not m])
        assert all(said in user_text for said in users_said)
    # The loss mask TRL builds from env_mask: some completion tokens are the users'.
    batch = trainer._generate_and_score_completions(rows)
    users_tokens = batch["completion_mask"] * (1 - batch["tool_mask"])
    assert users_tokens.sum() > 0


def test_a_step_trains_only_the_lora_weights_on_the_policys_tokens(trainer, monkeypatch):
    """The gradient of GRPO's loss with respect to each completion token's log-probability
    is exactly 0 at the users' tokens and not at the policy's; without TRL's env mask it
    would not be. Only LoRA weights receive gradients."""
    trainer.model.train()
    batch = trainer._generate_and_score_completions(_batch(trainer))
    rows = batch["completion_ids"].size(0)
    batch["advantages"] = torch.linspace(-1.0, 1.0, rows)  # every row pulls its own way
    captured = {}
    per_token = trainer._get_per_token_logps_and_entropies

    def keeping_grad(*args, **kwargs):
        logps, entropies, aux = per_token(*args, **kwargs)
        logps.retain_grad()
        captured["logps"] = logps
        return logps, entropies, aux

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", keeping_grad)

    def grad_of_logps(inputs: dict) -> torch.Tensor:
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
        return captured["logps"].grad

    users_tokens = (batch["completion_mask"] * (1 - batch["tool_mask"])).bool()
    policy_tokens = (batch["completion_mask"] * batch["tool_mask"]).bool()
    grad = grad_of_logps(batch)
    assert users_tokens.any() and torch.all(grad[users_tokens] == 0)
    assert grad[policy_tokens].abs().sum() > 0
    params = dict(trainer.model.named_parameters())
    trained = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)
    assert all(not p.requires_grad for n, p in params.items() if "lora_" not in n)
    unmasked = {k: v for k, v in batch.items() if k != "tool_mask"}
    assert grad_of_logps(unmasked)[users_tokens].abs().sum() > 0


def test_a_group_shares_its_user_opener_and_reaction_draws(world):
    users = _users(world, n=2)
    rows = users.rows(np.random.default_rng(1))
    chats = users.open([rows[0], rows[0], rows[1]])
    assert chats[0] == chats[1] == rows[0]["prompt"] and chats[2] == rows[1]["prompt"]
    sessions = users.sessions
    assert sessions[0].user is not sessions[1].user  # each conversation moves its own copy
    assert sessions[0].user.user_id == sessions[1].user.user_id != sessions[2].user.user_id
    draws = [s.signal_rng.random(6) for s in sessions]
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])
    # the pool itself never moves: the same rows open the same conversations again
    assert users.open([rows[0]]) == [rows[0]["prompt"]]


def test_conversation_return_averages_a_single_turn_reward_over_the_policys_turns():
    checkers = {"Kim": build_checkers({"ends_with_question": True, "max_words": 5})}
    reward = SteerabilityReward(checkers)
    turns = [
        [{"context": [{"role": "user", "content": "hi"}], "reply": "How are you?"},
         {"context": [{"role": "user", "content": "ok"}], "reply": "That is a long reply."}],
        [{"context": [{"role": "user", "content": "hi"}], "reply": "Why?"}],
    ]  # fmt: skip
    kwargs = {"turns": turns, "character": ["Kim", "Kim"]}
    returns = ConversationReturn(reward)([None, None], [None, None], **kwargs)
    expected = [
        np.mean(
            [reward.score("How are you?", "Kim"), reward.score("That is a long reply.", "Kim")]
        ),
        reward.score("Why?", "Kim"),
    ]
    assert returns == pytest.approx(expected) and expected[0] != expected[1]
    summed = ConversationReturn(reward, "sum")([None, None], [None, None], **kwargs)
    assert summed[0] == pytest.approx(2 * expected[0])
    assert ConversationReturn(reward).__name__ == "steerability"


def test_multiturn_refuses_what_it_cannot_train(tiny_llama_dir, world):
    with pytest.raises(ValueError, match="rate_estimate='count'"):
        ConversationReturn(RateConstraint("emoji", 0.1, estimate="tokens"))
    with pytest.raises(ValueError, match="aggregate in"):
        MultiTurnSettings(aggregate="max")
    with pytest.raises(ValueError, match="needs the rollout's 'turns'"):
        ConversationReturn(SteerabilityReward({"Kim": []}))([None], [None], character=["Kim"])
    with pytest.raises(ValueError, match="no token anchors"):
        train_multiturn(
            SimpleNamespace(anchors=["emoji"]), [{"prompt": []}], _users(world), None, "x"
        )
    with pytest.raises(ValueError, match="got no rows"):
        train_multiturn(SimpleNamespace(anchors=[]), [], _users(world), None, "x")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    no_end = SimpleNamespace(
        processing_class=tokenizer, chat_template_kwargs={},
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    )  # fmt: skip
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ValueError, match="eos_token"):
        user_turn_ids(no_end, chat, "and you?")
    with pytest.raises(ValueError, match="pool holds 2"):
        _users(world).open([{"user": 5, "seed": 0}])


def test_rollout_refuses_rows_the_other_side_opens_differently(trainer):
    rows = _batch(trainer)
    rows[1] = {**rows[1], "seed": rows[1]["seed"] + 1}  # not the seed the opening was drawn with
    with pytest.raises(ValueError, match="row 1: the other side opened"):
        roll_out(rows, trainer, trainer.users, TURNS)


def test_a_multiturn_run_is_seeded_and_reproducible(tiny_llama_dir, world, tmp_path):
    from safetensors.torch import load_file

    def run(name: str) -> tuple[dict, dict]:
        users = _users(world)
        rows = users.rows(np.random.default_rng(1))
        build = _build(world, tmp_path / name / "work", steps=2)
        out = train_multiturn(
            build, rows, users, model_config(str(tiny_llama_dir)), tmp_path / name,
            MultiTurnSettings(max_bot_turns=2),
        )  # fmt: skip
        metrics = json.loads((out / TRAINING_MARKER).read_text())["metrics"]
        return load_file(str(out / "model.safetensors")), metrics

    (first, metrics), (second, again) = run("a"), run("b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    shown = {k: v for k, v in metrics.items() if "time" not in k and "per_second" not in k}
    assert shown == {k: again[k] for k in shown}
    assert metrics["global_step"] == 2 and metrics["reward_names"][:2] == [
        "steerability", "artifact_penalty",
    ]  # fmt: skip
    assert metrics["multiturn/policy_turns"] >= 1 and "multiturn/user_tokens" in metrics
    base = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    assert any(not torch.equal(base[k], first[k]) for k in base if k in first)


def test_flywheel_trains_multiturn_grpo_calibrated_on_logged_turns(
    tiny_llama_dir, world, logged_turns, tmp_path
):
    """What ``flywheel train grpo --multiturn`` would run: the logged turns calibrate the
    rewards, new simulated users hold the training conversations."""
    from flywheel.multiturn import run_grpo_multiturn

    out = run_grpo_multiturn(
        logged_turns, world, str(tiny_llama_dir), tmp_path / "model", steps=1, users=2,
        settings=MultiTurnSettings(max_bot_turns=2),
        overrides={"per_device_train_batch_size": 4, "num_generations": GROUP,
                   "max_completion_length": 8},
    )  # fmt: skip
    marker = json.loads((out / TRAINING_MARKER).read_text())
    assert marker["recipe"] == "grpo_multiturn" and marker["metrics"]["global_step"] == 1
    assert marker["metrics"]["max_bot_turns"] == 2
    assert "steerability" in marker["metrics"]["reward_names"]


def _tiny_scenario(path: Path, model: Path) -> Path:
    """One generation of a tiny world whose only recipe is a grpo_multiturn one sized for
    the tiny model: 2 users, groups of GROUP conversations, 2 policy turns, 1 step."""
    return tiny_scenario_toml(
        path,
        user_model=model,
        name="tiny-talk",
        max_new_tokens=8,
        generations=1,
        policy={"model": str(model), "dtype": "float32"},
        world={
            "characters": ["Captain Mara", "Pixel"],
            "turn_cap": 3,
            "pii_rate": 0.0,
            "gold": {"continue_bias": 6.0},
        },
        collect={"days": 1},
        traffic={"pre_days": None, "test_days": None},
        curation={"require_continued": False, "held_out_share": 0.3},
        recipes=[
            {
                "name": "talk",
                "kind": "grpo_multiturn",
                "reward_model": "none",
                "users": 2,
                "max_bot_turns": 2,
                "max_steps": 1,
                "max_new_tokens": 8,
                "trainer": {"per_device_train_batch_size": 2 * GROUP, "num_generations": GROUP},
            }
        ],
    )


def test_the_loops_candidate_step_trains_a_grpo_multiturn_recipe(tiny_llama_dir, tmp_path):
    """A scenario's grpo_multiturn recipe through the loop's candidate step on its logged
    traffic: the loop hands over its world, the checkpoint's record says multi-turn, a held
    rate would be counted, and the same seed makes the same candidate."""
    from safetensors.torch import load_file

    from flywheel.ledger import Ledger
    from flywheel.loop import FlywheelRun, experiment_ids
    from flywheel.store import RunStore

    scenario = load_scenario(_tiny_scenario(tmp_path / "tiny.toml", tiny_llama_dir))
    recipe = scenario.recipes[0]
    run = FlywheelRun(scenario, tmp_path / "run", progress=False)
    traffic_id, _ = experiment_ids(1)
    deployed = run.base_spec()
    with RunStore(run.run_dir) as store:
        run.store, run.ledger = store, Ledger(store)  # what FlywheelRun.run opens
        run.simulate(traffic_id, scenario.collect_traffic(1), deployed, deployed, seed=1)
        curate = run.curate(1, traffic_id, seed=2)
        first, again = (
            run.make_candidate(
                generation,
                recipe=recipe,
                deployed=deployed,
                curate=curate,
                rms={},
                experiment_id=traffic_id,
                seed=5,
            )
            for generation in (1, 2)
        )
    marker = json.loads((run.run_dir / first.model_path / TRAINING_MARKER).read_text())
    assert marker["recipe"] == "grpo_multiturn" and marker["metrics"]["max_bot_turns"] == 2
    assert marker["metrics"]["global_step"] == 1
    assert marker["metrics"]["multiturn/policy_turns"] >= 1
    grpo = first.training.grpo
    assert first.training.examples == 2 and grpo is not None and grpo["multiturn"] == {
        "max_bot_turns": 2, "users": 2,
    }  # fmt: skip
    assert grpo["recipe"]["rate_estimate"] == "count"
    assert first.training.reward_names[:2] == ("steerability", "artifact_penalty")
    weights = [
        load_file(str(run.run_dir / c.model_path / "model.safetensors")) for c in (first, again)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_multiturn_candidate_needs_the_world(tmp_path):
    with pytest.raises(ValueError, match=re.escape("got world=None; fix: pass world=")):
        train_candidate(
            RecipeConfig(name="talk", kind="grpo_multiturn"), "unused", None, pd.DataFrame(), None, {}, None, tmp_path / "m",
            0, SamplingParams(),
        )  # fmt: skip


def test_a_multiturn_recipe_is_the_grpo_recipe_with_held_rates_counted():
    serving = SamplingParams(temperature=0.7, top_p=0.9)
    single = asdict(grpo_recipe(RecipeConfig(name="g", kind="grpo"), serving))
    multi = asdict(grpo_recipe(RecipeConfig(name="t", kind="grpo_multiturn"), serving))
    assert single["rate_estimate"] == "tokens" and multi["rate_estimate"] == "count"
    assert {**single, "rate_estimate": "count"} == multi
    counted = RecipeConfig(name="g", kind="grpo", rate_estimate="count")
    assert grpo_recipe(counted, serving).rate_estimate == "count"
    held = RecipeConfig(
        name="t", kind="grpo_multiturn", hold_rates=["emoji"], rate_estimate="count"
    )
    assert grpo_recipe(held, serving).hold_rates == ("emoji",)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "grpo", "users": 8}, "users = 8 shapes multi-turn conversations; fix: remove "
         "it or set kind = 'grpo_multiturn'"),
        ({"kind": "dpo", "max_bot_turns": 2}, "max_bot_turns = 2 shapes multi-turn"),
        ({"kind": "rs+sft", "rate_estimate": "count"}, "rate_estimate = 'count' measures a rate"),
        ({"kind": "grpo_multiturn", "prompts": 8}, "prompts = 8 is not read, its contexts are "
         "the openings of its simulated users; fix: set users = 8 instead"),
        ({"kind": "grpo_multiturn", "rate_estimate": "tokens"}, "rate_estimate = 'tokens' "
         "reads a held rate from token probabilities along one reply"),
    ],
)  # fmt: skip
def test_a_recipe_refuses_fields_its_kind_does_not_train_with(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RecipeConfig(name="r", **fields)


def test_a_scenario_names_the_recipe_field_that_asks_for_token_estimates(tmp_path):
    text = '[[recipes]]\nname = "t"\nkind = "grpo_multiturn"\nrate_estimate = "tokens"\n'
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    line = next(m for m in str(error.value).splitlines() if "rate_estimate" in m)
    assert "scenario.recipes.0" in line and "fix: rate_estimate = 'count'" in line
    path.write_text(text.replace('"tokens"', '"count"') + "users = 4\n", encoding="utf-8")
    assert load_scenario(path).recipes[0].users == 4


def test_a_recipe_record_leaves_out_the_fields_its_kind_does_not_read():
    """A recipe of another kind keeps the record it had before the multi-turn fields
    existed, so a run it is in keeps its scenario and step fingerprints and resumes; a
    record validates again as the same recipe."""
    new = {"max_bot_turns", "users", "rate_estimate"}
    for kind in ("grpo", "dpo", "rs+sft"):
        record = RecipeConfig(name="r", kind=kind).model_dump(mode="json")
        assert set(record) == set(RecipeConfig.model_fields) - new
    talk = RecipeConfig(name="t", kind="grpo_multiturn", users=4)
    record = talk.model_dump(mode="json")
    assert (record["users"], record["max_bot_turns"]) == (4, 3)
    assert not {"prompts", "rate_estimate"} & set(record)
    counted = RecipeConfig(name="g", kind="grpo", rate_estimate="count")
    assert counted.model_dump()["rate_estimate"] == "count"
    for recipe in (talk, counted):
        assert RecipeConfig.model_validate(recipe.model_dump(mode="json")) == recipe
