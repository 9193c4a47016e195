"""dtype "auto": bf16 only where the machine computes it natively, fp32 elsewhere.

The rule is a pure function of the CPU flags, so both kinds of machine are tested here
whatever this machine is.
"""

from __future__ import annotations

import pytest
import torch

from policies import PolicySpec, hardware
from policies.hardware import choose_dtype, cpu_flags, has_native_bf16, resolve_dtype

# Abridged /proc/cpuinfo texts of the two kinds of x86 machine this project runs on, and
# the Features line of an Arm CPU with BF16 (Neoverse V1).
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2
"""
AVX512_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16\n"


def _choose_on_cpu(cpuinfo: str, name: str = "auto") -> tuple[torch.dtype, str]:
    return choose_dtype(name, cuda=False, cuda_bf16=False, cpu_flags=cpu_flags(cpuinfo))


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    assert {"avx2", "fma"} <= cpu_flags(AVX2_ONLY) and "avx512f" not in cpu_flags(AVX2_ONLY)
    assert "avx512_bf16" in cpu_flags(AVX512_BF16)
    assert "bf16" in cpu_flags(ARM_BF16)
    assert cpu_flags("processor\t: 0\n") == frozenset()


def test_auto_is_fp32_on_a_cpu_without_native_bf16() -> None:
    dtype, why = _choose_on_cpu(AVX2_ONLY)
    assert dtype == torch.float32
    assert why == "CPU without native BF16: avx2"
    assert not has_native_bf16(cpu_flags(AVX2_ONLY))


def test_auto_is_bf16_on_a_cpu_with_native_bf16() -> None:
    dtype, why = _choose_on_cpu(AVX512_BF16)
    assert dtype == torch.bfloat16 and why == "CPU with native BF16: amx_bf16, avx512_bf16"
    assert _choose_on_cpu(ARM_BF16)[0] == torch.bfloat16


def test_auto_on_a_gpu_follows_its_bf16_support() -> None:
    no_flags: frozenset[str] = frozenset()
    assert choose_dtype("auto", cuda=True, cuda_bf16=True, cpu_flags=no_flags)[0] == torch.bfloat16
    assert choose_dtype("auto", cuda=True, cuda_bf16=False, cpu_flags=no_flags)[0] == torch.float32


def test_an_explicit_dtype_is_kept_whatever_the_machine() -> None:
    assert _choose_on_cpu(AVX2_ONLY, "bfloat16") == (torch.bfloat16, "as configured")
    assert _choose_on_cpu(AVX512_BF16, "float32") == (torch.float32, "as configured")


def test_an_unknown_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"dtype must be 'auto' or one of .*got 'fp8'"):
        _choose_on_cpu(AVX2_ONLY, "fp8")


def test_policy_spec_defaults_to_auto_and_resolves_on_this_machine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = PolicySpec()
    assert spec.dtype == "auto"
    hardware._announce.cache_clear()
    dtype = resolve_dtype(spec.dtype)
    assert dtype in (torch.bfloat16, torch.float32)
    # Said once, with the reason, so a person on a slow CPU run sees why it is fp32.
    name = str(dtype).removeprefix("torch.")
    assert capsys.readouterr().err.count(f"dtype auto -> {name} (") == 1
    resolve_dtype(spec.dtype)
    assert "dtype auto" not in capsys.readouterr().err
    assert resolve_dtype("float32") == torch.float32
