"""GRPO on the packaged SmolLM2: instruction following and gold utility up, style held.

Trains SmolLM2-135M-Instruct with TRL's GRPOTrainer (LoRA, CPU) on first-turn character
prompts written from the chit-chat *train* openers, with the flywheel's rewards
(``training.rewards``): the characters' steerability checkers, the artifact penalty against
the base model's own style statistics and, with ``--rm``, a reward model trained on logged
engagement (``flywheel rm train``; the proxy for what users want, never the gold
utility). Then it evaluates base and trained model on the same held-out prompts (the
chit-chat *held-out* openers, new users, every character equally often) and prints
before/after numbers:

- instruction-following rate (share of replies meeting every instruction of their
  character) and violation rate (``rewards.steerability``),
- gold utility (the simulator's oracle, ``sim.gold``) of each reply for its user,
- emoji rate (share of replies with an emoji), overall and over the characters that may
  use emoji (three characters forbid them, so there a falling rate is instruction
  following), emoji per reply and mean length in words, with the ratio to the base model
  (to be held within 15%),
- expected emoji rate and emoji per reply: each model's probability of starting an emoji
  at each position of its own sampled replies, summed up to the first emoji (the rate) or
  over the whole reply (the count) (``training.anchor.expected_features``). The same
  quantities as the counted ones, unbiased, with far less variance: at a few emoji
  replies in a hundred, counting cannot tell 15% apart in 1,200 replies.

Base and trained model answer the same prompts with the same sampling seeds, so each
metric is compared by a paired t-test (statsmodels) on per-prompt means: the prompt, not
the reply, is the unit, since the samples of one prompt are not independent.

Two guards against a policy that games its rewards (without them GRPO at lr 5e-4 turns
SmolLM2 into text that recites its rules, which the reward model scores as high as a real
answer; benchmarks/README.md): a KL leash to the
base model (``--beta``), and each reward divided by its spread over the base model's
replies (``--normalise reference``) instead of standardised within its group, where a
reward model's 0.03 differences would weigh as much as a broken instruction.

``--hold-rate emoji`` (the default) adds a ``RateConstraint``: the share of replies with
emoji, over the characters that may use them, held at the base model's rate by a Lagrange
multiplier, with the artifact penalty judging emoji only when present
(``training.rewards``). ``--anchor emoji`` adds a ``TokenAnchor`` instead or as well
(``training.anchor``): the policy's probability of starting an emoji held at the base
model's at every completion position by an extra loss term (at ``--anchor-coef 1`` its
gradient swamps GRPO's). ``--rate-estimate tokens`` has the constraint read each
reply's probability of an emoji from the policy's token probabilities instead of counting
them; ``--top-p 0.95`` samples GRPO's replies with the nucleus the policy serves with.
``--mask-credit emoji`` gives the tokens that start an emoji no advantage where no reward
sees them (``training.anchor.CreditMask``): no reward can say whether an emoji was good,
so its token should not share its reply's score. With ``--rate-estimate tokens --top-p
0.95`` it is the recipe that holds the rate. benchmarks/README.md has the figures of
each configuration and how to read them.
``--base-eval OUT/eval_base.parquet`` reuses another run's evaluation of the base model
(same prompts and seeds: the same replies), saving ~13 minutes.

The training run stops after ``--minutes`` of wall time (or ``--max-steps``), whichever
comes first. Usage::

    .venv/bin/python benchmarks/grpo_steerability.py --minutes 25 --out runs/grpo_smollm2

Writes ``OUT/model`` (merged checkpoint; ``policies.load_policy`` serves it),
``OUT/before_after.json``, ``OUT/eval_base.parquet`` and ``OUT/eval_grpo.parquet``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EVAL_HOUR = 12.0  # simulated hour of day of every evaluation session
# Style to be held "within 15% of the base model's": tested for equivalence.
HELD_STYLE = (
    "mean_words",
    "emoji_rate_where_allowed",
    "expected_emoji_rate_where_allowed",
    "emoji_per_reply_where_allowed",
    "expected_emoji_per_reply_where_allowed",
)
EQUIVALENCE_MARGIN = 0.15
TEMPERATURE = 0.8  # every reply the benchmark samples: reference and evaluation
# THREADS_NOTE: on a CPU shared with other jobs, torch's default of one thread per core
# collapses (threads spin at barriers while their partner is descheduled; figures in
# benchmarks/README.md). Pass --threads 2 on an idle machine.


def parse_tolerance(text: str) -> float | dict[str, float]:
    """``"0.5"`` (every feature) or ``"words=0,emoji=1"`` (per feature, others 0.5)."""
    if "=" not in text:
        return float(text)
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    return {name.strip(): float(value) for name, value in pairs}


def parse_features(text: str) -> tuple[str, ...]:
    """``"emoji,exclamations"`` -> the features (checked); ``"none"`` -> ()."""
    from training.rewards import check_rate_feature

    if text.strip() == "none":
        return ()
    try:
        return tuple(check_rate_feature(f.strip()) for f in text.split(",") if f.strip())
    except ValueError as err:  # argparse prints this message instead of a generic one
        raise argparse.ArgumentTypeError(str(err)) from err


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A field of ``Args``: its default, its one help line, and what argparse needs besides
    (``type`` where the default's type does not parse it, ``choices``)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Args:
    """The benchmark's options, one ``--kebab-case`` flag per field (``build_parser``); each
    GRPO one maps onto a ``training.recipes.GRPORecipe`` field (``recipe_from_args``)."""

    scenario: str = option("scenarios/world_example.toml", "world TOML: characters, users, gold")
    model: str = option("smollm2", "model GRPO starts from")
    out: str = option("runs/grpo_smollm2", "folder of the checkpoint, evaluations and report")
    minutes: float = option(25.0, "wall-time cap of training")
    max_steps: int = option(200, "optimizer steps at the most")
    train_prompts: int = option(400, "first-turn training prompts (chit-chat train openers)")
    eval_prompts: int = option(300, "held-out prompts, each a new user's first turn")
    eval_samples: int = option(4, "replies per held-out prompt and model")
    max_new_tokens: int = option(48, "reply cap, in training and evaluation")
    learning_rate: float = option(1e-4, "LoRA learning rate")
    artifact_tolerance: float | Mapping[str, float] = option(
        0.5,
        "style drift (in reference sd) the artifact penalty forgives: one value, or per "
        "feature as words=0,emoji=1 (others 0.5); 0 pulls a feature toward the base mean",
        type=parse_tolerance,
    )
    beta: float = option(
        0.2, "KL coefficient to the base model (TRL GRPOConfig.beta); 0 = no KL leash"
    )
    normalise: str = option(
        "reference",
        "reference: each reward over its spread on the base model's replies, then "
        "summed (sum_then_normalize); group: each standardised within its group "
        "(normalize_then_sum); see training.rewards",
        choices=("reference", "group"),
    )
    reference_samples: int = option(
        2,
        "base-model replies per training prompt for the reference (style statistics, "
        "reward scales, held rates); a 3%% emoji rate needs hundreds of replies",
    )
    hold_rate: tuple[str, ...] = option(
        ("emoji",),
        "features whose rate a RateConstraint holds at the base model's (comma list of "
        "emoji, exclamations; 'none' for none); characters forbidding one are not held",
        type=parse_features,
    )
    rate_lr: float = option(0.1, "RateConstraint multiplier step size")
    rate_estimate: str = option(
        "count",
        "how a RateConstraint observes a reply: count: has the feature or not; tokens: "
        "the policy's probability of it along the reply (training.rewards.RateConstraint)",
        choices=("count", "tokens"),
    )
    top_p: float = option(
        1.0,
        "GRPO's sampling nucleus (TRL's default 1.0; 0.95 is the one the policy serves "
        "and this benchmark evaluates with)",
    )
    anchor: tuple[str, ...] = option(
        (),
        "features whose token mass a TokenAnchor holds at the base model's at every "
        "completion position (training.anchor; comma list of emoji, exclamations; 'none')",
        type=parse_features,
    )
    anchor_coef: float = option(1.0, "weight of each TokenAnchor's loss")
    mask_credit: tuple[str, ...] = option(
        (),
        "features whose start tokens get no advantage where no reward sees them "
        "(training.anchor.CreditMask; comma list of emoji, exclamations; 'none')",
        type=parse_features,
    )
    seed: int = option(0, "seeds prompts, users, sampling and training")
    threads: int = option(1, "torch intra-op threads; 1 on a shared CPU (see THREADS_NOTE)")
    rm: str | None = option(
        None,
        "reward model folder (flywheel rm train RUN_DIR ...) added as the reward_model "
        "reward; without it GRPO optimises steerability and the artifact penalty only",
    )
    base_eval: str | None = option(
        None, "reuse this eval_base.parquet of another run with the same prompts and seeds"
    )
    trained: str | None = option(None, "evaluate this GRPO checkpoint instead of training one")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``Args``: ``--max-steps`` for ``max_steps``; values parse with the
    field's ``type``, else its default's type (text where the default is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Args):
        kwargs = dict(f.metadata)
        if "type" not in kwargs and not isinstance(f.default, str | None):
            kwargs["type"] = type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **kwargs)
    return parser


def round_robin(names: list[str], n: int) -> list[str]:
    """``n`` character names, each equally often (up to one)."""
    return [names[i % len(names)] for i in range(n)]


@dataclass
class Prompts:
    """The benchmark's prompts: first turns of new users, every character equally often."""

    world: Any
    train_chats: list
    train_characters: list[str]
    eval_users: list
    eval_characters: list[str]


def build_prompts(scenario: str, seed: int, n_train: int, n_eval: int) -> Prompts:
    """Training prompts from the chit-chat *train* openers, then the world switched to the
    *held-out* openers for ``n_eval`` new users, whose sessions ``evaluate`` opens (the
    same ones for every model: same users, same seed)."""
    from sim.user_llm import UserSimulator
    from sim.world import World, load_world_config

    world = World.build(load_world_config(scenario), seed=seed)
    names = sorted(world.characters)
    train_users = world.sampler.sample(n_train)
    eval_users = world.sampler.sample(n_eval)
    train_characters = round_robin(names, len(train_users))
    _, train_chats = first_turn_prompts(world, train_users, train_characters, seed + 1)
    world.engine.user_simulator = UserSimulator(
        world.user_simulator.policy, world.corpus, split="heldout"
    )
    return Prompts(
        world, train_chats, train_characters, eval_users, round_robin(names, len(eval_users))
    )


def first_turn_prompts(world, users, characters, seed: int):
    """Open one session per user (no LLM call: openers are human chit-chat lines)."""
    sessions = world.engine.open_sessions(
        users, day=0, hour=EVAL_HOUR, rng=np.random.default_rng(seed), characters=characters
    )
    return sessions, [world.engine.bot_chat(s) for s in sessions]


def evaluate(world, policy, users, characters, samples: int, seed: int, max_new_tokens: int):
    """Replies of ``policy`` to the held-out prompts, scored by checkers and gold utility.

    Every policy sees identical sessions: the same users (deep copies, so state updates
    from one evaluation never leak into the next) and the same openers (same seed).
    """
    from policies import SamplingParams
    from training.anchor import feature_token_ids

    emoji_ids = feature_token_ids(policy.tokenizer, "emoji")  # one pass over the vocabulary
    rows = []
    for k in range(samples):
        fresh = copy.deepcopy(users)
        sessions, chats = first_turn_prompts(world, fresh, characters, seed)
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=TEMPERATURE, seed=seed + k
        )
        generations = policy.generate(chats, params)
        records = world.engine.apply_replies(
            sessions, [g.text for g in generations], [g.completion_tokens for g in generations]
        )
        completions = [g.completion_ids for g in generations]
        count, present = expected_feature(policy, chats, completions, params, emoji_ids)
        checked = checker_gold(world, sessions, records)
        rows.extend(
            r.to_row()
            | {"sample": k, "expected_emoji": c, "expected_has_emoji": h, "gold_checker_terms": g}
            for r, c, h, g in zip(records, count, present, checked, strict=True)
        )
    return pd.DataFrame(rows)


def checker_gold(world, sessions, records) -> list[float]:
    """Per reply, the gold utility's checker-decided terms (``GoldModel.checker_terms``:
    instructions and violation), so the gain on the part no checker sees is ``gold - this``."""
    from sim.gold import share_followed

    return [
        sum(
            world.engine.gold.checker_terms(
                s.user, share_followed(r.checks), r.violates_any
            ).values()
        )
        for s, r in zip(sessions, records, strict=True)
    ]


def expected_feature(
    policy, chats, completion_ids: list[list[int]], params, token_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per reply, the policy's expected count of a feature (emoji: ``token_ids`` are the
    tokens that start one) and its probability of having it, from its own token
    probabilities along its sampled tokens (``training.recipes.feature_expectations``): the
    quantities counting estimates, with far less variance at a rate of a few replies in a
    hundred."""
    from training.recipes import feature_expectations

    return feature_expectations(
        policy, chats, completion_ids, token_ids, params.temperature, params.top_p
    )


def saved_base_evaluation(
    path: str, users: list, characters: list[str], samples: int
) -> pd.DataFrame:
    """The base model's evaluation saved by another run with the same ``--scenario``,
    ``--seed``, ``--eval-prompts``, ``--eval-samples`` and ``--max-new-tokens``: the same
    prompts and seeds give the same replies, so the ~13 minutes need not be spent again.
    Checked: its users and characters, sample by sample (not the seed: user ids do not
    depend on it)."""
    turns = pd.read_parquet(path)
    expected = [(u.user_id, c) for u, c in zip(users, characters, strict=True)] * samples
    columns = {"user_id", "character", "expected_has_emoji"}
    found = None
    if columns <= set(turns):
        found = list(zip(turns["user_id"], turns["character"], strict=True))
    if found != expected:
        raise SystemExit(
            f"--base-eval {path}: its {len(turns)} rows are not this run's {len(expected)} "
            "(users x characters x samples, with token-probability columns); fix: a run's "
            "eval_base.parquet with the same --scenario/--seed/--eval-prompts/--eval-samples, "
            "or drop --base-eval"
        )
    print(f"base evaluation reused from {path}", flush=True)
    return turns.drop(columns="model", errors="ignore")


def emoji_allowed(turns: pd.DataFrame) -> pd.Series:
    """Rows whose character has no ``no_emoji`` instruction (its check column is empty)."""
    if "check_no_emoji" not in turns:
        return pd.Series(True, index=turns.index)
    return turns["check_no_emoji"].isna()


def per_reply_metrics(turns: pd.DataFrame) -> pd.DataFrame:
    """One column per compared metric, one row per reply (NaN where a metric does not apply)."""
    allowed = emoji_allowed(turns)
    emoji = {
        "emoji_rate": (turns["feature_emoji"] > 0).astype(float),
        "emoji_per_reply": turns["feature_emoji"].astype(float),
        # The same, from the model's token probabilities (lower variance).
        "expected_emoji_rate": turns["expected_has_emoji"],
        "expected_emoji_per_reply": turns["expected_emoji"],
    }
    emoji_metrics = {}
    for metric, values in emoji.items():
        emoji_metrics[metric] = values
        emoji_metrics[f"{metric}_where_allowed"] = values.where(allowed)
    return pd.DataFrame(
        {
            "instruction_following_rate": turns["follows_all"].astype(float),
            "violation_rate": turns["violates_any"].astype(float),
            "gold_utility": turns["gold_satisfaction"].astype(float),
            # The gold without the terms the instruction checkers decide (NaN: an older
            # evaluation file that did not record them).
            "gold_utility_unchecked": (
                turns["gold_satisfaction"] - turns["gold_checker_terms"]
                if "gold_checker_terms" in turns
                else np.nan
            ),
            **emoji_metrics,
            "mean_words": turns["feature_words"].astype(float),
            # Diagnostics: what the reply talks about (MiniLM cosines, sim.gold's inputs).
            "relevance": turns["feature_relevance"].astype(float),
            "persona_consistency": turns["feature_persona_consistency"].astype(float),
            "prompt_leak": turns["feature_prompt_leak"].astype(float),
        }
    )


def summarise(turns: pd.DataFrame) -> dict[str, float]:
    """The before/after metrics of one model's evaluation replies (the means of
    ``per_reply_metrics``: instruction following and violations as ``rewards.steerability``
    counts them)."""
    metrics = per_reply_metrics(turns).mean().to_dict()
    n = len(turns)
    gold = turns["gold_satisfaction"]
    return metrics | {
        "n_replies": n,
        "n_replies_emoji_allowed": int(emoji_allowed(turns).sum()),
        "gold_utility_se": float(gold.std(ddof=1) / np.sqrt(n)),
    }


def paired_tests(base: pd.DataFrame, trained: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per metric: mean per-prompt difference (trained - base), its 95% CI and the paired
    t-test p-value, over the prompts (sessions) both models answered. For ``HELD_STYLE``
    also ``equivalence_p``: the paired TOST p-value (statsmodels ``ttost_paired``) of
    "the difference lies within +-15% of the base mean"; below 0.05 shows the metric held,
    which a large p-value of the plain t-test never does."""
    from statsmodels.stats.weightstats import DescrStatsW, ttost_paired

    if not (base["session_id"].to_numpy() == trained["session_id"].to_numpy()).all():
        raise ValueError("base and trained evaluations must answer the same prompts in order")
    prompt = base["session_id"].to_numpy()
    before = per_reply_metrics(base).groupby(prompt).mean()
    after = per_reply_metrics(trained).groupby(prompt).mean()
    tests = {}
    for metric in before:
        diff = (after[metric] - before[metric]).dropna().to_numpy()
        stats = DescrStatsW(diff)
        if diff.std() > 0:
            p_value = stats.ttest_mean()[1]
            low, high = stats.tconfint_mean()
        else:  # identical on every prompt: no test to run
            p_value, low, high = 1.0, diff.mean(), diff.mean()
        tests[metric] = {
            "diff": float(diff.mean()),
            "ci_low": float(low),
            "ci_high": float(high),
            "p_value": float(p_value),
            "n_prompts": len(diff),
        }
        if metric in HELD_STYLE:
            pair = pd.concat([after[metric], before[metric]], axis=1).dropna().to_numpy()
            margin = EQUIVALENCE_MARGIN * abs(pair[:, 1].mean())
            tests[metric]["equivalence_p"] = float(
                ttost_paired(pair[:, 0], pair[:, 1], -margin, margin)[0]
            )
    return tests


def recipe_from_args(args: Args | argparse.Namespace) -> Any:
    """The ``training.recipes.GRPORecipe`` the options describe: the builder the loop and
    ``flywheel train grpo`` use turns it into rewards and a GRPOConfig."""
    from training.recipes import GRPORecipe

    return GRPORecipe(
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        normalise=args.normalise,
        artifact_tolerance=args.artifact_tolerance,
        hold_rates=args.hold_rate,
        rate_lr=args.rate_lr,
        rate_estimate=args.rate_estimate,
        mask_credit=args.mask_credit,
        anchors=args.anchor,
        anchor_coef=args.anchor_coef,
        temperature=TEMPERATURE,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        reference_prompts=args.train_prompts,
        reference_samples=args.reference_samples,
    )


def checked_recipe(parser: argparse.ArgumentParser, args: Args) -> Any:
    """The recipe of ``args``, or the parser's usage error where its sampling cannot work."""
    from policies import SamplingParams

    try:
        recipe = recipe_from_args(args)
        # the reference replies are sampled at the serving nucleus
        recipe.check_sampling(TEMPERATURE, SamplingParams().top_p)
    except ValueError as err:
        parser.error(f"{err} (options --top-p, --rate-estimate)")
    return recipe


def evaluate_held_out(args: Args, prompts: Prompts, policy: Any) -> pd.DataFrame:
    """``evaluate`` on the held-out prompts with the settings every model is evaluated with."""
    return evaluate(
        prompts.world,
        policy,
        prompts.eval_users,
        prompts.eval_characters,
        args.eval_samples,
        args.seed + 2,
        args.max_new_tokens,
    )


def evaluate_base(args: Args, prompts: Prompts, recipe: Any, out: Path) -> tuple[pd.DataFrame, Any]:
    """The base model's held-out evaluation (or ``--base-eval``'s), saved, and the reference:
    its own replies to the training prompts (style statistics, reward scales, the rate a
    RateConstraint holds)."""
    from policies import load_policy
    from training.recipes import sample_reference

    base_policy = load_policy(args.model)
    if args.base_eval is not None:
        base_turns = saved_base_evaluation(
            args.base_eval, prompts.eval_users, prompts.eval_characters, args.eval_samples
        )
    else:
        t0 = time.monotonic()
        base_turns = evaluate_held_out(args, prompts, base_policy)
        print(f"base evaluated in {time.monotonic() - t0:.0f}s", flush=True)
    base_turns.assign(model="base").to_parquet(out / "eval_base.parquet")
    reference = sample_reference(
        base_policy, prompts.train_chats, prompts.train_characters, recipe, args.seed
    )
    return base_turns, reference


def build_rewards(args: Args, recipe: Any, world: Any, reference: Any, out: Path) -> Any:
    """The builder's rewards, rate constraints, anchors and credit masks for ``recipe``
    (``training.recipes.build_grpo``), each announced."""
    from training.recipes import build_grpo

    checkers = {name: world.characters[name].checkers for name in sorted(world.characters)}
    scorer = None
    if args.rm is not None:
        from rewards.rm.base import load_reward_model

        scorer = load_reward_model(args.rm)
    build = build_grpo(recipe, checkers, reference, out / "trainer", args.seed, scorer)
    if build.scales is not None:
        print(f"reward scales (sd over the base model's replies): {build.scales}", flush=True)
    for c in build.constraints:
        print(f"{c.__name__}: holding {c.target:.4f} for {sorted(c.characters)}", flush=True)
    for a in build.anchors:
        print(f"anchor: {a.feature} token mass for {sorted(a.characters)}", flush=True)
    for m in build.credit_masks:
        print(f"credit mask: {m.feature} start tokens for {sorted(m.characters)}", flush=True)
    return build


@dataclass(frozen=True)
class Training:
    """The checkpoint to evaluate and what training it took."""

    model_dir: Path
    seconds: float
    steps: int
    constraints: list  # the RateConstraints it trained with (none for a --trained checkpoint)


def train_or_load(args: Args, build: Any, prompts: Prompts, out: Path) -> Training:
    """Train until ``--minutes`` or ``--max-steps``, or take the ``--trained`` checkpoint."""
    from training.grpo import grpo_records
    from training.models import model_config, time_limit_callback
    from training.recipes import train

    if args.trained is None:
        t0 = time.monotonic()
        model_dir = train(
            build,
            grpo_records(prompts.train_chats, prompts.train_characters),
            model_config(args.model),
            out / "model",
            callbacks=[time_limit_callback(args.minutes * 60)],
        )
        seconds = time.monotonic() - t0
    else:
        model_dir = Path(args.trained)
    metrics = json.loads((model_dir / "flywheel-training.json").read_text())["metrics"]
    if args.trained is not None:
        seconds = metrics["train_runtime"]
    print(f"trained: {metrics}", flush=True)
    # A --trained checkpoint was not trained with this process's constraints.
    constraints = build.constraints if args.trained is None else []
    return Training(model_dir, seconds, int(metrics["global_step"]), constraints)


@dataclass(frozen=True)
class Comparison:
    """Base and trained model on the same held-out prompts: their replies, the means of
    ``summarise`` and the ``paired_tests``."""

    base: pd.DataFrame
    trained: pd.DataFrame
    before: dict[str, float]
    after: dict[str, float]
    tests: dict[str, dict[str, float]]

    @classmethod
    def of(cls, base: pd.DataFrame, trained: pd.DataFrame) -> Comparison:
        """Compare two evaluations of the same prompts."""
        return cls(base, trained, summarise(base), summarise(trained), paired_tests(base, trained))


def before_after_report(
    args: Args, build: Any, training: Training, comparison: Comparison
) -> dict[str, Any]:
    """``before_after.json``: the command, the training, the rewards' settings, the numbers."""
    steps = max(training.steps, 1)
    return {
        "command": "benchmarks/grpo_steerability.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "train_seconds": training.seconds,
        "train_steps": training.steps,
        "seconds_per_step": training.seconds / steps,
        "reward_scales": build.scales,
        "rate_constraints": {
            c.__name__: {
                "target": c.target,
                "final_multiplier": c.multiplier,
                "trace": c.history,
                "characters": sorted(c.characters),
            }
            for c in training.constraints
        },
        "anchors": {a.feature: sorted(a.characters) for a in build.anchors},
        "credit_masks": {m.feature: sorted(m.characters) for m in build.credit_masks},
        "before": comparison.before,
        "after": comparison.after,
        "paired_tests": comparison.tests,
        "per_character_following": {
            "before": comparison.base.groupby("character")["follows_all"].mean().to_dict(),
            "after": comparison.trained.groupby("character")["follows_all"].mean().to_dict(),
        },
        "reference_style": build.style.to_dict(),
    }


def print_summary(
    args: Args, training: Training, comparison: Comparison, n_characters: int, out: Path
) -> None:
    """The before/after table, the equivalence tests of the held style, where the report is."""
    before, after, tests = comparison.before, comparison.after, comparison.tests
    train_s, steps = training.seconds, training.steps
    print(f"\nGRPO: {steps} steps in {train_s / 60:.1f} min ({train_s / max(steps, 1):.1f} s/step)")
    for c in training.constraints:
        print(f"{c.__name__}: target {c.target:.4f}, final multiplier {c.multiplier:+.2f}")
    print(
        f"held-out: {before['n_replies']} replies per model ({args.eval_prompts} prompts x "
        f"{args.eval_samples} samples), {n_characters} characters; "
        f"{before['n_replies_emoji_allowed']} replies by characters that may use emoji\n"
    )
    header = f"{'metric':<28}{'base':>9}{'GRPO':>9}{'GRPO/base':>11}  {'diff [95% CI]':<24}{'p':>8}"
    print(header)
    for key, test in tests.items():
        b, a = before[key], after[key]
        ratio = f"{a / b:.2f}" if b else "n/a"
        ci = f"{test['diff']:+.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}]"
        print(f"{key:<28}{b:>9.3f}{a:>9.3f}{ratio:>11}  {ci:<24}{test['p_value']:>8.4f}")
    print(f"\nwithin {EQUIVALENCE_MARGIN:.0%} of the base model (paired TOST, p < 0.05 = held):")
    for key in HELD_STYLE:
        print(f"  {key:<40} p = {tests[key]['equivalence_p']:.4f}")
    print(
        "\n(paired t-tests on per-prompt means, statsmodels); full report: "
        f"{out / 'before_after.json'}"
    )


def main() -> None:
    """Evaluate the base model, train GRPO on its reference, evaluate again, report."""
    parser = build_parser()
    args = Args(**vars(parser.parse_args()))
    recipe = checked_recipe(parser, args)
    import torch

    torch.set_num_threads(args.threads)
    from policies import load_policy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(args.scenario, args.seed, args.train_prompts, args.eval_prompts)

    base_turns, reference = evaluate_base(args, prompts, recipe, out)
    build = build_rewards(args, recipe, prompts.world, reference, out)
    training = train_or_load(args, build, prompts, out)
    trained_turns = evaluate_held_out(args, prompts, load_policy(str(training.model_dir)))

    comparison = Comparison.of(base_turns, trained_turns)
    report = before_after_report(args, build, training, comparison)
    (out / "before_after.json").write_text(json.dumps(report, indent=2))
    trained_turns.assign(model="grpo").to_parquet(out / "eval_grpo.parquet")
    print_summary(args, training, comparison, len(prompts.world.characters), out)


if __name__ == "__main__":
    main()
