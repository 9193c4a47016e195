"""Direct preference optimisation on best/worst pairs with TRL's DPOTrainer.

Pairs come from rejection sampling (``training.rejection.preference_records``):
``{"prompt": [chat], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``. With
LoRA no second model is loaded: the reference policy is the base with the adapter
switched off, which is how TRL's DPOTrainer handles a peft model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.models import train_and_save, trainer_defaults


def dpo_config(output_dir: str | Path, max_steps: int = 20, seed: int = 0, **overrides: Any) -> Any:
    """A :class:`trl.DPOConfig` sized for CPU; any DPOConfig field may be overridden."""
    from trl import DPOConfig

    kwargs = trainer_defaults(output_dir, max_steps, seed) | {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 5e-5,
        "lr_scheduler_type": "constant",
        "beta": 0.1,
        "max_length": 512,
    }
    return DPOConfig(**(kwargs | overrides))


def train_dpo(
    records: list[dict[str, Any]],
    model_args: Any,
    args: Any,
    out_dir: str | Path,
) -> Path:
    """Train ``model_args``' model on preference ``records``; save a merged checkpoint.

    Args:
        records: conversational preference records (prompt, chosen, rejected).
        model_args: a :class:`trl.ModelConfig` (``training.models.model_config``).
        args: a :class:`trl.DPOConfig` (``dpo_config``).
        out_dir: where the checkpoint goes.

    Returns:
        ``out_dir``, loadable with ``policies.load_policy(str(out_dir))``.
    """
    from trl import DPOTrainer

    if not records:
        raise ValueError(
            "train_dpo got no preference pairs; run rejection sampling with n >= 2 on more "
            "contexts (pairs whose best and worst score tie are dropped)"
        )
    return train_and_save(DPOTrainer, "dpo", records, model_args, args, out_dir)
