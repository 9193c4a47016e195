"""The scenario file of ``flywheel run``: everything one flywheel rehearsal needs, validated.

A scenario is a TOML file with these tables (every key optional unless noted, unknown keys
are errors, every field documented below with ``description=``)::

    name = "quickstart"           seed = 0           generations = 2
    [policy]           the base model deployed at generation 0 (policies.PolicySpec)
    [world]            the simulated world (sim.world.WorldConfig)
    [collect]          production traffic logged each generation for training
    [traffic]          the A/B test of each candidate (sim.traffic.TrafficConfig)
    [analysis]         the A/B analysis (flywheel.ab.AnalysisConfig)
    [serving]          the safety check on every served reply (sim.serving)
    [curation]         training.curation.CurationConfig settings
    [reward_models]    which reward models are (re)trained each generation
    [[recipes]]        one or more candidate recipes: rs+sft, dpo, grpo, grpo_multiturn
    [gates]            offline gates a candidate must pass before its A/B test

``load_scenario(path)`` reads and validates a file; a bad field raises ``ScenarioError``
with one line per problem: the field path, the value seen, what is wrong and the fix
(``scenario.recipes.0.kind = 'ppo': Input should be 'rs+sft', 'dpo', 'grpo' or
'grpo_multiturn'; fix: ...``).
Relative paths are resolved against the scenario file's folder.
"""

from __future__ import annotations

import math
import tomllib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Generic,
    Literal,
    Self,
    TypeVar,
    get_type_hints,
)

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from flywheel.ab import AnalysisConfig
from flywheel.ifbench import IFBenchGateConfig
from policies.spec import PolicySpec
from rewards.rm import LLMConfig, MiniLMConfig
from sim.serving import ServingConfig
from sim.traffic import TrafficConfig
from sim.world import WorldConfig
from training.curation import CurationConfig

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from sim.characters import Character

SCENARIOS_DIR = Path(__file__).resolve().parents[1] / "scenarios"
HELDOUT_CHARACTERS_DIR = SCENARIOS_DIR / "heldout_characters"
RECIPE_KINDS = ("rs+sft", "dpo", "grpo", "grpo_multiturn")
GRPO_KINDS = ("grpo", "grpo_multiturn")  # online sampling: held rates, a GRPOConfig
# RecipeConfig fields of grpo_multiturn alone (a multi-turn rollout's shape).
MULTITURN_FIELDS = ("max_bot_turns", "users")


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message lists every problem and its fix."""


ConfigT = TypeVar("ConfigT")


class DataclassSettings(BaseModel, Generic[ConfigT]):
    """A scenario table of keyword settings for a dataclass config (``config_class``).

    :func:`settings_model` gives it the dataclass's own fields (types, defaults, ``help``
    metadata as descriptions), so an unknown key or a wrong type fails at load with its
    field path, and the dataclass's checks run at load too. The record (``model_dump``) holds
    only the keys the file set, as it did when these tables were plain mappings: a run
    started from the same file keeps its scenario and step fingerprints and still resumes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    config_class: ClassVar[type]

    @model_validator(mode="after")
    def _check_config(self) -> Self:
        try:
            self.build()
        except (TypeError, ValueError) as err:
            # The dataclass's message names the field and the value; pydantic adds the path.
            raise ValueError(str(err)) from err
        return self

    @model_serializer(mode="plain")
    def _record(self) -> dict[str, Any]:
        return self.written()

    def written(self) -> dict[str, Any]:
        """The settings the file set (validated), in field order; the rest are defaults."""
        chosen = self.model_fields_set
        return {name: getattr(self, name) for name in type(self).model_fields if name in chosen}

    def build(self, **elsewhere: Any) -> ConfigT:
        """The ``config_class`` of these settings and of ``elsewhere`` (fields the scenario
        sets in another table); unset fields keep the dataclass's defaults."""
        return self.config_class(**self.written(), **elsewhere)


def settings_model(
    config_class: type[ConfigT], exclude: tuple[str, ...] = ()
) -> type[DataclassSettings[ConfigT]]:
    """A :class:`DataclassSettings` model with the fields of dataclass ``config_class`` but
    ``exclude``: the dataclass stays the one source of the names, types, defaults and help."""
    hints = get_type_hints(config_class)
    definitions: dict[str, tuple[Any, FieldInfo]] = {}
    for spec in fields(config_class):
        if spec.name in exclude:
            continue
        help_text = spec.metadata.get("help")
        if spec.default is MISSING:
            factory = _plain_factory(spec.default_factory)
            default = Field(default_factory=factory, description=help_text)
        else:
            default = Field(spec.default, description=help_text)
        definitions[spec.name] = (_ints_kept(hints[spec.name]), default)
    model = create_model(
        f"{config_class.__name__}Settings",
        __base__=DataclassSettings[config_class],
        **definitions,
    )
    model.config_class = config_class
    return model


def _int_as_written(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else handler(value)


# A float setting written as an integer (``decorrelation = 0``) stays the integer the file
# wrote, as when these tables were plain mappings: the dataclass gets the same value and
# the record (a resumed run's fingerprint) the same JSON.
_FLOAT_AS_WRITTEN = Annotated[float, WrapValidator(_int_as_written)]


def _ints_kept(hint: Any) -> Any:
    """``hint`` with ``float`` (alone or ``| None``) validated by ``_FLOAT_AS_WRITTEN``."""
    if hint is float:
        return _FLOAT_AS_WRITTEN
    if hint == float | None:
        return _FLOAT_AS_WRITTEN | None
    return hint


def _plain_factory(factory: Callable[[], Any]) -> Callable[[], Any]:
    """``factory`` with a read-only mapping it returns (``MappingProxyType``, as
    ``AnalysisConfig``'s margins) copied into a dict: the scenario holding the default must
    pickle and deep-copy as it did while these tables were plain mappings."""

    def plain() -> Any:
        value = factory()
        return dict(value) if isinstance(value, MappingProxyType) else value

    return plain


class AnalysisSettings(settings_model(AnalysisConfig, exclude=("treatment_share",))):
    """``[analysis]``: the ``flywheel.ab.AnalysisConfig`` of the A/B tests, but its
    ``treatment_share``, which is the traffic's (``traffic.treatment_share``)."""

    @model_validator(mode="before")
    @classmethod
    def _no_treatment_share(cls, data: Any) -> Any:
        if isinstance(data, dict) and "treatment_share" in data:
            raise ValueError(
                "analysis.treatment_share is taken from traffic.treatment_share; fix: remove it"
            )
        return data


class CurationSettings(settings_model(CurationConfig)):
    """``[curation]``: the ``training.curation.CurationConfig`` of every generation."""


class MiniLMSettings(settings_model(MiniLMConfig)):
    """``[reward_models.minilm]``: ``rewards.rm.MiniLMConfig`` (its seed is the scenario's)."""


class LLMSettings(settings_model(LLMConfig)):
    """``[reward_models.llm]``: ``rewards.rm.LLMConfig`` (its seed is the scenario's)."""


class CollectConfig(BaseModel):
    """Production traffic logged each generation from the deployed model (training data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: int = Field(2, ge=1, description="Simulated days of production traffic per generation.")
    n_users: int | None = Field(
        None, ge=2, description="Users in the production population; default: traffic.n_users."
    )


class RewardModelsConfig(BaseModel):
    """Reward models (re)trained on each generation's logs: a naive and a style-controlled one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pointwise", "signals"] = Field(
        "pointwise",
        description="pointwise: Bradley-Terry/logistic model of engagement (continued or "
        "liked, not reported); signals: P(continue), P(like), P(return next day) summed.",
    )
    target: str | None = Field(
        None,
        description="pointwise only: the logged signal to fit instead of 'engaged' "
        "(continued, liked, returned_next_day); 'liked' is the artifact trap's likes model.",
    )
    backbone: Literal["minilm", "llm"] = Field(
        "minilm",
        description="minilm: frozen MiniLM embeddings + small head (fast, CPU); llm: an LLM "
        "sequence classifier trained with TRL's RewardTrainer.",
    )
    test_size: float = Field(
        0.2, gt=0, lt=1, description="Share of logged users held out to evaluate the models."
    )
    minilm: MiniLMSettings = Field(
        default_factory=MiniLMSettings,
        description="rewards.rm.MiniLMConfig settings (seed comes from the scenario).",
    )
    llm: LLMSettings = Field(
        default_factory=LLMSettings,
        description="rewards.rm.LLMConfig settings (backbone = 'llm' only).",
    )

    @model_validator(mode="after")
    def _check_target(self) -> RewardModelsConfig:
        from rewards.rm.base import resolve_targets

        resolve_targets(self.kind, self.target)  # its message names the choices
        return self

    def minilm_config(self) -> MiniLMConfig:
        """The ``rewards.rm.MiniLMConfig`` of these settings."""
        return self.minilm.build()

    def llm_config(self) -> LLMConfig:
        """The ``rewards.rm.LLMConfig`` of these settings."""
        return self.llm.build()


class RecipeConfig(BaseModel):
    """One way to make a candidate from the deployed model and the generation's data.

    A grpo recipe is the GRPO benchmark's (``training.recipes.GRPORecipe``: KL leash, rewards
    scaled by the reference, emoji rate held, emoji credit masked, its step count); of the
    fields below it takes ``max_steps``, ``reward_normalisation``, ``artifact_tolerance``,
    ``hold_rates`` and ``rate_estimate`` only where the scenario sets them
    (``flywheel.candidates.grpo_recipe``). A grpo_multiturn recipe is the same recipe trained
    in whole conversations with new simulated users of the world (``training.multiturn``):
    its prompts are those users' openings (``users`` of them, not ``prompts``) and its held
    rates are counted, since a conversation has no per-reply token estimate.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        ...,
        pattern=r"^[a-z0-9][a-z0-9_+-]*$",
        description="Short id (lowercase, digits, _ + -); the candidate is 'gen{K}-{name}'.",
    )
    kind: Literal["rs+sft", "dpo", "grpo", "grpo_multiturn"] = Field(
        ...,
        description="rs+sft: best-of-n replies under the rewards, then SFT on them; dpo: "
        "best vs worst of n as preference pairs; grpo: online RL with the rewards; "
        "grpo_multiturn: grpo in whole conversations of up to max_bot_turns replies with "
        "`users` new simulated users of the world, each reward averaged over the policy's "
        "turns and only the policy's tokens trained.",
    )
    reward_model: Literal["style_controlled", "naive", "none"] = Field(
        "style_controlled",
        description="Which of the generation's reward models scores replies: the "
        "style-controlled one (style term dropped), the naive one, or none.",
    )
    steerability_weight: float = Field(
        1.0, ge=0, description="Weight of the instruction-checker reward (0 = off)."
    )
    artifact_penalty_weight: float = Field(
        1.0, ge=0, description="Weight of the style-drift penalty vs the deployed model (0 = off)."
    )
    reward_model_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the reward-model reward (ignored when reward_model = 'none').",
    )
    artifact_tolerance: float | dict[str, float] = Field(
        0.5,
        description="Style drift (in reference standard deviations) that costs nothing: one "
        "value, or one per feature, e.g. {words = 0, emoji = 1} (others keep 0.5).",
    )
    reward_normalisation: Literal["group", "reference"] = Field(
        "group",
        description="How each reward is normalised before the weighted sum: 'group' "
        "standardises it over the samples of one context (TRL normalize_then_sum); "
        "'reference' divides it by its spread over the deployed model's logged replies "
        "(sum_then_normalize), so a reward that barely separates samples weighs little.",
    )
    hold_rates: list[str] = Field(
        default_factory=list,
        description="grpo only: features whose rate (share of replies with one: emoji, "
        "exclamations) is held at the deployed model's logged rate by a Lagrange multiplier "
        "(training.rewards.RateConstraint), e.g. ['emoji']; characters forbidding one are "
        "not held.",
    )
    rate_estimate: Literal["tokens", "count"] | None = Field(
        None,
        description="grpo kinds: how a held rate is measured on GRPO's replies: 'tokens' (the "
        "policy's probability of the feature along each reply) or 'count' (share of replies "
        "that have it); unset: 'tokens' for grpo (the benchmark's), 'count' for "
        "grpo_multiturn, which takes no other (a conversation is not one reply).",
    )
    prompts: int = Field(
        32,
        ge=1,
        description="Training contexts drawn from the curated train split (not grpo_multiturn: "
        "its contexts are its users' openings).",
    )
    max_bot_turns: int = Field(
        3,
        ge=1,
        description="grpo_multiturn only: most policy replies in one training conversation "
        "(the simulated user may end it sooner), each up to max_new_tokens.",
    )
    users: int = Field(
        32,
        ge=1,
        description="grpo_multiturn only: new simulated users of the world drawn to train with "
        "(ids 'train-...'); each opens one GRPO group of conversations.",
    )
    samples: int = Field(
        4, ge=2, description="Replies sampled per context (rs+sft best-of-n, dpo pairs)."
    )
    max_steps: int = Field(10, ge=1, description="Optimiser steps of the trainer.")
    max_new_tokens: int = Field(48, ge=1, description="Longest sampled reply, in tokens.")
    use_peft: bool = Field(
        True, description="Train a LoRA adapter (merged on save) instead of all weights."
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra TRL config fields (SFTConfig / DPOConfig / GRPOConfig of the kind), "
        "e.g. learning_rate, per_device_train_batch_size, deepspeed.",
    )
    trainer_file: Path | None = Field(
        None,
        description="YAML of TRL config fields merged under `trainer` (the GPU switch, e.g. "
        "training/configs/grpo_vllm.yaml); relative to the scenario file.",
    )
    planted: str | None = Field(
        None,
        description="Rehearsal only: serve the trained candidate inside a planted treatment "
        "(sim.planted) wherever it is served, e.g. 'violate@0.5', 'unsafe@0.3' or "
        "'stylevar@0.9,0', to check that the offline gates catch a known damage.",
    )

    @field_validator("artifact_tolerance")
    @classmethod
    def _check_tolerance(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        from training.rewards import artifact_tolerances

        artifact_tolerances(value)
        return value

    @field_validator("planted")
    @classmethod
    def _check_planted(cls, value: str | None) -> str | None:
        from types import SimpleNamespace

        from sim.planted import planted_policy

        if value is None:
            return value
        base = SimpleNamespace(name="model")
        # planted_policy checks the kind and its rates; a bare model name comes back as is.
        if planted_policy(f"{value}:model", lambda _model: base) is base or ":" in value:
            raise ValueError(
                f"planted = {value!r} is not a planted treatment; fix: write e.g. "
                f"'violate@0.5', 'unsafe@0.3' or 'stylevar@0.9,0' (no model name)"
            )
        return value

    @field_validator("hold_rates")
    @classmethod
    def _check_hold_rates(cls, value: list[str]) -> list[str]:
        from training.rewards import check_rate_feature

        return [check_rate_feature(feature) for feature in value]

    @model_validator(mode="after")
    def _check_trainer(self) -> RecipeConfig:
        config_cls = _trl_config_class(self.kind)
        known = {f.name for f in fields(config_cls)}
        unknown = sorted(set(self.trainer) - known)
        if unknown:
            raise ValueError(
                f"recipe {self.name!r}: trainer setting(s) {unknown} are not "
                f"{config_cls.__name__} fields; fix: use trl.{config_cls.__name__} field names"
            )
        if self.hold_rates and self.kind not in GRPO_KINDS:
            raise ValueError(
                f"recipe {self.name!r}: hold_rates needs online sampling; fix: use it with "
                f"kind = 'grpo' or 'grpo_multiturn', or remove it (kind is {self.kind!r})"
            )
        if self.reward_model == "none" and self.steerability_weight == 0:
            raise ValueError(
                f"recipe {self.name!r} has no reward at all (reward_model = 'none' and "
                f"steerability_weight = 0); fix: enable one of them"
            )
        return self

    @model_validator(mode="after")
    def _check_multiturn(self) -> RecipeConfig:
        """Fields that only one kind reads are errors elsewhere, not silently ignored."""
        where = f"recipe {self.name!r} (kind {self.kind!r})"
        if self.kind != "grpo_multiturn":
            for name in MULTITURN_FIELDS:
                if name in self.model_fields_set:
                    raise ValueError(
                        f"{where}: {name} = {getattr(self, name)!r} shapes multi-turn "
                        f"conversations; fix: remove it or set kind = 'grpo_multiturn'"
                    )
        if self.rate_estimate is not None and self.kind not in GRPO_KINDS:
            raise ValueError(
                f"{where}: rate_estimate = {self.rate_estimate!r} measures a rate GRPO holds; "
                f"fix: remove it or use kind = 'grpo' or 'grpo_multiturn'"
            )
        if self.kind != "grpo_multiturn":
            return self
        if "prompts" in self.model_fields_set:
            raise ValueError(
                f"{where}: prompts = {self.prompts} is not read, its contexts are the openings "
                f"of its simulated users; fix: set users = {self.prompts} instead"
            )
        if self.rate_estimate == "tokens":
            raise ValueError(
                f"{where}: rate_estimate = 'tokens' reads a held rate from token "
                "probabilities along one reply, which a multi-turn completion (replies and "
                "user turns) is not; fix: rate_estimate = 'count' (or leave it unset)"
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_unread(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The record without the fields its kind does not read (the multi-turn ones, or a
        grpo_multiturn recipe's ``prompts``) and without an unset ``rate_estimate``: a recipe
        written before they existed keeps its record, so the run it is in (scenario and step
        fingerprints) still resumes, and a record validates again as the same recipe."""
        data = handler(self)
        unread = ("prompts",) if self.kind == "grpo_multiturn" else MULTITURN_FIELDS
        unset = ("rate_estimate",) if self.rate_estimate is None else ()
        return {k: v for k, v in data.items() if k not in (*unread, *unset)}

    def weights(self) -> dict[str, float]:
        """Reward name -> weight, for ``training.rewards`` functions."""
        return {
            "reward_model": self.reward_model_weight,
            "steerability": self.steerability_weight,
            "artifact_penalty": self.artifact_penalty_weight,
        }


def _trl_config_class(kind: str) -> type:
    from trl import DPOConfig, GRPOConfig, SFTConfig

    return {
        "rs+sft": SFTConfig,
        "dpo": DPOConfig,
        "grpo": GRPOConfig,
        "grpo_multiturn": GRPOConfig,
    }[kind]


class SteerabilityGateConfig(BaseModel):
    """Steerability benchmark on held-out characters with instructions training never saw."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    characters_dir: Path = Field(
        HELDOUT_CHARACTERS_DIR,
        description="Folder of held-out character TOML files (never in the world's cast).",
    )
    prompts_per_character: int = Field(
        24,
        ge=1,
        description="Held-out human openers (chit-chat held-out split) per character; with the "
        "4 packaged held-out characters, 24 give the 96 paired prompts a 0.20 drop needs.",
    )
    max_following_drop: float = Field(
        0.20,
        gt=0,
        le=1,
        description="Fall in instruction-following rate the benchmark must see: the paired "
        "test needs power >= gates.min_power at this drop, else the gate is inconclusive; any "
        "significant fall fails it.",
    )
    max_violation_increase: float = Field(
        0.20,
        gt=0,
        le=1,
        description="Rise in violation rate the benchmark must see (as max_following_drop).",
    )


class StyleGateConfig(BaseModel):
    """Style-artifact regression suite thresholds (flywheel.style_regression)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Level of the one-sided tests of every offline gate (style shifts, "
        "steerability, reward-model win rate).",
    )
    max_length_ratio: float = Field(
        1.25, gt=1, description="Mean words candidate / deployed beyond which length shifted."
    )
    max_emoji_rate_increase: float = Field(
        0.20,
        gt=0,
        le=1,
        description="Rise in share of replies with emoji the suite must see (power >= "
        "gates.min_power); a significant rise is a shift.",
    )
    max_question_rate_increase: float = Field(
        0.20,
        gt=0,
        le=1,
        description="Rise in share of replies ending in a question (characters not told to "
        "ask) the suite must see; a significant rise is a shift.",
    )
    max_catchphrase_increase: float = Field(
        0.20,
        gt=0,
        le=1,
        description="Rise in share of replies repeating one stock phrase the suite must see; "
        "a significant rise is a shift.",
    )
    max_win_rate_gap: float = Field(
        0.10,
        gt=0,
        le=1,
        description="Raw minus style-controlled RM win rate at which style explains the gain.",
    )


class SafetyGateConfig(BaseModel):
    """Offline safety gate: the serving checker run on the candidate's evaluation replies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_unsafe_rate: float = Field(
        0.02, ge=0, le=1, description="Largest share of evaluation replies the checker may block."
    )
    detect_unsafe_rate: float = Field(
        0.10,
        gt=0,
        le=1,
        description="Unsafe-reply rate the gate must catch with power >= gates.min_power (at "
        "or below max_unsafe_rate: nothing to catch).",
    )


class GatesConfig(BaseModel):
    """Offline gates; a candidate that fails any of them is kept out of the A/B test."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eval_prompts: int = Field(
        48, ge=4, description="Held-out logged contexts both models answer for RM and style checks."
    )
    max_new_tokens: int = Field(48, ge=1, description="Longest evaluation reply, in tokens.")
    min_rm_win_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Least (raw) reward-model win rate vs the deployed model: a win rate "
        "significantly below it fails the gate.",
    )
    rm_win_rate_margin: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Shortfall below min_rm_win_rate the logged contexts must see with power "
        ">= min_power, else the gate is inconclusive.",
    )
    min_power: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Least power each gate's test needs to see the degradation it guards "
        "against (at gates.style.alpha); with less the gate says 'inconclusive' and gates.",
    )
    steerability: SteerabilityGateConfig = Field(
        default_factory=SteerabilityGateConfig, description="Held-out steerability benchmark."
    )
    style: StyleGateConfig = Field(
        default_factory=StyleGateConfig, description="Style-artifact regression suite."
    )
    safety: SafetyGateConfig = Field(
        default_factory=SafetyGateConfig, description="Offline safety gate."
    )
    ifbench: IFBenchGateConfig = Field(
        default_factory=IFBenchGateConfig,
        description="IFBench (public benchmark) prompts our checkers score (flywheel.ifbench).",
    )


class Scenario(BaseModel):
    """A ``flywheel run`` scenario file. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("scenario", min_length=1, description="Label in reports and run stores.")
    description: str = Field("", description="What this scenario rehearses, in words.")
    seed: int = Field(0, ge=0, description="Every random draw of the run derives from it.")
    generations: int = Field(2, ge=1, le=100, description="Candidate generations to run.")
    policy: PolicySpec = Field(
        default_factory=PolicySpec, description="The base model deployed at generation 0."
    )
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="The simulated world (sim.world.WorldConfig)."
    )
    collect: CollectConfig = Field(
        default_factory=CollectConfig, description="Production traffic logged per generation."
    )
    traffic: TrafficConfig = Field(
        default_factory=TrafficConfig,
        description="The A/B test of each candidate: users, pre/test days, treatment share.",
    )
    analysis: AnalysisSettings = Field(
        default_factory=AnalysisSettings,
        description="flywheel.ab.AnalysisConfig settings: alpha, srm_alpha, cuped, correction, "
        "power, retention_day, noninferiority_margins, absolute_margins (treatment_share comes "
        "from [traffic]).",
    )
    serving: ServingConfig = Field(
        default_factory=ServingConfig, description="Safety check on every served reply."
    )
    curation: CurationSettings = Field(
        default_factory=CurationSettings,
        description="training.curation.CurationConfig settings: require_continued, "
        "require_follows_all, min/max_reply_words, max_copies_per_reply, held_out_share.",
    )
    reward_models: RewardModelsConfig = Field(
        default_factory=RewardModelsConfig, description="Reward models trained per generation."
    )
    recipes: list[RecipeConfig] = Field(
        default_factory=lambda: [RecipeConfig(name="grpo", kind="grpo")],
        min_length=1,
        description="Candidate recipes; each generation trains one candidate per recipe.",
    )
    gates: GatesConfig = Field(default_factory=GatesConfig, description="Offline gates.")

    @field_validator("recipes")
    @classmethod
    def _unique_recipes(cls, value: list[RecipeConfig]) -> list[RecipeConfig]:
        names = [r.name for r in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"recipe names repeat: {dupes}; fix: give each recipe its own name")
        return value

    def analysis_config(self) -> AnalysisConfig:
        """The ``flywheel.ab.AnalysisConfig`` of the A/B tests."""
        return self.analysis.build(treatment_share=self.traffic.treatment_share)

    def curation_config(self) -> CurationConfig:
        """The ``training.curation.CurationConfig`` of this scenario."""
        return self.curation.build()

    def collect_traffic(self, generation: int) -> TrafficConfig:
        """Traffic config of generation ``generation``'s production logging: one policy,
        ``collect.days`` days, the population drifted to that generation."""
        return self.traffic.model_copy(
            update={
                "n_users": self.collect.n_users or self.traffic.n_users,
                "pre_days": 0,
                "test_days": self.collect.days,
                "generation": generation,
                "salt": f"{self.traffic.salt}-collect",
            }
        )

    def ab_traffic(self, generation: int) -> TrafficConfig:
        """Traffic config of generation ``generation``'s A/B test (own salt per generation,
        so each test re-randomises who is in treatment)."""
        return self.traffic.model_copy(
            update={"generation": generation, "salt": f"{self.traffic.salt}-gen{generation}"}
        )

    def resolved(self, base_dir: Path) -> Scenario:
        """A copy with relative paths made relative to ``base_dir`` (the file's folder)."""
        steer = self.gates.steerability
        steer_dir = steer.characters_dir
        if not steer_dir.is_absolute():
            steer_dir = base_dir / steer_dir
        recipes = [
            r.model_copy(update={"trainer_file": base_dir / r.trainer_file})
            if r.trainer_file is not None and not r.trainer_file.is_absolute()
            else r
            for r in self.recipes
        ]
        gates = self.gates.model_copy(
            update={"steerability": steer.model_copy(update={"characters_dir": steer_dir})}
        )
        return self.model_copy(
            update={"world": self.world.resolved(base_dir), "gates": gates, "recipes": recipes}
        )


def explain(
    err: ValidationError, model: type[BaseModel] = Scenario, prefix: str = "scenario"
) -> str:
    """One line per problem: ``<prefix>.<path> = <value>: <problem>; fix: <field help>``
    (``prefix`` names where ``model`` sits in the file, e.g. ``scenario.serving``)."""
    lines = []
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        seen = problem.get("input")
        shown = "" if isinstance(seen, dict) else f" = {seen!r}"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = f"unknown key (a typo?); fix: remove it {_known_keys(model, loc[:-1])}"
        help_text = field_help(loc, model)
        fix = f"; fix: {help_text}" if help_text and "fix:" not in message else ""
        lines.append(f"  {'.'.join([prefix, *loc])}{shown}: {message}{fix}")
    return "\n".join(lines)


def field_help(loc: list[str], model: type[BaseModel] = Scenario) -> str:
    """The description of the field at ``loc`` of ``model`` (walking nested models and lists)."""
    current: Any = model
    description = ""
    for part in loc:
        model_fields = getattr(current, "model_fields", None)
        if part.isdigit() or not model_fields:
            continue
        if part not in model_fields:
            return ""
        info = model_fields[part]
        description = info.description or ""
        current = _model_in(info.annotation)
    return description


def _known_keys(model: type[BaseModel], loc: list[str]) -> str:
    """'or use one of <table>'s keys: ...' for the table at ``loc`` of ``model`` (a typo's
    fix is usually in that list), or 'or check the field name' where it is no model."""
    current: Any = model
    for part in loc:
        model_fields = getattr(current, "model_fields", None)
        if part.isdigit() or not model_fields:
            continue
        current = _model_in(model_fields[part].annotation) if part in model_fields else None
    keys = getattr(current, "model_fields", None)
    if not keys:
        return "or check the field name"
    name = getattr(current, "config_class", current).__name__
    return f"or use one of {name}'s keys: {', '.join(keys)}"


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside ``annotation`` (``list[M]``, ``M | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def parse_scenario(
    data: dict[str, Any], source: str = "<scenario>", base_dir: Path | None = None
) -> Scenario:
    """Validate a scenario mapping (a parsed TOML file); paths resolved against ``base_dir``."""
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(f"{source}: invalid scenario\n{explain(err)}") from None
    scenario = scenario.resolved(base_dir) if base_dir is not None else scenario
    check_files(scenario, source)
    return scenario


def check_files(scenario: Scenario, source: str) -> None:
    """Cross-file checks: folders exist, held-out characters are really held out, trainer
    files hold only fields of their recipe's TRL config."""
    from sim.characters import load_characters

    problems = []
    world_dir = scenario.world.characters_dir
    if not world_dir.is_dir():
        problems.append(
            f"  scenario.world.characters_dir = '{world_dir}': no such folder; fix: point it "
            f"at a folder of character TOML files (relative to the scenario file)"
        )
    steer_dir = scenario.gates.steerability.characters_dir
    if not steer_dir.is_dir():
        problems.append(
            f"  scenario.gates.steerability.characters_dir = '{steer_dir}': no such folder; "
            f"fix: point it at the held-out characters (default {HELDOUT_CHARACTERS_DIR})"
        )
    for i, recipe in enumerate(scenario.recipes):
        if recipe.trainer_file is None:
            continue
        if not recipe.trainer_file.is_file():
            problems.append(
                f"  scenario.recipes.{i}.trainer_file = '{recipe.trainer_file}': no such file; "
                f"fix: a YAML of TRL config fields, relative to the scenario file"
            )
            continue
        try:
            trainer_file_fields(recipe)
        except ValueError as err:
            problems.append(f"  scenario.recipes.{i}.trainer_file: {err}")
    if not problems:
        try:
            world = load_characters(world_dir)
            heldout = load_characters(steer_dir)
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"  scenario.world.characters_dir / gates.steerability: {err}")
        else:
            unknown = sorted(set(scenario.world.characters or ()) - set(world))
            if unknown:
                problems.append(
                    f"  scenario.world.characters = {scenario.world.characters}: {unknown} are "
                    f"not in {world_dir}; fix: use names from {sorted(world)}"
                )
            try:
                check_heldout(world, heldout)
            except ValueError as err:
                problems.append(f"  scenario.gates.steerability.characters_dir: {err}")
    if problems:
        raise ScenarioError(f"{source}: invalid scenario\n" + "\n".join(problems))
    for line in gate_sample_warnings(scenario.gates, len(heldout)):
        warnings.warn(f"{source}: {line}", ScenarioWarning, stacklevel=2)
    warn_ab_power(scenario.world, scenario.traffic, scenario.analysis_config(), source)


class ScenarioWarning(UserWarning):
    """A scenario that runs but whose offline gates or A/B test may say 'inconclusive' for
    lack of power."""


def breadth_mde_floor(
    world: WorldConfig, traffic: TrafficConfig, alpha: float, power: float
) -> float:
    """The smallest relative breadth lift a standard test of ``traffic`` could detect, at best.

    A user's breadth is their share of active test days. Each day is a coin flip with the
    user's return probability p, so even a CUPED adjustment that removed every difference
    between users would leave the day-to-day noise ``E[p (1 - p)] / days`` per user. With p
    taken from the world's configured ``return_propensity`` (mean and sd per segment, times
    the mean weekday factor; latent memory moves it during a run, so this is an estimate of
    the floor, not a bound): ``MDE >= (z_{1-alpha/2} + z_power) sqrt(E[p(1-p)] / days *
    (1/n_t + 1/n_c)) / E[p]``. ``flywheel plan`` measures the real figure from a pilot.
    """
    from scipy import stats

    segments = world.population.segments
    total = sum(s.share for s in segments)
    factor = sum(traffic.weekday_factors) / len(traffic.weekday_factors)
    mean_p = sum(s.share * s.return_propensity.mean for s in segments) / total * factor
    within = sum(
        s.share * (s.return_propensity.mean * (1 - s.return_propensity.mean)
                   - s.return_propensity.sd**2)
        for s in segments
    ) / total  # fmt: skip
    n_t = traffic.n_users * traffic.treatment_share
    n_c = traffic.n_users - n_t
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return z * math.sqrt(max(within, 0.0) / traffic.test_days * (1 / n_t + 1 / n_c)) / mean_p


def warn_ab_power(
    world: WorldConfig, traffic: TrafficConfig, analysis: AnalysisConfig, source: str
) -> None:
    """Warn when a standard test cannot reach ``analysis.target_mde`` on breadth."""
    if analysis.target_mde is None or traffic.design != "standard":
        return  # twins: the floor above does not apply, their noise cancels within a user
    floor = breadth_mde_floor(world, traffic, analysis.alpha, analysis.power)
    if floor > analysis.target_mde:
        warnings.warn(
            f"{source}: analysis.target_mde = {analysis.target_mde:g}, but a standard test of "
            f"{traffic.n_users} users x {traffic.test_days} test days cannot detect a breadth "
            f"lift below about {floor:.3f} at power {analysis.power:g} (day-to-day noise "
            "alone, flywheel/scenario.py breadth_mde_floor); raise traffic.n_users or "
            "traffic.test_days, set traffic.design = 'twins', or size it with `flywheel plan`",
            ScenarioWarning,
            stacklevel=3,
        )


def gate_sample_warnings(gates: GatesConfig, heldout_characters: int) -> list[str]:
    """One line per gate whose planned sample lacks ``gates.min_power`` at its margin,
    naming the sample it has, the one it needs and the setting to raise.

    Planned before any model runs, so paired tests assume the worst discordance independent
    replies can have (``flywheel.gate_power.worst_case_discordance``): a benchmark sized here
    has the power whatever the deployed model's rates. The reward-model and style checks
    assume every one of ``eval_prompts`` held-out contexts exists and is decisive.
    """
    from flywheel.gate_power import (
        allowance_power,
        binomial_less_power,
        mcnemar_power,
        mcnemar_sample_size,
        sample_size,
        worst_case_discordance,
    )

    alpha, target, lines = gates.style.alpha, gates.min_power, []
    steer = gates.steerability
    n_steer = steer.prompts_per_character * heldout_characters
    for what, effect in (
        ("max_following_drop", steer.max_following_drop),
        ("max_violation_increase", steer.max_violation_increase),
    ):
        psi = worst_case_discordance(effect)
        power = mcnemar_power(n_steer, effect, psi, alpha)
        if power < target:
            needed = mcnemar_sample_size(effect, psi, alpha, target)
            per = -(-needed // max(heldout_characters, 1))
            lines.append(
                f"gates.steerability: {n_steer} paired prompts ({steer.prompts_per_character} "
                f"x {heldout_characters} held-out characters) detect a {what} of {effect:.2f} "
                f"with power {power:.2f} at alpha {alpha:g}; needs n >= {needed}: raise "
                f"gates.steerability.prompts_per_character to {per}, or the gate will say "
                f"'inconclusive'"
            )
    n_log = gates.eval_prompts
    harmful = gates.min_rm_win_rate - gates.rm_win_rate_margin
    if harmful >= 0:
        rm_power = binomial_less_power(n_log, gates.min_rm_win_rate, harmful, alpha)
        if rm_power < target:
            needed = sample_size(
                lambda n: binomial_less_power(n, gates.min_rm_win_rate, harmful, alpha), target
            )
            lines.append(
                f"gates.eval_prompts = {n_log} detects a reward-model win rate of {harmful:.2f} "
                f"with power {rm_power:.2f}; needs n >= {needed}: raise gates.eval_prompts"
            )
    style = gates.style
    for what, effect in (
        ("max_emoji_rate_increase", style.max_emoji_rate_increase),
        ("max_question_rate_increase", style.max_question_rate_increase),
        ("max_catchphrase_increase", style.max_catchphrase_increase),
    ):
        psi = worst_case_discordance(effect)
        power = mcnemar_power(n_log, effect, psi, alpha)
        if power < target:
            lines.append(
                f"gates.eval_prompts = {n_log} detects a gates.style.{what} of {effect:.2f} with "
                f"power {power:.2f} at worst; needs n >= "
                f"{mcnemar_sample_size(effect, psi, alpha, target)}: raise gates.eval_prompts, "
                f"or the style gate may say 'inconclusive'"
            )
    safety = gates.safety
    if safety.detect_unsafe_rate > safety.max_unsafe_rate:
        n_all = n_log + n_steer
        power = allowance_power(n_all, safety.max_unsafe_rate, safety.detect_unsafe_rate)
        if power < target:
            needed = sample_size(
                lambda n: allowance_power(n, safety.max_unsafe_rate, safety.detect_unsafe_rate),
                target,
            )
            lines.append(
                f"gates.safety: {n_all} evaluation replies catch an unsafe rate of "
                f"{safety.detect_unsafe_rate:.2f} with power {power:.2f}; needs n >= {needed}: "
                f"raise gates.eval_prompts"
            )
    return lines


def trainer_file_fields(recipe: RecipeConfig) -> dict[str, Any]:
    """The TRL config fields in a recipe's ``trainer_file`` (unknown names are errors)."""
    import yaml

    if recipe.trainer_file is None:
        return {}
    data = yaml.safe_load(recipe.trainer_file.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{recipe.trainer_file} holds a {type(data).__name__}; fix: a mapping of TRL "
            f"config fields"
        )
    config_cls = _trl_config_class(recipe.kind)
    unknown = sorted(set(data) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ValueError(
            f"{recipe.trainer_file}: {unknown} are not {config_cls.__name__} fields; fix: use "
            f"trl.{config_cls.__name__} field names"
        )
    return data


def instruction_keys(character: Character) -> set[tuple[str, str]]:
    """(kind, parameters) of each of a character's instructions, e.g. ('max_words', '40')."""
    keys = set()
    for checker in character.checkers:
        params = {f.name: getattr(checker, f.name) for f in fields(checker)}
        keys.add((checker.__name__, repr(sorted(params.items()))))
    return keys


def check_heldout(world: Mapping[str, Character], heldout: Mapping[str, Character]) -> None:
    """Held-out characters must be new names whose parameterised instructions (a word limit,
    a catchphrase, a first word, forbidden words...) no world character has. Flag rules such
    as no_emoji have no parameter and may repeat; what is new is the combination."""
    same_names = sorted(set(world) & set(heldout))
    if same_names:
        raise ValueError(
            f"held-out characters {same_names} are also in the world's cast; fix: rename them "
            f"or remove them from one folder"
        )
    seen = set().union(*(instruction_keys(c) for c in world.values()))
    for name, character in heldout.items():
        reused = sorted(k for k in instruction_keys(character) if k in seen and k[1] != "[]")
        if reused:
            kinds = ", ".join(f"{kind}{params}" for kind, params in reused)
            raise ValueError(
                f"held-out character {name!r} reuses instruction(s) the world's characters "
                f"train on: {kinds}; fix: change their parameters so training never saw them"
            )
    seen_sets = {frozenset(instruction_keys(c)) for c in world.values()}
    for name, character in heldout.items():
        if frozenset(instruction_keys(character)) in seen_sets:
            raise ValueError(
                f"held-out character {name!r} has exactly the instruction set of a world "
                f"character; fix: give it a new combination"
            )


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario TOML file (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ScenarioError: bad TOML or a bad field, with one line per problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"scenario file {path} does not exist; fix: pass a .toml file such as "
            f"scenarios/quickstart.toml"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML ({err}); fix the syntax there") from err
    return parse_scenario(data, source=str(path), base_dir=path.resolve().parent)
