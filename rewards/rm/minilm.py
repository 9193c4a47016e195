"""Reward models on frozen MiniLM embeddings with small torch heads (the fast default).

Input of the head for a (context, reply) pair: the MiniLM embeddings of both and their
element-wise product ``[e_c, e_r, e_c * e_r]`` (1,152 numbers), standardised with training
statistics. MiniLM's WordPiece vocabulary maps every emoji to ``[UNK]`` and ignores
punctuation counts, so a naive head would be half-blind to exactly the style tricks we
worry about; a naive model therefore also receives the reply's style covariates as inputs,
as an LLM reward model that reads the raw text would. A style-controlled model receives
them only through its separate style term (``rewards.style_control``), dropped at scoring,
and embeds the reply through ``strip_style`` (no emoji, no "!").

Training: AdamW on minibatches, early stopping on a held-out slice of the training rows
(best validation objective kept). A small head on 1,152 inputs ends up overconfident, so
pointwise and signal models are then Platt-scaled on that slice (``logit' = a + b logit``,
a binomial GLM from statsmodels; monotone, so rankings are unchanged). Pairwise: ``-log sigmoid(logit_chosen - logit_rejected)``.
Pointwise and signals: binary cross-entropy per target, rows with a missing label
(``returned_next_day`` on the last logged day) masked out of that target.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from rewards.datasets import as_lists, require_columns
from rewards.embeddings import get_embedder
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

WEIGHTS_FILE = "head.pt"
_EPS = 1e-6


@dataclass
class MiniLMConfig:
    """Training settings of a MiniLM-backbone reward model."""

    hidden: int = field(default=64, metadata={"help": "Hidden units of the MLP head (0 = linear)."})
    max_epochs: int = field(default=200, metadata={"help": "Most passes over the training rows."})
    batch_size: int = field(default=64, metadata={"help": "Rows (or pairs) per optimiser step."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the content head."})
    style_lr: float = field(
        default=2e-2,
        metadata={"help": "Learning rate of the style term (8 coefficients, no weight decay)."},
    )
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the head's hidden layer."})
    val_fraction: float = field(
        default=0.15, metadata={"help": "Share of training rows held out for early stopping."}
    )
    patience: int = field(
        default=15, metadata={"help": "Epochs without validation improvement before stopping."}
    )
    decorrelation: float = field(
        default=1.0,
        metadata={"help": "Weight of ODIN's style-decorrelation penalty (style-controlled only)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds torch and the validation split."})
    encoder_path: str | None = field(
        default=None,
        metadata={"help": "sentence-transformers folder; None = packaged all-MiniLM-L6-v2."},
    )

    def __post_init__(self) -> None:
        if self.hidden < 0:
            raise ValueError(f"MiniLMConfig.hidden must be >= 0, got {self.hidden}")
        for name in ("max_epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"MiniLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(
                f"MiniLMConfig.val_fraction must be in (0, 0.5), got {self.val_fraction}"
            )
        if self.lr <= 0 or self.style_lr <= 0 or self.weight_decay < 0 or self.decorrelation < 0:
            raise ValueError(
                "MiniLMConfig needs lr > 0, style_lr > 0, weight_decay >= 0, decorrelation >= 0; "
                f"got lr={self.lr}, style_lr={self.style_lr}, weight_decay={self.weight_decay}, "
                f"decorrelation={self.decorrelation}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"MiniLMConfig.dropout must be in [0, 1), got {self.dropout}")


class _Head(nn.Module):
    """Standardisation buffers, the content MLP and (style-controlled) the style term."""

    def __init__(
        self, n_inputs: int, n_outputs: int, hidden: int, dropout: float, style_controlled: bool
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("std", torch.ones(n_inputs))
        if hidden:
            self.content = nn.Sequential(
                nn.Linear(n_inputs, hidden),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, n_outputs),
            )
        else:
            self.content = nn.Sequential(nn.Linear(n_inputs, n_outputs))
        self.style = StyleTerm(n_outputs) if style_controlled else None

    def content_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.content((x - self.mean) / self.std)

    def style_logits(self, s: torch.Tensor) -> torch.Tensor:
        if self.style is None:
            raise RuntimeError("style_logits called on a naive head")
        return self.style(s)


class MiniLMRewardModel(RewardModel):
    """A trained MiniLM-backbone reward model (build it with :func:`train_minilm`)."""

    backbone = "minilm"

    def __init__(
        self,
        kind: str,
        style_controlled: bool,
        config: MiniLMConfig,
        scaler: StyleScaler,
        head: _Head,
        history: dict[str, Any] | None = None,
        platt: dict[str, tuple[float, float]] | None = None,
        targets: tuple[str, ...] | None = None,
    ) -> None:
        check_kind(kind)
        self.kind = kind
        self.targets = tuple(targets) if targets else TARGETS[kind]
        self.style_controlled = style_controlled
        self.config = config
        self.scaler = scaler
        self.head = head.eval()
        self.history = history or {}
        self.platt = platt or {}

    def features(self, contexts: Sequence[str], replies: Sequence[str]) -> np.ndarray:
        """Head inputs for (context, reply) pairs (see the module docstring)."""
        return _features(self.config, self.scaler, self.style_controlled, contexts, replies)

    def logits(
        self, contexts: Sequence[str], replies: Sequence[str], *, with_style: bool = False
    ) -> np.ndarray:
        """Per-target logits; ``with_style`` adds the style term of a style-controlled model."""
        contexts, replies = as_lists(contexts), as_lists(replies)
        check_texts(contexts, replies)
        x = torch.from_numpy(self.features(contexts, replies))
        with torch.no_grad():
            z = self.head.content_logits(x)
            if with_style and self.style_controlled:
                z = z + self.head.style_logits(torch.from_numpy(self.scaler.covariates(replies)))
        z = z.numpy().astype(np.float64)
        for j, target in enumerate(self.targets):
            if target in self.platt:
                a, b = self.platt[target]
                z[:, j] = a + b * z[:, j]
        return z

    def style_coefficients(self) -> dict[str, list[float]]:
        """Fitted style-term beta per covariate and target (empty for a naive model)."""
        return self.head.style.coefficients() if self.head.style is not None else {}

    def save(self, path: str | Path) -> Path:
        """Write ``reward_model.json`` and the head's weights into folder ``path``."""
        path = Path(path)
        write_meta(
            path,
            {
                "backbone": self.backbone,
                "kind": self.kind,
                "style_controlled": self.style_controlled,
                "config": asdict(self.config),
                "scaler": self.scaler.to_dict(),
                "n_inputs": int(self.head.mean.shape[0]),
                "history": self.history,
                "platt": self.platt,
                "style_coefficients": self.style_coefficients(),
            },
        )
        torch.save(self.head.state_dict(), path / WEIGHTS_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MiniLMRewardModel:
        """Read a folder written by :meth:`save`."""
        meta = read_meta(path)
        config = MiniLMConfig(**meta["config"])
        kind = meta["kind"]
        targets = tuple(meta.get("targets") or TARGETS[kind])
        head = _Head(
            meta["n_inputs"],
            len(targets),
            config.hidden,
            config.dropout,
            meta["style_controlled"],
        )
        head.load_state_dict(torch.load(Path(path) / WEIGHTS_FILE, weights_only=True))
        return cls(
            kind,
            meta["style_controlled"],
            config,
            StyleScaler.from_dict(meta["scaler"]),
            head,
            meta.get("history"),
            {t: (float(a), float(b)) for t, (a, b) in meta.get("platt", {}).items()},
            targets,
        )


def _embed(config: MiniLMConfig, texts: Sequence[str]) -> np.ndarray:
    return get_embedder(config.encoder_path).encode(list(texts))


def _features(
    config: MiniLMConfig,
    scaler: StyleScaler,
    style_controlled: bool,
    contexts: Sequence[str],
    replies: Sequence[str],
) -> np.ndarray:
    e_c = _embed(config, contexts)
    if style_controlled:
        e_r = _embed(config, [strip_style(r) for r in replies])
        parts = [e_c, e_r, e_c * e_r]
    else:
        e_r = _embed(config, replies)
        parts = [e_c, e_r, e_c * e_r, scaler.covariates(replies)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def train_minilm(
    kind: str,
    train: pd.DataFrame,
    *,
    style_controlled: bool = False,
    config: MiniLMConfig | None = None,
    target: str | None = None,
    verbose: bool = False,
) -> MiniLMRewardModel:
    """Fit a MiniLM-backbone reward model.

    Args:
        kind: ``pointwise`` (needs the pointwise table's ``context``, ``reply``,
            ``engaged``), ``signals`` (``continued``, ``liked``, ``returned_next_day``) or
            ``pairwise`` (the pairwise table's ``context``, ``chosen``, ``rejected``).
        train: the training table (``rewards.datasets``).
        style_controlled: fit the style term separately and drop it at scoring.
        config: training settings; defaults to :class:`MiniLMConfig()`.
        target: for ``pointwise``, the signal to model instead of ``engaged``.
        verbose: show a progress bar over epochs.
    """
    targets = resolve_targets(kind, target)
    config = config or MiniLMConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if kind == "pairwise":
        require_columns(train, ("context", "chosen", "rejected"), "pairwise")
        contexts = as_lists(train["context"])
        chosen, rejected = as_lists(train["chosen"]), as_lists(train["rejected"])
        scaler = StyleScaler.fit(style_counts(chosen + rejected))
        data = {
            "x_a": _features(config, scaler, style_controlled, contexts, chosen),
            "x_b": _features(config, scaler, style_controlled, contexts, rejected),
            "s_a": scaler.covariates(chosen),
            "s_b": scaler.covariates(rejected),
        }
        n_inputs = data["x_a"].shape[1]
        stats_rows = np.concatenate([data["x_a"], data["x_b"]])
    else:
        require_columns(train, ("context", "reply", *targets), kind)
        contexts, replies = as_lists(train["context"]), as_lists(train["reply"])
        scaler = StyleScaler.fit(style_counts(replies))
        y = train[list(targets)].astype(float).to_numpy()
        if not np.isfinite(y).any(axis=0).all():
            raise ValueError(
                f"every target needs labelled rows; targets {targets} have finite counts "
                f"{np.isfinite(y).sum(axis=0).tolist()}"
            )
        data = {
            "x": _features(config, scaler, style_controlled, contexts, replies),
            "s": scaler.covariates(replies),
            "y": np.nan_to_num(y).astype(np.float32),
            "m": np.isfinite(y).astype(np.float32),
        }
        n_inputs = data["x"].shape[1]
        stats_rows = data["x"]

    head = _Head(n_inputs, len(targets), config.hidden, config.dropout, style_controlled)
    head.mean.copy_(torch.from_numpy(stats_rows.mean(axis=0)))
    head.std.copy_(torch.from_numpy(stats_rows.std(axis=0) + _EPS))
    n = len(train)
    if n < 10:
        raise ValueError(f"training a reward model needs at least 10 rows, got {n}")
    order = rng.permutation(n)
    n_val = max(1, math.ceil(config.val_fraction * n))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
    val_idx, fit_idx = torch.from_numpy(order[:n_val]), torch.from_numpy(order[n_val:])
    history = _fit(head, kind, tensors, fit_idx, val_idx, config, style_controlled, verbose)
    platt: dict[str, tuple[float, float]] = {}
    if kind != "pairwise":
        with torch.no_grad():
            z = head.content_logits(tensors["x"][val_idx]).numpy().astype(np.float64)
        y, m = data["y"][order[:n_val]], data["m"][order[:n_val]] > 0
        history["platt"] = {}
        for j, target in enumerate(targets):
            platt_fit = _platt(z[m[:, j], j], y[m[:, j], j])
            history["platt"][target] = platt_fit
            if platt_fit["fitted"]:
                platt[target] = (platt_fit["a"], platt_fit["b"])
    return MiniLMRewardModel(kind, style_controlled, config, scaler, head, history, platt, targets)


def _platt(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Platt scaling ``a + b * logit`` by a binomial GLM; not applied (and the reason kept
    in the history) when the validation slice cannot support it."""
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    if len(labels) < 20 or labels.min() == labels.max():
        return {"fitted": False, "reason": f"{len(labels)} rows, classes {sorted(set(labels))}"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        try:
            result = sm.GLM(labels, sm.add_constant(logits), family=sm.families.Binomial()).fit()
        except PerfectSeparationWarning as err:
            return {"fitted": False, "reason": f"perfect separation: {err}"}
    a, b = (float(v) for v in result.params)
    if not (np.isfinite(a) and np.isfinite(b) and b > 0):
        return {"fitted": False, "reason": f"non-monotone fit a={a}, b={b}"}
    return {"fitted": True, "a": a, "b": b}


def _objective(
    head: _Head,
    kind: str,
    batch: dict[str, torch.Tensor],
    config: MiniLMConfig,
    style_controlled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(model loss, total objective incl. the decorrelation penalty) on one batch."""
    if kind == "pairwise":
        content_a, content_b = head.content_logits(batch["x_a"]), head.content_logits(batch["x_b"])
        logit = content_a - content_b
        if style_controlled:
            logit = logit + head.style_logits(batch["s_a"]) - head.style_logits(batch["s_b"])
        loss = nn.functional.softplus(-logit).mean()
        content = torch.cat([content_a, content_b])
        covariates = torch.cat([batch["s_a"], batch["s_b"]])
    else:
        content = head.content_logits(batch["x"])
        logit = content + head.style_logits(batch["s"]) if style_controlled else content
        per = nn.functional.binary_cross_entropy_with_logits(logit, batch["y"], reduction="none")
        loss = (per * batch["m"]).sum() / batch["m"].sum().clamp(min=1.0)
        covariates = batch["s"]
    if not style_controlled or config.decorrelation == 0:
        return loss, loss
    return loss, loss + config.decorrelation * decorrelation_penalty(content, covariates)


def _fit(
    head: _Head,
    kind: str,
    tensors: dict[str, torch.Tensor],
    fit_idx: torch.Tensor,
    val_idx: torch.Tensor,
    config: MiniLMConfig,
    style_controlled: bool,
    verbose: bool,
) -> dict[str, Any]:
    # The style term is a handful of coefficients that must settle before early stopping
    # ends training, and shrinking them toward zero would push style back into the content
    # term: its own, faster, undecayed parameter group.
    groups = [
        {"params": head.content.parameters(), "lr": config.lr, "weight_decay": config.weight_decay}
    ]
    if head.style is not None:
        groups.append(
            {"params": head.style.parameters(), "lr": config.style_lr, "weight_decay": 0.0}
        )
    optimiser = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(config.seed)
    val_batch = {k: v[val_idx] for k, v in tensors.items()}
    best, best_state, best_epoch, stale = math.inf, copy.deepcopy(head.state_dict()), 0, 0
    bar = tqdm(range(config.max_epochs), desc=f"rm {kind}", disable=not verbose, leave=False)
    for epoch in bar:
        head.train()
        perm = fit_idx[torch.randperm(len(fit_idx), generator=generator)]
        for start in range(0, len(perm), config.batch_size):
            idx = perm[start : start + config.batch_size]
            if len(idx) < 2:  # a batch of one has no correlation to penalise
                continue
            _, objective = _objective(
                head, kind, {k: v[idx] for k, v in tensors.items()}, config, style_controlled
            )
            optimiser.zero_grad()
            objective.backward()
            optimiser.step()
        head.eval()
        with torch.no_grad():
            val_loss, val_objective = _objective(head, kind, val_batch, config, style_controlled)
        bar.set_postfix(val_loss=f"{val_loss.item():.4f}")
        if val_objective.item() < best - 1e-5:
            best, best_state, best_epoch, stale = (
                val_objective.item(),
                copy.deepcopy(head.state_dict()),
                epoch,
                0,
            )
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return {
        "best_epoch": best_epoch,
        "val_objective": best,
        "epochs_run": epoch + 1,
        "n_fit": len(fit_idx),
        "n_val": len(val_idx),
        "covariates": list(COVARIATES),
    }
