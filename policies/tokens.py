"""Prompt building shared by the backends that tokenize locally (hf, vllm).

The same chat must mean the same prompt on every backend, so both trim long histories
and stop generating the same way.
"""

from __future__ import annotations

from typing import Any

from policies.base import Chat

END_OF_TURN = "<|im_end|>"  # ChatML end of turn (SmolLM2, Qwen); ignored if not in the vocab


def fit_prompt_ids(tokenizer: Any, chat: Chat, max_prompt_tokens: int) -> list[int]:
    """Token ids of ``chat`` with the generation prompt, dropping the oldest turns (never
    the system prompt: it holds the persona) until it fits ``max_prompt_tokens``.

    Raises ValueError with the sizes when the system prompt and the newest turn alone do
    not fit: cutting tokens instead would drop the persona or leave a malformed prompt.
    """
    head = chat[:1] if chat[0]["role"] == "system" else []
    turns = chat[len(head) :]
    while True:
        ids = _template_ids(tokenizer, head + turns)
        if len(ids) <= max_prompt_tokens:
            return ids
        if len(turns) <= 1:
            raise ValueError(_too_long_message(tokenizer, head, len(ids), max_prompt_tokens))
        turns = turns[1:]


def _template_ids(tokenizer: Any, chat: Chat, generation_prompt: bool = True) -> list[int]:
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=generation_prompt, tokenize=True
    )
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _too_long_message(tokenizer: Any, head: Chat, needed: int, max_prompt_tokens: int) -> str:
    if head:
        # The system turn's share: the template around it included, as the prompt counts it.
        system = len(_template_ids(tokenizer, head, generation_prompt=False))
        what = f"the system prompt ({system} tokens) and the newest turn"
    else:
        what = "the newest turn"
    return (
        f"{what} need {needed} prompt tokens with the chat template, more than "
        f"policy.max_prompt_tokens={max_prompt_tokens}; fix: raise policy.max_prompt_tokens "
        f"to at least {needed}, or shorten the persona or the message"
    )


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The end-of-sequence token and, when the vocabulary has it, ChatML's end of turn."""
    stops = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stops.add(end_of_turn)
    return sorted(i for i in stops if i is not None)
