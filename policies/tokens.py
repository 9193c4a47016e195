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
    the system prompt) until it fits ``max_prompt_tokens``; a single turn that is still too
    long keeps its last ``max_prompt_tokens`` tokens."""
    head = chat[:1] if chat[0]["role"] == "system" else []
    turns = chat[len(head) :]
    while True:
        ids = tokenizer.apply_chat_template(head + turns, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) <= max_prompt_tokens or len(turns) <= 1:
            return list(ids)[-max_prompt_tokens:]
        turns = turns[1:]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The end-of-sequence token and, when the vocabulary has it, ChatML's end of turn."""
    stops = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stops.add(end_of_turn)
    return sorted(i for i in stops if i is not None)
