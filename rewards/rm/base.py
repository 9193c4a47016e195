"""What every reward model offers, whatever its backbone.

Kinds (:data:`KINDS`):

- ``pointwise``: a Bradley-Terry / logistic model of engagement, ``P(engaged | context,
  reply) = sigmoid(logit)``; the score is the logit (an absolute score, comparable across
  contexts). ``target`` picks another logged signal to model instead of ``engaged``
  (:data:`POINTWISE_TARGETS`), e.g. ``liked``: the immediate reaction a naive product
  team optimises first.
- ``pairwise``: a Bradley-Terry model of annotator preferences, ``P(a preferred to b) =
  sigmoid(score(a) - score(b))``; the score is defined up to a constant per context.
- ``signals``: auxiliary user-signal models ``P(continue)``, ``P(like)``, ``P(return next
  day)``; the score is the weighted sum of the three probabilities
  (:data:`SIGNAL_WEIGHTS`), i.e. the expected number of engagement events a reply earns.

A style-controlled model (``rewards.style_control``) scores without its style term;
``logits(..., with_style=True)`` gives the training-time logit including it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from rewards.datasets import ENGAGEMENT_TARGET, SIGNAL_TARGETS

KINDS: tuple[str, ...] = ("pointwise", "pairwise", "signals")
BACKBONES: tuple[str, ...] = ("minilm", "llm")
PREFERENCE_TARGET = "preference"
TARGETS: dict[str, tuple[str, ...]] = {
    "pointwise": (ENGAGEMENT_TARGET,),
    "pairwise": (PREFERENCE_TARGET,),
    "signals": SIGNAL_TARGETS,
}
POINTWISE_TARGETS: tuple[str, ...] = (ENGAGEMENT_TARGET, *SIGNAL_TARGETS)
# Expected engagement events per reply: each signal counts once. Change the weights here,
# not at call sites, so every consumer of a signals model optimises the same thing.
SIGNAL_WEIGHTS: dict[str, float] = {"continued": 1.0, "liked": 1.0, "returned_next_day": 1.0}
META_FILE = "reward_model.json"


def check_kind(kind: str) -> None:
    """Fail fast on an unknown kind, naming the choices."""
    if kind not in KINDS:
        raise ValueError(f"reward model kind must be one of {KINDS}, got {kind!r}")


def resolve_targets(kind: str, target: str | None = None) -> tuple[str, ...]:
    """The targets a model of ``kind`` predicts; ``target`` overrides a pointwise one."""
    check_kind(kind)
    if target is None or (kind == "pointwise" and target == ENGAGEMENT_TARGET):
        return TARGETS[kind]
    if kind != "pointwise":
        raise ValueError(
            f"target applies to pointwise models only, got target={target!r} with kind={kind!r}"
        )
    if target not in POINTWISE_TARGETS:
        raise ValueError(f"pointwise target must be one of {POINTWISE_TARGETS}, got {target!r}")
    return (target,)


def check_backbone(backbone: str) -> None:
    """Fail fast on an unknown backbone, naming the choices."""
    if backbone not in BACKBONES:
        raise ValueError(f"reward model backbone must be one of {BACKBONES}, got {backbone!r}")


def check_texts(contexts: Sequence[str], replies: Sequence[str]) -> None:
    """Contexts and replies come in matching pairs."""
    if len(contexts) != len(replies):
        raise ValueError(
            f"contexts and replies must have the same length, got {len(contexts)} and "
            f"{len(replies)}; pass one context per reply"
        )


class RewardModel(ABC):
    """A trained reward model. Subclasses implement :meth:`logits` and persistence."""

    kind: str
    backbone: str
    style_controlled: bool
    targets: tuple[str, ...]  # the outputs the model predicts, one logit each

    @property
    def name(self) -> str:
        """Short stable name, e.g. ``pairwise-minilm-sc`` or ``pointwise-liked-minilm``."""
        suffix = "-sc" if self.style_controlled else ""
        target = "" if self.targets == TARGETS[self.kind] else f"-{self.targets[0]}"
        return f"{self.kind}{target}-{self.backbone}{suffix}"

    @abstractmethod
    def logits(
        self, contexts: Sequence[str], replies: Sequence[str], *, with_style: bool = False
    ) -> np.ndarray:
        """Per-target logits, shape ``(n, len(targets))``.

        ``with_style`` adds the style term of a style-controlled model (what it fitted
        during training); a naive model has no separate term and ignores the flag.
        """

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the model into folder ``path`` (created); return the folder."""

    def score(
        self, contexts: Sequence[str], replies: Sequence[str], *, with_style: bool = False
    ) -> np.ndarray:
        """The reward of each reply, shape ``(n,)`` (see the module docstring per kind)."""
        z = self.logits(contexts, replies, with_style=with_style)
        if self.kind != "signals":
            return z[:, 0]
        weights = np.asarray([SIGNAL_WEIGHTS[t] for t in self.targets])
        return expit(z) @ weights

    def predict_proba(
        self, contexts: Sequence[str], replies: Sequence[str], *, with_style: bool = False
    ) -> dict[str, np.ndarray]:
        """Calibrated probabilities per target (pointwise and signals models only)."""
        if self.kind == "pairwise":
            raise ValueError(
                "a pairwise model has no absolute probability; use score() differences, "
                "sigmoid(score(a) - score(b)), or train --kind pointwise"
            )
        z = self.logits(contexts, replies, with_style=with_style)
        return {t: expit(z[:, j]) for j, t in enumerate(self.targets)}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        """TRL reward-function form: one float per completion.

        ``prompts`` may be strings (the user's message) or chats (the last user message is
        the context); ``completions`` strings or chats (the first message's content).
        """
        contexts = [_last_user_text(p) for p in prompts]
        replies = [_completion_text(c) for c in completions]
        return [float(s) for s in self.score(contexts, replies)]


def _last_user_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError(f"prompt chat has no user message: {prompt!r}")
    return str(users[-1])


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return str(completion[0]["content"])


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write the model folder's metadata file (kind, backbone, settings)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read a model folder's metadata, with a clear error when it is not a model folder."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved reward model (no {META_FILE}); train one with "
            "`flywheel rm train RUN_DIR`"
        )
    return json.loads(file.read_text())


def load_reward_model(path: str | Path) -> RewardModel:
    """Load any saved reward model, dispatching on its backbone."""
    meta = read_meta(path)
    backbone = meta.get("backbone")
    check_backbone(str(backbone))
    if backbone == "minilm":
        from rewards.rm.minilm import MiniLMRewardModel

        return MiniLMRewardModel.load(path)
    from rewards.rm.llm import LLMRewardModel

    return LLMRewardModel.load(path)
