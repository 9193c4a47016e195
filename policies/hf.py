"""transformers backend: true batched generation on CPU (or GPU if torch has one).

Replies for a whole batch come from one left-padded ``generate`` call; padding sits on
the left so every row's next token follows its own prompt. A reply ends at the chat
template's end-of-turn token. With the same seed and the same batch, replies are
identical; the seed is offset per chunk so chunks differ from one another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from policies.base import Chat, Generation, SamplingParams, validate_chat
from policies.hardware import resolve_dtype
from policies.models import resolve_model_path
from policies.spec import PolicySpec
from policies.tokens import fit_prompt_ids, stop_token_ids

# Calls of at least this many batches (minutes on a CPU: best-of-n pools, benchmark
# evaluations) show a progress bar; the simulator's per-turn calls stay silent.
PROGRESS_MIN_CHUNKS = 4


def load_causal_lm(model: str, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from an id, a folder, or a LoRA adapter folder (merged)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=dtype)
        lm = PeftModel.from_pretrained(lm, path).merge_and_unload()
        tokenizer_source = path if (Path(path) / "tokenizer_config.json").is_file() else base
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_source))
    else:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    lm.eval()
    return lm, tokenizer


class HFPolicy:
    """A transformers causal LM answering batches of chats."""

    def __init__(self, spec: PolicySpec | None = None) -> None:
        self.spec = spec or PolicySpec()
        self.name = self.spec.label
        self.model, self.tokenizer = load_causal_lm(self.spec.model, resolve_dtype(self.spec.dtype))
        self.device = self.model.device
        self.stop_ids = stop_token_ids(self.tokenizer)
        if isinstance(self.model.generation_config.eos_token_id, int):
            self.stop_ids = sorted({*self.stop_ids, self.model.generation_config.eos_token_id})

    @torch.inference_mode()
    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """One reply per chat; batches of ``spec.batch_size`` rows per ``generate`` call."""
        for i, chat in enumerate(chats):
            validate_chat(chat, i)
        out: list[Generation] = []
        size = self.spec.batch_size
        starts = range(0, len(chats), size)
        quiet = len(starts) < PROGRESS_MIN_CHUNKS or os.environ.get("FLYWHEEL_QUIET") == "1"
        bar = tqdm(
            total=len(chats), desc=f"generate {self.name}", unit="reply", disable=quiet, leave=False
        )
        for chunk_index, start in enumerate(starts):
            chunk = chats[start : start + size]
            out.extend(self._generate_chunk(chunk, params, params.seed + chunk_index))
            bar.update(len(chunk))
        bar.close()
        return out

    def _generate_chunk(
        self, chats: Sequence[Chat], params: SamplingParams, seed: int
    ) -> list[Generation]:
        prompts = [fit_prompt_ids(self.tokenizer, c, self.spec.max_prompt_tokens) for c in chats]
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        sampling = params.temperature > 0
        torch.manual_seed(seed)
        generated = self.model.generate(
            **batch,
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=None,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :].tolist()
        results = []
        for prompt, row in zip(prompts, new_tokens, strict=True):
            completion = _until_stop(row, self.stop_ids)
            text = self.tokenizer.decode(completion, skip_special_tokens=True).strip()
            sampled = tuple(row[: len(completion) + 1])  # with its stop token, if any
            results.append(Generation(text, len(prompt), len(completion), sampled))
        return results


def _until_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens
