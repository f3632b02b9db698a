"""Open an NLA from a checkpoint spec: a checkpoint path of any format, or `init:SOURCE@LAYER` (untrained)."""

from __future__ import annotations

from typing import Any

from .checkpoint import NLA, CheckpointError, load_nla
from .lm import LMPool

INIT_PREFIX = "init:"


def parse_init(spec: str) -> tuple[str, int]:
    body = spec[len(INIT_PREFIX) :]
    source, sep, layer = body.rpartition("@")
    if not sep or not layer.lstrip("-").isdigit():
        raise CheckpointError(f"untrained spec must look like init:SOURCE@LAYER, got {spec!r}")
    return source, int(layer)


def open_nla(
    spec: str, *, pool: LMPool | None = None, dtype: str = "float32", layer: int | None = None, **kwargs: Any
) -> NLA:
    """`layer` overrides the layer of an untrained init (a trained checkpoint's layer is fixed)."""
    pool = pool or LMPool(dtype=dtype)
    if spec.startswith(INIT_PREFIX):
        source, init_layer = parse_init(spec)
        lm = pool.get(source)
        return NLA.init(lm, init_layer if layer is None else layer, subject_source=source)
    nla = load_nla(spec, pool=pool, **kwargs)
    if layer is not None and layer != nla.layer:
        raise CheckpointError(f"{spec} explains layer {nla.layer}; --layer {layer} needs another checkpoint")
    return nla
