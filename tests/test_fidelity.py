"""The fidelity report card (``flywheel fidelity``) on a small real run of the tiny Llama.

The run's user LLM is the random-initialised tiny Llama with SmolLM2's tokenizer, asked for
two tokens a message: its messages are far shorter than people's, so the message-words line
must MISS, with the KS distance recomputed here from the store and the held-out split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flywheel.fidelity import (
    ASSISTANT_SPEAK_MAX,
    FALLBACK_SHARE_MAX,
    RATE_Z_MAX,
    distinct_n,
    diversity_line,
    fidelity_card,
    implied_rate_z,
    rate_line,
    redraft_text,
    replay_response_model,
    share_line,
    user_llm_totals,
    write_fidelity,
)
from flywheel.store import RunStore
from policies import PolicySpec, load_policy
from rewards.checkers import words
from sim.chitchat import load_chitchat
from sim.gold import GoldModel
from sim.traffic import CountingPolicy, TrafficConfig, TrafficSimulator, drifted_population
from sim.world import World, parse_world

REPO = Path(__file__).resolve().parents[1]
SEED = 4


class RecordingGold(GoldModel):
    """The world's gold model, keeping the probabilities it drew every signal from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[dict[str, Any]] = []
        self.returns: list[dict[str, Any]] = []

    def respond(self, user, utility, reply, turn_index, rng):  # type: ignore[no-untyped-def]
        signals = super().respond(user, utility, reply, turn_index, rng)
        self.replies.append(
            {
                "user_id": user.user_id,
                "turn_index": turn_index,
                "gold_satisfaction": utility,
                "p_like": self.p_like(user, utility, reply),
                "p_continued": self.p_continue(user, utility, turn_index)
                * (1.0 - self.p_report(user, utility, reply)),
            }
        )
        return signals

    def return_probability(self, user, day):  # type: ignore[no-untyped-def]
        p = super().return_probability(user, day)
        self.returns.append({"user_id": user.user_id, "day": day, "p_return": p})
        return p


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, Any]:
    """A standard A/B run of 16 users (1 pre-period + 2 test days), its gold model recording."""
    policy = load_policy(PolicySpec(model=str(tiny_llama_dir), dtype="float32"))
    world_config = parse_world(
        {
            "characters_dir": str(REPO / "scenarios" / "characters"),
            "turn_cap": 3,
            # The tiny Llama's replies are gibberish (utility near -5): a utility offset keeps
            # users chatting and coming back, so every line has data.
            "gold": {"bias": 6.0},
            "user_llm": {"max_new_tokens": 2, "temperature": 0.9},
        },
        source="test",
    )
    world = World.build(world_config, seed=SEED, user_policy=CountingPolicy(policy))
    gold = RecordingGold(world_config.gold)
    world.engine.gold = gold
    traffic = TrafficConfig(
        n_users=16,
        pre_days=1,
        test_days=2,
        treatment_share=0.5,
        max_sessions_per_day=2,
        extra_session_prob=0.5,
        bot_sampling={"max_new_tokens": 4},
    )
    population = drifted_population(world.sampler, traffic, SEED)
    simulator = TrafficSimulator(
        world.engine, population.users, {"control": policy, "treatment": policy}, traffic,
        seed=SEED, user_params=world.user_params, progress=False,
    )  # fmt: skip
    run_dir = tmp_path_factory.mktemp("fidelity") / "run"
    config = {
        "world": world_config.model_dump(mode="json"),
        "traffic": traffic.model_dump(mode="json"),
    }
    with RunStore(run_dir) as store:
        simulator.run(store.open_sink("ab", config))
    return run_dir, gold


def test_replay_gives_the_probabilities_the_simulation_drew_from(tiny_run: tuple) -> None:
    """The implied-rate lines replay the gold model over the logs: every reply's P(like),
    P(continued) and every user-day's P(active) equal what the simulation drew with."""
    run_dir, gold = tiny_run
    with RunStore(run_dir, read_only=True) as store:
        tables = {
            "turns": store.read_turns("ab"),
            "sessions": store.read_sessions("ab"),
            "user_days": store.read_user_days("ab"),
            "users": store.read_users("ab"),
        }
        config = store.experiments().set_index("experiment_id").loc["ab", "config"]
    traffic = TrafficConfig.model_validate(config["traffic"])
    turns, user_days = replay_response_model(**tables, gold=GoldModel(gold.config), traffic=traffic)
    drawn = pd.DataFrame(gold.replies)
    keys = ["user_id", "turn_index", "gold_satisfaction"]
    merged = turns.merge(drawn, on=keys, suffixes=("", "_drawn"), validate="one_to_one")
    assert len(merged) == len(turns) == len(drawn) > 20
    np.testing.assert_allclose(merged["p_like"], merged["p_like_drawn"], rtol=1e-12)
    np.testing.assert_allclose(merged["p_continued"], merged["p_continued_drawn"], rtol=1e-12)
    returns = pd.DataFrame(gold.returns)
    merged = user_days.merge(returns, on=["user_id", "day"], validate="one_to_one")
    assert len(merged) == len(user_days) == 16 * 3
    factor = merged["day"].map(lambda d: traffic.weekday_factors[traffic.weekday(d)])
    expected = np.clip(merged["p_return"] * factor, 0, 1)
    np.testing.assert_allclose(merged["p_active"], expected, rtol=1e-12)
    assert turns["segment"].notna().all() and user_days["segment"].notna().all()


def test_card_of_a_tiny_run_misses_the_message_length_target(tiny_run: tuple) -> None:
    """Two-token messages are far shorter than people's: the KS line MISSes with the
    distance scipy gives on the stored messages against held-out human follow-ups."""
    run_dir, _ = tiny_run
    card = fidelity_card(run_dir)
    with RunStore(run_dir, read_only=True) as store:
        turns = store.read_turns("ab")
        fallbacks = store.user_fallbacks("ab").iloc[0]
    written = turns.loc[turns["turn_index"] >= 1, "user_message"]
    simulated = [len(words(m)) for m in written]
    human = [len(words(m)) for m in load_chitchat().replies("heldout")]
    line = card.line("message words KS")
    assert line.value == pytest.approx(stats.ks_2samp(simulated, human).statistic)
    assert line.n == len(written) > 0
    assert line.status == "MISS" and line.value > 0.1
    assert "message words KS" in [x.name for x in card.misses]
    share = card.line("fallback share")
    assert share.value == pytest.approx(fallbacks["fallback_share"])
    assert share.passed == (fallbacks["fallback_share"] <= FALLBACK_SHARE_MAX)
    speak = card.line("assistant-speak share")
    assert speak.status == "PASS"  # random tokens do not offer help
    assert f"0 of {len(written)} drafts were redrafted (0.0%)" in speak.detail
    assert card.redraft_share == 0.0
    names = [x.name for x in card.lines]
    for kind in ("like", "continue", "return"):
        assert any(n.startswith(f"{kind} rate (") for n in names)
    assert card.experiments == ("ab",)


def test_fidelity_command_writes_json_markdown_and_qq(tiny_run: tuple) -> None:
    """The entry point's smoke test: `flywheel fidelity RUN_DIR` prints every line with its
    target and status and writes the three files, the JSON matching the card."""
    run_dir, _ = tiny_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "flywheel.cli", "fidelity", str(run_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((run_dir / "fidelity.json").read_text())
    card = fidelity_card(run_dir)
    assert document == json.loads(json.dumps(card.to_dict()))
    assert document["misses"] and not document["passed"]
    for line in document["lines"]:
        assert f"| {line['name']} |" in done.stdout and line["target"] in done.stdout
    assert "**MISS**" in done.stdout and "MISSED: message words KS" in done.stdout
    assert (run_dir / "fidelity.md").read_text() == card.summary()
    assert (run_dir / "fidelity_qq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".*.tmp*"))  # no temporary file left behind


def test_fidelity_command_explains_a_missing_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    result = CliRunner().invoke(app, ["fidelity", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "run.duckdb does not exist" in result.output


def test_write_fidelity_replaces_an_older_card(tiny_run: tuple, tmp_path: Path) -> None:
    run_dir, _ = tiny_run
    card = fidelity_card(run_dir)
    (tmp_path / "fidelity.json").write_text("stale")
    paths = write_fidelity(card, tmp_path)
    assert json.loads(paths["json"].read_text())["lines"] == card.to_dict()["lines"]


# ---------------------------------------------------------------------------- the statistics
def test_distinct_n_counts_unique_word_ngrams() -> None:
    # bigrams: (a, b) (b, a) (a, b) | (a, b) -> 2 unique of 4; case and punctuation ignored
    assert distinct_n(["a b a b", "A, b!"]) == pytest.approx(2 / 4)
    assert distinct_n(["one two three"], n=1) == 1.0
    assert np.isnan(distinct_n(["single"]))


def test_diversity_line_misses_repeated_messages() -> None:
    rng = np.random.default_rng(0)
    human = load_chitchat().replies("heldout")
    repeated = diversity_line("message distinct-2", ["that is so cool"] * 50, human, rng)
    assert repeated.status == "MISS" and repeated.value < repeated.reference
    fresh = diversity_line("message distinct-2", list(rng.choice(human, 50)), human, rng)
    assert fresh.status == "PASS"


def test_share_lines_pass_at_the_target_and_miss_above() -> None:
    assert share_line("assistant-speak share", 2, 100, ASSISTANT_SPEAK_MAX, "").passed
    assert share_line("assistant-speak share", 3, 100, ASSISTANT_SPEAK_MAX, "").status == "MISS"
    assert share_line("fallback share", 6, 100, FALLBACK_SHARE_MAX, "").status == "MISS"
    assert share_line("fallback share", 0, 0, FALLBACK_SHARE_MAX, "").status == "MISS"


def testuser_llm_totals_read_redrafts_where_the_run_stored_them() -> None:
    days = pd.DataFrame(
        {"user_messages": [40, 60], "user_fallbacks": [1, 2], "user_redrafts": [4, 6]}
    )
    totals = user_llm_totals(days)
    assert (totals.messages, totals.fallbacks, totals.redrafts) == (100, 3, 10)
    assert totals.redraft_share == pytest.approx(0.1)
    assert redraft_text(totals) == "10 of 100 drafts were redrafted (10.0%)"
    older = user_llm_totals(days.drop(columns="user_redrafts"))  # stored before the count
    assert older.redraft_share is None and redraft_text(older) == "redrafts not recorded"


def test_implied_rate_z_is_standard_normal_when_draws_follow_the_model() -> None:
    """Simulation: 4,000 experiments of 400 Bernoulli draws with varied p. Under the model
    the z's are N(0, 1) and |z| > RATE_Z_MAX about 1% of the time; draws from p + 0.1 miss."""
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, size=(4000, 400))
    zs = np.array([implied_rate_z(rng.random(400) < row, row) for row in p])
    assert abs(zs.mean()) < 0.05 and abs(zs.std() - 1) < 0.05
    false_miss = np.mean(np.abs(zs) > RATE_Z_MAX)
    assert 0.005 < false_miss < 0.016  # 1%, within binomial noise of 4,000 experiments
    assert stats.kstest(zs, "norm").pvalue > 0.001
    # The same figure for a constant p is the binomial count's normal approximation.
    outcomes = np.array([True] * 30 + [False] * 70)
    assert implied_rate_z(outcomes, np.full(100, 0.25)) == pytest.approx(
        (30 - 25) / np.sqrt(100 * 0.25 * 0.75)
    )
    row = p[0]
    shifted = rng.random(400) < np.clip(row + 0.1, 0, 1)
    line = rate_line("like rate (x)", pd.Series(shifted), pd.Series(row))
    assert line.status == "MISS" and line.value > line.reference
