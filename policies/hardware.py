"""Which float type this machine runs fastest without losing accuracy: bf16 or fp32.

bf16 halves the memory traffic of fp32 and doubles CPU throughput, but only where the
hardware has BF16 instructions (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``). On a
CPU without them (e.g. AVX2 only) PyTorch emulates bf16 and runs several times *slower*
than fp32. ``"auto"`` therefore means bf16 on a GPU that supports it and on a CPU with
native BF16, fp32 everywhere else. Every place that picks a dtype (policies, training
autocast) asks :func:`resolve_dtype` / :func:`use_bf16`, so one rule holds everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# CPU feature flags (as /proc/cpuinfo spells them) that mean bf16 matmuls run in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in a ``/proc/cpuinfo`` text (x86 ``flags``, Arm
    ``Features``); empty when the text has neither line."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str] | set[str]) -> bool:
    """True when the CPU flags include a BF16 matmul instruction set."""
    return bool(NATIVE_BF16_FLAGS & set(flags))


def cpu_has_native_bf16() -> bool:
    """True when this machine's CPU computes bf16 in hardware (False when unknown)."""
    return has_native_bf16(_machine_cpu_flags())


def choose_dtype(
    name: str, *, cuda: bool, cuda_bf16: bool, cpu_flags: frozenset[str] | set[str]
) -> tuple[torch.dtype, str]:
    """The torch dtype ``name`` means on a machine described by the arguments, and why.

    ``name`` is ``"auto"`` or a key of :data:`DTYPES`; explicit names are taken as given.
    """
    if name != AUTO:
        if name not in DTYPES:
            raise ValueError(
                f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}; "
                "fix: use 'auto' to pick bf16 or fp32 by the machine"
            )
        return DTYPES[name], "as configured"
    if cuda:
        if cuda_bf16:
            return torch.bfloat16, "GPU with bf16 support"
        return torch.float32, "GPU without bf16 support"
    if has_native_bf16(cpu_flags):
        return torch.bfloat16, f"CPU with native BF16: {_flag_summary(cpu_flags)}"
    return torch.float32, f"CPU without native BF16: {_flag_summary(cpu_flags)}"


def _flag_summary(flags: frozenset[str] | set[str]) -> str:
    bf16 = sorted(NATIVE_BF16_FLAGS & set(flags))
    if bf16:
        return ", ".join(bf16)
    vector = [f for f in ("avx512f", "avx2", "avx", "asimd") if f in flags]
    return vector[0] if vector else "no vector flags seen"


# The flags that decide CPU inference speed, shown beside every benchmark figure.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd")


def machine_summary() -> str:
    """This machine's CPU model, core count and vector flags, for benchmark headers: speed
    figures differ several-fold between AVX2-only and AVX-512 + BF16 machines."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    flags = [f for f in VECTOR_FLAGS if f in _machine_cpu_flags()]
    return f"{model}; {os.cpu_count()} CPUs; vector flags: {' '.join(flags) or 'none seen'}"


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype ``name`` means on this machine; ``"auto"`` logs its choice once."""
    cuda = torch.cuda.is_available()
    flags = frozenset() if cuda else _machine_cpu_flags()
    dtype, why = choose_dtype(
        name, cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), cpu_flags=flags
    )
    if name == AUTO:
        _announce(f"dtype auto -> {str(dtype).removeprefix('torch.')} ({why})")
    return dtype


def use_bf16() -> bool:
    """Whether training should run in bf16 autocast here: the same rule as ``"auto"``."""
    return resolve_dtype(AUTO) == torch.bfloat16


@functools.cache
def _machine_cpu_flags() -> frozenset[str]:
    try:
        return cpu_flags(CPUINFO.read_text())
    except OSError:  # no /proc (macOS, Windows): assume emulated bf16, the safe side
        return frozenset()


@functools.cache
def _announce(message: str) -> None:
    # On stderr as well as the log: a person waiting on a slow CPU run should see why it
    # is fp32, and stdout stays free for the commands that print tables or JSON.
    log.info(message)
    print(message, file=sys.stderr, flush=True)
