"""Logit lens and tuned lens read-outs of a residual vector.

The logit lens applies the subject's final norm and unembedding to the layer-L residual. A tuned lens first adds a
learned affine translator (h + W·h + b), with the `tuned-lens` package's conventions:

* translator i reads HF `hidden_states[i]`, the input of block i. Our activation at layer L is the output of block
  L, i.e. `hidden_states[L+1]`, so it goes through translator L+1. After the last block the hidden state is the
  model's own final residual and needs no translator: the tuned lens there is the logit lens.
* a lens directory holds `config.json` (`d_model`, `num_hidden_layers`, `bias`, …) and `params.pt`, the state dict
  of the translator list (`0.weight`, `0.bias`, `1.weight`, …). A `layer_translators.` prefix on the keys (a whole
  lens module's state dict) is accepted too. It is read with `weights_only=True`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .lm import LM

PREFIX = "layer_translators."


class LensError(ValueError):
    pass


def format_top(lm: LM, logits: Tensor, k: int = 10) -> list[str]:
    """Top-k tokens of each row as one readable string: each token quoted, most likely first."""
    top = logits.float().topk(min(k, logits.shape[-1]), dim=-1).indices.tolist()
    out = []
    for row in top:
        toks = [lm.tokenizer.decode([t]) for t in row]
        out.append(" ".join(repr(t) for t in toks))
    return out


def logit_lens(lm: LM, h: Tensor) -> Tensor:
    return lm.logits(lm.final_norm(h.to(lm.dtype)))


class TunedLens(nn.Module):
    """Affine translators; `layer_translators[i]` acts on HF `hidden_states[i]` (the input of block i)."""

    def __init__(self, d_model: int, n_layers: int, *, bias: bool = True) -> None:
        super().__init__()
        self.layer_translators = nn.ModuleList(
            nn.Linear(d_model, d_model, bias=bias) for _ in range(n_layers)
        )

    def forward(self, h: Tensor, index: int) -> Tensor:
        """h + translator_index(h) for hidden states taken at HF `hidden_states[index]`."""
        t: nn.Linear = self.layer_translators[index]  # type: ignore[assignment]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)


def translator_index(layer: int) -> int:
    """The translator for the output of block `layer`: that output is the input of block `layer + 1`."""
    return layer + 1


def _translator_state(state: dict[str, Any], where: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        if key.startswith("unembed."):
            continue  # a whole-lens state dict also carries the unembedding; ours is the subject's own
        parts = name.split(".")
        if len(parts) != 2 or not parts[0].isdigit() or parts[1] not in ("weight", "bias"):
            raise LensError(f"{where} does not look like a tuned lens: unexpected tensor {key!r}")
        if not isinstance(value, Tensor):
            raise LensError(f"{where}: {key!r} is not a tensor")
        out[name] = value
    return out


def load_tuned_lens(directory: str | Path, lm: LM) -> TunedLens:
    """A tuned lens directory as the `tuned-lens` package saves it (`params.pt` + `config.json`)."""
    d = Path(directory)
    params = d / "params.pt"
    if not params.is_file():
        raise LensError(f"tuned lens directory {d} has no params.pt")
    try:
        raw = torch.load(params, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LensError(f"{params} cannot be read as a tensor state dict: {exc}") from None
    if not isinstance(raw, dict):
        raise LensError(f"{params} does not hold a state dict")
    state = _translator_state(raw, params)
    if not state:
        raise LensError(f"{params} holds no layer translators")
    meta: dict[str, Any] = {}
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            meta = dict(json.loads(cfg.read_text()))
        except (ValueError, TypeError) as exc:
            raise LensError(f"{cfg} is not a JSON object: {exc}") from None
    if int(meta.get("d_model", lm.d_model)) != lm.d_model:
        raise LensError(f"tuned lens d_model {meta.get('d_model')} does not match the subject's {lm.d_model}")
    layers = meta.get("num_hidden_layers")
    if layers is not None and int(layers) != lm.n_layers:
        raise LensError(
            f"tuned lens was trained for a model with {layers} blocks; the subject has {lm.n_layers}"
        )
    n = 1 + max(int(k.split(".")[0]) for k in state)
    if n > lm.n_layers:
        raise LensError(f"{params} has {n} translators; the subject has only {lm.n_layers} blocks")
    bias = any(k.endswith(".bias") for k in state)
    lens = TunedLens(lm.d_model, n, bias=bias)
    missing, unexpected = lens.layer_translators.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LensError(
            f"{params} does not look like a tuned lens: missing {missing}, unexpected {unexpected}"
        )
    return lens.eval()


def tuned_lens_logits(lm: LM, lens: TunedLens, h: Tensor, layer: int) -> Tensor:
    """Next-token logits of the tuned lens for activations `h` taken after block `layer`."""
    index = translator_index(layer)
    if index >= lm.n_layers:
        return logit_lens(lm, h)  # the final residual: no translator after the last block
    if index >= len(lens.layer_translators):
        raise LensError(
            f"the tuned lens has translators for hidden states 0..{len(lens.layer_translators) - 1}; layer "
            f"{layer}'s output is hidden state {index}"
        )
    return lm.logits(lm.final_norm(lens(h.float(), index).to(lm.dtype)))
