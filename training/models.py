"""Plumbing every recipe shares: seeding, loading the model a recipe starts from, LoRA
settings, CPU-sized trainer defaults, and saving the result as a checkpoint that
``policies.load_policy(path)`` serves.

Model and LoRA settings are TRL's own :class:`trl.ModelConfig` (``use_peft``, ``lora_r``,
``lora_alpha``, ``lora_target_modules``, ``dtype``...), so a recipe is configured exactly as
TRL's example scripts are; nothing here restates those fields.

Saved checkpoints are *merged*: a LoRA adapter is folded into the base weights
(``merge_and_unload``) and the full model is written with its tokenizer, in the base
model's dtype (fp32 for the packaged SmolLM2; folding a small LoRA delta into bf16
weights would round much of it away). A merged folder is a plain HF checkpoint, so
``load_policy``, a later recipe's ``--from`` and vLLM all read it without peft.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.hardware import use_bf16

DEFAULT_MODEL = "smollm2"
# Written last into a saved checkpoint: recipe, base model, steps, final metrics.
TRAINING_MARKER = "flywheel-training.json"


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` in one place (TRL samplers read them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model(model: str) -> str:
    """``"smollm2"`` -> the packaged SmolLM2 checkpoint folder, a folder or a cached hub id
    as given; anything else raises FileNotFoundError saying how to name a model."""
    from policies.models import resolve_model_path

    return resolve_model_path(model)


def model_config(
    model: str = DEFAULT_MODEL,
    use_peft: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_target_modules: list[str] | None = None,
) -> Any:
    """A :class:`trl.ModelConfig` for ``model`` (LoRA on every linear layer by default).

    ``use_peft=False`` is full fine-tuning; every other ModelConfig field can be set on the
    returned object before it is passed to a recipe.
    """
    from trl import ModelConfig

    return ModelConfig(
        model_name_or_path=model,
        dtype="float32",
        use_peft=use_peft,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        lora_target_modules=lora_target_modules or ["all-linear"],
    )


def load_model_and_tokenizer(model_args: Any) -> tuple[Any, Any]:
    """Load the causal LM and tokenizer a ModelConfig names (offline, from disk)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model_args.model_name_or_path)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def trainer_defaults(output_dir: str | Path, max_steps: int, seed: int) -> dict[str, Any]:
    """Keyword arguments shared by every recipe's TRL config on this project.

    Checkpoints are written once, at the end, by :func:`save_checkpoint` (merged), so the
    trainers save nothing themselves; logging goes to stdout/JSON, not to a tracker.
    """
    return {
        "output_dir": str(output_dir),
        "max_steps": max_steps,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        # TRL turns activation checkpointing on by default; it disables the KV cache, so
        # GRPO's generate recomputes the whole prefix each token (a step of 16 x 48 tokens
        # ran for over 6 minutes here). A 135M model needs no memory saving on CPU.
        "gradient_checkpointing": False,
        "use_cpu": not torch.cuda.is_available(),
        # bf16 autocast is what makes CPU training bearable on CPUs with native BF16; on
        # CPUs without it bf16 is emulated and several times slower than fp32.
        "bf16": use_bf16(),
        "disable_tqdm": os.environ.get("FLYWHEEL_QUIET") == "1",
    }


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    recipe: str,
    model_args: Any,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (a PeftModel is merged first) and its tokenizer as a plain checkpoint.

    Returns the folder; ``policies.load_policy(str(folder))`` serves it.
    """
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "recipe": recipe,
        "base_model": resolve_model(model_args.model_name_or_path),
        "model_config": {k: v for k, v in asdict(model_args).items() if _jsonable(v)},
        "metrics": metrics or {},
    }
    (out / TRAINING_MARKER).write_text(json.dumps(record, indent=2))
    return out


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of every numeric metric in a Trainer's ``log_history``."""
    last: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, int | float) and np.isfinite(value):
                last[key] = float(value)
    return last


def train_and_save(
    trainer_cls: Any,
    recipe: str,
    records: list[dict[str, Any]],
    model_args: Any,
    args: Any,
    out_dir: str | Path,
    extra_metrics: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> Path:
    """Seed, load the model (LoRA when ``model_args`` asks for it), train a TRL trainer on
    ``records`` and save the merged checkpoint with its final metrics and ``extra_metrics``
    (``save_checkpoint``). ``trainer_kwargs`` go to the trainer (GRPO's ``reward_funcs``)."""
    from datasets import Dataset
    from trl import get_peft_config

    seed_everything(args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )
    trainer.train()
    metrics = final_metrics(trainer.state.log_history) | {"global_step": trainer.state.global_step}
    metrics |= extra_metrics or {}
    return save_checkpoint(trainer.model, tokenizer, out_dir, recipe, model_args, metrics)


def time_limit_callback(seconds: float) -> Any:
    """A TrainerCallback that ends training after ``seconds`` of wall time (after a step).

    The "useful run in N minutes" budget is a wall-clock promise on a shared CPU, where
    step times vary; ``max_steps`` alone cannot keep it.
    """
    import time

    from transformers import TrainerCallback

    class _TimeLimit(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.monotonic() - self.start >= seconds:
                control.should_training_stop = True

    return _TimeLimit()
