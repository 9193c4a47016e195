"""Online RL with TRL's GRPOTrainer on character prompts.

The dataset holds one row per prompt: ``{"prompt": [system, ..., user], "character":
name}`` (``grpo_records``). For each prompt GRPO samples ``num_generations`` replies,
scores them with the reward functions of ``training.rewards`` and pushes the policy
towards the replies that beat their group. The part people change is the reward list
and its weights (``build_rewards``); everything else is TRL. The loop, ``flywheel train
grpo`` and the GRPO benchmark assemble rewards, rate constraints, credit masks and this
config in one place, ``training.recipes.build_grpo``.

On CPU (default) generation is transformers' ``generate`` and LoRA keeps the step cheap
(benchmarks/README.md has step times on a 2-core CPU). On GPUs the same recipe
switches to vLLM generation and DeepSpeed ZeRO-3 by configuration only: a YAML of
GRPOConfig fields (``training/configs/grpo_vllm.yaml``) and an accelerate config
(``training/configs/accelerate_zero3.yaml``); see ``training/configs/README.md``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rewards.checkers import Checker
from training.models import train_and_save, trainer_defaults
from training.rewards import (
    RATE_FEATURES,
    ArtifactPenalty,
    ReplyScorer,
    RewardModelReward,
    SteerabilityReward,
    StyleReference,
)

# Default weight of each reward after per-reward normalisation (normalize_then_sum).
DEFAULT_WEIGHTS = {
    "reward_model": 1.0,
    "steerability": 1.0,
    "artifact_penalty": 1.0,
    **{f"{feature}_rate": 1.0 for feature in RATE_FEATURES},
}


def grpo_config(
    output_dir: str | Path, max_steps: int = 30, seed: int = 0, **overrides: Any
) -> Any:
    """A :class:`trl.GRPOConfig` sized for CPU; any GRPOConfig field may be overridden.

    Two prompts x 8 completions of at most 48 tokens a step; each reward normalised
    within its group before the weighted sum (``normalize_then_sum``; the reference-scaled
    alternative is in ``training.rewards``); a KL leash to the starting model
    (``beta=0.2``, one extra forward pass of the LoRA-disabled model a step). The style
    penalty alone is no leash: measured with ``beta=0``, 50 steps at lr 5e-4 turned
    SmolLM2 into text that recites its rules ("You are the user. The user is...");
    with 0.2 the same run stays at ~0.05 nats a token and its replies read like the
    base model's (benchmarks/README.md, grpo_steerability.py).
    """
    from trl import GRPOConfig

    kwargs = trainer_defaults(output_dir, max_steps, seed) | {
        "per_device_train_batch_size": 16,
        "num_generations": 8,
        "gradient_accumulation_steps": 1,
        "max_completion_length": 48,
        "temperature": 0.8,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "beta": 0.2,
        "multi_objective_aggregation": "normalize_then_sum",
    }
    return GRPOConfig(**(kwargs | overrides))


def load_config_overrides(path: str | Path) -> dict[str, Any]:
    """GRPOConfig fields from a YAML file (the GPU switch: ``use_vllm``, ``vllm_mode``...).

    Unknown keys are errors that name the key and the file.
    """
    from dataclasses import fields

    from trl import GRPOConfig

    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of GRPOConfig fields, got {type(data)}")
    known = {f.name for f in fields(GRPOConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{path}: {unknown} are not GRPOConfig fields; fix: use names from "
            "trl.GRPOConfig (e.g. use_vllm, vllm_mode, num_generations)"
        )
    return data


def grpo_records(
    prompts: Sequence[Sequence[Mapping[str, str]]], characters: Sequence[str]
) -> list[dict[str, Any]]:
    """GRPO dataset rows: the chat to answer and the character whose checkers apply."""
    if len(prompts) != len(characters):
        raise ValueError(
            f"grpo_records got {len(prompts)} prompts but {len(characters)} characters"
        )
    return [
        {"prompt": [dict(m) for m in prompt], "character": str(character)}
        for prompt, character in zip(prompts, characters, strict=True)
    ]


def reference_style(
    model: str,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    characters: Sequence[str],
    max_new_tokens: int = 48,
    seed: int = 0,
) -> StyleReference:
    """Style statistics of ``model``'s own replies to ``prompts`` (one batched call)."""
    from policies import PolicySpec, SamplingParams, load_policy

    policy = load_policy(PolicySpec(model=model, dtype="auto"))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, seed=seed)
    replies = [g.text for g in policy.generate([list(p) for p in prompts], params)]
    return StyleReference.from_replies(replies, characters)


def build_rewards(
    checkers: Mapping[str, Sequence[Checker]],
    reference: StyleReference,
    scorer: ReplyScorer | None = None,
    artifact_tolerance: float | Mapping[str, float] = 0.5,
    held: Collection[str] = (),
) -> list[Any]:
    """The reward functions in TRL's order: [reward_model,] steerability, artifact_penalty
    (``held``: features whose rate a ``RateConstraint`` holds, see ``ArtifactPenalty``)."""
    rewards: list[Any] = [] if scorer is None else [RewardModelReward(scorer)]
    rewards.append(SteerabilityReward(checkers))
    rewards.append(ArtifactPenalty(reference, tolerance=artifact_tolerance, held=held))
    return rewards


def train_grpo(
    records: list[dict[str, Any]],
    reward_funcs: list[Any],
    model_args: Any,
    args: Any,
    out_dir: str | Path,
    weights: Mapping[str, float] | None = None,
    callbacks: Sequence[Any] = (),
    anchors: Sequence[Any] = (),
    credit_masks: Sequence[Any] = (),
) -> Path:
    """Run GRPO on ``records`` with ``reward_funcs`` and save a merged checkpoint.

    Args:
        records: ``grpo_records`` rows.
        reward_funcs: from ``build_rewards`` (named callables).
        model_args: a :class:`trl.ModelConfig` (``training.models.model_config``).
        args: a :class:`trl.GRPOConfig` (``grpo_config``); ``reward_weights`` is filled
            from ``weights`` by reward name when the config leaves it unset.
        out_dir: where the checkpoint goes.
        weights: ``{reward name: weight}``; defaults to ``DEFAULT_WEIGHTS``.
        callbacks: extra TrainerCallbacks (e.g. ``training.models.time_limit_callback``).
        anchors: ``training.anchor.TokenAnchor`` s: hold a rare feature's token mass at
            the base model's (an extra loss term; see ``training.anchor``).
        credit_masks: ``training.anchor.CreditMask`` s: no advantage for the tokens that
            start a feature no reward sees.

    Returns:
        ``out_dir``, loadable with ``policies.load_policy(str(out_dir))``.
    """
    from training.anchor import AnchoredGRPOTrainer

    if not records:
        raise ValueError("train_grpo got no prompts; curate logged turns first")
    names = [f.__name__ for f in reward_funcs]
    if args.reward_weights is None:
        weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"no weight for reward(s) {missing}; pass weights={{name: w}}")
        args.reward_weights = [weights[n] for n in names]
    return train_and_save(
        AnchoredGRPOTrainer, "grpo", records, model_args, args, out_dir,
        extra_metrics={"reward_names": names}, reward_funcs=reward_funcs,
        callbacks=list(callbacks), anchors=list(anchors), credit_masks=list(credit_masks),
    )  # fmt: skip
