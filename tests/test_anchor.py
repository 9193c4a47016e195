"""Token-mass anchors: the feature's tokens, its mass, the loss, and GRPO with an anchor."""

from __future__ import annotations

import json
import math

import emoji
import pytest
import torch

from training.anchor import (
    MIN_LOG_MASS,
    CreditMask,
    TokenAnchor,
    anchor_loss,
    expected_features,
    feature_token_ids,
    log_feature_mass,
    uncredited,
    up_to_first,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize(
    "text",
    [
        "Great job today 😊 keep going!",
        "Look up at the stars 🌟🌍 tonight",
        "Nice one 👍🏻\n🚀 Let's go ✨",
        "No emoji here — just “quotes”, café, 日本語 and naïve words.",
    ],
)
def test_emoji_tokens_start_each_emoji_of_a_reply_once(tokenizer, text):
    ids = set(feature_token_ids(tokenizer, "emoji"))
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert sum(t in ids for t in tokens) == emoji.emoji_count(text)


def test_exclamation_tokens_and_unknown_feature(tokenizer):
    ids = set(feature_token_ids(tokenizer, "exclamations"))
    tokens = tokenizer.encode("Wow! That is great!!", add_special_tokens=False)
    assert sum(t in ids for t in tokens) >= 2
    assert not any(t in ids for t in tokenizer.encode("No shouting.", add_special_tokens=False))
    with pytest.raises(ValueError, match=r"words.*fix"):
        feature_token_ids(tokenizer, "words")
    with pytest.raises(ValueError, match="coef"):
        TokenAnchor("emoji", ["Mara"], coef=0)


def test_feature_mass_follows_temperature_and_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids = torch.tensor([1, 3])
    expected = torch.softmax(logits / 0.5, -1)[0, [1, 3]].sum().log()
    assert log_feature_mass(logits, ids, temperature=0.5).item() == pytest.approx(expected.item())
    # top_p 0.6 keeps token 0 alone (p = 0.64): the feature cannot be sampled, and
    # nothing flows back from there (a NaN gradient would poison a whole GRPO step)
    leaf = logits.clone().requires_grad_()
    dropped = log_feature_mass(leaf, ids, top_p=0.6)
    assert dropped.item() == pytest.approx(MIN_LOG_MASS)
    dropped.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_anchor_loss_pulls_the_policy_mass_toward_the_reference_where_held():
    log_ref = torch.log(torch.tensor([[0.02, 1e-6, 0.02]]))
    log_policy = torch.log(torch.tensor([[0.005, 1e-6, 0.05]])).requires_grad_()
    held = torch.tensor([[1.0, 1.0, 0.0]])
    loss, log_ratio = anchor_loss(log_policy, log_ref, held)
    loss.backward()
    grad = log_policy.grad[0]
    assert loss.item() > 0 and log_ratio.item() < 0  # the held position lost mass
    assert grad[0] < 0  # descending raises the mass that fell below the reference
    assert grad[2] == 0  # not held (a character that forbids the feature)
    assert abs(grad[1]) < 1e-3 * abs(grad[0])  # mid-word: neither model would start one
    same, zero_ratio = anchor_loss(log_ref, log_ref, held)
    assert same.item() == 0 and zero_ratio.item() == 0


def test_expected_features_sum_the_feature_probability_at_each_sampled_position(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = feature_token_ids(tokenizer, "emoji")
    prompts = [[5, 6, 7, 8], [9, 10]]  # different lengths: padding must not move positions
    completions = [[11, 12, 13], [14, ids[0], 16, ids[1], 2]]  # emoji at 1 and 3
    counts, present = expected_features(
        model, prompts, completions, ids, temperature=0.8, top_p=1.0, pad_token_id=2
    )
    first_emoji = [len(completions[0]), 2]  # positions summed for "present"
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0]
        probs = torch.softmax(logits / 0.8, -1)[:, ids].sum(-1)
        drawn = probs[len(prompt) - 1 : len(prompt) + len(completion) - 1]
        assert counts[i] == pytest.approx(drawn.sum().item(), rel=1e-3)
        assert present[i] == pytest.approx(drawn[: first_emoji[i]].sum().item(), rel=1e-3)


def test_grpo_with_an_anchor_logs_its_drift_only_for_held_characters(tiny_llama_dir, tmp_path):
    from test_training import CHECKERS, PROMPTS, REFERENCE, tiny_grpo_args

    from training.grpo import build_rewards, grpo_records, train_grpo
    from training.models import TRAINING_MARKER, model_config

    def run(characters: list[str], name: str) -> dict:
        args = tiny_grpo_args(tmp_path / f"work-{name}", prompts_per_step=2, steps=3)
        out = train_grpo(
            grpo_records(PROMPTS, characters),
            build_rewards(CHECKERS, REFERENCE, held=["emoji"]),
            model_config(str(tiny_llama_dir)),
            args,
            tmp_path / name,
            anchors=[TokenAnchor("emoji", ["Mara"])],
        )
        return json.loads((out / TRAINING_MARKER).read_text())["metrics"]

    held = run(["Mara", "Pixel"] * (len(PROMPTS) // 2), "held")  # only Mara's rows anchored
    # the last step compares a LoRA-updated policy with the base model: it has drifted
    assert held["anchor/emoji_loss"] > 0 and math.isfinite(held["anchor/emoji_log_ratio"])
    assert held["anchor/emoji_log_ratio"] != 0
    # Pixel forbids emoji: its completions are never anchored
    assert "anchor/emoji_loss" not in run(["Pixel"] * len(PROMPTS), "forbidden")


def test_grpo_gives_a_token_estimated_rate_constraint_each_held_replys_probability(
    tiny_llama_dir, tmp_path
):
    from test_training import CHECKERS, PROMPTS, REFERENCE, tiny_grpo_args

    from training.grpo import build_rewards, grpo_records, train_grpo
    from training.models import model_config
    from training.rewards import RateConstraint

    calls: list[list[tuple[str, float]]] = []  # (character, probability) per step

    def spy(prompts, completions, character, expected_emoji, **kwargs):
        calls.append(list(zip(character, expected_emoji, strict=True)))
        return [0.0] * len(completions)

    spy.__name__ = "steerability"  # a weight train_grpo knows
    constraint = RateConstraint("emoji", 0.05, ["Mara"], estimate="tokens")
    args = tiny_grpo_args(tmp_path / "work", prompts_per_step=2)
    rewards = build_rewards(CHECKERS, REFERENCE, held=["emoji"])[1:]  # the artifact penalty
    train_grpo(
        grpo_records(PROMPTS, ["Mara", "Pixel"] * (len(PROMPTS) // 2)),
        [spy, *rewards, constraint],
        model_config(str(tiny_llama_dir)),
        args,
        tmp_path / "model",
    )
    seen = [pair for call in calls for pair in call]
    mara = [x for ch, x in seen if ch == "Mara"]
    # a random model puts some mass on the emoji tokens at every position: each held reply
    # has a probability in (0, 1); Pixel forbids emoji and is not estimated
    assert mara and all(0 < x < 1 for x in mara)
    assert all(x == 0 for ch, x in seen if ch == "Pixel")
    # the multiplier read the mean of the held replies' probabilities, step by step
    held = [c for c in ([x for ch, x in call if ch == "Mara"] for call in calls) if c]
    assert [n for n, _, _ in constraint.history] == [len(c) for c in held]
    assert [rate for _, rate, _ in constraint.history] == pytest.approx(
        [sum(c) / len(c) for c in held]
    )


def test_up_to_first_keeps_the_positions_before_the_feature_and_its_first_use():
    ids = torch.tensor([7, 9])
    tokens = torch.tensor([[1, 2, 7, 3, 9], [1, 2, 3, 4, 5], [9, 1, 1, 1, 1]])
    assert up_to_first(tokens, ids).tolist() == [
        [1, 1, 1, 0, 0],  # the first emoji's position counts: it is where the choice was made
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]


def test_uncredited_marks_the_feature_tokens_of_held_rows_only():
    ids = torch.tensor([7, 9])
    tokens = torch.tensor([[1, 7, 3, 9], [7, 2, 3, 4], [1, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    held = torch.tensor([1.0, 0.0, 1.0])  # the second row's character is not masked
    assert uncredited(tokens, mask, ids, held).int().tolist() == [
        [0, 1, 0, 1],
        [0, 0, 0, 0],
        [0, 1, 0, 0],
    ]


def test_grpo_gives_masked_tokens_no_credit(tiny_llama_dir, tmp_path, monkeypatch):
    """With every token counted as the feature, a held character's completions carry no
    advantage anywhere and the KL term has no gradient at the base model: GRPO leaves the
    weights as they were. A character the mask does not hold still learns."""
    from test_training import CHECKERS, PROMPTS, REFERENCE, _changed, _weights, tiny_grpo_args

    import training.anchor
    from training.grpo import build_rewards, grpo_records, train_grpo
    from training.models import TRAINING_MARKER, model_config

    monkeypatch.setattr(
        training.anchor, "feature_token_ids", lambda tokenizer, feature: range(len(tokenizer))
    )

    def run(character: str) -> tuple[bool, dict]:
        out = train_grpo(
            grpo_records(PROMPTS, [character] * len(PROMPTS)),
            build_rewards(CHECKERS, REFERENCE, held=["emoji"]),
            model_config(str(tiny_llama_dir)),
            tiny_grpo_args(tmp_path / f"work-{character}", prompts_per_step=2),
            tmp_path / character,
            credit_masks=[CreditMask("emoji", ["Mara"])],
        )
        metrics = json.loads((out / TRAINING_MARKER).read_text())["metrics"]
        return _changed(_weights(tiny_llama_dir), _weights(out)), metrics

    changed, metrics = run("Mara")
    assert not changed and metrics["credit_mask/emoji_tokens"] > 0
    changed, metrics = run("Pixel")
    assert changed and metrics["credit_mask/emoji_tokens"] == 0
