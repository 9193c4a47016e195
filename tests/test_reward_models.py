"""Reward models: example tables, both backbones, evaluation, annotators, rm_eval and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flywheel.rm_eval import (
    cross_validate,
    gold_correlation,
    pairwise_gold_agreement,
    read_comparisons,
    train_and_evaluate,
    write_comparisons,
)
from rewards.datasets import (
    case_control_pairs,
    pairwise_examples,
    pointwise_examples,
    split_by_group,
)
from rewards.evaluation import calibration, evaluate_pairwise, pairwise_accuracy, win_rate
from rewards.rm import (
    LLMConfig,
    MiniLMConfig,
    load_reward_model,
    train_llm,
    train_minilm,
)

ROOT = Path(__file__).resolve().parents[1]

# Each context has replies about it; a reply about another context is off-topic.
TOPICS = {
    "What should I cook tonight?": (
        "Try a lemon garlic pasta with fresh basil.",
        "A slow cooked beef stew would be cozy tonight.",
        "Roast some vegetables with rosemary and olive oil.",
        "Make tacos with grilled chicken and salsa.",
        "Bake a salmon fillet with dill and potatoes.",
    ),
    "Where should I go on holiday?": (
        "Lisbon has sunny streets and great seafood.",
        "Go hiking along the fjords in Norway.",
        "Kyoto temples are beautiful in autumn.",
        "Drive a road trip along the Portuguese coast.",
        "Spend a week on the beaches of Crete.",
    ),
    "Any song recommendations for me?": (
        "Listen to some classic jazz by Miles Davis.",
        "Beethoven symphonies are great for focus.",
        "Put on some upbeat funk from the seventies.",
        "Try the new album from that indie rock band.",
        "Some old soul records by Aretha Franklin.",
    ),
    "How can I get fitter this year?": (
        "Start running three times a week.",
        "Swim laps at your local pool.",
        "Cycle to work to build stamina.",
        "Add squats and push-ups to your mornings.",
        "Join a weekly yoga class near you.",
    ),
}
CONTEXTS = list(TOPICS)


def _reply(rng: np.random.Generator, context: int, on_topic: bool, held_out: bool) -> str:
    """On-topic or off-topic reply; the last reply of each topic is kept for testing."""
    if not on_topic:
        context = (context + 1 + int(rng.integers(len(CONTEXTS) - 1))) % len(CONTEXTS)
    replies = TOPICS[CONTEXTS[context]]
    return replies[-1] if held_out else replies[int(rng.integers(len(replies) - 1))]


def relevance_pairs(rng: np.random.Generator, n: int, held_out: bool = False) -> pd.DataFrame:
    """Pairwise table where relevance alone decides: the on-topic reply is always chosen."""
    rows = []
    for i in range(n):
        c = int(rng.integers(len(CONTEXTS)))
        rows.append({
            "context": CONTEXTS[c],
            "chosen": _reply(rng, c, True, held_out),
            "rejected": _reply(rng, c, False, held_out),
            "user_id": f"u{i % 30}",
            "annotator_id": f"a{i % 5}",
        })  # fmt: skip
    return pd.DataFrame(rows)


def relevance_turns(rng: np.random.Generator, n: int, days: int = 3) -> pd.DataFrame:
    """A turns table (run store layout) where engagement follows relevance.

    P(continued) and P(liked) are 0.85 on-topic, 0.15 off-topic; the gold utility is the
    relevance itself plus noise.
    """
    rows = []
    for i in range(n):
        c = int(rng.integers(len(CONTEXTS)))
        on = bool(rng.random() < 0.5)
        p = 0.85 if on else 0.15
        rows.append({
            "session_id": f"s{i}", "user_id": f"u{i % 24}", "character": "ada",
            "day": int(rng.integers(days)), "turn_index": 0,
            "user_message": CONTEXTS[c], "bot_reply": _reply(rng, c, on, held_out=False),
            "continued": bool(rng.random() < p), "liked": bool(rng.random() < p),
            "reported": False, "gold_satisfaction": float(on) + 0.1 * rng.normal(),
        })  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- datasets
def test_pointwise_examples_labels_and_oracle_drop() -> None:
    turns = pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u2"], "day": [0, 1, 0, 1],
        "user_message": ["hi", "yo", "hey", "sup"], "bot_reply": ["a", "b", "c", "d"],
        "continued": [True, False, False, False], "liked": [False, True, False, True],
        "reported": [False, False, False, True], "gold_satisfaction": [1.0, 2.0, 3.0, 4.0],
    })  # fmt: skip
    table = pointwise_examples(turns)
    assert "gold_satisfaction" not in table.columns
    assert table["context"].tolist() == ["hi", "yo", "hey", "sup"]
    assert table["engaged"].tolist() == [True, True, False, False]  # a report vetoes
    # u1 and u2 both came back on day 1; day 1 is the last day: unobservable.
    assert table["returned_next_day"].iloc[[0, 2]].tolist() == [1.0, 1.0]
    assert table["returned_next_day"].iloc[[1, 3]].isna().all()
    activity = pd.DataFrame({"user_id": ["u1", "u1", "u1"], "day": [0, 1, 2]})
    with_activity = pointwise_examples(turns, activity)
    assert with_activity["returned_next_day"].tolist()[:3] == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="missing column"):
        pointwise_examples(turns.drop(columns=["liked"]))


def test_pairwise_examples_from_annotator_log() -> None:
    log = pd.DataFrame({
        "context": ["q1", "q2"], "reply_a": ["a1", "a2"], "reply_b": ["b1", "b2"],
        "choice": ["a", "b"], "user_id": ["u1", "u2"], "annotator_id": ["x", "y"],
        "gold_utility_a": [1.0, 0.0], "gold_utility_b": [0.0, 1.0],
    })  # fmt: skip
    pairs = pairwise_examples(log)
    assert pairs["chosen"].tolist() == ["a1", "b2"]
    assert pairs["rejected"].tolist() == ["b1", "a2"]
    assert not any(c.startswith("gold_") for c in pairs.columns)
    with pytest.raises(ValueError, match="'a' or 'b'"):
        pairwise_examples(log.assign(choice=["a", "c"]))


def test_split_by_group_holds_out_whole_users() -> None:
    df = pd.DataFrame({"user_id": [f"u{i % 10}" for i in range(100)], "x": range(100)})
    train, test = split_by_group(df, np.random.default_rng(0), test_size=0.3)
    assert set(train["user_id"]).isdisjoint(test["user_id"])
    assert test["user_id"].nunique() == 3 and len(train) + len(test) == 100


def test_case_control_pairs_match_within_user() -> None:
    df = pd.DataFrame({
        "user_id": ["u1"] * 4 + ["u2"] * 2 + ["u3"] * 2,
        "context": list("abcdefgh"), "reply": list("ABCDEFGH"),
        "engaged": [True, True, False, False, True, False, True, True],
    })  # fmt: skip
    pairs = case_control_pairs(df, "engaged", np.random.default_rng(0))
    assert len(pairs) == 3  # u1: two positives, u2: one, u3: no negative
    by_reply = df.set_index("reply")
    for row in pairs.itertuples():
        assert by_reply.loc[row.chosen, "engaged"] and not by_reply.loc[row.rejected, "engaged"]
        assert by_reply.loc[row.chosen, "user_id"] == by_reply.loc[row.rejected, "user_id"]


# ---------------------------------------------------------------------------- evaluation
def test_pairwise_accuracy_counts_ties_half_with_wilson_interval() -> None:
    acc = pairwise_accuracy([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 1.0])
    assert acc.accuracy == pytest.approx(0.625) and acc.n == 4
    assert acc.ci_low < 0.625 < acc.ci_high
    assert win_rate([1, 1], [0, 0]).win_rate == 1.0


def test_calibration_matches_reference_computations() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=400)
    y = rng.uniform(size=400) < p  # perfectly calibrated by construction
    cal = calibration(p, y)
    # AUC: share of (positive, negative) pairs ordered correctly, counted directly.
    direct = np.mean(p[y][:, None] > p[~y][None, :])
    assert cal.auc == pytest.approx(direct, abs=1e-9)
    assert cal.brier == pytest.approx(np.mean((p - y) ** 2))
    assert cal.ece < 0.08
    miscalibrated = calibration(np.clip(p + 0.3, 0, 1), y)
    assert miscalibrated.ece > 0.2
    labels = np.where(np.arange(400) % 2 == 0, y, np.nan)  # missing labels are skipped
    assert calibration(p, labels).n == 200


# ---------------------------------------------------------------------------- MiniLM backbone
def test_minilm_pairwise_model_recovers_the_driving_feature(tmp_path: Path) -> None:
    """Relevance alone decides the labels; held-out replies the model never saw are
    ordered by relevance, and saving / loading keeps the scores."""
    rng = np.random.default_rng(0)
    model = train_minilm("pairwise", relevance_pairs(rng, 300), config=MiniLMConfig(seed=0))
    held_out = relevance_pairs(rng, 120, held_out=True)
    assert evaluate_pairwise(model, held_out).accuracy >= 0.85
    loaded = load_reward_model(model.save(tmp_path / "rm"))
    contexts, replies = list(held_out["context"][:8]), list(held_out["chosen"][:8])
    np.testing.assert_allclose(loaded.score(contexts, replies), model.score(contexts, replies),
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="no absolute probability"):
        model.predict_proba(contexts, replies)


def test_minilm_pointwise_and_signal_models_learn_engagement() -> None:
    rng = np.random.default_rng(1)
    table = pointwise_examples(relevance_turns(rng, 400))
    test = pointwise_examples(relevance_turns(rng, 200))
    on_topic = np.array(
        [reply in TOPICS[ctx] for ctx, reply in zip(test["context"], test["reply"], strict=True)]
    )
    pointwise = train_minilm("pointwise", table, config=MiniLMConfig(seed=0))
    p = pointwise.predict_proba(test["context"], test["reply"])["engaged"]
    # Engaged = continued or liked: P = 0.98 on-topic and 0.28 off-topic by construction.
    assert calibration(p, test["engaged"]).auc > 0.75
    assert p[on_topic].mean() == pytest.approx(test["engaged"][on_topic].mean(), abs=0.1)
    assert p[~on_topic].mean() == pytest.approx(test["engaged"][~on_topic].mean(), abs=0.1)
    assert pointwise.history["platt"]["engaged"]["fitted"]

    signals = train_minilm("signals", table, config=MiniLMConfig(seed=0))
    probabilities = signals.predict_proba(test["context"], test["reply"])
    assert set(probabilities) == {"continued", "liked", "returned_next_day"}
    assert calibration(probabilities["liked"], test["liked"]).auc > 0.75
    score = signals.score(test["context"], test["reply"])
    assert score[on_topic].mean() > score[~on_topic].mean() + 0.5

    likes = train_minilm("pointwise", table, config=MiniLMConfig(seed=0), target="liked")
    assert likes.targets == ("liked",) and likes.name == "pointwise-liked-minilm"
    with pytest.raises(ValueError, match="pointwise models only"):
        train_minilm("pairwise", table, target="liked")


# ---------------------------------------------------------------------------- LLM backbone
def test_llm_reward_model_trains_with_reward_trainer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pairs = relevance_pairs(rng, 24)
    config = LLMConfig(model=str(tiny_llama_dir), max_steps=3, batch_size=8, lora_r=4,
                       lora_alpha=8)  # fmt: skip
    model = train_llm("pairwise", pairs, config=config)
    history = model.history["preference"]
    assert history["steps"] == 3 and np.isfinite(history["train_loss"])
    contexts, replies = list(pairs["context"][:5]), list(pairs["chosen"][:5])
    scores = model.score(contexts, replies)
    assert scores.shape == (5,) and np.isfinite(scores).all()
    loaded = load_reward_model(model.save(tmp_path / "llm-rm"))
    np.testing.assert_allclose(loaded.score(contexts, replies), scores, rtol=1e-4, atol=1e-5)
    # Same config, same model: the fresh score head is seeded too (torch's global generator
    # has moved on since the first fit, so an unseeded head would differ).
    again = train_llm("pairwise", pairs, config=config)
    np.testing.assert_allclose(again.score(contexts, replies), scores, rtol=1e-4, atol=1e-5)

    table = pointwise_examples(relevance_turns(rng, 40))
    pointwise = train_llm("pointwise", table, config=config)
    # The intercept makes the mean predicted probability match the base rate it was fit on.
    p = pointwise.predict_proba(table["context"], table["reply"])["engaged"]
    assert abs(p.mean() - table["engaged"].mean()) < 0.1
    assert pointwise.history["engaged"]["pairs"] <= table["engaged"].sum()


# ---------------------------------------------------------------------------- annotators
def test_simulated_annotators_follow_gold_with_noise_and_disagreement() -> None:
    from rewards.embeddings import get_embedder
    from sim.annotators import AnnotatorConfig, PairToJudge, SimulatedAnnotators
    from sim.characters import load_characters
    from sim.gold import GoldModel
    from sim.population import PopulationConfig, UserSampler

    characters = load_characters(ROOT / "scenarios" / "characters")
    name = sorted(characters)[0]
    users = UserSampler(PopulationConfig(), np.random.default_rng(0)).sample(6)
    context = "What should I cook tonight?"
    pairs = [
        PairToJudge(f"p{i}", users[i % 6].user_id, name, context, (),
                    "Try a lemon garlic pasta with fresh basil, it is quick and cozy.",
                    "Whatever. I do not care about that.")
        for i in range(60)
    ]  # fmt: skip
    gold, embedder = GoldModel(), get_embedder()

    sharp = SimulatedAnnotators(gold, characters, users, embedder,
                                AnnotatorConfig(noise=0.05, disagreement=0.0))  # fmt: skip
    records = sharp.label(pairs, np.random.default_rng(1))
    assert all(r.annotator_id == r.user_id for r in records)
    assert all(r.gold_utility_a > r.gold_utility_b for r in records)
    assert np.mean([r.choice == "a" for r in records]) > 0.95

    noisy = SimulatedAnnotators(
        gold,
        characters,
        users,
        embedder,
        AnnotatorConfig(noise=50.0, disagreement=1.0, labels_per_pair=2),
    )
    records = noisy.label(pairs, np.random.default_rng(1))
    assert len(records) == 120
    assert 0.3 < np.mean([r.choice == "a" for r in records]) < 0.7
    assert any(r.annotator_id != r.user_id for r in records)


# ---------------------------------------------------------------------------- rm_eval (oracle)
def test_gold_correlation_and_agreement_match_references() -> None:
    rng = np.random.default_rng(3)
    gold = rng.normal(size=50)
    scores = gold + rng.normal(size=50)
    result = gold_correlation(scores, gold)
    assert result.pearson_r == pytest.approx(stats.pearsonr(scores, gold).statistic)
    assert result.spearman_rho == pytest.approx(stats.spearmanr(scores, gold).statistic)
    agree = pairwise_gold_agreement(
        np.array([1.0, 0.0, 2.0]),
        np.array([0.0, 1.0, 2.0]),
        np.array([1.0, 1.0, 0.0]),
        np.array([0.0, 0.0, 1.0]),
    )
    assert agree == pytest.approx((1 + 0 + 0.5) / 3)


def _comparisons(rng: np.random.Generator, n: int) -> pd.DataFrame:
    pairs = relevance_pairs(rng, n)
    flip = rng.random(n) < 0.5
    return pd.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)], "user_id": pairs["user_id"],
        "annotator_id": pairs["annotator_id"], "context": pairs["context"],
        "reply_a": np.where(flip, pairs["rejected"], pairs["chosen"]),
        "reply_b": np.where(flip, pairs["chosen"], pairs["rejected"]),
        "choice": np.where(flip, "b", "a"),
        "gold_utility_a": np.where(flip, 0.0, 1.0), "gold_utility_b": np.where(flip, 1.0, 0.0),
    })  # fmt: skip


def test_train_and_evaluate_reports_accuracy_gold_and_style() -> None:
    rng = np.random.default_rng(4)
    turns, comparisons = relevance_turns(rng, 300), _comparisons(rng, 300)
    model, report = train_and_evaluate(turns, comparisons, "pairwise", "minilm",
                                       style_controlled=True, seed=0)  # fmt: skip
    assert model.style_controlled and report["model"] == "pairwise-minilm-sc"
    assert report["pairwise_accuracy"]["accuracy"] > 0.85
    assert report["gold_correlation"]["turns"]["pearson_r"] > 0.5
    assert report["gold_correlation"]["pairs_agreement"] > 0.85
    assert set(report["style_correlations"]) == {"length", "emoji", "questions", "exclamations"}
    assert "style_coefficients" in report
    with pytest.raises(ValueError, match="needs annotator comparisons"):
        train_and_evaluate(turns, None, "pairwise", "minilm")


def test_cross_validate_holds_every_user_out_once() -> None:
    rng = np.random.default_rng(6)
    turns, comparisons = relevance_turns(rng, 200), _comparisons(rng, 200)
    result = cross_validate(turns, comparisons, "pairwise", "minilm", folds=2, seed=0)
    assert len(result["folds"]) == 2
    pooled = result["pooled"]
    assert pooled["pairwise_accuracy"]["n"] == 200 and pooled["n_turns"] == 200
    assert pooled["pairwise_accuracy"]["accuracy"] > 0.85
    assert set(pooled["style_sensitivity_sd"]) == {"emoji", "exclamation", "filler"}


def _write_run(run_dir: Path, turns: pd.DataFrame) -> None:
    """A run store holding ``turns`` (other tables filled with neutral values)."""
    from flywheel.store import TABLES, RunStore
    from sim.traffic import DayLog

    defaults = {"VARCHAR": "x", "INTEGER": 0, "DOUBLE": 0.0, "BOOLEAN": False, "JSON": {}}

    def frame(table: str, n: int, **columns: object) -> pd.DataFrame:
        out = {c: columns.get(c, defaults[t.split()[0]]) for c, t in TABLES[table].items()
               if c != "experiment_id"}  # fmt: skip
        return pd.DataFrame({k: (v if isinstance(v, list) else [v] * n) for k, v in out.items()})

    users = sorted(turns["user_id"].unique())
    with RunStore(run_dir) as store:
        store.begin_experiment(
            "e",
            {"unit": 1},
            frame("users", len(users), user_id=users),
            frame("assignments", len(users), user_id=users),
            b"",
        )
        for day, day_turns in turns.groupby("day"):
            t = day_turns.drop(columns=["feature_words"], errors="ignore")
            turn_frame = frame("turns", len(t), **{c: t[c].tolist() for c in t.columns})
            active = sorted(t["user_id"].unique())
            user_days = frame("user_days", len(active), user_id=active, day=int(day), active=True)
            store.commit_day(
                "e",
                DayLog(
                    int(day), "test", int(day) % 7, frame("sessions", 0), turn_frame, user_days, {}
                ),
                b"",
            )


def test_flywheel_rm_train_cli_writes_model_and_rm_eval(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    run_dir = tmp_path / "run"
    _write_run(run_dir, relevance_turns(rng, 200))
    write_comparisons(run_dir, _comparisons(rng, 200))
    assert len(read_comparisons(run_dir)) == 200
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "flywheel.cli", "rm", "train", str(run_dir), "--kind",
           "pointwise", "--backbone", "minilm", "--style-controlled"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = run_dir / "artifacts" / "rm" / "pointwise-minilm-sc"
    report = json.loads((folder / "rm_eval.json").read_text())
    assert report["pairwise_accuracy"]["n"] > 0 and "calibration" in report
    assert report["gold_correlation"]["turns"]["pearson_r"] > 0.3
    assert load_reward_model(folder).style_controlled
    bad = subprocess.run([*cmd[:5], str(tmp_path / "missing")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "does not exist" in bad.stderr
