"""The recipes behind ``flywheel train sft|dpo|grpo``, and the one GRPO recipe builder.

Each ``run_*`` takes the turns DataFrame ``flywheel/`` read from the run store and what it
knows of the characters (system prompts; checkers for the steerability reward), curates the
turns (``training.curation``) and runs one TRL trainer on the curated *train* split. The
held-out users are kept for evaluation and never trained on.

- SFT: the curated replies themselves.
- DPO: for each curated context, ``n`` replies of the starting model scored by the
  reward model (when given), the steerability checkers and the artifact penalty; best
  vs worst of each context (``training.rejection``).
- GRPO: the curated contexts as prompts, rewards as in DPO but online.

GRPO is built in one place for every entry point (``flywheel run``'s candidates,
``flywheel train grpo`` and ``benchmarks/grpo_steerability.py``): a ``GRPORecipe`` (the
settings, defaults the benchmark measured best) and a ``ReferenceReplies`` (the starting
model's replies: style statistics, reward scales, the rates held) go into ``build_grpo``,
which returns the rewards, weights, credit masks, anchors and the ``GRPOConfig``
(``GRPOBuild``); ``train`` runs it. The same recipe and reference give the same build
whoever calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rewards.checkers import Checker
from training.curation import CuratedData, CurationConfig, curate, sft_records
from training.models import model_config

# Replies sampled per context for DPO pairs; contexts used to fit the reference style.
DPO_SAMPLES = 4
REFERENCE_PROMPTS = 128


def curated(turns: pd.DataFrame, system_prompts: Mapping[str, str], seed: int) -> CuratedData:
    """Curate ``turns`` with the default filters, split by user with ``seed``."""
    data = curate(turns, np.random.default_rng(seed), CurationConfig(), system_prompts)
    if data.train.empty:
        raise ValueError(
            f"curation kept no training examples from {len(turns)} logged replies "
            f"({data.dropped}); log more traffic or relax training.curation.CurationConfig"
        )
    return data


def _reference(model: str, prompts: Sequence[Any], characters: Sequence[str], seed: int) -> Any:
    from training.grpo import reference_style

    k = min(len(prompts), REFERENCE_PROMPTS)
    return reference_style(model, prompts[:k], characters[:k], seed=seed)


def run_sft(
    turns: pd.DataFrame,
    system_prompts: Mapping[str, str],
    model: str,
    out: str | Path,
    steps: int,
    seed: int = 0,
    use_peft: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """SFT on the curated train split; returns the merged checkpoint folder."""
    from training.sft import sft_config, train_sft

    data = curated(turns, system_prompts, seed)
    args = sft_config(Path(out) / "trainer", max_steps=steps, seed=seed, **(overrides or {}))
    return train_sft(sft_records(data.train), model_config(model, use_peft=use_peft), args, out)


def run_dpo(
    turns: pd.DataFrame,
    system_prompts: Mapping[str, str],
    checkers: Mapping[str, Sequence[Checker]],
    model: str,
    out: str | Path,
    steps: int,
    scorer: Any | None = None,
    seed: int = 0,
    use_peft: bool = True,
    max_new_tokens: int = 48,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """DPO on best/worst pairs of the starting model's own replies to curated contexts."""
    from policies import PolicySpec, SamplingParams, load_policy
    from training.dpo import dpo_config, train_dpo
    from training.grpo import build_rewards
    from training.rejection import preference_records, sample_candidates, score_candidates

    data = curated(turns, system_prompts, seed)
    # One context per pair each step: more contexts than steps x batch would not be seen.
    contexts = data.train.head(max(steps * 4, 8))
    prompts, characters = list(contexts["prompt"]), list(contexts["character"])
    reference = _reference(model, prompts, characters, seed)
    policy = load_policy(PolicySpec(model=model, dtype="auto"))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.9, seed=seed)
    candidates = sample_candidates(policy, prompts, characters, DPO_SAMPLES, params)
    del policy
    scored = score_candidates(candidates, build_rewards(checkers, reference, scorer))
    args = dpo_config(Path(out) / "trainer", max_steps=steps, seed=seed, **(overrides or {}))
    return train_dpo(preference_records(scored), model_config(model, use_peft=use_peft), args, out)


def run_grpo(
    turns: pd.DataFrame,
    system_prompts: Mapping[str, str],
    checkers: Mapping[str, Sequence[Checker]],
    model: str,
    out: str | Path,
    steps: int,
    scorer: Any | None = None,
    seed: int = 0,
    use_peft: bool = True,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    hold_rates: Sequence[str] = (),
) -> Path:
    """``flywheel train grpo``: the benchmark's recipe (``cli_recipe``) on the curated
    contexts, calibrated on the logged train replies (``logged_reference``: each held
    feature's rate is the logged one)."""
    from training.grpo import grpo_records

    recipe = cli_recipe(steps, hold_rates, overrides)
    data = curated(turns, system_prompts, seed)
    prompts, characters = list(data.train["prompt"]), list(data.train["character"])
    policy = transformers_policy(None, model) if recipe.estimates_rates else None
    reference = logged_reference(
        policy, prompts, list(data.train["completion"]), characters, recipe,
        np.random.default_rng(seed),
    )  # fmt: skip
    del policy
    build = build_grpo(recipe, checkers, reference, Path(out) / "trainer", seed, scorer)
    records = grpo_records(prompts, characters)
    return train(build, records, model_config(model, use_peft=use_peft), out, callbacks)


# ---------------------------------------------------------------------------- GRPO recipe
# The settings benchmarks/grpo_steerability.py measured best (benchmarks/README.md, section
# "grpo_steerability.py: GRPO on SmolLM2 on a CPU", the command it opens with): a KL leash
# (beta 0.2), each reward divided by its spread over the reference replies, the emoji rate
# held by a token-estimated RateConstraint with GRPO sampling at the serving nucleus, and no
# advantage for the tokens that start an emoji. 47 steps of 2 prompts x 8 replies (752
# replies) at lr 5e-4 raised instruction following 0.254 -> 0.339 and gold utility by +0.28
# with the emoji rate and words held; 44 steps of a counted-rate variant moved it too (+0.037,
# +0.27). No shorter run was measured: STEPS_TO_MOVE is the measured recipe's step count, at
# its batch (fewer replies a step need more steps) and learning rate.
STEPS_TO_MOVE = 47
BENCHMARK_TOLERANCE = {"words": 0.0, "exclamations": 0.0, "emoji": 1.0}
REWARD_NAMES = ("reward_model", "steerability", "artifact_penalty")
NORMALISATIONS = ("reference", "group")


def _unit_weights() -> dict[str, float]:
    return dict.fromkeys(REWARD_NAMES, 1.0)


@dataclass(frozen=True)
class GRPORecipe:
    """What a GRPO candidate is trained with; the defaults are the benchmark's best
    (comment above ``STEPS_TO_MOVE``).

    Attributes:
        max_steps: optimiser steps; ``STEPS_TO_MOVE`` is what the benchmark needed for the
            candidate to move.
        learning_rate: LoRA learning rate.
        beta: KL coefficient to the starting model (TRL ``GRPOConfig.beta``).
        normalise: ``reference``: each reward over its spread on the reference replies,
            then summed (``sum_then_normalize``); ``group``: each standardised within its
            group (``normalize_then_sum``); ``training.rewards`` says why.
        artifact_tolerance: style drift (reference sd) the artifact penalty forgives: one
            value or one per feature.
        hold_rates: features whose rate a ``RateConstraint`` holds at the reference's.
        rate_lr: the constraints' multiplier step.
        rate_estimate: ``count`` or ``tokens`` (the policy's own probability of the
            feature along each reply; needs ``ReferenceReplies.estimates``).
        mask_credit: features whose start tokens get no advantage (``CreditMask``).
        anchors: features whose token mass a ``TokenAnchor`` holds (none measured best).
        anchor_coef: weight of each anchor's loss.
        temperature: GRPO's sampling temperature.
        top_p: GRPO's sampling nucleus (the serving one: a token-estimated rate is read at
            it on both sides).
        max_new_tokens: longest reply GRPO samples (and the reference).
        reference_prompts: contexts the reference replies answer (at most).
        reference_samples: reference replies sampled per context (``sample_reference``).
        weights: weight of each reward by name (0 leaves it out); rate constraints weigh 1.
        trainer: further ``GRPOConfig`` fields, applied last (the GPU switch, batch sizes).
    """

    max_steps: int = STEPS_TO_MOVE
    learning_rate: float = 5e-4
    beta: float = 0.2
    normalise: str = "reference"
    artifact_tolerance: float | Mapping[str, float] = field(
        default_factory=lambda: dict(BENCHMARK_TOLERANCE)
    )
    hold_rates: tuple[str, ...] = ("emoji",)
    rate_lr: float = 0.1
    rate_estimate: str = "tokens"
    mask_credit: tuple[str, ...] = ("emoji",)
    anchors: tuple[str, ...] = ()
    anchor_coef: float = 1.0
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 48
    reference_prompts: int = REFERENCE_PROMPTS
    reference_samples: int = 2
    weights: Mapping[str, float] = field(default_factory=_unit_weights)
    trainer: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from training.rewards import RATE_ESTIMATES, artifact_tolerances, check_rate_feature

        for name in ("hold_rates", "mask_credit", "anchors"):
            features = tuple(getattr(self, name))
            for feature in features:
                check_rate_feature(feature)
            object.__setattr__(self, name, features)
        object.__setattr__(self, "weights", {**_unit_weights(), **self.weights})
        object.__setattr__(self, "trainer", dict(self.trainer))
        artifact_tolerances(self.artifact_tolerance)
        checks = {
            "normalise": self.normalise in NORMALISATIONS,
            "rate_estimate": self.rate_estimate in RATE_ESTIMATES,
            "max_steps": self.max_steps >= 1,
            "learning_rate": self.learning_rate > 0,
            "beta": self.beta >= 0,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "reference_prompts": self.reference_prompts >= 1,
            "reference_samples": self.reference_samples >= 1,
            "weights": set(self.weights) <= set(REWARD_NAMES)
            and all(w >= 0 for w in self.weights.values()),
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            shown = {name: getattr(self, name) for name in wrong}
            raise ValueError(
                f"GRPORecipe {shown} out of range; fix: normalise in {NORMALISATIONS}, "
                f"rate_estimate in {RATE_ESTIMATES}, steps / tokens / prompts / samples >= 1, "
                f"learning_rate and temperature > 0, beta >= 0, top_p in (0, 1], weights >= 0 "
                f"named from {REWARD_NAMES}"
            )

    @property
    def aggregation(self) -> str:
        """TRL's ``multi_objective_aggregation`` for ``normalise``."""
        return "sum_then_normalize" if self.normalise == "reference" else "normalize_then_sum"

    @property
    def estimates_rates(self) -> bool:
        """Whether a held rate is read from token probabilities (a model must score the
        reference replies)."""
        return self.rate_estimate == "tokens" and bool(self.hold_rates)

    def check_sampling(self, temperature: float, top_p: float) -> None:
        """A token-estimated rate is read at GRPO's sampling on the policy's replies and at
        the reference's (``temperature``, ``top_p``) on the reference replies: both must be
        the same distribution."""
        if self.estimates_rates:
            same_sampling((self.temperature, self.top_p), (temperature, top_p))


def same_sampling(grpo: tuple[float, float], reference: tuple[float, float]) -> None:
    """ValueError unless GRPO's (temperature, top_p) is the reference replies' one."""
    if tuple(grpo) != tuple(reference):
        raise ValueError(
            f"rate_estimate 'tokens' with GRPO sampling at temperature {grpo[0]}, top_p "
            f"{grpo[1]}: the held rate's target is estimated on reference replies sampled at "
            f"temperature {reference[0]}, top_p {reference[1]}, and GRPO's replies must be "
            f"sampled the same way; fix: top_p = {reference[1]}, temperature = {reference[0]} "
            "(or rate_estimate = 'count')"
        )


# GRPOConfig fields that are GRPORecipe settings under another name or the same one.
_RECIPE_FIELDS = {
    "learning_rate": "learning_rate",
    "beta": "beta",
    "temperature": "temperature",
    "top_p": "top_p",
    "max_completion_length": "max_new_tokens",
}


def split_trainer_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """GRPOConfig ``fields`` as (GRPORecipe settings, the rest for ``GRPORecipe.trainer``):
    a learning rate given as a trainer field is the recipe's learning rate, so that the
    recipe says what the run used."""
    named = {_RECIPE_FIELDS[k]: v for k, v in fields.items() if k in _RECIPE_FIELDS}
    return named, {k: v for k, v in fields.items() if k not in _RECIPE_FIELDS}


def cli_recipe(
    steps: int, hold_rates: Sequence[str] = (), overrides: Mapping[str, Any] | None = None
) -> GRPORecipe:
    """``flywheel train grpo``'s recipe: the benchmark's, with ``--steps``, ``--hold-rate``
    (none given: the recipe's; ``none``: no rate held) and ``--config``'s GRPOConfig fields."""
    held = {} if not hold_rates else {"hold_rates": tuple(f for f in hold_rates if f != "none")}
    named, trainer = split_trainer_fields(overrides or {})
    return GRPORecipe(max_steps=steps, trainer=trainer, **held, **named)


@dataclass(frozen=True)
class ReferenceReplies:
    """The starting model's replies the rewards are calibrated on: style statistics (the
    artifact penalty), each reward's spread (``normalise = "reference"``) and each held
    feature's rate. ``temperature`` / ``top_p``: the distribution they come from;
    ``estimates``: per held feature, the model's probability of it along each reply
    (``training.anchor.expected_features``' ``present``)."""

    chats: list[list[dict[str, str]]]
    replies: list[str]
    characters: list[str]
    temperature: float
    top_p: float
    estimates: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {len(self.chats), len(self.replies), len(self.characters)}
        sizes |= {len(v) for v in self.estimates.values()}
        if len(sizes) != 1 or not self.replies:
            raise ValueError(
                f"ReferenceReplies needs one chat, character and estimate per reply and at "
                f"least one reply; got {len(self.chats)} chats, {len(self.replies)} replies, "
                f"{len(self.characters)} characters, estimates "
                f"{ {k: len(v) for k, v in self.estimates.items()} }"
            )


def _hf_parts(policy: Any) -> Any:
    """The transformers-backed policy under planted wrappers (``.base``)."""
    while not hasattr(policy, "model") and hasattr(policy, "base"):
        policy = policy.base
    if not hasattr(policy, "model") or not hasattr(policy, "tokenizer"):
        raise ValueError(
            f"policy {getattr(policy, 'name', policy)!r} exposes no transformers model to "
            "read token probabilities from; fix: serve it with backend 'hf' or 'hf_engine', "
            "or use rate_estimate = 'count'"
        )
    return policy


def transformers_policy(policy: Any | None, model: str) -> Any:
    """What token-estimated rates read probabilities from: ``policy``'s transformers model
    (under planted wrappers) or, where it has none (a vLLM engine, an OpenAI-compatible
    server) or none is given, ``model`` loaded with the ``hf`` backend."""
    if policy is not None:
        try:
            return _hf_parts(policy)
        except ValueError:
            pass
    from policies import PolicySpec, load_policy

    return load_policy(PolicySpec(model=model, dtype="auto"))


def feature_expectations(
    policy: Any,
    chats: Sequence[Sequence[Mapping[str, str]]],
    completion_ids: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    temperature: float,
    top_p: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per reply, ``policy``'s expected count of a feature (``token_ids`` start one) and its
    probability of having it, from its token probabilities along the reply at
    ``temperature`` / ``top_p`` (``training.anchor.expected_features``)."""
    from policies.tokens import fit_prompt_ids
    from training.anchor import expected_features

    policy = _hf_parts(policy)
    tokenizer = policy.tokenizer
    limit = policy.spec.max_prompt_tokens
    return expected_features(
        policy.model,
        [fit_prompt_ids(tokenizer, [dict(m) for m in chat], limit) for chat in chats],
        completion_ids,
        token_ids,
        temperature,
        top_p,
        tokenizer.pad_token_id,
    )


def _estimates(
    policy: Any,
    recipe: GRPORecipe,
    chats: Sequence[Sequence[Mapping[str, str]]],
    completion_ids: Sequence[Sequence[int]],
    temperature: float,
    top_p: float,
) -> dict[str, Sequence[float]]:
    """``ReferenceReplies.estimates`` of the recipe's held features (none for ``count``)."""
    if recipe.rate_estimate != "tokens":
        return {}
    from training.anchor import feature_token_ids

    tokenizer = _hf_parts(policy).tokenizer
    return {
        feature: feature_expectations(
            policy, chats, completion_ids, feature_token_ids(tokenizer, feature),
            temperature, top_p,
        )[1].tolist()
        for feature in recipe.hold_rates
    }  # fmt: skip


def sample_reference(
    policy: Any,
    chats: Sequence[Sequence[Mapping[str, str]]],
    characters: Sequence[str],
    recipe: GRPORecipe,
    seed: int,
    top_p: float | None = None,
) -> ReferenceReplies:
    """``recipe.reference_samples`` replies of ``policy`` to each of the first
    ``recipe.reference_prompts`` contexts, in one batched call at the recipe's temperature
    and ``top_p`` (default: the serving nucleus, ``SamplingParams().top_p``)."""
    from policies import SamplingParams

    k = min(len(chats), recipe.reference_prompts)
    chats = [[dict(m) for m in c] for c in chats[:k]] * recipe.reference_samples
    characters = [str(c) for c in characters[:k]] * recipe.reference_samples
    params = SamplingParams(
        max_new_tokens=recipe.max_new_tokens,
        temperature=recipe.temperature,
        top_p=SamplingParams().top_p if top_p is None else top_p,
        seed=seed,
    )
    generations = policy.generate(chats, params)
    completions = [list(g.completion_ids) for g in generations]
    if recipe.rate_estimate == "tokens" and not all(completions):
        raise ValueError(
            f"policy {policy.name!r} returned no completion token ids; fix: the 'hf' backend "
            "(or rate_estimate = 'count')"
        )
    return ReferenceReplies(
        chats, [g.text for g in generations], characters, params.temperature, params.top_p,
        _estimates(policy, recipe, chats, completions, params.temperature, params.top_p),
    )  # fmt: skip


def logged_reference(
    policy: Any | None,
    chats: Sequence[Sequence[Mapping[str, str]]],
    replies: Sequence[str],
    characters: Sequence[str],
    recipe: GRPORecipe,
    rng: np.random.Generator,
) -> ReferenceReplies:
    """Up to ``recipe.reference_prompts`` logged replies (drawn with ``rng``) of the model
    that served them, taken as sampled at the recipe's temperature and nucleus (the loop
    trains at its serving sampling). Token-estimated rates read ``policy``'s probabilities
    along the replies re-tokenised, ended by the end-of-turn token."""
    from policies.tokens import END_OF_TURN

    rows = np.sort(rng.permutation(len(replies))[: recipe.reference_prompts])
    chats = [[dict(m) for m in chats[i]] for i in rows]
    texts, names = [str(replies[i]) for i in rows], [str(characters[i]) for i in rows]
    estimates: dict[str, Sequence[float]] = {}
    if recipe.estimates_rates:
        if policy is None:
            raise ValueError("rate_estimate 'tokens' needs the policy that served the replies")
        tokenizer = _hf_parts(policy).tokenizer
        end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if not isinstance(end, int) or end == tokenizer.unk_token_id:
            end = tokenizer.eos_token_id
        ids = [[*tokenizer(t, add_special_tokens=False)["input_ids"], end] for t in texts]
        estimates = _estimates(policy, recipe, chats, ids, recipe.temperature, recipe.top_p)
    return ReferenceReplies(chats, texts, names, recipe.temperature, recipe.top_p, estimates)


@dataclass(frozen=True)
class GRPOBuild:
    """Everything a GRPO run is made of, built by ``build_grpo``: the rewards in TRL's order
    (rate constraints last), their weights by name, credit masks, anchors, the style
    statistics, each reward's reference scale (``normalise = "reference"``) and the
    ``trl.GRPOConfig``."""

    recipe: GRPORecipe
    rewards: list[Any]
    weights: dict[str, float]
    credit_masks: list[Any]
    anchors: list[Any]
    style: Any
    scales: dict[str, float] | None
    args: Any

    @property
    def constraints(self) -> list[Any]:
        """The ``RateConstraint`` s among the rewards."""
        from training.rewards import RateConstraint

        return [r for r in self.rewards if isinstance(r, RateConstraint)]

    def describe(self) -> dict[str, Any]:
        """JSON-ready record: rewards, weights, scales, held rates, masks, anchors and every
        GRPOConfig field but the output folders (equal builds describe equally)."""
        config = {
            k: v for k, v in self.args.to_dict().items() if k not in ("output_dir", "logging_dir")
        }
        return {
            "reward_names": [r.__name__ for r in self.rewards],
            "weights": self.weights,
            "reward_scales": self.scales,
            "rate_constraints": {
                c.__name__: {"target": c.target, "characters": sorted(c.characters or ())}
                for c in self.constraints
            },
            "credit_masks": {m.feature: sorted(m.characters) for m in self.credit_masks},
            "anchors": {a.feature: sorted(a.characters) for a in self.anchors},
            "trainer": config,
        }


def build_grpo(
    recipe: GRPORecipe,
    checkers: Mapping[str, Sequence[Checker]],
    reference: ReferenceReplies,
    output_dir: str | Path,
    seed: int,
    scorer: Any | None = None,
) -> GRPOBuild:
    """The rewards, weights, credit masks, anchors and GRPOConfig of ``recipe``, calibrated
    on ``reference`` (with the reward model ``scorer`` when given and weighted > 0)."""
    from training.anchor import credit_masks, token_anchors
    from training.grpo import DEFAULT_WEIGHTS, build_rewards, grpo_config
    from training.rewards import StyleReference, held_rates, scaled_by_reference

    recipe.check_sampling(reference.temperature, reference.top_p)
    estimates = None
    if recipe.estimates_rates:
        missing = [f for f in recipe.hold_rates if f not in reference.estimates]
        if missing:
            raise ValueError(
                f"rate_estimate 'tokens' holds {missing} but the reference has no token "
                "estimates for them; fix: build it with sample_reference / logged_reference "
                "from the same recipe"
            )
        estimates = reference.estimates
    style = StyleReference.from_replies(reference.replies, reference.characters)
    constraints = held_rates(
        recipe.hold_rates, reference.replies, reference.characters, checkers,
        estimates=estimates, lr=recipe.rate_lr, estimate=recipe.rate_estimate,
    )  # fmt: skip
    anchors = token_anchors(recipe.anchors, checkers, recipe.anchor_coef)
    masks = credit_masks(recipe.mask_credit, checkers)
    held = sorted({c.feature for c in [*constraints, *anchors, *masks]})
    rewards = build_rewards(checkers, style, scorer, recipe.artifact_tolerance, held=held)
    rewards = [r for r in rewards if recipe.weights[r.__name__] > 0]
    if not rewards:
        raise ValueError(
            f"GRPORecipe weights {recipe.weights} leave no reward (reward model given: "
            f"{scorer is not None}); fix: weigh steerability or the reward model above 0"
        )
    scales = None
    if recipe.normalise == "reference":
        rewards = scaled_by_reference(
            rewards, reference.chats, reference.replies, reference.characters
        )
        scales = {r.__name__: r.scale for r in rewards}
    weights = {r.__name__: recipe.weights[r.__name__] for r in rewards}
    weights |= {c.__name__: DEFAULT_WEIGHTS[c.__name__] for c in constraints}
    args = grpo_config(
        output_dir, max_steps=recipe.max_steps, seed=seed,
        **{
            "max_completion_length": recipe.max_new_tokens,
            "learning_rate": recipe.learning_rate,
            "beta": recipe.beta,
            "temperature": recipe.temperature,
            "top_p": recipe.top_p,
            "multi_objective_aggregation": recipe.aggregation,
            **recipe.trainer,
        },
    )  # fmt: skip
    if constraints and estimates is not None:  # the trainer table may change the sampling
        same_sampling((args.temperature, args.top_p), (reference.temperature, reference.top_p))
    return GRPOBuild(recipe, [*rewards, *constraints], weights, masks, anchors, style, scales, args)


def train(
    build: GRPOBuild,
    records: list[dict[str, Any]],
    model_args: Any,
    out_dir: str | Path,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Run ``build`` on ``records`` (``training.grpo.grpo_records``) from ``model_args``;
    returns the merged checkpoint folder ``out_dir``."""
    from training.grpo import train_grpo

    return train_grpo(
        records, build.rewards, model_args, build.args, out_dir, weights=build.weights,
        callbacks=callbacks, anchors=build.anchors, credit_masks=build.credit_masks,
    )  # fmt: skip
