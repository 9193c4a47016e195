"""vllm backend: an in-process ``vllm.LLM`` engine (the ``gpu`` extra).

vLLM schedules a whole batch with continuous batching and paged attention, which is
where a GPU's throughput is. It is optional and heavy, so it is imported only when this
backend is built, with an error that says how to install it.

Prompts are built here, not by vLLM's ``LLM.chat``, for one reason: a long history must
be trimmed the way the hf backend trims it (oldest turns first, the system prompt kept),
so that the same chat means the same prompt on every backend. vLLM's own
``truncate_prompt_tokens`` cuts from the left and would drop the persona. Chat ``i`` of a
call is sampled with seed ``params.seed + i`` (vLLM seeds each request on its own), as the
openai backend does, so a batch is reproducible whatever else the engine schedules.

Not exercised on a GPU in this repository's CI; the import hint and the prompt and
sampling mapping are tested on CPU (tests/test_policies_vllm.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from policies.base import Chat, Generation, SamplingParams, validate_chat
from policies.hardware import resolve_dtype
from policies.models import resolve_model_path
from policies.spec import PolicySpec
from policies.tokens import fit_prompt_ids, stop_token_ids

INSTALL_HINT = "pip install 'characterflywheel[gpu]'"


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"policy.backend='vllm' needs the vllm package, which is not installed ({error}); "
            f"fix: {INSTALL_HINT} on a machine with a CUDA GPU, or use backend 'hf' (CPU) or "
            "'openai' (a vLLM server elsewhere)"
        ) from error
    return vllm


def sampling_kwargs(params: SamplingParams, seed: int, stop_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request.

    temperature 0 is greedy in vLLM as here (it then ignores top_p); special tokens are
    dropped from the text as the hf backend drops them.
    """
    return {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": seed,
        "stop_token_ids": list(stop_ids),
        "skip_special_tokens": True,
    }


class VLLMPolicy:
    """Chats answered by an in-process vLLM engine."""

    def __init__(self, spec: PolicySpec) -> None:
        self.vllm = import_vllm()  # first, so a missing extra fails before any loading
        self.spec = spec
        self.name = spec.label
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = resolve_model_path(spec.model)
        dtype = str(resolve_dtype(spec.dtype)).removeprefix("torch.")
        self.llm = self.vllm.LLM(model=model, dtype=dtype)
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tokenizer)

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """One reply per chat, all handed to the engine at once; chat ``i`` uses seed
        ``params.seed + i``."""
        for i, chat in enumerate(chats):
            validate_chat(chat, i)
        prompts = [
            {"prompt_token_ids": fit_prompt_ids(self.tokenizer, chat, self.spec.max_prompt_tokens)}
            for chat in chats
        ]
        sampling = [
            self.vllm.SamplingParams(**sampling_kwargs(params, params.seed + i, self.stop_ids))
            for i in range(len(chats))
        ]
        outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        return [
            Generation(
                out.outputs[0].text.strip(),
                len(out.prompt_token_ids),
                completion_length(out.outputs[0].token_ids, self.stop_ids),
            )
            for out in outputs
        ]


def completion_length(token_ids: Sequence[int], stop_ids: Sequence[int]) -> int:
    """Generated tokens without the stop token vLLM appends, counted as the hf backend does."""
    return len(token_ids) - (1 if token_ids and token_ids[-1] in stop_ids else 0)
