"""Which dtype "auto" means on a device: bfloat16 where the hardware computes it fast, else float32.

bf16 halves the weights' memory everywhere, but it is only faster where the matrix units take it natively: every
CUDA GPU with bf16 support (Ampere and later) and CPUs with AVX512-BF16 or AMX instructions (about 2.6× the fp32
matmul speed on this project's machines). On other CPUs bf16 is emulated and slower than fp32, so "auto" keeps
float32 there. Whether a checkpoint keeps its fidelity in bf16 is measured per checkpoint
(`scripts/speed_and_dtype.py`: held-out FVE in bf16 against fp32) before "auto" becomes its default.
"""

from __future__ import annotations

from pathlib import Path

import torch

AUTO = "auto"


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (faster than float32) on this device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_dtype(choice: str, device: str | torch.device = "cpu") -> str:
    """The dtype name to load weights in: `choice` itself, or for "auto" bfloat16 where `bf16_is_fast`."""
    if choice == AUTO:
        return "bfloat16" if bf16_is_fast(device) else "float32"
    return choice
