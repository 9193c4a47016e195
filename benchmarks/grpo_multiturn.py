"""Single-turn vs multi-turn GRPO at the same wall-clock budget, judged on whole conversations.

Both arms start from the same model (default: the packaged SmolLM2, LoRA, CPU), with the
same recipe (``training.recipes.build_grpo``: rewards, weights, reference scales, emoji
rate held by counting, emoji credit masked) and the same training users:

1. the base model talks with the training users (``--train-users`` simulated users of the
   world, chit-chat *train* openers); every bot turn of those conversations is a logged
   turn: its context is a single-turn GRPO prompt and its reply a reference reply (style
   statistics, reward scales, the held rate), as the flywheel's GRPO trains on turns cut
   from logged conversations;
2. single-turn GRPO (``training.recipes.train``) on those contexts, for ``--minutes``;
3. multi-turn GRPO (``training.multiturn.train_multiturn``) in conversations with the same
   users (``flywheel.multiturn.SimulatedUsers``: G conversations per user and seed), the
   rewards a conversation-level return, for ``--minutes``;
4. base, single-turn and multi-turn models each hold full conversations with
   ``--eval-users`` held-out users (new users, chit-chat *held-out* openers), the same
   users and seeds for every model, and are compared per conversation:

- gold utility per conversation (``SessionRecord.mean_gold_satisfaction``, the ORACLE),
- conversation length (bot replies before the user left), P(return) next day (ORACLE,
  ``ConversationEngine.return_probability`` after the session),
- instruction following and violation rate over the conversation's replies,
- emoji rate and mean words per reply, with their ratio to the base model (drift).

Paired t-tests (statsmodels) on per-conversation values: multi vs single, each vs base.
Step times: seconds per optimiser step and per thousand policy tokens (TRL's
``completions/mean_length`` counts the policy's tokens only where an env mask is given).

Writes ``report.json`` and the evaluated conversations (``conversations.parquet``) to
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPERATURE = 0.8  # every reply the benchmark samples: training, reference and evaluation
ARMS = ("base", "single", "multi")
METRICS = (
    "gold_utility",
    "turns",
    "p_return",
    "instruction_following",
    "violation_rate",
    "emoji_rate",
    "mean_words",
)
DRIFT = ("emoji_rate", "mean_words")  # style whose ratio to the base model is reported
PAIRS = (("multi", "single"), ("single", "base"), ("multi", "base"))


def build_world(scenario: str, seed: int, user_model: str | None) -> Any:
    """The world, with ``user_model`` writing the users' messages when given."""
    from policies import load_policy
    from sim.world import World, load_world_config

    user_policy = load_policy(user_model) if user_model is not None else None
    return World.build(load_world_config(scenario), seed=seed, user_policy=user_policy)


def converse(world, policy, users, seed: int, max_new_tokens: int) -> pd.DataFrame:
    """Full conversations of ``policy`` with deep copies of ``users`` (one per user, opened
    with seed ``seed + i``: every policy meets the same users, openers and reaction draws),
    one row per conversation, the ORACLE columns included (evaluation only)."""
    from policies import SamplingParams
    from rewards.features import style_features

    engine = world.engine
    fresh = copy.deepcopy(list(users))
    sessions = engine.open_sessions(
        fresh, 0, 12.0, np.random.default_rng(seed), seeds=[[seed + i] for i in range(len(fresh))]
    )
    bot = SamplingParams(max_new_tokens=max_new_tokens, temperature=TEMPERATURE, seed=seed)
    records = engine.run_sessions(sessions, policy, bot, world.user_params(seed))
    rows = []
    for session in sessions:
        record = engine.close_session(session)
        turns = [r for r in records if r.session_id == session.session_id]
        styles = [style_features(t.bot_reply) for t in turns]
        rows.append(
            {
                "user_id": session.user.user_id,
                "character": session.character.name,
                "end_reason": record.end_reason,
                "gold_utility": record.mean_gold_satisfaction,
                "turns": record.n_turns,
                "p_return": engine.return_probability(session.user, 1),
                "instruction_following": float(np.mean([t.follows_all for t in turns])),
                "violation_rate": float(np.mean([t.violates_any for t in turns])),
                "emoji_rate": float(np.mean([s["emoji"] > 0 for s in styles])),
                "mean_words": float(np.mean([s["words"] for s in styles])),
            }
        )
    return pd.DataFrame(rows)


def logged_turns(world, policy, users, seed: int, max_new_tokens: int, recipe) -> Any:
    """The base model's conversations with the training users, cut into turns: the
    single-turn prompts and the ``ReferenceReplies`` (each turn's context and reply)."""
    from policies import SamplingParams
    from training.recipes import ReferenceReplies

    engine = world.engine
    sessions = engine.open_sessions(
        copy.deepcopy(list(users)), 0, 12.0, np.random.default_rng(seed),
        seeds=[[seed + i] for i in range(len(users))],
    )  # fmt: skip
    bot = SamplingParams(max_new_tokens=max_new_tokens, temperature=TEMPERATURE, seed=seed)
    engine.run_sessions(sessions, policy, bot, world.user_params(seed))
    chats, replies, characters = [], [], []
    for s in sessions:
        chat = engine.bot_chat(s)
        for k, message in enumerate(chat):
            if message["role"] == "assistant":
                chats.append([dict(m) for m in chat[:k]])
                replies.append(message["content"])
                characters.append(s.character.name)
    return ReferenceReplies(chats, replies, characters, TEMPERATURE, recipe.top_p)


def ratio(value: float, base: float) -> float:
    """``value / base``; NaN where the base is 0 (no drift ratio to report)."""
    return float(value / base) if base else float("nan")


def paired(conversations: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Per pair of arms and metric: the mean per-conversation difference, its 95% CI and
    the paired t-test's p-value (statsmodels), over the conversations both held."""
    from statsmodels.stats.weightstats import DescrStatsW

    wide = {arm: conversations[conversations["arm"] == arm].set_index("user_id") for arm in ARMS}
    tests: dict[str, dict[str, dict[str, float]]] = {}
    for a, b in PAIRS:
        tests[f"{a}-{b}"] = {}
        for metric in METRICS:
            diff = (wide[a][metric] - wide[b][metric]).dropna().to_numpy()
            stats = DescrStatsW(diff)
            if len(diff) > 1 and diff.std() > 0:
                p_value, (low, high) = stats.ttest_mean()[1], stats.tconfint_mean()
            else:  # identical in every conversation (or one): nothing to test
                p_value, low, high = 1.0, diff.mean(), diff.mean()
            tests[f"{a}-{b}"][metric] = {
                "diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high),
                "p_value": float(p_value), "n": len(diff),
            }  # fmt: skip
    return tests


def policy_token_counter(batch: int) -> Any:
    """A TrainerCallback that sums, in ``.total``, the policy's tokens over a run: TRL logs
    their mean per completion each step (with an env mask, the policy's tokens only)."""
    from transformers import TrainerCallback

    class _PolicyTokens(TrainerCallback):
        def __init__(self) -> None:
            self.total = 0.0

        def on_log(self, args: Any, state: Any, control: Any, logs=None, **kw: Any) -> None:
            if logs and "completions/mean_length" in logs:
                self.total += logs["completions/mean_length"] * batch

    return _PolicyTokens()


def step_times(model_dir: Path, policy_tokens: float) -> dict[str, float]:
    """Seconds per optimiser step and per thousand policy tokens of one arm's run (the
    trainer's own runtime: loading and saving the model are not counted)."""
    metrics = json.loads((model_dir / "flywheel-training.json").read_text())["metrics"]
    steps, seconds = max(int(metrics["global_step"]), 1), float(metrics["train_runtime"])
    return {
        "steps": steps,
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "policy_tokens": policy_tokens,
        "policy_tokens_per_step": policy_tokens / steps,
        "seconds_per_1k_policy_tokens": 1000 * seconds / max(policy_tokens, 1.0),
    }


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options: list[tuple[str, Any, str]] = [
        ("--scenario", "scenarios/world_example.toml", "world TOML: characters, users, gold"),
        ("--model", "smollm2", "model both arms start from"),
        ("--user-model", None, "LLM writing the users' messages (default: the world's)"),
        ("--out", "runs/grpo_multiturn", "folder of the checkpoints and report"),
        ("--minutes", 30.0, "wall-time cap of each arm's training"),
        ("--max-steps", 500, "optimizer steps of each arm at the most"),
        ("--train-users", 64, "simulated users the arms train with"),
        ("--eval-users", 96, "held-out users, one full conversation per model each"),
        ("--max-new-tokens", 48, "reply cap, in training and evaluation"),
        ("--max-bot-turns", 3, "multi-turn arm: most policy replies per training chat"),
        ("--group", 4, "GRPO group size: replies (single) or chats (multi) per prompt"),
        ("--groups-per-step", 2, "groups per optimizer step"),
        ("--learning-rate", 5e-4, "LoRA learning rate"),
        ("--seed", 0, "seeds users, sampling and training"),
        ("--threads", 2, "torch intra-op threads (1 on a CPU shared with other jobs)"),
    ]
    for flag, default, text in options:
        kind = str if default is None else type(default)
        parser.add_argument(flag, default=default, type=kind, help=text)
    return parser


def recipe_from_args(args: argparse.Namespace) -> Any:
    """The recipe of both arms: the benchmark's best (``GRPORecipe``) with the emoji rate
    counted (a multi-turn completion has no per-reply token estimate) and the options'
    sizes; the single-turn arm gets as many replies a step as the multi-turn one has
    conversations."""
    from training.recipes import GRPORecipe

    return GRPORecipe(
        max_steps=args.max_steps, learning_rate=args.learning_rate, rate_estimate="count",
        temperature=TEMPERATURE, max_new_tokens=args.max_new_tokens,
        trainer={
            "per_device_train_batch_size": args.group * args.groups_per_step,
            "num_generations": args.group,
        },
    )  # fmt: skip


def train_arms(args, world, train_users, recipe, out: Path) -> dict[str, Any]:
    """Both arms for ``--minutes`` each; returns their checkpoint folders and step times."""
    from flywheel.multiturn import SimulatedUsers
    from policies import load_policy
    from training.grpo import grpo_records
    from training.models import model_config, time_limit_callback
    from training.multiturn import MultiTurnSettings, train_multiturn
    from training.recipes import build_grpo, train

    checkers = {name: c.checkers for name, c in world.characters.items()}
    base = load_policy(args.model)
    reference = logged_turns(world, base, train_users, args.seed, args.max_new_tokens, recipe)
    del base
    print(f"{len(reference.replies)} logged turns of {len(train_users)} users", flush=True)
    batch = args.group * args.groups_per_step
    result: dict[str, Any] = {}
    for arm in ("single", "multi"):
        build = build_grpo(recipe, checkers, reference, out / arm / "trainer", args.seed)
        counter = policy_token_counter(batch)
        callbacks = [time_limit_callback(args.minutes * 60), counter]
        if arm == "single":
            records = grpo_records(reference.chats, reference.characters)
            model_dir = train(build, records, model_config(args.model), out / arm, callbacks)
        else:
            users = SimulatedUsers(world, train_users)
            rows = users.rows(np.random.default_rng(args.seed))
            settings = MultiTurnSettings(max_bot_turns=args.max_bot_turns)
            model_dir = train_multiturn(
                build, rows, users, model_config(args.model), out / arm, settings, callbacks
            )
        times = step_times(model_dir, counter.total)
        result[arm] = {"model": model_dir, "times": times}
        print(f"{arm}: {times}", flush=True)
    return result


def main() -> None:
    """Train both arms, evaluate the three models on held-out conversations, report."""
    args = build_parser().parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from flywheel.multiturn import draw_users
    from policies import load_policy
    from sim.user_llm import UserSimulator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(args.scenario, args.seed, args.user_model)
    rng = np.random.default_rng(args.seed)
    train_users = draw_users(world, args.train_users, rng, "train-")
    eval_users = draw_users(world, args.eval_users, rng, "heldout-")
    recipe = recipe_from_args(args)
    arms = train_arms(args, world, train_users, recipe, out)
    world.engine.user_simulator = UserSimulator(
        world.user_simulator.policy, world.corpus, pii_rate=world.config.pii_rate,
        max_message_words=world.config.user_llm.max_message_words,
        length_user_share=world.config.user_llm.length_user_share, split="heldout",
    )  # fmt: skip
    models = {"base": args.model} | {arm: str(arms[arm]["model"]) for arm in ("single", "multi")}
    frames = []
    for arm, model in models.items():
        t0 = time.monotonic()
        held = converse(world, load_policy(model), eval_users, args.seed + 1, args.max_new_tokens)
        frames.append(held.assign(arm=arm))
        print(f"{arm} evaluated in {time.monotonic() - t0:.0f}s", flush=True)
    conversations = pd.concat(frames, ignore_index=True)
    conversations.to_parquet(out / "conversations.parquet")
    means = conversations.groupby("arm")[list(METRICS)].mean()
    tests = paired(conversations)
    report = {
        "command": "benchmarks/grpo_multiturn.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "step_times": {arm: arms[arm]["times"] for arm in ("single", "multi")},
        "means": means.to_dict(orient="index"),
        "drift_vs_base": {
            arm: {m: ratio(means.loc[arm, m], means.loc["base", m]) for m in DRIFT}
            for arm in ("single", "multi")
        },
        "paired_tests": tests,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(
        f"\n{'metric':<24}"
        + "".join(f"{a:>9}" for a in ARMS)
        + f"  {'multi-single [95% CI]':<26}{'p':>8}"
    )
    for metric in METRICS:
        t = tests["multi-single"][metric]
        ci = f"{t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]"
        row = "".join(f"{means.loc[a, metric]:>9.3f}" for a in ARMS)
        print(f"{metric:<24}{row}  {ci:<26}{t['p_value']:>8.4f}")
    for arm in ("single", "multi"):
        times = arms[arm]["times"]
        print(
            f"{arm}: {times['steps']} steps, {times['seconds_per_step']:.1f} s/step, "
            f"{times['seconds_per_1k_policy_tokens']:.1f} s per 1k policy tokens"
        )
    print(f"full report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
