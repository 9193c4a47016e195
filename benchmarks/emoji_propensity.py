"""Where did a trained model's emoji go? Its rate change, split in two.

A policy's share of replies with an emoji can fall because it starts an emoji less readily
at the same point of a reply (its *propensity*), or because its replies go where an emoji
is less likely (shorter, other openings, another register). This script tells them apart
on the held-out prompts of ``grpo_steerability.py``:

- propensity: both models read the *base* model's held-out replies (teacher-forced, so both
  see the same contexts), and each gives its probability of starting an emoji, summed along
  the reply up to its first emoji, at the sampling settings the benchmark evaluates with
  (temperature 0.8, top_p 0.95); the ratio trained / base is the propensity part;
- own rate: the same estimate on each model's *own* replies (``expected_has_emoji`` of the
  benchmark's two evaluation files); own ratio / propensity ratio is the rest, where the
  trained model's replies go.

Only the characters that may use emoji count. The replies are re-tokenised from their text
(the evaluation files keep text, not token ids), which for byte-level BPE gives the same
tokens in nearly every case. Usage (the prompts must be the benchmark run's)::

    .venv/bin/python benchmarks/emoji_propensity.py --trained runs/grpo_smollm2/model \\
        --base-eval runs/grpo_smollm2/eval_base.parquet \\
        --trained-eval runs/grpo_smollm2/eval_grpo.parquet

Figures and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd
from grpo_steerability import (
    TEMPERATURE,
    build_prompts,
    emoji_allowed,
    expected_feature,
    first_turn_prompts,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def propensity(policy, chats, replies) -> tuple[np.ndarray, np.ndarray]:
    """Per reply: the policy's probability of starting an emoji summed up to the reply's
    first emoji (``expected_features``' ``present``, here on replies it did not sample),
    and the same on the reply's first token alone, at the benchmark's evaluation sampling."""
    from policies import SamplingParams
    from training.anchor import feature_token_ids

    tokenizer = policy.tokenizer
    ids = feature_token_ids(tokenizer, "emoji")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = [[*tokenizer(r, add_special_tokens=False)["input_ids"], end] for r in replies]
    params = SamplingParams(temperature=TEMPERATURE)

    def present(completions: list[list[int]]) -> np.ndarray:
        return expected_feature(policy, chats, completions, params, ids)[1]

    return present(replies), present([r[:1] for r in replies])


def main() -> None:
    """Parse arguments, read both models' propensities on the base replies, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", required=True, help="the trained checkpoint")
    parser.add_argument("--base-eval", required=True, help="the benchmark's eval_base.parquet")
    parser.add_argument("--trained-eval", help="its eval_grpo.parquet, for the own-rate ratio")
    parser.add_argument("--model", default="smollm2", help="the base model")
    parser.add_argument("--scenario", default="scenarios/world_example.toml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-prompts", type=int, default=400)
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument("--samples", type=int, default=1, help="base replies per prompt read")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    import torch
    from statsmodels.stats.weightstats import DescrStatsW

    from policies import load_policy

    torch.set_num_threads(args.threads)
    prompts = build_prompts(args.scenario, args.seed, args.train_prompts, args.eval_prompts)
    _, chats = first_turn_prompts(
        prompts.world, prompts.eval_users, prompts.eval_characters, args.seed + 2
    )
    base_turns = pd.read_parquet(args.base_eval)
    rows = base_turns[(base_turns["sample"] < args.samples) & emoji_allowed(base_turns)]
    if list(base_turns.loc[base_turns["sample"] == 0, "character"]) != prompts.eval_characters:
        raise SystemExit(
            f"--base-eval {args.base_eval} answers other prompts; fix: the eval_base.parquet "
            "of a run with the same --scenario/--seed/--train-prompts/--eval-prompts"
        )
    row_chats = [chats[i % len(chats)] for i in rows.index]
    replies = list(rows["bot_reply"])
    base, base_first = propensity(load_policy(args.model), row_chats, replies)
    trained, trained_first = propensity(load_policy(args.trained), row_chats, replies)
    diff = DescrStatsW(trained - base)
    low, high = diff.tconfint_mean()
    ratio = trained.mean() / base.mean()
    print(f"{len(replies)} base replies read by characters that may use emoji")
    print(
        f"propensity (P(start an emoji), summed to the first): base {base.mean():.4f}, "
        f"trained {trained.mean():.4f}, ratio {ratio:.2f}, diff [95% CI] "
        f"{diff.mean:+.4f} [{low:+.4f}, {high:+.4f}], p = {diff.ttest_mean()[1]:.2g}"
    )
    print(
        f"  of which at the first token: base {base_first.mean():.4f}, "
        f"trained {trained_first.mean():.4f}"
    )
    if args.trained_eval:
        own = pd.read_parquet(args.trained_eval)
        allowed = emoji_allowed(base_turns)
        before = base_turns.loc[allowed, "expected_has_emoji"].mean()
        after = own.loc[emoji_allowed(own), "expected_has_emoji"].mean()
        print(
            f"own rate (each model on its own replies): base {before:.4f}, trained {after:.4f}, "
            f"ratio {after / before:.2f} = propensity {ratio:.2f} x where the replies go "
            f"{after / before / ratio:.2f}"
        )


if __name__ == "__main__":
    main()
