"""Making a candidate: one scenario recipe run on a generation's curated data.

The recipe starts from the deployed model and reads the generation's curated *train*
split (held-out users are kept for the offline gates). The rewards are the named functions
of ``training.rewards``: the chosen reward model, the character checkers (steerability) and
the artifact penalty, which measures style drift against the deployed model's own logged
replies. A weight of 0 leaves a reward out. ``reward_normalisation = "reference"`` divides
each reward by its spread over the deployed model's logged replies instead of standardising
it per context (``training.rewards`` says why).

- ``rs+sft``: ``samples`` replies per context from the deployed model in one batched call,
  each scored by the rewards (standardised per context, weighted); the best reply of each
  context becomes an SFT target (``training.rejection`` then ``training.sft``).
- ``dpo``: the same samples; the best and worst reply of each context form a preference
  pair (``training.dpo``).
- ``grpo``: the contexts as prompts for TRL's GRPOTrainer, built by
  ``training.recipes.build_grpo`` like ``flywheel train grpo`` and the GRPO benchmark
  (``grpo_recipe``: the benchmark's recipe with the scenario's settings), calibrated on the
  deployed model's logged replies and sampling as it serves.
- ``grpo_multiturn``: the grpo recipe (held rates counted) trained in whole conversations of
  up to ``max_bot_turns`` replies with ``users`` new simulated users of the world
  (``flywheel.multiturn.train_in_conversations``, as ``flywheel train grpo --multiturn``):
  the users' openings are its prompts, only the policy's tokens are trained, and each reward
  is averaged over the policy's turns (``training.multiturn``).

The checkpoint is written into a staging folder and renamed into place when complete, so a
killed run never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flywheel.records import read_fields, read_list
from flywheel.scenario import RecipeConfig, trainer_file_fields
from policies.base import SamplingParams

if TYPE_CHECKING:
    from sim.world import World

# Logged replies of the deployed model over which each reward's spread is measured
# (recipes with reward_normalisation = "reference").
SCALE_REPLIES = 128


def require_examples(train: pd.DataFrame) -> None:
    """ValueError saying what to change when curation kept nothing to train on."""
    if train.empty:
        raise ValueError(
            "curation kept no training examples; log more traffic (collect.days, "
            "traffic.n_users) or relax [curation]"
        )


def training_contexts(
    train: pd.DataFrame, n: int, rng: np.random.Generator
) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Up to ``n`` curated train contexts (prompt chats) and their characters."""
    require_examples(train)
    rows = train.iloc[np.sort(rng.permutation(len(train))[: min(n, len(train))])]
    return [[dict(m) for m in p] for p in rows["prompt"]], [str(c) for c in rows["character"]]


def reward_functions(
    recipe: RecipeConfig,
    checkers: Mapping[str, Sequence[Any]],
    reference: Any,
    reward_model: Any | None,
    held: Sequence[str] = (),
) -> tuple[list[Any], dict[str, float]]:
    """The recipe's reward functions (weight 0 left out) and their weights by name
    (``held``: features a ``RateConstraint`` holds, judged by the artifact penalty only
    when present)."""
    from training.rewards import ArtifactPenalty, RewardModelReward, SteerabilityReward

    funcs: list[Any] = []
    if recipe.reward_model != "none" and recipe.reward_model_weight > 0:
        if reward_model is None:
            raise ValueError(f"recipe {recipe.name!r} needs a reward model and none was trained")
        funcs.append(RewardModelReward(reward_model))
    if recipe.steerability_weight > 0:
        funcs.append(SteerabilityReward(checkers))
    if recipe.artifact_penalty_weight > 0:
        funcs.append(ArtifactPenalty(reference, tolerance=recipe.artifact_tolerance, held=held))
    weights = {f.__name__: recipe.weights()[f.__name__] for f in funcs}
    return funcs, weights


def scaled_by_logged_replies(
    funcs: Sequence[Any], train: pd.DataFrame, rng: np.random.Generator
) -> list[Any]:
    """``funcs`` each divided by its spread over (up to ``SCALE_REPLIES``) logged replies of
    the deployed model (``training.rewards.scaled_by_reference``)."""
    from training.rewards import scaled_by_reference

    rows = train.iloc[np.sort(rng.permutation(len(train))[:SCALE_REPLIES])]
    return scaled_by_reference(
        funcs, list(rows["prompt"]), list(rows["completion"]), list(rows["character"])
    )


def trainer_overrides(recipe: RecipeConfig) -> dict[str, Any]:
    """TRL config fields for the recipe: its trainer file, then its ``trainer`` table."""
    return {**trainer_file_fields(recipe), **recipe.trainer}


# RecipeConfig fields a grpo recipe takes from the scenario only where the scenario sets
# them; unset, the benchmark's measured default (training.recipes.GRPORecipe) applies.
_SCENARIO_GRPO_FIELDS = {
    "max_steps": "max_steps",
    "reward_normalisation": "normalise",
    "artifact_tolerance": "artifact_tolerance",
    "hold_rates": "hold_rates",
    "rate_estimate": "rate_estimate",
}
# What a kind changes in the benchmark's settings before the scenario's fields apply: a
# conversation is no single reply to read a rate's token probabilities along.
_KIND_GRPO_SETTINGS: dict[str, dict[str, Any]] = {"grpo_multiturn": {"rate_estimate": "count"}}


def grpo_recipe(recipe: RecipeConfig, sampling: SamplingParams) -> Any:
    """The ``training.recipes.GRPORecipe`` of a scenario's grpo (or grpo_multiturn) recipe:
    the benchmark's settings (grpo_multiturn: held rates counted), overridden by the fields
    the scenario sets (``max_steps``, ``reward_normalisation``, ``artifact_tolerance``,
    ``hold_rates``, ``rate_estimate``; ``trainer`` and ``trainer_file`` as GRPOConfig fields,
    the recipe's own among them lifted into it), its reward weights and reply length,
    sampling at the serving ``sampling`` (the logged replies' distribution) unless the
    trainer fields say otherwise."""
    from training.recipes import GRPORecipe, split_trainer_fields

    chosen = {
        ours: getattr(recipe, theirs)
        for theirs, ours in _SCENARIO_GRPO_FIELDS.items()
        if theirs in recipe.model_fields_set
    }
    if "hold_rates" in chosen:
        chosen["hold_rates"] = tuple(chosen["hold_rates"])
    named, trainer = split_trainer_fields(trainer_overrides(recipe))
    settings = {
        "max_new_tokens": recipe.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        **_KIND_GRPO_SETTINGS.get(recipe.kind, {}),
        **chosen,
        **named,
    }
    return GRPORecipe(**settings, weights=recipe.weights(), trainer=trainer)


def train_candidate(
    recipe: RecipeConfig,
    base_model: str,
    deployed: Any,
    train: pd.DataFrame,
    reference: Any,
    checkers: Mapping[str, Sequence[Any]],
    reward_model: Any | None,
    out_dir: Path,
    seed: int,
    sampling: SamplingParams,
    *,
    world: World | None = None,
) -> CandidateTraining:
    """Run ``recipe`` from ``base_model`` (the deployed checkpoint) into ``out_dir``.

    Args:
        recipe: the scenario's recipe.
        base_model: the deployed model's checkpoint ('smollm2' or a folder).
        deployed: the deployed ``Policy`` (samples the rs+sft / dpo candidates).
        train: curated train split (columns prompt, character, ...).
        reference: ``training.rewards.StyleReference`` of the deployed model's replies
            (rs+sft, dpo; a grpo recipe calibrates on the logged train replies).
        checkers: character name -> instruction checkers.
        reward_model: the reward model the recipe names (or None for 'none').
        out_dir: final checkpoint folder (must not exist yet or is replaced).
        seed: seeds context choice, sampling and the trainer.
        sampling: how the deployed model serves: rs+sft / dpo sample replies with it (its
            seed replaced by ``seed``), grpo trains at its temperature and nucleus.
        world: the ``sim.world.World`` whose simulated users a grpo_multiturn recipe talks
            to (other kinds: unused).

    Returns:
        What training reported (:class:`CandidateTraining`).
    """
    from training.models import TRAINING_MARKER, model_config, seed_everything

    if recipe.kind == "grpo_multiturn" and world is None:
        raise ValueError(
            f"recipe {recipe.name!r} (kind 'grpo_multiturn') trains in conversations with the "
            "world's simulated users and got world=None; fix: pass world=sim.world.World.build"
            "(...) (the loop passes its own)"
        )
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    job = _Job(
        recipe=recipe,
        base_model=base_model,
        deployed=deployed,
        train=train,
        reference=reference,
        checkers=checkers,
        reward_model=reward_model,
        seed=seed,
        sampling=sampling,
        world=world,
        rng=np.random.default_rng(seed),
        model_args=model_config(
            base_model, use_peft=recipe.use_peft, lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha
        ),
        staging=staging,
    )
    seed_everything(seed)
    trained = _TRAIN_BY_KIND[recipe.kind](job)
    shutil.rmtree(job.work, ignore_errors=True)
    if not (staging / TRAINING_MARKER).is_file():
        raise RuntimeError(f"recipe {recipe.name!r} finished without a checkpoint in {staging}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    record = json.loads((out_dir / TRAINING_MARKER).read_text())
    return CandidateTraining(
        examples=trained.examples,
        reward_names=tuple(f.__name__ for f in trained.rewards),
        weights=trained.weights,
        trainer_metrics=record.get("metrics", {}),
        grpo=trained.grpo,
    )


@dataclass(frozen=True)
class CandidateTraining:
    """What training a candidate reported: its examples, rewards and the trainer's metrics.

    ``to_dict`` is the JSON the loop's ``candidate:R`` step stores beside ``model_path``
    (``flywheel.steps.TrainedCandidate``); ``from_dict`` reads it back.
    """

    examples: int  # training examples (prompts, SFT targets, preference pairs or users)
    reward_names: tuple[str, ...]  # the reward functions' names, in the order they score
    weights: Mapping[str, float]  # each reward's weight, by name
    trainer_metrics: Mapping[str, Any]  # the trainer's final log (training.models marker)
    # grpo / grpo_multiturn only: the GRPORecipe the scenario resolved to and what its build
    # made of it (``_resolved``); kept as written, it is a record for people, not read back.
    grpo: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The step's JSON (``grpo`` only for the kinds that have one)."""
        out = {
            "examples": self.examples,
            "reward_names": list(self.reward_names),
            "weights": dict(self.weights),
            "trainer_metrics": dict(self.trainer_metrics),
        }
        return out if self.grpo is None else {**out, "grpo": dict(self.grpo)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "candidate", *, fix: str) -> CandidateTraining:
        """Read what :meth:`to_dict` wrote; ``fix`` ends the error of a malformed record.

        Raises:
            flywheel.records.RecordError: a field is missing or unknown.
        """
        values = read_fields(cls, d, where, optional=("grpo",), fix=fix)
        names = tuple(read_list(values["reward_names"], f"{where}.reward_names", fix=fix))
        return cls(**{**values, "reward_names": names, "grpo": d.get("grpo")})


@dataclass(frozen=True)
class _Job:
    """What one recipe trains from (``train_candidate``'s arguments, resolved)."""

    recipe: RecipeConfig
    base_model: str
    deployed: Any
    train: pd.DataFrame
    reference: Any
    checkers: Mapping[str, Sequence[Any]]
    reward_model: Any | None
    seed: int
    sampling: SamplingParams
    world: World | None
    rng: np.random.Generator
    model_args: Any
    staging: Path  # the checkpoint is written here, then renamed into place

    @property
    def work(self) -> Path:
        """The trainer's scratch folder (removed once the checkpoint is saved)."""
        return self.staging / "trainer"


@dataclass(frozen=True)
class _Trained:
    """What a kind's training reports back: its rewards, weights, examples and settings."""

    rewards: Sequence[Any]
    weights: Mapping[str, float]
    examples: int
    grpo: Mapping[str, Any] | None = None  # grpo kinds: what the recipe resolved to


def _train_grpo_multiturn(job: _Job) -> _Trained:
    from flywheel.multiturn import train_in_conversations
    from training.multiturn import MultiTurnSettings

    recipe = job.recipe
    require_examples(job.train)
    settings = grpo_recipe(recipe, job.sampling)
    build, _ = train_in_conversations(
        settings,
        job.train,
        job.world,
        job.model_args,
        job.staging,
        checkers=job.checkers,
        users=recipe.users,
        seed=job.seed,
        rng=job.rng,
        scorer=job.reward_model,
        settings=MultiTurnSettings(max_bot_turns=recipe.max_bot_turns),
    )
    conversations = {"max_bot_turns": recipe.max_bot_turns, "users": recipe.users}
    grpo = {**_resolved(settings, build), "multiturn": conversations}
    return _Trained(build.rewards, build.weights, recipe.users, grpo)


def _train_grpo(job: _Job) -> _Trained:
    from training.grpo import grpo_records
    from training.recipes import build_grpo, logged_reference, transformers_policy
    from training.recipes import train as train_build

    train = job.train
    prompts, characters = training_contexts(train, job.recipe.prompts, job.rng)
    settings = grpo_recipe(job.recipe, job.sampling)
    estimator = (
        transformers_policy(job.deployed, job.base_model) if settings.estimates_rates else None
    )
    logged = logged_reference(
        estimator,
        list(train["prompt"]),
        list(train["completion"]),
        list(train["character"]),
        settings,
        job.rng,
    )
    del estimator
    build = build_grpo(settings, job.checkers, logged, job.work, job.seed, job.reward_model)
    records = grpo_records(prompts, characters)
    train_build(build, records, job.model_args, job.staging)
    return _Trained(build.rewards, build.weights, len(records), _resolved(settings, build))


def _train_best_of_n(job: _Job) -> _Trained:
    """rs+sft and dpo: score ``samples`` replies per context, then SFT on the best or DPO on
    the best vs the worst."""
    from training.rejection import (
        best_replies,
        preference_records,
        sample_candidates,
        score_candidates,
    )

    recipe = job.recipe
    prompts, characters = training_contexts(job.train, recipe.prompts, job.rng)
    funcs, weights = reward_functions(recipe, job.checkers, job.reference, job.reward_model)
    if recipe.reward_normalisation == "reference":
        funcs = scaled_by_logged_replies(funcs, job.train, job.rng)
    params = SamplingParams(
        max_new_tokens=recipe.max_new_tokens,
        temperature=job.sampling.temperature,
        top_p=job.sampling.top_p,
        seed=job.seed,
    )
    samples = sample_candidates(job.deployed, prompts, characters, recipe.samples, params)
    scored = score_candidates(
        samples, funcs, weights, standardise=recipe.reward_normalisation == "group"
    )
    overrides = trainer_overrides(recipe)
    if recipe.kind == "rs+sft":
        from training.sft import sft_config, train_sft

        records = sft_targets(best_replies(scored), recipe.max_new_tokens)
        args = sft_config(job.work, max_steps=recipe.max_steps, seed=job.seed, **overrides)
        train_sft(records, job.model_args, args, job.staging)
    else:
        from training.dpo import dpo_config, train_dpo

        records = preference_records(scored)
        args = dpo_config(job.work, max_steps=recipe.max_steps, seed=job.seed, **overrides)
        train_dpo(records, job.model_args, args, job.staging)
    return _Trained(funcs, weights, len(records))


def sft_targets(best: pd.DataFrame, max_new_tokens: int) -> list[dict[str, Any]]:
    """SFT records of the best replies; a reply the token cap stopped is marked ``cut`` and
    trained without an end of turn (``training.sft``)."""
    cut = best["completion_tokens"] >= max_new_tokens
    return [
        {"prompt": list(p), "completion": [{"role": "assistant", "content": r}], "cut": bool(c)}
        for p, r, c in zip(best["prompt"], best["reply"], cut, strict=True)
    ]


_TRAIN_BY_KIND = {
    "grpo_multiturn": _train_grpo_multiturn,
    "grpo": _train_grpo,
    "rs+sft": _train_best_of_n,
    "dpo": _train_best_of_n,
}


def _resolved(settings: Any, build: Any) -> dict[str, Any]:
    """What a grpo recipe resolved to (the scenario's recipe record shows only what it set):
    its ``GRPORecipe`` and what its build made of it, less the trainer config."""
    built = {k: v for k, v in build.describe().items() if k != "trainer"}
    return {"recipe": asdict(settings), **built}
