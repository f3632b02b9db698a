"""Token sampling driven by uniforms the caller supplies.

Each row gets its random numbers from a generator seeded by (request seed, position, sample), drawn before any
model work. Sampling by inverse CDF then needs one uniform per token, and a row's tokens depend only on its own
uniforms and logits: the same seed gives the same explanations whatever else shares the batch.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def row_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for one (seed, key...) stream, independent of every other stream."""
    digest = hashlib.blake2b(repr((int(seed), *map(int, key))).encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def row_uniforms(seed: int, keys: list[tuple[int, ...]], n: int) -> Tensor:
    """[len(keys), n] uniforms in [0, 1), row r from its own stream."""
    if not keys:
        return torch.empty(0, n)
    return torch.stack([torch.rand(n, generator=row_generator(seed, *k)) for k in keys])


def sample_next(logits: Tensor, temperature: float, uniforms: Tensor | None, top_p: float = 1.0) -> Tensor:
    """Next token ids [R] from logits [R, V]; temperature 0 is greedy and ignores the uniforms."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if uniforms is None:
        raise ValueError("sampling at temperature > 0 needs uniforms")
    uniforms = uniforms.to(logits.device)
    # In fp32 whatever the logits' dtype; at temperature 1 without a division pass over [R, V].
    scaled = logits if temperature == 1.0 else logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        keep = (cum - sorted_p) < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        cdf = sorted_p.cumsum(dim=-1)
        idx = torch.searchsorted(cdf, (uniforms.float() * cdf[:, -1]).unsqueeze(-1), right=True).clamp_max(
            cdf.shape[-1] - 1
        )
        return order.gather(-1, idx).squeeze(-1)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (uniforms.float() * cdf[:, -1]).unsqueeze(-1), right=True).clamp_max(
        cdf.shape[-1] - 1
    )
    return idx.squeeze(-1)
