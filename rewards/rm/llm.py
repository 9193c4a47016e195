"""Reward models on an LLM sequence classifier trained with TRL's ``RewardTrainer``.

Default backbone: the packaged SmolLM2-135M-Instruct (``policies.models.smollm2_checkpoint``)
with a one-logit classification head, fine-tuned with LoRA (peft) so a CPU run stays in
minutes. Inputs are the chat ``[user: context, assistant: reply]`` rendered by the model's
chat template, exactly as ``RewardTrainer`` tokenises its conversational datasets.

``RewardTrainer`` fits Bradley-Terry on (chosen, rejected) pairs, so each kind is posed as
pairs:

- ``pairwise``: the annotators' pairs, one shared prompt.
- ``pointwise`` and ``signals``: case-control pairs (``rewards.datasets.case_control_pairs``):
  a positive and a negative reply of the same user. Conditional logistic regression says
  the BT model on those pairs estimates the pointwise logit up to a per-user constant; one
  intercept per target is then fitted with statsmodels (a binomial GLM whose offset is the
  model's score) so that ``predict_proba`` is calibrated. ``signals`` trains one LoRA
  adapter per signal.

Style control: :class:`StyleControlledRewardTrainer` adds the separate style term
``beta . style`` to both sides of the BT logit and ODIN's decorrelation penalty on the
model's own score; ``beta`` is kept in the model folder for reports, the adapter scores
without it. The model reads replies through ``strip_style`` (no emoji, no "!"), in
training and scoring alike, so those two cannot raise its score.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rewards.datasets import as_lists, case_control_pairs, require_columns
from rewards.rm.base import (
    TARGETS,
    RewardModel,
    check_kind,
    check_texts,
    read_meta,
    resolve_targets,
    write_meta,
)
from rewards.style_control import (
    COVARIATES,
    StyleScaler,
    StyleTerm,
    decorrelation_penalty,
    strip_style,
    style_counts,
)

DEFAULT_MODEL = "smollm2"  # resolved to the packaged SmolLM2 checkpoint at load time
BETA_FILE = "style_term.json"


@dataclass
class LLMConfig:
    """Training settings of an LLM-backbone reward model (passed on to ``RewardConfig``)."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "HF model folder or id; 'smollm2' = the packaged SmolLM2-135M."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimiser steps (-1 = use epochs)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimiser step."})
    lr: float = field(default=5e-4, metadata={"help": "Learning rate (LoRA wants a high one)."})
    max_length: int = field(
        default=256, metadata={"help": "Longest tokenised chat kept for training (tokens)."}
    )
    max_pairs: int | None = field(
        default=None, metadata={"help": "Cap on training pairs per target (None = all)."}
    )
    decorrelation: float = field(
        default=1.0,
        metadata={"help": "Weight of ODIN's style-decorrelation penalty (style-controlled only)."},
    )
    style_lr: float = field(
        default=2e-2, metadata={"help": "Learning rate of the style term's coefficients."}
    )
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 autocast."})
    score_batch_size: int = field(default=32, metadata={"help": "Chats per scoring forward."})
    calibration_rows: int = field(
        default=512, metadata={"help": "Most training rows used to fit each intercept."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds the head, LoRA init and data order."})

    def __post_init__(self) -> None:
        if self.lora_r < 0 or self.lora_alpha < 1:
            raise ValueError(
                f"LLMConfig needs lora_r >= 0 and lora_alpha >= 1, got lora_r={self.lora_r}, "
                f"lora_alpha={self.lora_alpha}"
            )
        for name in ("batch_size", "max_length", "score_batch_size", "calibration_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"LLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError(
                f"LLMConfig needs epochs > 0 or max_steps > 0, got epochs={self.epochs}, "
                f"max_steps={self.max_steps}"
            )
        if self.lr <= 0 or self.style_lr <= 0 or self.decorrelation < 0:
            raise ValueError(
                f"LLMConfig needs lr > 0, style_lr > 0, decorrelation >= 0; got lr={self.lr}, "
                f"style_lr={self.style_lr}, decorrelation={self.decorrelation}"
            )

    def model_path(self) -> str:
        """The backbone folder, preparing the packaged SmolLM2 checkpoint if it is the default."""
        if self.model == DEFAULT_MODEL:
            from policies.models import smollm2_checkpoint

            return str(smollm2_checkpoint())
        return self.model


def _chat(context: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": context}, {"role": "assistant", "content": reply}]


def _load_classifier(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification

    # The causal-LM checkpoint has no classification head: transformers initialises a
    # fresh one (from torch's global generator, seeded by the caller) and warns about it.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)


def _style_trainer_class() -> type:
    """Build the trainer subclass lazily so importing this module stays cheap."""
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class StyleCollator(DataCollatorForPreference):
        """TRL's preference collator plus the style covariates, chosen rows then rejected."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out = super().torch_call(examples)
            rows = [e["chosen_style"] for e in examples] + [e["rejected_style"] for e in examples]
            out["style"] = torch.tensor(rows, dtype=torch.float32)
            return out

    class StyleControlledRewardTrainer(RewardTrainer):
        """RewardTrainer whose BT logit carries a separate, jointly fitted style term.

        ``P(chosen > rejected) = sigmoid(r(chosen) + b.s(chosen) - r(rejected) - b.s(rejected))``
        plus ``decorrelation * sum_k corr(r, s_k)^2`` over the batch (ODIN). Only ``r``
        (the model's logit) is the reward afterwards.
        """

        def __init__(
            self, *args: Any, decorrelation: float, style_lr: float, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self.style_term = StyleTerm(1).to(self.args.device)
            self.decorrelation = decorrelation
            self.style_lr = style_lr

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "chosen_style", "rejected_style"]

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            optimizer = super().create_optimizer(model)
            # Added before the scheduler is built, so the scheduler decays it too.
            optimizer.add_param_group(
                {
                    "params": list(self.style_term.parameters()),
                    "lr": self.style_lr,
                    "weight_decay": 0.0,
                }
            )
            return optimizer

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, torch.Tensor],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | None = None,
        ) -> Any:
            mode = "train" if self.model.training else "eval"
            style = inputs["style"]
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
            )
            content = outputs.logits.squeeze(-1)
            total = content + self.style_term(style.to(content.dtype)).squeeze(-1)
            total_chosen, total_rejected = torch.chunk(total, chunks=2)
            loss = -nn.functional.logsigmoid(total_chosen - total_rejected).mean()
            penalty = decorrelation_penalty(content, style.to(content.dtype))
            if self.decorrelation:
                loss = loss + self.decorrelation * penalty
            with torch.no_grad():
                content_chosen, content_rejected = torch.chunk(content, chunks=2)
                metrics = self._metrics[mode]
                metrics["accuracy"].append(
                    (content_chosen > content_rejected).float().mean().item()
                )
                metrics["accuracy_with_style"].append(
                    (total_chosen > total_rejected).float().mean().item()
                )
                metrics["style_decorrelation_penalty"].append(penalty.item())
            return (loss, outputs) if return_outputs else loss

    return StyleControlledRewardTrainer, StyleCollator


class LLMRewardModel(RewardModel):
    """A trained LLM-backbone reward model (build it with :func:`train_llm`)."""

    backbone = "llm"

    def __init__(
        self,
        kind: str,
        style_controlled: bool,
        config: LLMConfig,
        scaler: StyleScaler,
        models: dict[str, Any],
        tokenizer: Any,
        intercepts: dict[str, float],
        style_coefficients: dict[str, dict[str, list[float]]],
        history: dict[str, Any] | None = None,
    ) -> None:
        check_kind(kind)
        self.kind = kind
        self.style_controlled = style_controlled
        self.config = config
        self.scaler = scaler
        self.models = {t: m.eval() for t, m in models.items()}
        self.targets = tuple(self.models)
        self.tokenizer = tokenizer
        self.intercepts = intercepts
        self._style_coefficients = style_coefficients
        self.history = history or {}

    def _raw(self, target: str, contexts: list[str], replies: list[str]) -> np.ndarray:
        model = self.models[target]
        if self.style_controlled:
            replies = [strip_style(r) for r in replies]
        device = next(model.parameters()).device
        ids = [
            self.tokenizer.apply_chat_template(_chat(c, r), tokenize=True, return_dict=True)[
                "input_ids"
            ][-self.config.max_length :]
            for c, r in zip(contexts, replies, strict=True)
        ]
        order = np.argsort([len(x) for x in ids])  # similar lengths share a batch: less padding
        out = np.empty(len(ids), dtype=np.float64)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(ids), self.config.score_batch_size):
            idx = order[start : start + self.config.score_batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.no_grad():
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).logits
            out[idx] = logits[:, 0].float().cpu().numpy()
        return out

    def logits(
        self, contexts: Sequence[str], replies: Sequence[str], *, with_style: bool = False
    ) -> np.ndarray:
        """Per-target logits (model score + fitted intercept); ``with_style`` adds beta . s."""
        contexts, replies = as_lists(contexts), as_lists(replies)
        check_texts(contexts, replies)
        columns = []
        covariates = self.scaler.covariates(replies) if with_style else None
        for target in self.targets:
            z = self._raw(target, contexts, replies) + self.intercepts.get(target, 0.0)
            if covariates is not None and self.style_controlled:
                coefficients = self._style_coefficients[target]
                beta = np.asarray([coefficients[name][0] for name in COVARIATES])
                z = z + covariates @ beta
            columns.append(z)
        return np.stack(columns, axis=1)

    def style_coefficients(self) -> dict[str, dict[str, list[float]]]:
        """Fitted style-term beta per target and covariate (empty for a naive model)."""
        return self._style_coefficients

    def save(self, path: str | Path) -> Path:
        """Write the metadata, each target's adapter (or full model) and the tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for target, model in self.models.items():
            model.save_pretrained(path / target)
        self.tokenizer.save_pretrained(path / "tokenizer")
        write_meta(
            path,
            {
                "backbone": self.backbone,
                "kind": self.kind,
                "targets": list(self.targets),
                "style_controlled": self.style_controlled,
                "config": asdict(self.config),
                "scaler": self.scaler.to_dict(),
                "intercepts": self.intercepts,
                "style_coefficients": self._style_coefficients,
                "history": self.history,
            },
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> LLMRewardModel:
        """Read a folder written by :meth:`save` (the base model must still be on disk)."""
        from transformers import AutoTokenizer

        path = Path(path)
        meta = read_meta(path)
        config = LLMConfig(**meta["config"])
        models = {}
        for target in meta.get("targets") or TARGETS[meta["kind"]]:
            if config.lora_r:
                from peft import PeftModel

                models[target] = PeftModel.from_pretrained(
                    _load_classifier(config.model_path()), path / target
                )
            else:
                models[target] = _load_classifier(str(path / target))
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        return cls(
            meta["kind"],
            meta["style_controlled"],
            config,
            StyleScaler.from_dict(meta["scaler"]),
            models,
            tokenizer,
            meta["intercepts"],
            meta["style_coefficients"],
            meta.get("history"),
        )


def _pairs_dataset(
    pairs: pd.DataFrame, scaler: StyleScaler, shared_prompt: bool, style_controlled: bool
) -> Any:
    from datasets import Dataset

    chosen, rejected = as_lists(pairs["chosen"]), as_lists(pairs["rejected"])
    columns: dict[str, list[Any]] = {
        "chosen_style": scaler.covariates(chosen).tolist(),
        "rejected_style": scaler.covariates(rejected).tolist(),
    }
    if style_controlled:  # the model reads stripped text; the style term reads the original
        chosen, rejected = [strip_style(r) for r in chosen], [strip_style(r) for r in rejected]
    if shared_prompt:
        columns["prompt"] = [[{"role": "user", "content": c}] for c in as_lists(pairs["context"])]
        columns["chosen"] = [[{"role": "assistant", "content": r}] for r in chosen]
        columns["rejected"] = [[{"role": "assistant", "content": r}] for r in rejected]
    else:
        columns["chosen"] = [
            _chat(c, r) for c, r in zip(as_lists(pairs["chosen_context"]), chosen, strict=True)
        ]
        columns["rejected"] = [
            _chat(c, r) for c, r in zip(as_lists(pairs["rejected_context"]), rejected, strict=True)
        ]
    return Dataset.from_dict(columns)


def _fit_intercept(scores: np.ndarray, labels: np.ndarray) -> float:
    """Intercept of a binomial GLM with the model's score as a fixed offset."""
    import statsmodels.api as sm

    result = sm.GLM(
        labels.astype(float),
        np.ones((len(labels), 1)),
        family=sm.families.Binomial(),
        offset=scores,
    ).fit()
    return float(result.params[0])


@dataclass(frozen=True)
class _TrainingSetup:
    """What the training of every target shares: settings, tokenizer, scaler, trainer classes."""

    config: LLMConfig
    model_path: str  # the backbone folder (``LLMConfig.model_path``)
    tokenizer: Any
    scaler: StyleScaler  # fitted on every training reply, so all targets share one
    style_controlled: bool
    verbose: bool
    style_trainer: type  # ``StyleControlledRewardTrainer`` (``_style_trainer_class``)
    style_collator: type


@dataclass(frozen=True)
class _FittedTarget:
    """One target's trained classifier and what its training recorded."""

    model: Any  # in eval mode
    history: dict[str, Any]
    style_coefficients: dict[str, list[float]] | None  # style-controlled only


def _training_setup(
    kind: str,
    train: pd.DataFrame,
    targets: Sequence[str],
    *,
    config: LLMConfig,
    style_controlled: bool,
    verbose: bool,
) -> _TrainingSetup:
    """Load the tokenizer, check ``train``'s columns and fit the style scaler on its replies."""
    from transformers import AutoTokenizer

    model_path = config.model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "pairwise":
        require_columns(train, ("context", "chosen", "rejected"), "pairwise")
        replies = as_lists(train["chosen"]) + as_lists(train["rejected"])
    else:
        require_columns(train, ("context", "reply", *targets), kind)
        replies = as_lists(train["reply"])
    scaler = StyleScaler.fit(style_counts(replies))
    trainer_cls, collator_cls = _style_trainer_class()
    return _TrainingSetup(
        config=config,
        model_path=model_path,
        tokenizer=tokenizer,
        scaler=scaler,
        style_controlled=style_controlled,
        verbose=verbose,
        style_trainer=trainer_cls,
        style_collator=collator_cls,
    )


def _target_pairs(
    kind: str,
    train: pd.DataFrame,
    target: str,
    *,
    rng: np.random.Generator,
    max_pairs: int | None,
) -> pd.DataFrame:
    """The (chosen, rejected) pairs one target trains on, at most ``max_pairs`` (seeded)."""
    if kind != "pairwise":
        return case_control_pairs(train, target, rng, max_pairs=max_pairs)
    if max_pairs is not None and len(train) > max_pairs:
        return train.iloc[np.sort(rng.choice(len(train), max_pairs, replace=False))]
    return train


def _reward_config(config: LLMConfig, *, output_dir: str, n_pairs: int, verbose: bool) -> Any:
    """TRL's ``RewardConfig`` for one target's training run."""
    from trl import RewardConfig

    return RewardConfig(
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        max_length=config.max_length,
        bf16=config.bf16,
        use_cpu=not torch.cuda.is_available(),  # transformers refuses CPU bf16 without it
        activation_checkpointing=False,  # a 135M model fits; recomputation only costs time
        dataloader_pin_memory=torch.cuda.is_available(),
        logging_steps=max(1, n_pairs // config.batch_size // 10),
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        disable_tqdm=not verbose,
        remove_unused_columns=True,
    )


def _lora_config(config: LLMConfig) -> Any:
    """peft's LoRA settings, or None for full fine-tuning (``lora_r`` 0)."""
    if not config.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules="all-linear",
    )


def _train_target(
    setup: _TrainingSetup, pairs: pd.DataFrame, *, shared_prompt: bool, target: str
) -> _FittedTarget:
    """Fit one fresh classifier on ``pairs`` with ``RewardTrainer`` (or its style-controlled
    subclass); the trainer's scratch folder is removed afterwards."""
    from trl import RewardTrainer

    config = setup.config
    dataset = _pairs_dataset(
        pairs, setup.scaler, shared_prompt=shared_prompt, style_controlled=setup.style_controlled
    )
    output_dir = tempfile.mkdtemp(prefix=f"rm-{target}-")
    args = _reward_config(config, output_dir=output_dir, n_pairs=len(pairs), verbose=setup.verbose)
    peft_config = _lora_config(config)
    # The fresh classification head is drawn from torch's global generator before the
    # trainer seeds anything: seed it here, or the first target of a process is unseeded.
    torch.manual_seed(config.seed)
    common = dict(
        model=_load_classifier(setup.model_path),
        args=args,
        train_dataset=dataset,
        processing_class=setup.tokenizer,
        peft_config=peft_config,
    )
    if setup.style_controlled:
        trainer = setup.style_trainer(
            **common,
            data_collator=setup.style_collator(pad_token_id=setup.tokenizer.pad_token_id),
            decorrelation=config.decorrelation,
            style_lr=config.style_lr,
        )
    else:
        trainer = RewardTrainer(**common)
    started = time.perf_counter()
    result = trainer.train()
    history = {
        "train_seconds": time.perf_counter() - started,
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "pairs": len(dataset),
        "log": [e for e in trainer.state.log_history if "loss" in e],
    }
    fitted = _FittedTarget(
        model=trainer.model.eval(),
        history=history,
        style_coefficients=trainer.style_term.coefficients() if setup.style_controlled else None,
    )
    shutil.rmtree(output_dir, ignore_errors=True)
    return fitted


def _fit_intercepts(
    model: LLMRewardModel,
    train: pd.DataFrame,
    targets: Sequence[str],
    *,
    rng: np.random.Generator,
    max_rows: int,
) -> dict[str, float]:
    """Each target's intercept (:func:`_fit_intercept`) on at most ``max_rows`` labelled
    training rows (a seeded sample)."""
    intercepts = {}
    for target in targets:
        rows = train[train[target].notna()]
        if len(rows) > max_rows:
            rows = rows.iloc[np.sort(rng.choice(len(rows), max_rows, replace=False))]
        scores = model._raw(target, as_lists(rows["context"]), as_lists(rows["reply"]))
        intercepts[target] = _fit_intercept(scores, rows[target].astype(bool).to_numpy())
    return intercepts


def train_llm(
    kind: str,
    train: pd.DataFrame,
    *,
    style_controlled: bool = False,
    config: LLMConfig | None = None,
    target: str | None = None,
    verbose: bool = False,
) -> LLMRewardModel:
    """Fit an LLM-backbone reward model with TRL's ``RewardTrainer`` (+ LoRA).

    ``train`` is the pairwise table for ``pairwise`` and the pointwise table for
    ``pointwise`` / ``signals`` (``rewards.datasets``); ``target`` picks the signal a
    pointwise model fits (default ``engaged``). One generator seeded by ``config.seed``
    draws each target's training pairs, then the rows each intercept is fitted on.
    """
    targets = resolve_targets(kind, target)
    config = config or LLMConfig()
    setup = _training_setup(
        kind, train, targets, config=config, style_controlled=style_controlled, verbose=verbose
    )
    rng = np.random.default_rng(config.seed)
    fitted: dict[str, _FittedTarget] = {}
    for name in targets:
        pairs = _target_pairs(kind, train, name, rng=rng, max_pairs=config.max_pairs)
        fitted[name] = _train_target(setup, pairs, shared_prompt=kind == "pairwise", target=name)
    model = LLMRewardModel(
        kind=kind,
        style_controlled=style_controlled,
        config=config,
        scaler=setup.scaler,
        models={t: f.model for t, f in fitted.items()},
        tokenizer=setup.tokenizer,
        intercepts={},
        style_coefficients={
            t: f.style_coefficients for t, f in fitted.items() if f.style_coefficients is not None
        },
        history={t: f.history for t, f in fitted.items()},
    )
    if kind != "pairwise":
        model.intercepts = _fit_intercepts(
            model, train, targets, rng=rng, max_rows=config.calibration_rows
        )
    return model
