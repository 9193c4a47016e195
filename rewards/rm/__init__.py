"""Reward models: pointwise, pairwise and user-signal models on two backbones.

- ``rewards.rm.base``: the ``RewardModel`` interface, kinds, ``load_reward_model``.
- ``rewards.rm.minilm``: frozen MiniLM embeddings + small torch heads (fast default).
- ``rewards.rm.llm``: an LLM sequence classifier trained with TRL's ``RewardTrainer``.

Both backbones accept ``style_controlled=True`` (``rewards.style_control``). The LLM module
imports TRL only when a model is trained or loaded.
"""

from rewards.rm.base import (
    BACKBONES,
    KINDS,
    POINTWISE_TARGETS,
    SIGNAL_WEIGHTS,
    TARGETS,
    RewardModel,
    check_backbone,
    check_kind,
    load_reward_model,
    resolve_targets,
)
from rewards.rm.llm import LLMConfig, LLMRewardModel, train_llm
from rewards.rm.minilm import MiniLMConfig, MiniLMRewardModel, train_minilm

__all__ = [
    "BACKBONES",
    "KINDS",
    "POINTWISE_TARGETS",
    "SIGNAL_WEIGHTS",
    "TARGETS",
    "LLMConfig",
    "LLMRewardModel",
    "MiniLMConfig",
    "MiniLMRewardModel",
    "RewardModel",
    "check_backbone",
    "check_kind",
    "load_reward_model",
    "resolve_targets",
    "train_llm",
    "train_minilm",
]
