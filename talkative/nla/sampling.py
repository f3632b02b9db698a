"""Token sampling that the shape of the batch cannot change.

Every sampled row has its own random stream, keyed by (request seed, position, sample) and drawn before any model
work: it gives one 63-bit seed per decoding step, and that seed gives the step's noise. A row's tokens therefore
depend only on its own stream and its own logits. Its logits are not bit-identical in every batch, though:
floating-point reductions depend on the batch shape and move logits by ~1e-5. Inverse-CDF sampling (one uniform
against the running sum of all V probabilities) turns such a shift into another token whenever the uniform lies
near any of the V boundaries, and with 49k tokens, many of them tiny, that is often. Here each step is Gumbel-max
instead: token = argmax(logit / τ + g) with g Gumbel noise of that (row, step), so the token changes only when the
two best perturbed scores are closer than the shift.

Drawing V Gumbel variables per row per step would cost about as much as the decode step itself, so the
vocabulary is split into ⌈√V⌉ contiguous blocks: Gumbel-max over the blocks' log-masses (logsumexp of their
logits) picks a block, Gumbel-max over that block's logits picks the token. P(block) · P(token | block) is the
softmax probability exactly, for about 2√V uniforms per row per step (~450 for V = 49,152). A flip then needs a
near-tie between the two best blocks or between the two best tokens of the chosen block.

Temperature 0 is greedy (argmax) and draws nothing.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

SEED_BOUND = (1 << 63) - 1  # step seeds lie in [0, SEED_BOUND)


def row_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for one (seed, key...) stream, independent of every other stream."""
    digest = hashlib.blake2b(repr((int(seed), *map(int, key))).encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") & SEED_BOUND)
    return g


def step_seeds(seed: int, keys: list[tuple[int, ...]], n: int) -> Tensor:
    """[len(keys), n] int64 step seeds: row r's seeds for steps 0..n-1 come from its own (seed, *keys[r]) stream.

    A row's first m seeds do not depend on n, on the other keys, or on their order.
    """
    if not keys:
        return torch.empty(0, n, dtype=torch.long)
    return torch.stack(
        [
            torch.randint(0, SEED_BOUND, (n,), generator=row_generator(seed, *k), dtype=torch.long)
            for k in keys
        ]
    )


def blocks(vocab: int) -> tuple[int, int]:
    """(number of blocks, block size) of the two-level Gumbel-max over a vocabulary of `vocab` tokens."""
    size = max(1, math.isqrt(max(vocab - 1, 0)) + 1)  # ⌈√V⌉
    return -(-vocab // size), size


def noise_size(vocab: int) -> int:
    """Uniforms one sampling step needs per row."""
    n_blocks, size = blocks(vocab)
    return n_blocks + size


def step_uniforms(seeds: Tensor, vocab: int) -> Tensor:
    """[R, noise_size(vocab)] uniforms in [0, 1), row r from a generator seeded with seeds[r]."""
    n = noise_size(vocab)
    g = torch.Generator(device="cpu")
    rows = []
    for s in seeds.tolist():
        g.manual_seed(int(s))
        rows.append(torch.rand(n, generator=g))
    return torch.stack(rows) if rows else torch.empty(0, n)


def _gumbel(u: Tensor) -> Tensor:
    # u = 0 would give -inf noise, a legal but useless draw; the clamp keeps every score finite
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


def gumbel_max(scores: Tensor, uniforms: Tensor) -> Tensor:
    """Token ids [R] distributed as softmax(scores [R, V]), by the two-level Gumbel-max over `uniforms`.

    `uniforms` is [R, noise_size(V)]: the first n_blocks pick the block, the rest the token within it. Scores of
    -inf (masked tokens) are never chosen while a row has a finite score.
    """
    R, V = scores.shape
    n_blocks, size = blocks(V)
    u = uniforms.to(device=scores.device, dtype=torch.float32)
    x = scores.float()
    # block masses as sums of probabilities (softmax is one fused pass); a block whose mass underflows to 0
    # holds only tokens below ~1e-38 and is never picked
    e = torch.softmax(x, dim=-1)
    full = V // size
    mass = e[:, : full * size].view(R, full, size).sum(dim=-1)
    if full < n_blocks:
        mass = torch.cat([mass, e[:, full * size :].sum(dim=-1, keepdim=True)], dim=1)
    block = (mass.log() + _gumbel(u[:, :n_blocks])).argmax(dim=-1)
    idx = block.unsqueeze(1) * size + torch.arange(size, device=x.device)
    within = x.gather(1, idx.clamp_max(V - 1)).masked_fill(idx >= V, float("-inf"))
    inner = (within + _gumbel(u[:, n_blocks : n_blocks + size])).argmax(dim=-1)
    return block * size + inner


def nucleus_mask(scores: Tensor, top_p: float) -> Tensor:
    """`scores` with every token outside the smallest set whose probability reaches top_p set to -inf."""
    probs = torch.softmax(scores, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # never drops the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float, seeds: Tensor | None, top_p: float = 1.0) -> Tensor:
    """Next token ids [R] from logits [R, V] and this step's seeds [R]; temperature 0 is greedy, seeds unused."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if seeds is None:
        raise ValueError("sampling at temperature > 0 needs step seeds")
    # in fp32 whatever the logits' dtype; at temperature 1 without a division pass over [R, V]
    scores = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_p < 1.0:
        scores = nucleus_mask(scores, top_p)
    return gumbel_max(scores, step_uniforms(seeds, logits.shape[-1]))
