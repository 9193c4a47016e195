"""Supervised fine-tuning on curated (or best-of-n) replies with TRL's SFTTrainer.

Data is conversational prompt-completion records (``training.curation.sft_records``):
``{"prompt": [system, user, assistant, ..., user], "completion": [{"role": "assistant",
...}]}``. TRL renders them with the model's chat template and, for prompt-completion
data, computes the loss on the completion tokens only, so the model learns the replies,
not the users' messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.models import train_and_save, trainer_defaults


def sft_config(output_dir: str | Path, max_steps: int = 20, seed: int = 0, **overrides: Any) -> Any:
    """A :class:`trl.SFTConfig` sized for CPU; any SFTConfig field may be overridden."""
    from trl import SFTConfig

    kwargs = trainer_defaults(output_dir, max_steps, seed) | {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "constant",
        "max_length": 512,
    }
    return SFTConfig(**(kwargs | overrides))


def train_sft(
    records: list[dict[str, Any]],
    model_args: Any,
    args: Any,
    out_dir: str | Path,
) -> Path:
    """Fine-tune ``model_args``' model on ``records`` and save a merged checkpoint.

    Args:
        records: conversational prompt-completion records (at least one).
        model_args: a :class:`trl.ModelConfig` (``training.models.model_config``).
        args: a :class:`trl.SFTConfig` (``sft_config``).
        out_dir: where the checkpoint goes.

    Returns:
        ``out_dir``, loadable with ``policies.load_policy(str(out_dir))``.
    """
    from trl import SFTTrainer

    if not records:
        raise ValueError("train_sft got no records; curate more logged turns or relax the filters")
    return train_and_save(SFTTrainer, "sft", records, model_args, args, out_dir)
