"""Logit lens and tuned lens read-outs of a residual vector.

The logit lens applies the subject's final norm and unembedding to the layer-L residual. A tuned lens first adds a
learned per-layer affine translator (h + W·h + b), as in the `tuned-lens` package's directory layout:
`config.json` plus `params.pt` holding `layer_translators.{i}.weight/bias`, loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .lm import LM


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
    def __init__(self, d_model: int, n_layers: int) -> None:
        super().__init__()
        self.layer_translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))

    def forward(self, h: Tensor, layer: int) -> Tensor:
        t: nn.Linear = self.layer_translators[layer]  # type: ignore[assignment]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)


def load_tuned_lens(directory: str | Path, lm: LM) -> TunedLens:
    d = Path(directory)
    params = d / "params.pt"
    if not params.is_file():
        raise LensError(f"tuned lens directory {d} has no params.pt")
    state = torch.load(params, map_location="cpu", weights_only=True)
    n = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layer_translators.")), default=-1)
    cfg = d / "config.json"
    if cfg.is_file():
        meta = json.loads(cfg.read_text())
        if int(meta.get("d_model", lm.d_model)) != lm.d_model:
            raise LensError(
                f"tuned lens d_model {meta.get('d_model')} does not match the subject's {lm.d_model}"
            )
    if n == 0:
        raise LensError(f"{params} holds no layer_translators")
    lens = TunedLens(lm.d_model, n)
    missing, unexpected = lens.load_state_dict(state, strict=False)
    if missing or [k for k in unexpected if not k.startswith("unembed")]:
        raise LensError(
            f"{params} does not look like a tuned lens: missing {missing}, unexpected {unexpected}"
        )
    return lens.eval()


def tuned_lens_logits(lm: LM, lens: TunedLens, h: Tensor, layer: int) -> Tensor:
    if layer >= len(lens.layer_translators):
        raise LensError(
            f"the tuned lens has translators for {len(lens.layer_translators)} layers, not layer {layer}"
        )
    return lm.logits(lm.final_norm(lens(h.float(), layer).to(lm.dtype)))
