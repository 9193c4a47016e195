"""SFT, DPO and GRPO end to end on the tiny random Llama; rewards; rejection sampling."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from rewards.checkers import build_checkers
from training.grpo import build_rewards, grpo_config, grpo_records, load_config_overrides
from training.models import TRAINING_MARKER, model_config
from training.rejection import (
    best_of_n_kl,
    best_of_n_sweep,
    expected_best_of_n,
    preference_records,
    sample_candidates,
    score_candidates,
)
from training.rewards import (
    ArtifactPenalty,
    RateConstraint,
    RewardModelReward,
    ScaledReward,
    SteerabilityReward,
    StyleReference,
    characters_allowing,
    check_rewards,
    held_rates,
    reference_scales,
    scaled_by_reference,
)

CHECKERS = {
    "Pixel": build_checkers({"ends_with_question": True, "max_words": 12, "no_emoji": True}),
    "Mara": build_checkers({"starts_with": "Ahoy"}),
}
PROMPTS = [
    [
        {"role": "system", "content": "You are Pixel, a retro gamer. End with a question."},
        {"role": "user", "content": f"hi, I like game number {i}"},
    ]
    for i in range(8)
]
REFERENCE = StyleReference.from_replies(
    ["Hello there, how are you today?", "Nice to meet you, what do you play?"] * 6
)


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k in after)


def _assert_serves(path) -> None:
    from policies import SamplingParams, load_policy

    policy = load_policy(str(path))
    [reply] = policy.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, seed=0))
    assert reply.completion_tokens >= 1
    assert json.loads((path / TRAINING_MARKER).read_text())["recipe"]


def test_sft_trains_and_saves_a_servable_merged_checkpoint(tiny_llama_dir, tmp_path):
    from training.sft import sft_config, train_sft

    records = [
        {"prompt": p, "completion": [{"role": "assistant", "content": "Ahoy! What game?"}]}
        for p in PROMPTS
    ]
    out = train_sft(
        records,
        model_config(str(tiny_llama_dir)),
        sft_config(tmp_path / "work", max_steps=2, learning_rate=1e-2),
        tmp_path / "sft",
    )
    assert not (out / "adapter_config.json").exists()  # merged, a plain checkpoint
    assert _changed(_weights(tiny_llama_dir), _weights(out))
    marker = json.loads((out / TRAINING_MARKER).read_text())
    assert marker["recipe"] == "sft" and math.isfinite(marker["metrics"]["train_loss"])
    _assert_serves(out)


def test_sft_tokens_match_trl_and_a_reply_cut_by_the_cap_gets_no_end_of_turn(
    tiny_llama_dir, tmp_path
):
    from datasets import Dataset
    from trl import SFTTrainer

    from training.models import load_model_and_tokenizer
    from training.sft import sft_config, token_records

    record = {"prompt": PROMPTS[0], "completion": [{"role": "assistant", "content": "Ahoy! What"}]}
    model, tokenizer = load_model_and_tokenizer(model_config(str(tiny_llama_dir)))
    trl = SFTTrainer(
        model=model,
        args=sft_config(tmp_path),
        train_dataset=Dataset.from_list([record]),
        processing_class=tokenizer,
    ).train_dataset[0]
    whole, cut = token_records([record, {**record, "cut": True}], tokenizer)
    # The reference: TRL's own rendering of the same conversational record.
    assert whole["input_ids"] == trl["input_ids"]
    assert whole["labels"] == trl["labels"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert whole["input_ids"].count(end_of_turn) == cut["input_ids"].count(end_of_turn) + 1
    assert cut["input_ids"] == whole["input_ids"][: len(cut["input_ids"])]
    trained = [t for t in cut["labels"] if t != -100]
    assert tokenizer.decode(trained) == "Ahoy! What"


def test_dpo_trains_on_pairs_and_saves_a_servable_checkpoint(tiny_llama_dir, tmp_path):
    from training.dpo import dpo_config, train_dpo

    records = [
        {
            "prompt": p,
            "chosen": [{"role": "assistant", "content": "What do you play?"}],
            "rejected": [{"role": "assistant", "content": "As an AI I cannot play 😀"}],
        }
        for p in PROMPTS
    ]
    out = train_dpo(
        records,
        model_config(str(tiny_llama_dir)),
        dpo_config(tmp_path / "work", max_steps=2, learning_rate=1e-2),
        tmp_path / "dpo",
    )
    assert _changed(_weights(tiny_llama_dir), _weights(out))
    _assert_serves(out)


def tiny_grpo_args(work, prompts_per_step: int = 1, steps: int = 2):
    """A GRPOConfig for the tiny model: ``steps`` steps of 4 completions of 8 tokens for
    each of ``prompts_per_step`` prompts, at a learning rate that moves it."""
    return grpo_config(
        work,
        max_steps=steps,
        per_device_train_batch_size=4 * prompts_per_step,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
    )


def test_grpo_runs_a_few_steps_and_logs_each_reward(tiny_llama_dir, tmp_path):
    from training.grpo import train_grpo

    args = tiny_grpo_args(tmp_path / "work")
    held_rate = RateConstraint("emoji", 0.2, ["Mara"])
    out = train_grpo(
        grpo_records(PROMPTS, ["Mara"] * len(PROMPTS)),
        [*build_rewards(CHECKERS, REFERENCE), held_rate],
        model_config(str(tiny_llama_dir)),
        args,
        tmp_path / "grpo",
    )
    assert args.multi_objective_aggregation == "normalize_then_sum"
    metrics = json.loads((out / TRAINING_MARKER).read_text())["metrics"]
    assert metrics["reward_names"] == ["steerability", "artifact_penalty", "emoji_rate"]
    for name in metrics["reward_names"]:
        assert math.isfinite(metrics[f"reward/{name}"])
        assert f"rewards/{name}/mean" in metrics
    # the random model writes no emoji for Mara, so the multiplier rose each step and is logged
    assert held_rate.multiplier > 0
    assert metrics["reward/emoji_rate_multiplier"] == pytest.approx(held_rate.multiplier)
    _assert_serves(out)


def test_full_fine_tuning_is_a_config_switch(tiny_llama_dir, tmp_path):
    from training.sft import sft_config, train_sft

    records = [{"prompt": PROMPTS[0], "completion": [{"role": "assistant", "content": "Hi?"}]}]
    out = train_sft(
        records,
        model_config(str(tiny_llama_dir), use_peft=False),
        sft_config(tmp_path / "work", max_steps=1, per_device_train_batch_size=1),
        tmp_path / "full",
    )
    assert json.loads((out / TRAINING_MARKER).read_text())["model_config"]["use_peft"] is False
    assert _changed(_weights(tiny_llama_dir), _weights(out))


def test_steerability_reward_rewards_compliance_and_punishes_prohibitions():
    reward = SteerabilityReward(CHECKERS)
    assert reward.__name__ == "steerability"
    good, partial, bad = "What do you play?", "I play chess.", "I play chess 😀"
    values = reward(
        [PROMPTS[0]] * 3,
        [[{"role": "assistant", "content": t}] for t in (good, partial, bad)],
        character=["Pixel"] * 3,
    )
    # 3/3 met + 1; 2/3 met; 1/3 met - 1 (no_emoji broken)
    assert values == pytest.approx([2.0, 2 / 3, 1 / 3 - 1])
    with pytest.raises(ValueError, match="character"):
        reward([PROMPTS[0]], ["x"])
    with pytest.raises(ValueError, match="Nobody"):
        reward([PROMPTS[0]], ["x"], character=["Nobody"])


def test_artifact_penalty_is_zero_near_reference_and_grows_with_emoji_spam():
    penalty = ArtifactPenalty(REFERENCE, tolerance=0.5)
    logged: dict[str, float] = {}
    typical, spam = "Hello friend, what do you play?", "Hi 😀😀😀😀 !!!!"
    values = penalty(
        ["p", "p"],
        [typical, spam],
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    assert values[0] == 0.0
    assert values[1] < -5
    assert logged["reward/artifact_penalty"] == pytest.approx(np.mean(values))


def test_artifact_tolerance_per_feature_keeps_a_tight_leash_on_length_only():
    long_reply = " ".join(["word"] * 60) + " 😀"
    scalar = ArtifactPenalty(REFERENCE, tolerance=0.0)
    per_feature = ArtifactPenalty(REFERENCE, tolerance={"words": 0.0, "emoji": 10.0})
    stats = REFERENCE.for_character(None)
    words_term = abs(60 - stats["words"][0]) / stats["words"][1]
    emoji_term = abs(1 - stats["emoji"][0]) / stats["emoji"][1]
    assert scalar.score(long_reply) == pytest.approx(-(words_term + emoji_term))
    # emoji forgiven (10 sd), words still fully counted, exclamations keep the default 0.5
    assert per_feature.score(long_reply) == pytest.approx(-words_term)
    assert per_feature.tolerance["exclamations"] == 0.5
    with pytest.raises(ValueError, match="emojis"):
        ArtifactPenalty(REFERENCE, tolerance={"emojis": 1.0})
    with pytest.raises(ValueError, match="'words' is -1"):
        ArtifactPenalty(REFERENCE, tolerance={"words": -1.0})


def test_artifact_penalty_judges_a_held_feature_only_when_present():
    reference = StyleReference.from_replies(["Hi there friend"] * 18 + ["Hi 😀 friend 😀"] * 2)
    assert reference.when_present["emoji"] == (2.0, 0.5)  # 2 emoji each; std at the floor
    plain = ArtifactPenalty(reference, tolerance=1.0)
    held = ArtifactPenalty(reference, tolerance=1.0, held=["emoji"])
    two, spam = "Hi 😀 friend 😀", "Hi " + "😀 " * 8 + "friend"
    # unheld: two emoji sit 3 sd above the mean of 0.2 (std 0.6), beyond the tolerance
    emoji_mean, emoji_std = reference.for_character(None)["emoji"]
    assert plain.score(two) == pytest.approx(-(abs(2 - emoji_mean) / emoji_std - 1.0))
    # held: presence is the RateConstraint's business; two emoji is the usual amount
    assert held.score(two) == 0.0
    assert held.score("Hi there friend") == plain.score("Hi there friend") == 0.0
    # spam is still spam: 8 emoji are 12 sd above the 2 of a reply with emoji
    assert held.score(spam) == pytest.approx(-((8 - 2.0) / 0.5 - 1.0))
    with pytest.raises(ValueError, match="'words' is unknown"):
        ArtifactPenalty(reference, held=["words"])


def test_scaled_rewards_divide_by_their_spread_on_reference_replies():
    reference_replies = ["What do you play?", "I play chess.", "I play chess 😀", "Go?"]
    characters = ["Pixel"] * 4
    raw = SteerabilityReward(CHECKERS)
    scales = reference_scales([raw], [PROMPTS[0]] * 4, reference_replies, characters)
    expected = np.std([raw.score(r, "Pixel") for r in reference_replies])
    assert scales == {"steerability": pytest.approx(expected)}
    scaled = ScaledReward(raw, scales["steerability"])
    assert scaled.__name__ == "steerability"
    values = scaled(
        [PROMPTS[0]] * 2, ["What do you play?", "I play chess."], character=["Pixel"] * 2
    )
    assert values == pytest.approx([2.0 / expected, (2 / 3) / expected])
    constant = reference_scales([raw], [PROMPTS[0]] * 2, ["Go?", "Go?"], ["Pixel"] * 2)
    assert constant["steerability"] == 1e-3  # the floor: no division by zero
    with pytest.raises(ValueError, match="steerability"):
        ScaledReward(raw, 0.0)


def test_rate_constraint_pays_for_a_feature_the_policy_stopped_using_and_settles_at_target():
    held = characters_allowing("emoji", CHECKERS)
    assert held == ["Mara"]  # Pixel forbids emoji: steerability handles it, not the rate
    reference = ["Ahoy there 😀", "Ahoy!", "Ahoy, mate", "Ahoy ho", "Ahoy 😀 😀"]
    (constraint,) = held_rates(
        ["emoji"], [*reference, "no 😀"], ["Mara"] * 5 + ["Pixel"], CHECKERS, lr=0.1
    )
    assert constraint.__name__ == "emoji_rate"
    assert constraint.target == pytest.approx(0.4)  # 2 of Mara's 5 (Pixel's reply not counted)
    logged: dict[str, float] = {}
    batch = ["Ahoy 😀", "Ahoy", "Ahoy", "Ahoy", "Pixel 😀"]
    chars = ["Mara"] * 4 + ["Pixel"]

    def step(completions: list[str]) -> list[float]:
        return constraint(
            ["p"] * len(completions),
            completions,
            character=chars[: len(completions)],
            log_metric=lambda name, value: logged.__setitem__(name, value),
        )

    # multiplier starts at 0; a batch below target (1 of 4) raises it by lr * 0.375
    assert step(batch) == [0.0] * 5
    assert constraint.multiplier == pytest.approx(0.1 * (0.4 - 0.25) / 0.4)
    assert logged["reward/emoji_rate_batch"] == 0.25
    assert constraint.history == [(4, 0.25, pytest.approx(constraint.multiplier))]
    # now an emoji reply of a held character earns more than one without; Pixel gets 0
    values = step(batch)
    m = 0.1 * (0.4 - 0.25) / 0.4
    assert values == pytest.approx([m * 0.6, -m * 0.4, -m * 0.4, -m * 0.4, 0.0])
    # while the policy stays below target the multiplier keeps growing (up to the clip)...
    for _ in range(200):
        step(["Ahoy"] * 4)
    assert constraint.multiplier == constraint.max_multiplier
    # ...and a policy above target turns it into a penalty
    for _ in range(200):
        step(["Ahoy 😀"] * 4)
    assert constraint.multiplier == -constraint.max_multiplier
    # exactly on target (2 of 5 held replies) it does not move; Pixel's emoji is not counted
    constraint.multiplier = 1.0
    chars[:] = ["Mara"] * 5 + ["Pixel"]
    step(["Ahoy 😀", "Ahoy 😀", "Ahoy", "Ahoy", "Ahoy", "Go 😀"])
    assert constraint.multiplier == pytest.approx(1.0)


def test_rate_constraint_is_never_rescaled_nor_fed_reference_replies():
    constraint = RateConstraint("emoji", 0.1, ["Mara"])
    steer = SteerabilityReward(CHECKERS)
    scaled = scaled_by_reference(
        [steer, constraint], [PROMPTS[0]] * 3, ["Ahoy", "Ahoy 😀", "Go?"], ["Mara"] * 3
    )
    assert isinstance(scaled[0], ScaledReward)
    assert scaled[1] is constraint
    assert constraint.multiplier == 0.0  # the reference replies did not move it
    with pytest.raises(ValueError, match="'words' is unknown"):
        RateConstraint("words", 0.5)
    with pytest.raises(ValueError, match=r"target for .emoji. is 0\.0"):
        RateConstraint("emoji", 0.0)


def test_rate_constraint_from_token_probabilities_rewards_every_held_reply_in_target_units():
    constraint = RateConstraint("emoji", 0.02, ["Mara"], lr=0.1, estimate="tokens")
    completions = ["Ahoy", "Ahoy there", "Go?"]
    kwargs = {"character": ["Mara", "Mara", "Pixel"], "expected_emoji": [0.01, 0.05, 0.9]}
    # the multiplier reads the held replies' mean probability (0.03, Pixel's 0.9 ignored)
    assert constraint(["p"] * 3, completions, **kwargs) == [0.0, 0.0, 0.0]
    m = 0.1 * (0.02 - 0.03) / 0.02
    assert constraint.multiplier == pytest.approx(m)
    assert constraint.history == [(2, pytest.approx(0.03), pytest.approx(m))]
    # every held reply now has something to say, in units of the target; none has an emoji
    values = constraint(["p"] * 3, completions, **kwargs)
    assert values == pytest.approx([m * (0.01 - 0.02) / 0.02, m * (0.05 - 0.02) / 0.02, 0.0])
    with pytest.raises(ValueError, match="'expected_emoji' column"):
        constraint(["p"], ["Ahoy"], character=["Mara"])
    with pytest.raises(ValueError, match="estimate 'tally' is unknown"):
        RateConstraint("emoji", 0.02, estimate="tally")


def test_held_rates_take_the_target_from_token_estimates_of_the_held_characters():
    replies = ["Ahoy 😀", "Ahoy", "Go 😀"]
    chars = ["Mara", "Mara", "Pixel"]
    (counted,) = held_rates(["emoji"], replies, chars, CHECKERS)
    assert counted.target == pytest.approx(0.5)
    estimates = {"emoji": [0.3, 0.1, 0.9]}
    (estimated,) = held_rates(["emoji"], replies, chars, CHECKERS, estimates=estimates)
    assert estimated.target == pytest.approx(0.2)  # Mara's two, not Pixel's
    with pytest.raises(ValueError, match="one per reply"):
        held_rates(["emoji"], replies, chars, CHECKERS, estimates={"emoji": [0.3]})


def test_held_rates_target_the_reference_rate_of_characters_allowed_the_feature(caplog):
    replies = ["Ahoy 😀", "Ahoy", "Ahoy!", "Ahoy", "Go 😀 😀"]
    characters = ["Mara", "Mara", "Mara", "Mara", "Pixel"]
    emoji, exclamations = held_rates(["emoji", "exclamations"], replies, characters, CHECKERS)
    # emoji: Mara only (Pixel forbids it), 1 of 4; exclamations: everyone, 1 of 5
    assert (emoji.target, sorted(emoji.characters)) == (0.25, ["Mara"])
    assert (exclamations.target, sorted(exclamations.characters)) == (0.2, ["Mara", "Pixel"])
    never = ["Ahoy"] * 4 + ["Go 😀"]
    with caplog.at_level("WARNING"):
        assert held_rates(["emoji"], never, characters, CHECKERS) == []
    assert "never use emoji" in caplog.text
    with pytest.raises(ValueError, match="'words' is unknown"):
        held_rates(["words"], replies, characters, CHECKERS)


def test_reward_model_reward_scores_last_user_message_and_checks_finiteness():
    class LengthScorer:
        def score(self, contexts, replies):
            return np.array([len(r) - len(c) for c, r in zip(contexts, replies, strict=True)])

    reward = RewardModelReward(LengthScorer())
    assert reward([PROMPTS[0]], ["abc"]) == [3 - len(PROMPTS[0][-1]["content"])]

    class NaNScorer:
        def score(self, contexts, replies):
            return np.full(len(replies), np.nan)

    with pytest.raises(ValueError, match="reward_model"):
        RewardModelReward(NaNScorer())([PROMPTS[0]], ["abc"])
    with pytest.raises(ValueError, match="one per completion"):
        check_rewards("x", [1.0], 2)
    with pytest.raises(TypeError, match="score"):
        RewardModelReward(object())


def test_expected_best_of_n_matches_enumeration_over_all_subsets():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=7), rng.normal(size=7)
    for n in (1, 2, 3, 7):
        subsets = list(itertools.combinations(range(7), n))
        brute = np.mean([gold[max(s, key=lambda i: proxy[i])] for s in subsets])
        assert expected_best_of_n(proxy, gold, n) == pytest.approx(brute)
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_sweep_shows_proxy_rising_and_gold_falling_when_they_disagree(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for context in range(30):
        style = rng.normal(size=16)  # the proxy pays for style, gold punishes it
        content = rng.normal(size=16)
        for j in range(16):
            rows.append(
                {
                    "context_id": context,
                    "proxy": content[j] + 2 * style[j],
                    "gold": content[j] - style[j],
                }
            )
    sweep = best_of_n_sweep(pd.DataFrame(rows), [1, 2, 4, 8, 16], "proxy", "gold")
    table = sweep.table
    assert list(table["n"]) == [1, 2, 4, 8, 16]
    assert table["proxy"].is_monotonic_increasing
    assert table["gold"].iloc[-1] < table["gold"].iloc[0]
    png = sweep.plot(tmp_path / "bon.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sqrt KL" in sweep.summary()
    # a proxy on another scale (an untrained reward model's thousands) keeps its columns apart
    wide = pd.DataFrame(rows).assign(proxy=lambda f: 1e3 * f["proxy"])
    last = best_of_n_sweep(wide, [1, 16], "proxy", "gold").summary().splitlines()[-1]
    assert len(last.split()) == 7


def test_rejection_sampling_keeps_best_and_pairs_best_with_worst(tiny_llama_dir):
    from policies import SamplingParams, load_policy

    policy = load_policy(str(tiny_llama_dir))
    extra = pd.DataFrame({"user_id": [f"u{i}" for i in range(3)]})
    candidates = sample_candidates(
        policy, PROMPTS[:3], ["Pixel"] * 3, 4, SamplingParams(max_new_tokens=6, seed=0), extra
    )
    assert len(candidates) == 12 and list(candidates["user_id"][:4]) == ["u0"] * 4
    scored = score_candidates(candidates, build_rewards(CHECKERS, REFERENCE))
    assert {"reward/steerability", "reward/artifact_penalty", "score"} <= set(scored.columns)
    pairs = preference_records(scored)
    for pair in pairs:
        group = scored[scored["prompt"].map(lambda p, pr=pair["prompt"]: p == pr)]
        assert pair["chosen"][0]["content"] == group.loc[group["score"].idxmax(), "reply"]
        assert pair["rejected"][0]["content"] == group.loc[group["score"].idxmin(), "reply"]
    # Scaled rewards are summed as they are: the score is the plain weighted sum.
    plain = score_candidates(
        candidates, build_rewards(CHECKERS, REFERENCE), {"steerability": 2.0}, standardise=False
    )
    expected = 2.0 * plain["reward/steerability"] + plain["reward/artifact_penalty"]
    np.testing.assert_allclose(plain["score"], expected)


def test_grpo_gpu_switch_is_a_config_file(tmp_path):
    overrides = load_config_overrides("training/configs/grpo_vllm.yaml")
    assert overrides["use_vllm"] is True and overrides["vllm_mode"] in ("server", "colocate")
    bad = tmp_path / "bad.yaml"
    bad.write_text("use_vlm: true\n")
    with pytest.raises(ValueError, match="use_vlm"):
        load_config_overrides(bad)


def _logged_run(run_dir, n_users: int = 12) -> None:
    """A one-day run store, written through RunStore's own path, with real characters."""
    from flywheel.store import TABLES, RunStore
    from sim.characters import load_characters
    from sim.traffic import DayLog
    from sim.world import DEFAULT_CHARACTERS_DIR

    names = sorted(load_characters(DEFAULT_CHARACTERS_DIR))[:2]
    users = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(n_users)],
            "segment": "casual",
            "generation": 0,
            "traits": [{"patience": 0.5}] * n_users,
        }
    )
    assignments = pd.DataFrame(
        {"user_id": users["user_id"], "arm": "control", "bucket": 0.5, "salt": "s"}
    )
    turns = pd.DataFrame(
        [
            {
                "day": 0, "period": "pre", "arm": "control", "life": "control", "policy": "p",
                "session_id": f"s{i}", "user_id": f"u{i}", "character": names[i % 2],
                "turn_index": t, "hour": 12.0, "user_message": f"tell me about thing {t}",
                "bot_reply": f"Ahoy, thing {t} is fun, game on! What about you, friend {i}?",
                "completion_tokens": 12, "features": {"words": 10.0}, "checks": {},
                "follows_all": True, "violates_any": False, "unsafe": False,
                "gold_satisfaction": 0.1, "novelty": 0.0, "continued": True, "liked": False,
                "reported": False,
            }
            for i in range(n_users)
            for t in range(2)
        ]
    )  # fmt: skip
    world = {"characters_dir": str(DEFAULT_CHARACTERS_DIR), "characters": names}
    # Only turns matter to training; the other day tables are empty with their columns.
    empty = {
        c: pd.DataFrame(columns=[k for k in TABLES[c] if k != "experiment_id"])
        for c in ("sessions", "user_days")
    }
    with RunStore(run_dir) as store:
        sink = store.open_sink("ab", {"scenario": {"world": world}})
        sink.begin(users, assignments, b"")
        sink.commit_day(DayLog(0, "pre", 0, empty["sessions"], turns, empty["user_days"], {}), b"")


@pytest.mark.parametrize("recipe", ["sft", "grpo"])
def test_flywheel_train_command_end_to_end(recipe, tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    _logged_run(tmp_path / "run")
    config = tmp_path / "small.yaml"
    small = {"sft": "per_device_train_batch_size: 2\n",
             "grpo": "per_device_train_batch_size: 4\nnum_generations: 4\n"
                     "max_completion_length: 8\n"}[recipe]  # fmt: skip
    config.write_text(small)
    hold = ["--hold-rate", "exclamations"] if recipe == "grpo" else []
    out = tmp_path / recipe
    done = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "train", recipe, str(tmp_path / "run"),
         "--from", str(tiny_llama_dir), "--out", str(out), "--steps", "1",
         "--config", str(config), *hold],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / TRAINING_MARKER).read_text())["metrics"]
    assert metrics["global_step"] == 1
    if recipe == "grpo":  # every logged reply has a "!": a rate to hold
        assert metrics["reward_names"][-1] == "exclamations_rate"
    _assert_serves(out)


def test_flywheel_train_grpo_multiturn_command(tiny_llama_dir, tmp_path):
    # Whole conversations with new simulated users of the run's world (its user LLM: the
    # packaged SmolLM2); --multiturn belongs to grpo alone.
    import subprocess
    import sys

    _logged_run(tmp_path / "run")
    config = tmp_path / "small.yaml"
    config.write_text(
        "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 6\n"
    )
    base = [sys.executable, "-m", "flywheel.cli", "train"]
    args = [str(tmp_path / "run"), "--from", str(tiny_llama_dir), "--steps", "1"]
    refused = subprocess.run(
        [*base, "sft", *args, "--out", str(tmp_path / "sft"), "--multiturn", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert refused.returncode == 2 and "use it with grpo, not sft" in refused.stderr
    out = tmp_path / "multiturn"
    done = subprocess.run(
        [*base, "grpo", *args, "--out", str(out), "--config", str(config),
         "--multiturn", "2", "--users", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / TRAINING_MARKER).read_text())["metrics"]
    assert metrics["global_step"] == 1 and metrics["max_bot_turns"] == 2


# ----------------------------------------------------------------------------- one recipe
BENCHMARK_BEST = [
    "--learning-rate", "5e-4", "--artifact-tolerance", "words=0,exclamations=0,emoji=1",
    "--beta", "0.2", "--normalise", "reference", "--hold-rate", "emoji", "--rate-lr", "0.1",
    "--rate-estimate", "tokens", "--top-p", "0.95", "--mask-credit", "emoji",
    "--reference-samples", "2", "--max-new-tokens", "48", "--train-prompts", "128",
]  # fmt: skip
RECIPE_CHECKERS = {
    "Pixel": build_checkers({"no_emoji": True, "max_words": 12}),
    "Mara": build_checkers({"starts_with": "Ahoy"}),
    "Kim": build_checkers({"ends_with_question": True}),
}


def _benchmark_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_steerability.py"
    spec = importlib.util.spec_from_file_location("grpo_steerability", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _reference(estimate: float = 0.05):
    from training.recipes import ReferenceReplies

    replies = ["Ahoy there, sailor!", "Hi 😀 friend", "What do you play?", "Ahoy! Fair winds"]
    characters = ["Mara", "Kim", "Kim", "Mara"]
    chats = [[{"role": "user", "content": f"hello {i}"}] for i in range(len(replies))]
    return ReferenceReplies(
        chats * 3, replies * 3, characters * 3, 0.8, 0.95, {"emoji": [estimate] * 12}
    )


def _three_recipes(steps: int):
    """The loop's, the CLI's and the benchmark's recipe for the same settings: the
    benchmark's best (benchmarks/README.md) with ``steps`` steps."""
    from flywheel.candidates import grpo_recipe
    from flywheel.scenario import RecipeConfig
    from policies import SamplingParams
    from training.recipes import cli_recipe

    loop = grpo_recipe(
        RecipeConfig(name="grpo", kind="grpo", max_steps=steps, max_new_tokens=48),
        SamplingParams(temperature=0.8, top_p=0.95),
    )
    cli = cli_recipe(steps)
    bench = _benchmark_module()
    args = bench.build_parser().parse_args([*BENCHMARK_BEST, "--max-steps", str(steps)])
    return {"loop": loop, "cli": cli, "benchmark": bench.recipe_from_args(args)}


def test_loop_cli_and_benchmark_build_identical_grpo_runs(tmp_path):
    from training.recipes import build_grpo

    recipes = _three_recipes(steps=5)
    assert recipes["loop"] == recipes["cli"] == recipes["benchmark"]
    built = {
        name: build_grpo(recipe, RECIPE_CHECKERS, _reference(), tmp_path, seed=3)
        for name, recipe in recipes.items()
    }
    described = {name: build.describe() for name, build in built.items()}
    assert described["loop"] == described["cli"] == described["benchmark"]
    # What the benchmark's command line built by hand before there was a builder.
    one = described["loop"]
    assert one["reward_names"] == ["steerability", "artifact_penalty", "emoji_rate"]
    assert set(one["weights"].values()) == {1.0}
    held = one["rate_constraints"]["emoji_rate"]
    assert held["target"] == pytest.approx(0.05) and held["characters"] == ["Kim", "Mara"]
    assert one["credit_masks"] == {"emoji": ["Kim", "Mara"]}
    trainer = one["trainer"]
    assert (trainer["max_steps"], trainer["learning_rate"], trainer["beta"]) == (5, 5e-4, 0.2)
    assert (trainer["temperature"], trainer["top_p"], trainer["max_completion_length"]) == (
        0.8, 0.95, 48,
    )  # fmt: skip
    assert trainer["multi_objective_aggregation"] == "sum_then_normalize"
    assert trainer["seed"] == 3 and trainer["num_generations"] == 8
    scaled = built["cli"].rewards[0]
    assert isinstance(scaled, ScaledReward) and scaled.scale == one["reward_scales"]["steerability"]


def test_recipe_defaults_are_the_benchmarks_best_and_scenario_fields_override_them(tmp_path):
    from flywheel.candidates import grpo_recipe
    from flywheel.scenario import RecipeConfig
    from policies import SamplingParams
    from training.recipes import STEPS_TO_MOVE, GRPORecipe

    best = GRPORecipe()
    assert (best.beta, best.normalise, best.rate_estimate) == (0.2, "reference", "tokens")
    assert best.mask_credit == best.hold_rates == ("emoji",) and best.max_steps == STEPS_TO_MOVE
    serving = SamplingParams(temperature=0.7, top_p=0.9)
    unset = grpo_recipe(RecipeConfig(name="g", kind="grpo"), serving)
    assert (unset.normalise, unset.max_steps, unset.hold_rates) == ("reference", 47, ("emoji",))
    assert (unset.temperature, unset.top_p) == (0.7, 0.9)  # GRPO samples as the model serves
    chosen = grpo_recipe(
        RecipeConfig(
            name="g", kind="grpo", reward_normalisation="group", hold_rates=[], max_steps=6,
            steerability_weight=0, trainer={"learning_rate": 1e-4},
        ),
        serving,
    )  # fmt: skip
    assert (chosen.normalise, chosen.hold_rates, chosen.max_steps) == ("group", (), 6)
    assert chosen.learning_rate == 1e-4 and chosen.trainer == {}  # the recipe says what ran
    build = build_grpo_count(chosen, tmp_path)
    assert build.args.learning_rate == 1e-4 and build.args.temperature == 0.7
    assert [r.__name__ for r in build.rewards] == ["artifact_penalty"]
    assert build.args.multi_objective_aggregation == "normalize_then_sum"


def build_grpo_count(recipe, tmp_path):
    from training.recipes import ReferenceReplies, build_grpo

    ref = _reference()
    reference = ReferenceReplies(
        ref.chats, ref.replies, ref.characters, recipe.temperature, recipe.top_p
    )
    return build_grpo(recipe, RECIPE_CHECKERS, reference, tmp_path / "w", seed=0)


def test_token_estimated_rates_need_matching_sampling_and_estimates(tmp_path):
    import re
    from dataclasses import replace

    from training.recipes import GRPORecipe, ReferenceReplies, build_grpo

    recipe, ref = GRPORecipe(max_steps=1), _reference()
    top_p_1 = replace(ref, top_p=1.0)
    with pytest.raises(ValueError, match=re.escape("fix: top_p = 1.0, temperature = 0.8")):
        build_grpo(recipe, RECIPE_CHECKERS, top_p_1, tmp_path, 0)
    bare = ReferenceReplies(ref.chats, ref.replies, ref.characters, 0.8, 0.95)
    with pytest.raises(ValueError, match="no token estimates"):
        build_grpo(recipe, RECIPE_CHECKERS, bare, tmp_path, 0)
    nucleus = replace(recipe, trainer={"top_p": 1.0})  # GRPOConfig fields may not move it
    with pytest.raises(ValueError, match=re.escape("GRPO sampling at temperature 0.8, top_p 1.0")):
        build_grpo(nucleus, RECIPE_CHECKERS, ref, tmp_path, 0)
    counted = replace(recipe, rate_estimate="count")  # counting reads no probabilities
    assert build_grpo(counted, RECIPE_CHECKERS, top_p_1, tmp_path, 0).constraints


def test_loop_candidate_trains_the_benchmarks_recipe_on_logged_replies(tiny_llama_dir, tmp_path):
    """The loop's grpo candidate: calibrated on the deployed model's logged replies (the
    emoji rate read from its token probabilities), credit masked, one step, checkpoint."""
    from flywheel.candidates import train_candidate
    from flywheel.scenario import RecipeConfig
    from policies import PolicySpec, SamplingParams, load_policy

    deployed = load_policy(PolicySpec(model=str(tiny_llama_dir), dtype="float32"))
    train = pd.DataFrame({
        "prompt": PROMPTS, "character": ["Pixel", "Mara"] * 4,
        "completion": ["Ahoy, what a fine day 😀", "Ahoy matey!"] * 4,
    })  # fmt: skip
    recipe = RecipeConfig(
        name="grpo", kind="grpo", reward_model="none", prompts=4, max_steps=1,
        max_new_tokens=8, trainer={"per_device_train_batch_size": 4, "num_generations": 4},
    )  # fmt: skip
    result = train_candidate(
        recipe, str(tiny_llama_dir), deployed, train, REFERENCE, CHECKERS, None,
        tmp_path / "model", seed=0, sampling=SamplingParams(temperature=0.7, top_p=0.95),
    )  # fmt: skip
    assert result.reward_names == ("steerability", "artifact_penalty", "emoji_rate")
    grpo = result.grpo
    assert grpo is not None
    assert grpo["recipe"]["rate_estimate"] == "tokens" and grpo["recipe"]["temperature"] == 0.7
    assert grpo["credit_masks"] == {"emoji": ["Mara"]}  # Pixel forbids emoji: a checker sees it
    assert 0 < grpo["rate_constraints"]["emoji_rate"]["target"] < 1
    assert result.trainer_metrics["global_step"] == 1
    _assert_serves(tmp_path / "model")


def test_grpo_benchmark_runs_through_the_builder_on_a_tiny_budget(tiny_llama_dir, tmp_path):
    """The benchmark's entry point end to end on the tiny model: base evaluation, reference,
    the builder's rewards and credit mask, one step, evaluation, report."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "benchmarks/grpo_steerability.py", "--model", str(tiny_llama_dir),
         "--train-prompts", "4", "--eval-prompts", "2", "--eval-samples", "1",
         "--max-steps", "1", "--max-new-tokens", "8", "--rate-estimate", "tokens",
         "--top-p", "0.95", "--mask-credit", "emoji", "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "before_after.json").read_text())
    assert report["train_steps"] == 1 and set(report["reward_scales"]) == {
        "steerability", "artifact_penalty",
    }  # fmt: skip
    assert set(report["credit_masks"]) == {"emoji"}
    assert report["paired_tests"]["instruction_following_rate"]["n_prompts"] == 2
    # The gold's part no checker decides is reported beside the whole gold.
    assert report["paired_tests"]["gold_utility_unchecked"]["n_prompts"] == 2


def test_proxy_headroom_is_the_gold_of_the_proxy_best_minus_the_context_mean():
    import importlib.util
    import sys
    from pathlib import Path

    from scipy import stats

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_headroom.py"
    spec = importlib.util.spec_from_file_location("proxy_headroom", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    rng = np.random.default_rng(0)
    samples = pd.DataFrame(
        {"context_id": np.repeat(np.arange(30), 4), "gold": rng.normal(size=120)}
    )
    samples["proxy"] = samples["gold"] + rng.normal(size=120)
    row = module.headroom(samples, "proxy", 4)
    # Reference: with n = all samples, best-of-n is the argmax of the proxy in each context.
    groups = samples.groupby("context_id")
    gains = (
        samples.loc[groups["proxy"].idxmax()].set_index("context_id")["gold"]
        - groups["gold"].mean()
    )
    low, high = stats.t.interval(0.95, len(gains) - 1, gains.mean(), stats.sem(gains))
    assert row["gold_gain"] == pytest.approx(gains.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    assert row["contexts"] == 30 and row["gold_gain"] > 0
    samples["proxy"] = -samples["gold"]
    assert module.headroom(samples, "proxy", 4)["gold_gain"] < 0
    # A proxy that ties every reply picks one at random: no gain, whatever the sample order.
    samples["proxy"] = 1.0
    assert module.headroom(samples, "proxy", 2)["gold_gain"] == pytest.approx(0.0, abs=1e-12)
