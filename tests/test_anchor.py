"""A feature's token mass: its tokens, its mass, the estimates, the anchor's loss, the rate
constraint's surrogate, and GRPO with both."""

from __future__ import annotations

import json
import math

import emoji
import pytest
import torch

from training.anchor import (
    MIN_LOG_MASS,
    TokenAnchor,
    anchor_loss,
    expected_features,
    feature_token_ids,
    log_feature_mass,
    rate_surrogate,
)
from training.rewards import RateConstraint


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
    # nothing flows back from there (a NaN gradient would poison the whole step)
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


def test_rate_surrogate_gradient_is_the_exact_gradient_of_the_feature_rate():
    """Enumerate every two-token reply over {a, e, s} (e: the feature) of a policy whose
    second token depends on the first: the probability-weighted sum of the surrogate's
    gradients is the gradient of P(reply has e), though each reply's own term is noisy."""
    torch.manual_seed(0)
    first = torch.randn(3, requires_grad=True)
    second = torch.randn(3, 3, requires_grad=True)  # logits of token 2 given token 1
    feature = torch.tensor([1])
    p1, p2 = torch.softmax(first, -1), torch.softmax(second, -1)
    rate = 1 - sum(p1[y] * (1 - p2[y, 1]) for y in (0, 2))  # 1 - P(no e at all)
    exact = torch.autograd.grad(rate, [first, second])

    replies = torch.tensor([[y1, y2] for y1 in range(3) for y2 in range(3)])
    logits = torch.stack([torch.stack([first, second[y1]]) for y1, _ in replies.tolist()])
    log_probs = torch.log_softmax(logits, -1)
    surrogate, estimate = rate_surrogate(
        log_feature_mass(logits, feature),
        log_probs.gather(-1, replies[..., None]).squeeze(-1),
        torch.isin(replies, feature),
        torch.ones_like(replies),
        torch.arange(len(replies)),  # each reply alone: baseline 0
    )
    weights = log_probs.gather(-1, replies[..., None]).squeeze(-1).sum(-1).exp().detach()
    assert float((weights * estimate).sum()) == pytest.approx(rate.item(), rel=1e-5)
    estimated = torch.autograd.grad((weights * surrogate).sum(), [first, second])
    for e, x in zip(estimated, exact, strict=True):
        torch.testing.assert_close(e, x, rtol=1e-4, atol=1e-6)
    # the estimate stops at the first e: a reply "e e" counts the mass of position 1 only
    assert float(estimate[4]) == pytest.approx(float(p1[1]), rel=1e-5)


def test_rate_surrogate_baseline_is_the_mean_of_the_other_replies_to_the_same_prompt():
    log_mass = torch.log(torch.tensor([[0.1], [0.3], [0.2], [0.4]]))
    token_logps = torch.zeros(4, 1, requires_grad=True)
    surrogate, _ = rate_surrogate(
        log_mass, token_logps, torch.zeros(4, 1, dtype=torch.bool), torch.ones(4, 1),
        torch.tensor([0, 0, 0, 1]),
    )  # fmt: skip
    (grad,) = torch.autograd.grad(surrogate.sum(), token_logps)
    # prompt 0: each reply's mass minus the mean of the other two; prompt 1 alone: baseline 0
    torch.testing.assert_close(grad[:, 0], torch.tensor([-0.15, 0.15, 0.0, 0.4]))


def test_grpo_with_an_anchor_and_a_rate_constraint_acts_only_on_held_characters(
    tiny_llama_dir, tmp_path
):
    from test_training import CHECKERS, PROMPTS, REFERENCE

    from training.grpo import build_rewards, grpo_config, grpo_records, train_grpo
    from training.models import TRAINING_MARKER, model_config

    def run(characters: list[str], name: str) -> tuple[dict, RateConstraint]:
        args = grpo_config(
            tmp_path / f"work-{name}",
            max_steps=3,
            per_device_train_batch_size=8,  # two prompts a step
            num_generations=4,
            max_completion_length=8,
            learning_rate=1e-2,
        )
        constraint = RateConstraint("emoji", 0.5, ["Mara"])
        out = train_grpo(
            grpo_records(PROMPTS, characters),
            build_rewards(CHECKERS, REFERENCE, held=["emoji"]),
            model_config(str(tiny_llama_dir)),
            args,
            tmp_path / name,
            anchors=[TokenAnchor("emoji", ["Mara"])],
            constraints=[constraint],
        )
        return json.loads((out / TRAINING_MARKER).read_text())["metrics"], constraint

    held, constraint = run(["Mara", "Pixel"] * (len(PROMPTS) // 2), "held")  # Mara's rows only
    # the last step compares a LoRA-updated policy with the base model: it has drifted
    assert held["anchor/emoji_loss"] > 0 and math.isfinite(held["anchor/emoji_log_ratio"])
    assert held["anchor/emoji_log_ratio"] != 0
    # the random model rarely starts an emoji: each batch's estimated rate is far below
    # 0.5, so the multiplier rose every step
    # (a step of two Pixel prompts has nothing to hold and leaves it alone)
    assert constraint.history and {n for n, _, _ in constraint.history} <= {4, 8}
    assert all(0 < rate < 0.5 for _, rate, _ in constraint.history)
    multipliers = [m for _, _, m in constraint.history]
    assert multipliers[0] > 0 and multipliers == sorted(multipliers)
    assert held["constraint/emoji_multiplier"] > 0
    # Pixel forbids emoji: its completions are never anchored nor counted
    forbidden, constraint = run(["Pixel"] * len(PROMPTS), "forbidden")
    assert "anchor/emoji_loss" not in forbidden and constraint.history == []
