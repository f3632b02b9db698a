"""What dtype "auto" resolves to: bfloat16 only where the device computes it natively."""

from __future__ import annotations

from pathlib import Path

import torch

from talkative.nla.precision import bf16_is_fast, resolve_dtype


def test_an_explicit_dtype_is_kept_whatever_the_device() -> None:
    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "meta") == "bfloat16"


def test_auto_follows_the_cpu_flags_and_the_gpu() -> None:
    flags = Path("/proc/cpuinfo").read_text()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert bf16_is_fast("cpu") is native
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_dtype("auto", "meta") == "float32"
    if torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda:0") == (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        )
