"""The vllm backend, as far as it can be checked without a GPU.

vLLM itself is not installed here (it is the ``gpu`` extra), so the engine is never
started: these tests cover the install hint, the prompt the engine would receive (it must
equal the hf backend's, so a chat means the same thing on both), the sampling mapping and
the token counting. Running it on a GPU is unchecked in this repository.
"""

from __future__ import annotations

import sys

import pytest

from policies import PolicySpec, SamplingParams, load_policy
from policies.hf import HFPolicy
from policies.vllm_engine import (
    INSTALL_HINT,
    completion_length,
    sampling_kwargs,
    stop_token_ids,
)


def test_missing_vllm_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import vllm` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError) as caught:
        load_policy(PolicySpec(backend="vllm"))
    assert INSTALL_HINT in str(caught.value)
    assert INSTALL_HINT == "pip install 'characterflywheel[gpu]'"
    assert "policy.backend='vllm'" in str(caught.value)


def test_sampling_params_mapping() -> None:
    params = SamplingParams(max_new_tokens=33, temperature=0.7, top_p=0.9, seed=5)
    assert sampling_kwargs(params, seed=12, stop_ids=[2, 7]) == {
        "n": 1,
        "max_tokens": 33,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 12,
        "stop_token_ids": [2, 7],
        "skip_special_tokens": True,
    }


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama_dir) -> HFPolicy:
    return load_policy(
        PolicySpec(backend="hf", model=str(tiny_llama_dir), dtype="float32", max_prompt_tokens=60)
    )


def test_stop_tokens_and_completion_length(tiny_hf: HFPolicy) -> None:
    stops = stop_token_ids(tiny_hf.tokenizer)
    assert stops == tiny_hf.stop_ids
    end_of_turn = tiny_hf.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in stops
    assert completion_length([10, 11, end_of_turn], stops) == 2
    assert completion_length([10, 11, 12], stops) == 3
    assert completion_length([], stops) == 0
