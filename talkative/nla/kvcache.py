"""Key/value caches for the explicit forwards in `lm.py`.

A cache records, next to every stored key, the absolute position it was computed at (`kpos`, -1 for a slot that
must never be attended to). Attention masks are derived from those positions alone, which lets one mechanism cover
plain causal decoding, a prompt prefix shared by every row, right padding, and rows that may only see part of a
shared cache (the KL forward, where row i sees the clean keys before its own position only).

The HF attention modules call `update(keys, values, layer_idx)` once per block; `begin`/`end` bracket one forward
so the positions of the new keys are known before the first block runs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Cache(Protocol):
    """What `LM.forward` needs from a cache."""

    def begin(self, positions: Tensor) -> Tensor:
        """Register a block of new keys at `positions` [B, q]; return the positions of every visible key [B, K]."""
        ...

    def update(
        self, keys: Tensor, values: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]: ...

    def end(self) -> None: ...


class KVCache:
    """Growable per-layer buffers [B, H, capacity, D]; writes only the new keys at each step.

    Decoding appends one token per step; copying the whole cache each step (as `torch.cat` would) costs more than
    the step's matmuls for wide batches, so keys go into preallocated buffers that double when full.
    """

    def __init__(self, batch: int, capacity: int = 64, device: torch.device | str = "cpu") -> None:
        self.batch = batch
        self.capacity = max(1, capacity)
        self.device = torch.device(device)
        self.length = 0
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.kpos = torch.full((batch, self.capacity), -1, dtype=torch.long, device=self.device)
        self._pending = 0

    # -- protocol -------------------------------------------------------------------------------------------
    def begin(self, positions: Tensor) -> Tensor:
        if positions.shape[0] != self.batch:
            raise ValueError(f"cache holds {self.batch} rows, forward has {positions.shape[0]}")
        q = positions.shape[1]
        self._reserve(self.length + q)
        self.kpos[:, self.length : self.length + q] = positions
        self._pending = q
        return self.kpos[:, : self.length + q]

    def update(
        self, keys: Tensor, values: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        start, stop = self.length, self.length + self._pending
        if layer_idx not in self.keys:
            shape = (self.batch, keys.shape[1], self.capacity, keys.shape[3])
            self.keys[layer_idx] = keys.new_zeros(shape)
            self.values[layer_idx] = values.new_zeros((*shape[:3], values.shape[3]))
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        kb[:, :, start:stop] = keys
        vb[:, :, start:stop] = values
        return kb[:, :, :stop], vb[:, :, :stop]

    def end(self) -> None:
        self.length += self._pending
        self._pending = 0

    # -- shaping --------------------------------------------------------------------------------------------
    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        grow = new_cap - self.capacity
        self.kpos = torch.cat([self.kpos, self.kpos.new_full((self.batch, grow), -1)], dim=1)
        for store in (self.keys, self.values):
            for idx, buf in store.items():
                pad = buf.new_zeros((*buf.shape[:2], grow, buf.shape[3]))
                store[idx] = torch.cat([buf, pad], dim=2)
        self.capacity = new_cap

    def select(self, rows: Tensor, extra_capacity: int = 0, length: int | None = None) -> KVCache:
        """A new cache whose row i is row `rows[i]` of this one (repeat, expand or compact), with room to grow;
        `length` keeps only the first slots (a shorter common prefix)."""
        rows = rows.to(self.device)
        n = self.length if length is None else length
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot keep {n} slots of a cache holding {self.length}")
        out = KVCache(len(rows), n + max(extra_capacity, 1), self.device)
        out.length = n
        out.kpos[:, :n] = self.kpos[rows, :n]
        for idx in self.keys:
            k, v = self.keys[idx], self.values[idx]
            nk = k.new_zeros((len(rows), k.shape[1], out.capacity, k.shape[3]))
            nv = v.new_zeros((len(rows), v.shape[1], out.capacity, v.shape[3]))
            nk[:, :, :n] = k[rows, :, :n]
            nv[:, :, :n] = v[rows, :, :n]
            out.keys[idx], out.values[idx] = nk, nv
        return out

    def repeat_interleave(self, repeats: int, extra_capacity: int = 0) -> KVCache:
        rows = torch.arange(self.batch, device=self.device).repeat_interleave(repeats)
        return self.select(rows, extra_capacity)

    def broadcast(self, batch: int, extra_capacity: int = 0) -> KVCache:
        """Copy a one-row cache (a shared prompt prefix) to `batch` rows."""
        if self.batch != 1:
            raise ValueError("broadcast needs a one-row cache")
        return self.select(torch.zeros(batch, dtype=torch.long, device=self.device), extra_capacity)


class PrefixView:
    """A read-only one-row cache seen by many rows, each with its own visible slots; new keys are not stored.

    Used for the KL forward: row i carries one patched token at position p_i and must see the clean run's keys at
    positions < p_i and nothing after. Materialising B copies of a long cache for every layer would be wasteful,
    so the shared keys are expanded (a view) and concatenated with the single new key per layer, transiently.
    """

    def __init__(self, prefix: KVCache, visible: Tensor) -> None:
        if prefix.batch != 1:
            raise ValueError("PrefixView needs a one-row cache")
        self.prefix = prefix
        self.visible = visible  # [B, S] bool: which prefix slots each row may attend to
        self._kpos: Tensor | None = None

    def begin(self, positions: Tensor) -> Tensor:
        base = self.prefix.kpos[:, : self.prefix.length].expand(positions.shape[0], -1)
        base = torch.where(self.visible, base, torch.full_like(base, -1))
        self._kpos = torch.cat([base, positions], dim=1)
        return self._kpos

    def update(
        self, keys: Tensor, values: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        n = self.prefix.length
        pk = self.prefix.keys[layer_idx][:, :, :n].expand(keys.shape[0], -1, -1, -1)
        pv = self.prefix.values[layer_idx][:, :, :n].expand(values.shape[0], -1, -1, -1)
        return torch.cat([pk, keys], dim=2), torch.cat([pv, values], dim=2)

    def end(self) -> None:
        self._kpos = None


def attention_mask(qpos: Tensor, kpos: Tensor, dtype: torch.dtype, window: int | None = None) -> Tensor:
    """Additive mask [B, 1, q, K]: a query sees keys at positions <= its own (and within `window`, if given)."""
    q = qpos[:, :, None]
    k = kpos[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= (q - k) < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=qpos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
