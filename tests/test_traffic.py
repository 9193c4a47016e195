"""The traffic model: assignment, novelty, drift, the batcher, and whole experiments.

The end-to-end tests run ``flywheel ab`` on a tiny random Llama (real SmolLM2 tokenizer)
for both arms and the simulated users, with every session opening in one evening slot, so
a simulated day is a handful of batched backend calls. The resume tests compare an
interrupted-then-resumed run with an independent uninterrupted one (a separate process):
equal tables are also the "same scenario + seed -> same numbers" check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import simpy
from conftest import tiny_scenario_toml
from pydantic import ValidationError
from scipy import stats

from flywheel.experiment import PolicyCache, load_scenario, run_ab
from flywheel.store import RunStore
from policies import Chat, Generation, Policy, PolicySpec, SamplingParams
from sim.population import PopulationConfig, SegmentConfig, TraitDist, UserSampler
from sim.traffic import (
    Batcher,
    TrafficConfig,
    assign_arm,
    drifted_population,
    hash_bucket,
    novelty_offset,
)

REPO = Path(__file__).resolve().parents[1]
EVENING_ONLY = [0.0] * 20 + [1.0, 0.0, 0.0, 0.0]  # every session arrives at 20:00


# ---------------------------------------------------------------------------- assignment
def test_assignment_is_deterministic_uniform_and_salted() -> None:
    ids = [f"user-{i}" for i in range(20_000)]
    buckets = np.array([hash_bucket(uid, "exp1") for uid in ids])
    assert stats.kstest(buckets, "uniform").pvalue > 0.001
    arms = [assign_arm(uid, "exp1", 0.1) for uid in ids]
    share = arms.count("treatment") / len(ids)
    assert abs(share - 0.1) < 0.01  # 4.7 binomial standard deviations
    assert arms == [assign_arm(uid, "exp1", 0.1) for uid in ids]
    resalted = [assign_arm(uid, "exp2", 0.1) for uid in ids]
    both = sum(a == b == "treatment" for a, b in zip(arms, resalted, strict=True))
    assert abs(both / len(ids) - 0.01) < 0.004  # independent under a new salt: 10% x 10%


def test_novelty_decays_by_half_life() -> None:
    assert novelty_offset(0, 0.4, 2.0) == pytest.approx(0.4)
    assert novelty_offset(2, 0.4, 2.0) == pytest.approx(0.2)
    assert novelty_offset(4, -0.4, 2.0) == pytest.approx(-0.1)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"treatment_share": 1.5}, "treatment_share"),
        ({"weekday_factors": (1.0, 1.0)}, "needs 7 values"),
        ({"slot_minutes": 7}, r"must divide a day \(1440 minutes\), got 7"),
        ({"n_users": 5, "treatment_share": 0.1}, "n_users = 5 with treatment_share = 0.1"),
        ({"hourly_weights": (0.0,) * 24}, "positive sum"),
    ],
)
def test_traffic_config_errors_name_field_and_value(override: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        TrafficConfig(**override)


def test_scenario_errors_name_path_value_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[traffic]\ntretment_share = 0.2\ntest_days = 0\n")
    with pytest.raises(ValueError) as err:
        load_scenario(path)
    text = str(err.value)
    assert "scenario.traffic.tretment_share = 0.2: unknown key" in text
    assert "scenario.traffic.test_days = 0" in text
    assert "fix: Days of the A/B test" in text
    path.write_text("[analysis]\nalfa = 0.1\n")
    with pytest.raises(ValueError, match=r"scenario.analysis.alfa = 0.1: unknown key"):
        load_scenario(path)


def test_shipped_small_scenario_is_valid() -> None:
    scenario = load_scenario(REPO / "scenarios" / "ab_small.toml")
    assert scenario.world.characters_dir.is_dir()
    assert scenario.traffic.pre_days >= 1


# ---------------------------------------------------------------------------- drift
def _sampler(seed: int = 0) -> UserSampler:
    population = PopulationConfig(
        segments=[
            SegmentConfig(name="casual", share=0.8),
            SegmentConfig(name="deep", share=0.2, patience=TraitDist(mean=0.9, sd=0.0)),
        ]
    )
    return UserSampler(population, np.random.default_rng(seed))


def test_drift_accumulates_and_shifts_the_segment_mix() -> None:
    base = TrafficConfig(n_users=3000, churn_per_generation=0.3, segment_drift={"deep": 3.0})
    gen0 = drifted_population(_sampler(), base, seed=5)
    gen1 = drifted_population(_sampler(), base.model_copy(update={"generation": 1}), seed=5)
    gen3 = drifted_population(_sampler(), base.model_copy(update={"generation": 3}), seed=5)
    assert [u.user_id for u in gen0.users] == [u.user_id for u in _sampler().sample(3000)]
    new1 = {uid for uid, g in gen1.joined.items() if g > 0}
    new3 = {uid for uid, g in gen3.joined.items() if g > 0}
    assert new1 < new3  # a newcomer stays; later generations only add newcomers
    assert abs(len(new3) / 3000 - (1 - 0.7**3)) < 0.04
    by_id = {u.user_id: u for u in gen3.users}
    assert all(by_id[uid] == u for u in gen1.users if (uid := u.user_id) in new1)
    newcomers = [by_id[uid] for uid in new3]
    deep_share = np.mean([u.segment == "deep" for u in newcomers])
    # generation-1 newcomers see deep weight 0.2*3 (share 0.43), generation 3: 0.2*27 (0.87)
    assert deep_share > 0.4


def test_drift_rejects_unknown_segments() -> None:
    config = TrafficConfig(n_users=10, generation=1, churn_per_generation=0.5,
                           segment_drift={"nobody": 2.0})  # fmt: skip
    with pytest.raises(ValueError, match=r"segment_drift names segments \['nobody'\]"):
        drifted_population(_sampler(), config, seed=0)


# ---------------------------------------------------------------------------- batcher
def test_batcher_gathers_one_instant_and_chains_kinds() -> None:
    env = simpy.Environment()
    calls: list[tuple[str, float, list[int]]] = []

    def handler(kind: str):
        def answer(key: str, items: list[int]) -> list[int]:
            calls.append((f"{kind}:{key}", env.now, items))
            return [x * 10 for x in items]

        return answer

    users = Batcher(env, handler("user"), priority=2)
    bots = Batcher(env, handler("bot"), priority=3)
    got: dict[int, int] = {}

    def conversation(i: int, start: float):
        yield env.timeout(start)
        yield users.request("u", i)  # the user writes ...
        got[i] = yield bots.request("a" if i % 2 else "b", i)  # ... the bot answers at once

    for i, start in enumerate([1.0, 1.0, 1.0, 1.0, 2.0]):
        env.process(conversation(i, start))
    env.run()
    assert calls == [
        ("user:u", 1.0, [0, 1, 2, 3]),
        ("bot:b", 1.0, [0, 2]),
        ("bot:a", 1.0, [1, 3]),
        ("user:u", 2.0, [4]),
        ("bot:b", 2.0, [4]),
    ]
    assert got == {0: 0, 1: 10, 2: 20, 3: 30, 4: 40}


def test_unbatched_mode_answers_each_request_alone() -> None:
    env = simpy.Environment()
    calls: list[list[int]] = []

    def answer(key: str, items: list[int]) -> list[int]:
        calls.append(items)
        return items

    single = Batcher(env, answer, priority=2, gather=False)

    def ask(i: int):
        yield env.timeout(1.0)
        yield single.request("k", i)

    for i in range(3):
        env.process(ask(i))
    env.run()
    assert calls == [[0], [1], [2]]


# ---------------------------------------------------------------------------- end to end
class Crash:
    """A budget of backend calls shared by several policies; the last one raises."""

    def __init__(self, calls: int) -> None:
        self.left = calls


class FailAfter:
    """Wraps a real policy and raises once the shared ``Crash`` budget is spent."""

    def __init__(self, base: Policy, crash: Crash) -> None:
        self.base, self.name, self.crash = base, base.name, crash

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        self.crash.left -= 1
        if self.crash.left <= 0:
            raise RuntimeError("injected crash")
        return self.base.generate(chats, params)


@pytest.fixture(scope="module")
def tiny_scenario(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    return tiny_scenario_toml(
        tmp_path_factory.mktemp("scenario") / "tiny.toml",
        user_model=tiny_llama_dir,
        seed=11,
        max_new_tokens=5,
        temperature=0.0,
        traffic={
            "max_sessions_per_day": 1,
            "novelty_amplitude": 0.3,
            "hourly_weights": EVENING_ONLY,
        },
    )


@pytest.fixture(scope="module")
def reference_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_scenario: Path, tiny_llama_dir: Path
) -> Path:
    """An uninterrupted run through the real command line (the entry point's smoke test)."""
    out = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [
        sys.executable, "-m", "flywheel.cli", "ab", str(tiny_scenario),
        "--control", str(tiny_llama_dir), "--treatment", f"violate:{tiny_llama_dir}",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "decision:" in done.stdout
    return out


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    with RunStore(run_dir, read_only=True) as store:
        return {
            "turns": store.read_turns("ab").drop(columns=["experiment_id"]),
            "sessions": store.read_sessions("ab").drop(columns=["experiment_id"]),
            "user_days": store.read_user_days("ab").drop(columns=["experiment_id"]),
            "users": store.read_users("ab").drop(columns=["experiment_id"]),
        }


def test_ab_writes_result_and_catches_the_planted_violations(reference_run: Path) -> None:
    result = json.loads((reference_run / "ab" / "result.json").read_text())
    for metric in ("breadth", "depth", "violation_rate", "report_rate", "unsafe_rate"):
        assert {"lift", "ci_low", "ci_high", "p_value", "cuped_variance_reduction"} <= set(
            result["metrics"][metric]
        )
    assert result["srm_p_value"] is not None
    violations = result["metrics"]["violation_rate"]
    assert violations["treatment"] == 1.0 and violations["control"] < 0.5
    assert result["decision"] == "hold" and "violation_rate" in result["reason"]
    for name in ("report.md", "daily.png", "lift.png", "simulation.json"):
        assert (reference_run / "ab" / name).stat().st_size > 0


def test_traffic_is_batched_and_arms_are_served_right(reference_run: Path) -> None:
    tables = _tables(reference_run)
    turns, user_days = tables["turns"], tables["user_days"]
    assert len(user_days) == 16 * 3 and set(user_days.period) == {"pre", "test"}
    pre, test = turns[turns.period == "pre"], turns[turns.period == "test"]
    assert set(pre.policy) == {pre.policy.iloc[0]} and not pre.policy.iloc[0].startswith("violate")
    treated = test[test.arm == "treatment"]
    assert treated.policy.str.startswith("violate@1:").all() and treated.violates_any.all()
    assert (tables["sessions"].start_hour == 12.0).all()  # 20:00 falls in the 12-24 h slot
    with RunStore(reference_run, read_only=True) as store:
        days = store.read_days("ab")
    # every session opens in the same slot and runs in lockstep, and both arms wrap one engine:
    # one engine run per turn for both arms, however many sessions there are
    assert (days.bot_calls <= 2).all() and (days.turns > days.bot_calls).any()
    assert days.max_bot_batch.max() > 1


def test_rerun_with_other_arguments_is_refused(reference_run: Path, tiny_scenario: Path) -> None:
    with pytest.raises(ValueError, match="different scenario, policies or seed"):
        run_ab(tiny_scenario, "smollm2", "smollm2", reference_run, progress=False)


@pytest.fixture(scope="module")
def cache(tiny_llama_dir: Path) -> PolicyCache:
    cache = PolicyCache()
    cache.get(PolicySpec(model=str(tiny_llama_dir), dtype="float32"))
    cache.get(PolicySpec(model=str(tiny_llama_dir)))
    return cache


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = _tables(run_dir), _tables(reference)
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_dtype=False, obj=name)
    result = json.loads((run_dir / "ab" / "result.json").read_text())
    assert result == json.loads((reference / "ab" / "result.json").read_text())


def test_resume_after_a_crash_between_days(
    tmp_path: Path, tiny_scenario: Path, tiny_llama_dir: Path, cache: PolicyCache,
    reference_run: Path,
) -> None:  # fmt: skip
    def crash_after_day_0(day: int) -> None:
        if day == 0:
            raise KeyboardInterrupt

    model, out = str(tiny_llama_dir), tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_ab(tiny_scenario, model, f"violate:{model}", out, progress=False,
               on_day_end=crash_after_day_0, policy_cache=cache)  # fmt: skip
    with RunStore(out, read_only=True) as store:
        assert store.read_days("ab")["day"].tolist() == [0]
    run_ab(tiny_scenario, model, f"violate:{model}", out, progress=False, policy_cache=cache)
    _assert_same_run(out, reference_run)


def test_resume_after_a_crash_inside_a_day(
    tmp_path: Path, tiny_scenario: Path, tiny_llama_dir: Path, cache: PolicyCache,
    reference_run: Path,
) -> None:  # fmt: skip
    with RunStore(reference_run, read_only=True) as store:
        days = store.read_days("ab").set_index("day")
    calls = days.bot_calls + days.user_calls
    assert calls[1] > 0
    # crash on the last backend call of day 1: the whole day is in progress, none committed
    crash = Crash(int(calls[0] + calls[1]))
    model, out = str(tiny_llama_dir), tmp_path / "run"
    crashing = PolicyCache()
    for spec in (PolicySpec(model=model), PolicySpec(model=model, dtype="float32")):
        crashing.put(spec, FailAfter(cache.get(spec), crash))
    with pytest.raises(RuntimeError, match="injected crash"):
        run_ab(tiny_scenario, model, f"violate:{model}", out, progress=False,
               policy_cache=crashing)  # fmt: skip
    with RunStore(out, read_only=True) as store:
        assert store.read_days("ab")["day"].tolist() == [0]
        assert set(store.read_turns("ab")["day"]) == {0}
    run_ab(tiny_scenario, model, f"violate:{model}", out, progress=False, policy_cache=cache)
    _assert_same_run(out, reference_run)


def test_ab_twins_analyses_both_lives_beside_the_standard_view(
    tmp_path: Path, tiny_scenario: Path, tiny_llama_dir: Path, cache: PolicyCache
) -> None:
    model = str(tiny_llama_dir)
    outcome = run_ab(tiny_scenario, model, f"violate:{model}", tmp_path / "twins",
                     progress=False, policy_cache=cache, design="twins")  # fmt: skip
    result = json.loads(outcome.paths["result"].read_text())
    assert result["design"] == "twins" and result["n_users"] == 16
    assert result["decision"] == "hold" and "violation_rate" in result["reason"]
    violations = result["metrics"]["violation_rate"]
    assert violations["treatment"] == 1.0 and violations["control"] < 0.5
    assert result["standard"]["n_users"] == 16  # the hashed lives: what production would see
    report = outcome.paths["report"].read_text()
    assert "Twin decision: HOLD" in report and "## Standard view" in report
    with RunStore(tmp_path / "twins", read_only=True) as store:
        days = store.read_user_days("ab")
    assert (days[days.period == "test"].groupby(["user_id", "day"]).size() == 2).all()
    with pytest.raises(ValueError, match="--design 'paired' is not a traffic design"):
        run_ab(tiny_scenario, model, model, tmp_path / "bad", design="paired")
