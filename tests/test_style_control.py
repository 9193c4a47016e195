"""Style control: covariates, the ODIN penalty, and a model that ignores planted style."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from rewards.evaluation import evaluate_pairwise, style_controlled_win_rates, style_sensitivity
from rewards.rm import LLMConfig, MiniLMConfig, train_llm, train_minilm
from rewards.style_control import (
    COVARIATES,
    STYLE_FEATURES,
    StyleScaler,
    decorrelation_penalty,
    max_abs_style_correlation,
    strip_style,
    style_correlations,
    style_counts,
)

# Contexts and on-topic replies; a pair's other reply answers a different topic.
TOPICS = {
    "What should I cook tonight?": (
        "Try a lemon garlic pasta with fresh basil.",
        "A slow cooked beef stew would be cozy tonight.",
        "Roast some vegetables with rosemary and olive oil.",
        "Make tacos with grilled chicken and salsa.",
    ),
    "Where should I go on holiday?": (
        "Lisbon has sunny streets and great seafood.",
        "Go hiking along the fjords in Norway.",
        "Kyoto temples are beautiful in autumn.",
        "Drive a road trip along the Portuguese coast.",
    ),
    "Any song recommendations for me?": (
        "Listen to some classic jazz by Miles Davis.",
        "Beethoven symphonies are great for focus.",
        "Put on some upbeat funk from the seventies.",
        "Try the new album from that indie rock band.",
    ),
    "How can I get fitter this year?": (
        "Start running three times a week.",
        "Swim laps at your local pool.",
        "Cycle to work to build stamina.",
        "Add squats and push-ups to your mornings.",
    ),
}
EMOJI = ("😀", "🎉", "✨", "🔥")


def _with_emoji(text: str, k: int) -> str:
    return text if k == 0 else f"{text} {''.join(EMOJI[i % len(EMOJI)] for i in range(k))}"


def planted_pairs(
    rng: np.random.Generator, n: int, emoji_weight: float, content_weight: float = 1.5
) -> pd.DataFrame:
    """Pairs whose label depends on content (on-topic beats off-topic) and, planted, on
    the emoji count difference: P(a preferred) = sigmoid(content + emoji_weight * dk)."""
    contexts = list(TOPICS)
    rows = []
    for i in range(n):
        c = int(rng.integers(len(contexts)))
        other = (c + 1 + int(rng.integers(len(contexts) - 1))) % len(contexts)
        on = TOPICS[contexts[c]][int(rng.integers(4))]
        off = TOPICS[contexts[other]][int(rng.integers(4))]
        k_on, k_off = (int(k) for k in rng.integers(0, 4, size=2))
        z = content_weight + emoji_weight * (k_on - k_off)
        a, b = _with_emoji(on, k_on), _with_emoji(off, k_off)
        if rng.random() >= 1 / (1 + np.exp(-z)):
            a, b = b, a
        rows.append(
            {
                "context": contexts[c],
                "chosen": a,
                "rejected": b,
                "user_id": f"u{i % 25}",
                "annotator_id": f"a{i % 7}",
            }
        )
    return pd.DataFrame(rows)


def test_style_counts_use_the_project_feature_rules() -> None:
    counts = style_counts(["Hi there! How are you? 👍🏽🎉", "", "Wow!! ok?"])
    # 👍🏽 (skin tone) is one emoji; words are \w+ tokens.
    assert counts.tolist() == [[5, 2, 1, 1], [0, 0, 0, 0], [2, 0, 1, 2]]


def test_strip_style_removes_emoji_and_exclamations_only() -> None:
    assert strip_style("Great idea!! 👍🏽 Try it 😀🎉") == "Great idea. Try it"
    assert strip_style("Really?! Yes.") == "Really. Yes."
    assert strip_style("Fair use © 2024, right?") == "Fair use © 2024, right?"
    assert style_counts([strip_style("Wow! 🎉🎉 so fun!")])[0].tolist() == [3, 0, 0, 0]


def test_scaler_standardises_and_survives_constant_features() -> None:
    counts = np.array([[3, 0, 1, 0], [5, 2, 0, 0], [10, 1, 1, 0]], dtype=float)
    scaler = StyleScaler.fit(counts)
    z = scaler.transform(counts)
    assert z.shape == (3, len(COVARIATES))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-6)
    # "exclamations" never varies: it maps to 0, not NaN.
    assert np.all(z[:, STYLE_FEATURES.index("exclamations")] == 0)
    assert StyleScaler.from_dict(scaler.to_dict()) == scaler
    with pytest.raises(ValueError, match="shape"):
        scaler.transform(np.zeros((2, 3)))


def test_decorrelation_penalty_matches_numpy_correlations() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 2))
    covariates = rng.normal(size=(50, 3))
    covariates[:, 0] += 2 * scores[:, 0]
    expected = sum(
        np.corrcoef(scores[:, i], covariates[:, j])[0, 1] ** 2
        for i in range(2) for j in range(3)
    )  # fmt: skip
    got = decorrelation_penalty(torch.tensor(scores), torch.tensor(covariates))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    constant = decorrelation_penalty(
        torch.ones(10, dtype=torch.float64), torch.tensor(covariates[:10])
    )
    assert float(constant) == pytest.approx(0.0)


def test_style_correlations_match_scipy() -> None:
    replies = ["short", "a bit longer reply", "the longest reply of them all here 🎉", "mid one"]
    scores = np.array([0.1, 0.5, 0.9, 0.2])
    corr = style_correlations(scores, replies)
    lengths = style_counts(replies)[:, 0]
    assert corr["length"].pearson_r == pytest.approx(stats.pearsonr(scores, lengths).statistic)
    assert np.isnan(corr["questions"].pearson_r)  # no reply has a question mark
    assert max_abs_style_correlation(corr) == pytest.approx(
        max(abs(corr["length"].pearson_r), abs(corr["emoji"].pearson_r))
    )


def test_style_controlled_model_ignores_planted_emoji_signal() -> None:
    rng = np.random.default_rng(1)
    train = planted_pairs(rng, 500, emoji_weight=1.2)
    # Held out: content decides, emoji are noise.
    test = planted_pairs(rng, 200, emoji_weight=0.0, content_weight=20.0)
    replies = list(test["chosen"]) + list(test["rejected"])
    contexts = list(test["context"]) * 2
    config = MiniLMConfig(seed=0)

    naive = train_minilm("pairwise", train, config=config)
    controlled = train_minilm("pairwise", train, style_controlled=True, config=config)

    r_naive = style_correlations(naive.score(contexts, replies), replies)["emoji"].pearson_r
    r_controlled = style_correlations(controlled.score(contexts, replies), replies)
    assert r_naive > 0.3, f"the naive model should have learned the planted emoji, r={r_naive}"
    assert abs(r_controlled["emoji"].pearson_r) <= 0.1
    assert abs(r_controlled["length"].pearson_r) <= 0.1
    # The style term took the emoji effect; the content term kept the content.
    beta = controlled.style_coefficients()
    assert beta["emoji"][0] + beta["log_emoji"][0] > 0.3
    assert evaluate_pairwise(controlled, test).accuracy >= 0.85
    # With the style term kept, the model still explains its training labels' emoji part.
    with_style = controlled.score(contexts, replies, with_style=True)
    assert style_correlations(with_style, replies)["emoji"].pearson_r > 0.3
    # What a policy would gain by appending emoji: a clear bonus naive, none controlled.
    assert style_sensitivity(naive, contexts, replies)["emoji"].mean_delta_sd > 0.3
    gain = style_sensitivity(controlled, contexts, replies)
    assert gain["emoji"].mean_delta == 0.0
    assert abs(gain["exclamation"].mean_delta_sd) < 0.05


def test_style_term_recovers_a_pure_style_driver() -> None:
    """Labels driven by question marks alone: beta says so, the content score does not."""
    rng = np.random.default_rng(2)
    rows = []
    for i in range(300):
        context = list(TOPICS)[i % 4]
        a, b = rng.choice(TOPICS[context], size=2, replace=False)
        qa, qb = (int(q) for q in rng.integers(0, 2, size=2))
        a, b = a.rstrip(".") + ("?" if qa else "."), b.rstrip(".") + ("?" if qb else ".")
        if rng.random() >= 1 / (1 + np.exp(-2.5 * (qa - qb))):
            a, b = b, a
        rows.append(
            {
                "context": context,
                "chosen": a,
                "rejected": b,
                "user_id": f"u{i % 20}",
                "annotator_id": "a",
            }
        )
    model = train_minilm(
        "pairwise", pd.DataFrame(rows), style_controlled=True, config=MiniLMConfig(seed=0)
    )
    beta = {k: v[0] for k, v in model.style_coefficients().items()}
    question = beta["questions"] + beta["log_questions"]
    others = [abs(beta[f"{p}{f}"]) for p in ("", "log_") for f in ("length", "emoji")]
    assert question > 0.5
    assert question > 3 * max(others)
    replies = [r for row in rows[:100] for r in (row["chosen"], row["rejected"])]
    contexts = [row["context"] for row in rows[:100] for _ in range(2)]
    r = style_correlations(model.score(contexts, replies), replies)["questions"].pearson_r
    assert abs(r) <= 0.15


def test_style_controlled_win_rate_warns_on_style_driven_gain() -> None:
    rng = np.random.default_rng(3)
    train = planted_pairs(rng, 400, emoji_weight=1.5)
    model = train_minilm("pairwise", train, style_controlled=True, config=MiniLMConfig(seed=0))
    contexts = [c for c in TOPICS for _ in range(4)]
    baseline = [r for c in TOPICS for r in TOPICS[c]]
    candidate = [_with_emoji(r, 3) for r in baseline]  # same content, emoji spam
    with pytest.warns(UserWarning, match="style, not content"):
        result = style_controlled_win_rates(contexts, candidate, baseline, model)
    assert result.raw.win_rate > 0.8
    assert abs(result.style_controlled.win_rate - 0.5) <= 0.25
    assert result.warning is not None and result.gap > 0.1
    naive_gap = style_controlled_win_rates(contexts, baseline, baseline, model)
    assert naive_gap.warning is None and naive_gap.gap == 0.0


def test_llm_style_controlled_trainer_fits_a_style_term(tiny_llama_dir: Path) -> None:
    rng = np.random.default_rng(4)
    train = planted_pairs(rng, 32, emoji_weight=3.0, content_weight=0.0)
    model = train_llm(
        "pairwise",
        train,
        style_controlled=True,
        config=LLMConfig(
            model=str(tiny_llama_dir),
            max_steps=4,
            batch_size=8,
            lora_r=4,
            lora_alpha=8,
            style_lr=0.1,
        ),
    )
    beta = model.style_coefficients()["preference"]
    assert set(beta) == set(COVARIATES)
    # Four steps on labels driven by emoji alone move the emoji coefficients up.
    assert beta["emoji"][0] + beta["log_emoji"][0] > 0
    history = model.history["preference"]
    assert history["steps"] == 4
    assert any("style_decorrelation_penalty" in e for e in history["log"])
    contexts, replies = list(train["context"][:4]), list(train["chosen"][:4])
    without = model.score(contexts, replies)
    with_style = model.score(contexts, replies, with_style=True)
    assert without.shape == (4,) and not np.allclose(without, with_style)
