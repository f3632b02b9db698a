"""Steering: a direction in the subject's layer-L residual space, and the arithmetic that adds it.

An NLA maps vectors to words and words back to vectors, so a direction can be named three ways
(`Steer.source`):

* `vector`: given as numbers (a list, or base64 float32 as the vector endpoints take them);
* `text`: the reconstructor's vector for that text read as an explanation ("ocean" → the AR's idea of a state
  that an explanation saying "ocean" describes);
* `from`: the activation another input produces at layer L, at one of its positions.

Only the direction counts: it is normalised, and the added vector is scaled to the norm of what it is added to,
`alpha · ‖h‖ · unit(direction)`, so one alpha means the same push at every position and on every model (alpha 1
adds a vector as long as the activation itself). alpha 0 returns the input unchanged, bit for bit.

Everything here is pure torch over an `NLA`; the serving layer only passes the spec along.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .checkpoint import NLA

MAX_ALPHA = 10.0
SOURCES = ("vector", "text", "from")
# A direction shorter than this has no usable orientation: normalising it would amplify rounding noise into one.
MIN_NORM = 1e-12
SteerPositions = Literal["all", "new"]


class SteerError(ValueError):
    """A direction that cannot steer (zero, not finite, wrong size, an input position out of range)."""


@dataclass(frozen=True)
class Steer:
    """A resolved steer option: where the direction comes from, how hard to push, and (generation) where.

    `value` is the direction's wire value as canonical JSON, so the spec is hashable and two requests that steer
    the same way compare equal (batches merge on it).
    """

    source: str
    value: str
    alpha: float
    positions: SteerPositions = "all"

    @classmethod
    def of(cls, direction: dict[str, Any], alpha: float, positions: SteerPositions = "all") -> Steer:
        """From the wire's `{direction: {vector | text | from: …}, alpha}`."""
        keys = [k for k in SOURCES if direction.get(k) is not None]
        if len(keys) != 1:
            raise SteerError("direction must have exactly one of vector, text or from")
        if not -MAX_ALPHA <= alpha <= MAX_ALPHA:
            raise SteerError(f"alpha must be between {-MAX_ALPHA:g} and {MAX_ALPHA:g}, got {alpha:g}")
        return cls(keys[0], json.dumps(direction[keys[0]], sort_keys=True), float(alpha), positions)

    @property
    def direction(self) -> Any:
        return json.loads(self.value)

    def describe(self) -> dict[str, Any]:
        """What results echo: the source and alpha (and for text and from, the value; a vector can be long)."""
        out: dict[str, Any] = {"source": self.source, "alpha": self.alpha}
        if self.source != "vector":
            out[self.source] = self.direction
        return out


# -- arithmetic -----------------------------------------------------------------------------------------------------
def unit(direction: Tensor) -> Tensor:
    """The direction scaled to length 1 (float32); zero or non-finite directions are refused."""
    d = direction.detach().float().reshape(-1)
    if not bool(torch.isfinite(d).all()):
        raise SteerError("the steering direction contains NaN or infinite values")
    n = float(d.norm())
    if not n > MIN_NORM:
        raise SteerError("the steering direction is zero: it has no orientation to steer along")
    return d / n


def add_scaled(h: Tensor, direction_unit: Tensor, alpha: float) -> Tensor:
    """`h + alpha · ‖h‖ · u` row by row over the last dimension; `h` itself when alpha is 0 (nothing computed,
    so an unsteered request is exactly an unsteered one)."""
    if alpha == 0:
        return h
    u = direction_unit.to(device=h.device, dtype=torch.float32)
    hf = h.float()
    out = hf + alpha * hf.norm(dim=-1, keepdim=True) * u
    return out.to(h.dtype)


# -- naming a direction ---------------------------------------------------------------------------------------------
def resolve_direction(nla: NLA, steer: Steer, *, max_tokens: int | None = None) -> Tensor:
    """The unit direction a spec names, as a float32 [d] on the subject's device."""
    value = steer.direction
    if steer.source == "vector":
        raw = _vector(nla, value)
    elif steer.source == "text":
        raw = text_direction(nla, value)
    else:
        raw = input_activation(nla, value, max_tokens=max_tokens)
    return unit(raw).to(nla.subject.device)


def _vector(nla: NLA, value: Any) -> Tensor:
    # The wire decoder lives with the vector endpoints, which build on analysis; analysis applies steers, so a
    # module-level import would be circular.
    from .vectors import decode_vectors

    if isinstance(value, str):  # bare base64: one float32 vector
        value = {"data": value, "shape": [nla.d_model]}
    try:
        return decode_vectors(value, d_model=nla.d_model, max_rows=1, what="direction.vector")[0]
    except ValueError as exc:
        raise SteerError(str(exc)) from None


def text_direction(nla: NLA, text: Any) -> Tensor:
    """The reconstructor's vector for `text` read as an explanation, with its neutral current token."""
    if not isinstance(text, str) or not text.strip():
        raise SteerError("direction.text must be a non-empty string")
    rec = nla.reconstructor
    try:
        units = rec.text_units(text)
    except ValueError as exc:
        raise SteerError(f"direction.text: {exc}") from None
    if not units:
        raise SteerError("direction.text has no tokens")
    current = torch.tensor([rec.space_id], dtype=torch.long)
    with torch.no_grad():
        return rec.reconstruct([units], current)[0].float()


def input_activation(nla: NLA, spec: Any, *, max_tokens: int | None = None) -> Tensor:
    """The layer-L activation of `spec["text"]` at `spec["position"]` (negative counts from the end)."""
    if not isinstance(spec, dict) or set(spec) - {"text", "position"}:
        raise SteerError('direction.from must be {"text": …, "position": N}')
    text, position = spec.get("text"), spec.get("position", -1)
    if not isinstance(text, str) or not text.strip():
        raise SteerError("direction.from.text must be a non-empty string")
    if isinstance(position, bool) or not isinstance(position, int):
        raise SteerError("direction.from.position must be an integer")
    acts = activations(nla, text, max_tokens=max_tokens)
    n = acts.shape[0]
    q = position + n if position < 0 else position
    if not 0 <= q < n:
        raise SteerError(f"direction.from.position {position} is outside the {n} tokens of its text")
    return acts[q].float()


def activations(nla: NLA, text: str, *, max_tokens: int | None = None) -> Tensor:
    """[S, d] residual after block L for every token of `text` (blocks 0..L only)."""
    lm = nla.subject
    ids = lm.encode(text)
    if not ids:
        raise SteerError("the text has no tokens")
    if max_tokens is not None and len(ids) > max_tokens:
        raise SteerError(f"the text has {len(ids)} tokens, more than the limit of {max_tokens}")
    with torch.no_grad():
        x_ids = torch.tensor(ids, dtype=torch.long, device=lm.device).unsqueeze(0)
        pos = torch.arange(len(ids), device=lm.device).unsqueeze(0)
        return lm.forward(lm.add_positions(lm.embed(x_ids), pos), pos, stop=nla.layer + 1)[0]
