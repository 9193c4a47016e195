"""The leak probe (flywheel.rm_eval): it reads a planted gold term, its R^2 agrees with
theory, the gold's terms are recomputed exactly from logged turns, and no gold term is
readable from a MiniLM reward model's inputs now that the gold has its own judge (while
the MiniLM-cosine gold it replaced was)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_scenario_toml

from flywheel.rm_eval import (
    LEAK_THRESHOLD,
    TOTAL_TERM,
    leak_probe,
    logged_gold_terms,
    rm_inputs,
    rm_train,
    summarize,
)
from rewards.datasets import pointwise_examples
from rewards.embeddings import get_embedder
from rewards.rm import MiniLMConfig, train_minilm
from sim.characters import load_characters
from sim.chitchat import load_chitchat
from sim.judge import judge_replies
from sim.world import DEFAULT_CHARACTERS_DIR


def test_the_probe_reads_a_planted_term_and_nothing_from_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(400, 30))
    secret = rng.normal(size=400)
    inputs = np.column_stack([noise, secret])  # an input that contains a gold term
    terms = pd.DataFrame(
        {"planted": 2.0 * secret - 1.0, "unrelated": rng.normal(size=400), "bias": 0.5}
    )
    probe = leak_probe(inputs, terms, seed=0)
    by_term = {t.term: t for t in probe.terms}
    assert by_term["planted"].linear_r2 >= LEAK_THRESHOLD
    assert by_term["planted"].best_r2 >= 0.99
    assert by_term["unrelated"].best_r2 < 0.1
    assert probe.leaks() == ["planted"]
    assert probe.constant_terms == ("bias",)
    assert "planted" in probe.summary() and "LEAK" in probe.summary()
    assert json.loads(json.dumps(probe.to_dict()))["leaks"] == ["planted"]


def test_linear_r2_agrees_with_the_signal_to_noise_ratio() -> None:
    """y = x . b + e with Var(x . b) = 1 and Var(e) = 1/3: the population R^2 is 0.75."""
    rng = np.random.default_rng(1)
    n, d = 4000, 10
    x = rng.normal(size=(n, d))
    b = np.full(d, 1 / np.sqrt(d))
    y = x @ b + rng.normal(scale=np.sqrt(1 / 3), size=n)
    probe = leak_probe(x, pd.DataFrame({"y": y}), seed=1)
    assert probe.terms[0].linear_r2 == pytest.approx(0.75, abs=0.02)
    assert probe.leaks() == []


def test_the_probe_refuses_misaligned_or_tiny_inputs() -> None:
    with pytest.raises(ValueError, match="one row per terms row"):
        leak_probe(np.zeros((10, 2)), pd.DataFrame({"a": np.arange(9.0)}))
    with pytest.raises(ValueError, match=">= 25 rows"):
        leak_probe(np.zeros((10, 2)), pd.DataFrame({"a": np.arange(10.0)}))


@pytest.fixture(scope="module")
def human_replies() -> tuple[list[str], list[str], list]:
    """400 human (message, reply) pairs from chit-chat data, each with a character."""
    rng = np.random.default_rng(2)
    pairs = [
        (conv[i - 1], conv[i])
        for conv in load_chitchat().conversations("heldout")
        for i in range(1, len(conv))
    ]
    chosen = rng.choice(len(pairs), size=400, replace=False)
    characters = sorted(load_characters(DEFAULT_CHARACTERS_DIR).values(), key=lambda c: c.name)
    picks = rng.integers(len(characters), size=400)
    messages = [pairs[i][0] for i in chosen]
    replies = [pairs[i][1] for i in chosen]
    contexts = [characters[k].reply_context(m) for m, k in zip(messages, picks, strict=True)]
    return messages, replies, contexts


def _semantic_terms(replies: list[str], contexts: list, judge: object) -> pd.DataFrame:
    scores = judge_replies(replies, contexts, judge)  # type: ignore[arg-type]
    return pd.DataFrame(
        {
            "relevance": [s.relevance for s in scores],
            "persona_consistency": [s.persona_consistency for s in scores],
            "prompt_leak": [s.prompt_leak for s in scores],
        }
    )


def test_minilm_rm_inputs_cannot_read_the_judges_terms_but_could_read_minilm_cosines(
    human_replies: tuple[list[str], list[str], list],
) -> None:
    """The gate on the real encoders: a naive MiniLM reward model's inputs against the
    gold's semantic inputs, on human replies. With the judge no term reaches the bar; the
    MiniLM-cosine gold it replaced fails the same probe (its relevance is a sum of the
    inputs), so the probe would catch the oracle sharing the proxies' eyes again."""
    messages, replies, contexts = human_replies
    rng = np.random.default_rng(3)
    table = pointwise_examples(
        pd.DataFrame(
            {
                "user_message": messages,
                "bot_reply": replies,
                "user_id": [f"u{i % 40}" for i in range(len(replies))],
                "day": 0,
                "continued": rng.random(len(replies)) < 0.5,
                "liked": rng.random(len(replies)) < 0.3,
                "reported": False,
            }
        )
    )
    model = train_minilm("pointwise", table, config=MiniLMConfig(max_epochs=2, seed=0))
    inputs = rm_inputs(model, messages, replies)
    assert inputs.shape == (len(replies), 3 * 384 + model.scaler.covariates(replies[:1]).shape[1])
    judged = leak_probe(inputs, _semantic_terms(replies, contexts, None), seed=0)
    assert judged.leaks() == [], judged.summary()
    minilm = leak_probe(inputs, _semantic_terms(replies, contexts, get_embedder()), seed=0)
    assert "relevance" in minilm.leaks(), minilm.summary()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A real `flywheel ab` run on the tiny Llama (simulated with the current gold)."""
    from flywheel.experiment import run_ab

    folder = tmp_path_factory.mktemp("leak")
    scenario = tiny_scenario_toml(
        folder / "tiny.toml",
        user_model=tiny_llama_dir,
        seed=5,
        max_new_tokens=5,
        world={"turn_cap": 3, "user_llm": {"temperature": 0.0}},
        traffic={
            "n_users": 24,
            "max_sessions_per_day": 2,
            "bot_sampling": {"max_new_tokens": 12, "temperature": 1.0},
        },
    )
    out = folder / "run"
    run_ab(scenario, str(tiny_llama_dir), f"stylevar@0.5,0.3:{tiny_llama_dir}", out, progress=False)
    return out


def test_logged_gold_terms_add_up_to_the_logged_gold(tiny_run: Path) -> None:
    """Recomputed per turn (users from their traits, emoji exposure replayed), the terms
    sum to the gold the simulator logged; the MiniLM encoder in the judge's place does not."""
    from flywheel.rm_eval import load_run_tables

    turns, _, _ = load_run_tables(tiny_run)
    terms = logged_gold_terms(tiny_run, turns)
    logged = turns["gold_satisfaction"].to_numpy()
    assert len(terms) == len(turns) >= 40
    np.testing.assert_allclose(terms[TOTAL_TERM].to_numpy(), logged, atol=1e-4)
    assert (terms["emoji_tire"] < 0).any()  # the exposure replay is exercised
    rows = np.arange(0, len(turns), 3)
    sample = logged_gold_terms(tiny_run, turns, rows=rows)
    np.testing.assert_allclose(sample[TOTAL_TERM].to_numpy(), logged[rows], atol=1e-4)
    before = logged_gold_terms(tiny_run, turns, judge=get_embedder())
    assert not np.allclose(before["relevance"].to_numpy(), terms["relevance"].to_numpy())


def test_rm_train_writes_the_leak_probe(tiny_run: Path) -> None:
    folder, report = rm_train(
        tiny_run,
        "pointwise",
        "minilm",
        out=tiny_run / "rm",
        minilm_config=MiniLMConfig(max_epochs=3),
        probe_rows=None,
        verbose=False,
    )
    probe = json.loads((folder / "rm_eval.json").read_text())["leak_probe"]
    assert probe == json.loads(json.dumps(report["leak_probe"]))
    assert {"relevance", "persona", "length", TOTAL_TERM} <= set(probe["terms"])
    assert "bias" in probe["constant_terms"]
    assert probe["leaks"] == [], summarize(report)
    assert "leak probe:" in summarize(report)


def test_llm_rm_inputs_are_what_its_score_head_reads(tiny_llama_dir: Path) -> None:
    """For an LLM reward model the probe reads the last hidden state at the last token:
    the score head applied to it gives the model's raw scores back."""
    import torch

    from rewards.rm import LLMConfig, train_llm

    rng = np.random.default_rng(6)
    table = pointwise_examples(
        pd.DataFrame(
            {
                "user_message": [f"message {i} about music" for i in range(40)],
                "bot_reply": [f"reply number {i}" + " ok" * (i % 5) for i in range(40)],
                "user_id": [f"u{i % 8}" for i in range(40)],
                "day": 0,
                "continued": rng.random(40) < 0.5,
                "liked": rng.random(40) < 0.5,
                "reported": False,
            }
        )
    )
    config = LLMConfig(model=str(tiny_llama_dir), max_steps=2, batch_size=8, lora_r=4,
                       lora_alpha=8, score_batch_size=7)  # fmt: skip
    model = train_llm("pointwise", table, config=config)
    contexts, replies = list(table["context"][:10]), list(table["reply"][:10])
    inputs = rm_inputs(model, contexts, replies)
    assert inputs.shape == (10, 64)
    head = model.models["engaged"].score
    with torch.no_grad():
        from_inputs = head(torch.from_numpy(inputs).float())[:, 0].numpy()
    raw = model._raw("engaged", contexts, replies)
    np.testing.assert_allclose(from_inputs, raw, rtol=1e-4, atol=1e-4)
