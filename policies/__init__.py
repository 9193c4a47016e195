"""Chat-model backends behind one interface: ``hf``, ``hf_engine`` (prefix caching, continuous
batching), ``openai`` (HTTP), ``vllm`` (GPU extra)."""

from __future__ import annotations

from policies.base import Chat, Generation, Message, Policy, SamplingParams
from policies.spec import PolicySpec

__all__ = ["Chat", "Generation", "Message", "Policy", "PolicySpec", "SamplingParams", "load_policy"]


def load_policy(spec: PolicySpec | str) -> Policy:
    """Build the backend a spec names; a plain string is an ``hf`` model id or folder."""
    if isinstance(spec, str):
        spec = PolicySpec(model=spec)
    if spec.backend == "hf":
        from policies.hf import HFPolicy

        return HFPolicy(spec)
    if spec.backend == "hf_engine":
        from policies.engine import EnginePolicy

        return EnginePolicy(spec)
    if spec.backend == "openai":
        from policies.openai_compat import OpenAIPolicy

        return OpenAIPolicy(spec)
    from policies.vllm_engine import VLLMPolicy

    return VLLMPolicy(spec)
