"""Which chat model to use, as written in a scenario file or on the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "smollm2"


class PolicySpec(BaseModel):
    """A chat-model backend and its settings. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["hf", "hf_engine", "openai", "vllm"] = Field(
        "hf_engine",
        description="hf_engine (default): transformers on this machine with prefix caching "
        "and continuous batching, for bulk generation (policies/engine.py); hf: "
        "transformers' padded-batch generate; openai: any OpenAI-compatible server (vLLM, "
        "llama.cpp); vllm: in-process vLLM engine (GPU extra).",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="HF model id, local checkpoint folder, or 'smollm2' for the packaged "
        "SmolLM2-135M-Instruct. For backend=openai, the model name the server serves.",
    )
    name: str | None = Field(None, description="Label in logs and reports; defaults to model.")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto",
        description="Weights dtype for hf/vllm. auto: bf16 on a GPU with bf16 and on a CPU "
        "with native BF16 (avx512_bf16, amx_bf16), where it is ~2x fp32; fp32 elsewhere, "
        "where bf16 is emulated and several times slower (policies/hardware.py).",
    )
    batch_size: int = Field(
        64,
        gt=0,
        description="Chats per forward batch (hf), decoding together (hf_engine) "
        "or in flight (openai).",
    )
    max_prompt_tokens: int = Field(
        1536,
        gt=0,
        description="Older turns are dropped (system prompt kept) beyond this; a system "
        "prompt and newest turn that alone exceed it are refused with their sizes.",
    )
    prefix_cache_tokens: int = Field(
        65536,
        ge=0,
        description="hf_engine: prompt and reply tokens whose key/value states are kept for "
        "reuse by later prompts with the same prefix (least recently used dropped first); "
        "0 turns prefix caching off. SmolLM2-135M keeps ~23 KB per token in bf16, 46 in fp32.",
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible server root, e.g. http://127.0.0.1:8000/v1."
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the API key.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout (openai).")
    max_retries: int = Field(3, ge=0, description="Retries with exponential backoff (openai).")

    @model_validator(mode="after")
    def _check_backend_fields(self) -> PolicySpec:
        if self.backend == "openai" and not self.base_url:
            raise ValueError(
                "policy.base_url is required for backend 'openai'; "
                "set it to the server root, e.g. http://127.0.0.1:8000/v1"
            )
        return self

    @property
    def label(self) -> str:
        """The name shown in logs and reports."""
        return self.name or self.model
