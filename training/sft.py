"""Supervised fine-tuning on curated (or best-of-n) replies with TRL's SFTTrainer.

Data is conversational prompt-completion records (``training.curation.sft_records``):
``{"prompt": [system, user, assistant, ..., user], "completion": [{"role": "assistant",
...}]}``. TRL renders them with the model's chat template and, for prompt-completion
data, computes the loss on the completion tokens only, so the model learns the replies,
not the users' messages.

A best-of-n reply that the sampling cap cut off (``"cut": True`` in its record) is trained
without the chat template's end-of-turn tokens: appending them would teach the model to stop
wherever the cap stopped it, and the candidate would learn to write shorter, broken replies.
The records are tokenized here (``token_records``) so that each one ends as it should;
TRL's trainer reads the ids and labels (-100 over the prompt) as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from policies import Chat
from training.models import resolve_model, train_and_save, trainer_defaults

# The label that leaves a token out of the loss (the prompt's tokens).
IGNORE = -100


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
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    if not records:
        raise ValueError("train_sft got no records; curate more logged turns or relax the filters")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_args.model_name_or_path))
    tokens = token_records(records, tokenizer)
    return train_and_save(SFTTrainer, "sft", tokens, model_args, args, out_dir)


def token_records(records: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` (-100 over the prompt) of each prompt-completion record, rendered with
    the tokenizer's chat template as TRL renders them; a record with ``"cut": True`` keeps
    only the reply's own tokens after the prompt (no end-of-turn)."""
    out = []
    for record in records:
        prompt = _ids(tokenizer, record["prompt"], add_generation_prompt=True)
        if record.get("cut", False):
            reply = "".join(m["content"] for m in record["completion"])
            ids = prompt + tokenizer(reply, add_special_tokens=False)["input_ids"]
        else:
            ids = _ids(tokenizer, [*record["prompt"], *record["completion"]])
            if ids[: len(prompt)] != prompt:
                raise ValueError(
                    "the chat template renders the prompt differently alone and before its "
                    "reply, so the completion cannot be told apart; use a template whose "
                    "generation prompt is a prefix of the rendered conversation"
                )
        out.append({"input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt) :]})
    return out


def _ids(tokenizer: Any, chat: Chat, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
