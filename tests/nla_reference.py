"""Straightforward references for the NLA engine's numbers, written with plain HF calls.

Nothing here uses `LM.forward`, `KVCache` or `PrefixView`: every reference runs the HF model's own forward over
the whole sequence (no cache), with `inputs_embeds` for soft inputs and temporary hooks on the HF blocks where a
residual must be overwritten. Tests compare the engine's rows against these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

GEMMA_TYPES = {"gemma", "gemma2", "gemma3", "gemma3_text"}


def embed_scale(lm) -> float:
    """What the HF embedding module multiplies token rows by (Gemma: √d); soft inputs need the same."""
    cfg = lm.model.config
    return math.sqrt(cfg.hidden_size) if cfg.model_type in GEMMA_TYPES else 1.0


def hf_blocks(lm):
    m = lm.model
    return m.transformer.h if hasattr(m, "transformer") else m.model.layers


def hf_input_embeddings(lm, ids: Tensor) -> Tensor:
    """The HF embedding module's output (scaled for Gemma): what `inputs_embeds` must hold for token ids."""
    return lm.model.get_input_embeddings()(ids)


def hf_block_output(lm, layer: int, **forward_kwargs) -> Tensor:
    """[B, S, d] output of HF block `layer` in a full HF forward, captured by a temporary hook.

    This is `hidden_states[layer + 1]` except for the last block, whose HF hidden state has the final norm applied;
    the activation (like upstream's hook) is the block output before it.
    """
    got: list[Tensor] = []

    def hook(module, args, out):
        got.append(out[0] if isinstance(out, tuple) else out)

    handle = hf_blocks(lm)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = lm.model(output_hidden_states=True, **forward_kwargs)
    finally:
        handle.remove()
    if layer < len(hf_blocks(lm)) - 1:  # the hook and HF's own hidden_states agree away from the last block
        torch.testing.assert_close(got[0], out.hidden_states[layer + 1])
    return got[0].float()


def hf_activations(lm, ids: Sequence[int], layer: int) -> Tensor:
    """[S, d] residual after block `layer` (HF `hidden_states[layer + 1]` below the last block)."""
    return hf_block_output(lm, layer, input_ids=torch.tensor([list(ids)]))[0]


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def replace_block_input(lm, replacements: dict[int, tuple[int, Tensor]]) -> Iterator[None]:
    """While active, the residual entering HF block i at position p is `vec` for every (i -> (p, vec))."""
    handles = []
    for i, (p, vec) in replacements.items():

        def pre(module, args, kwargs, p=p, vec=vec):
            h = _hidden(args, kwargs).clone()
            h[:, p] = vec.to(h.dtype)
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        handles.append(hf_blocks(lm)[i].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextlib.contextmanager
def replace_block_output(lm, layer: int, pos: int, vec: Tensor) -> Iterator[None]:
    """While active, HF block `layer`'s output at position `pos` is `vec` (the rest of the run sees it)."""

    def post(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, pos] = vec.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = hf_blocks(lm)[layer].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def hf_logits(lm, ids: Sequence[int]) -> Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([list(ids)])).logits[0].float()


def hf_patched_logits(lm, ids: Sequence[int], layer: int, pos: int, vec: Tensor) -> Tensor:
    """Next-token logits at `pos` of a full forward with block `layer`'s output at `pos` replaced by `vec`."""
    with torch.no_grad(), replace_block_output(lm, layer, pos, vec):
        return lm.model(torch.tensor([list(ids)])).logits[0, pos].float()


def kl_nats(p_logits: Tensor, q_logits: Tensor) -> float:
    """KL(P ‖ Q) in nats, by hand, in float64."""
    lp = p_logits.double() - torch.logsumexp(p_logits.double(), -1)
    lq = q_logits.double() - torch.logsumexp(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


# -- reconstructor (upstream soft-prompt AR) -----------------------------------------------------------------------
def hf_soft_reconstruct(rec, expl_ids: Sequence[int], current_id: int | None) -> Tensor:
    """Â [d]: [soft prefix][explanation][soft postfix][current token + learned vector] → block output_layer, last."""
    lm = rec.lm
    dt = lm.model.dtype
    rows = lm.model.get_input_embeddings().weight.detach()  # unscaled rows; the scale is applied once, below
    parts = [rec.soft_prompt.detach().to(dt), rows[list(expl_ids)]]
    if rec.soft_prompt_post is not None:
        parts.append(rec.soft_prompt_post.detach().to(dt))
    if rec.add_current_token:
        parts.append(rows[[current_id]])
    x = torch.cat(parts)
    if rec.special_vector is not None:  # added to whatever comes last (upstream: x[:, -1] += v)
        x = torch.cat([x[:-1], (x[-1:].float() + rec.special_vector.detach()).to(dt)])
    x = (x * embed_scale(lm)).unsqueeze(0)
    out = hf_block_output(lm, rec.output_layer, inputs_embeds=x)[0, -1]
    with torch.no_grad():
        return rec.head(out) if rec.head is not None else out


def hf_template_reconstruct(rec, text: str) -> Tensor:
    """Official AR: the whole template tokenized at once, last token of block output_layer, value head."""
    lm = rec.lm
    ids = lm.tokenizer(rec.pre_text + text + rec.post_text, add_special_tokens=True)["input_ids"]
    out = hf_block_output(lm, rec.output_layer, input_ids=torch.tensor([ids]))[0, -1]
    with torch.no_grad():
        return rec.head(out)


# -- verbalizers -----------------------------------------------------------------------------------------------
def projection(v, A: Tensor, i: int) -> Tensor:
    return (v.proj_weight[i].detach() @ A.float() + v.proj_bias[i].detach()).to(v.lm.model.dtype)


def layer_replacement_prompt(
    v, A: Tensor, left: Tensor | None = None, right: Tensor | None = None, add_ids: Sequence[int] = ()
) -> tuple[Tensor, int]:
    """inputs_embeds [P, d] of the AV prompt for one activation, and the placeholder index."""
    lm = v.lm
    dt = lm.model.dtype
    s = embed_scale(lm)
    left = v.prompt_left_emb.detach().to(dt) if left is None else left.to(dt)
    right = v.prompt_right_emb.detach().to(dt) if right is None else right.to(dt)
    add = lm.model.get_input_embeddings().weight[list(add_ids)].detach().to(dt)
    x = torch.cat([left, projection(v, A, 0).unsqueeze(0), right, add]) * s
    return x, left.shape[0]


def hf_greedy_layer_replacement(
    v, A: Tensor, steps: int, left: Tensor | None = None, right: Tensor | None = None, add_ids=()
) -> list[int]:
    """Greedy decode through the HF model, no cache: every step re-runs the whole sequence with the placeholder's
    residual replaced by W_i·A + b_i at the input of blocks i < N."""
    lm = v.lm
    x, n_left = layer_replacement_prompt(v, A, left, right, add_ids)
    reps = {i: (n_left, projection(v, A, i)) for i in range(v.patch_layers)}
    out: list[int] = []
    with torch.no_grad(), replace_block_input(lm, reps):
        for _ in range(steps):
            logits = lm.model(inputs_embeds=x.unsqueeze(0)).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            x = torch.cat([x, hf_input_embeddings(lm, torch.tensor([tok]))])
    return out


def hf_greedy_embedding_replacement(v, A: Tensor, steps: int, add_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decode through the HF model: the marker's input embedding replaced by A rescaled to the injection
    norm, stopping at an end-of-turn token."""
    lm = v.lm
    ids = list(v.prompt_ids) + list(add_ids)
    x = hf_input_embeddings(lm, torch.tensor(ids)).clone()
    a = A.float()
    x[v.inject_pos] = (a if v.injection_scale is None else a / a.norm() * v.injection_scale).to(x.dtype)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            tok = int(lm.model(inputs_embeds=x.unsqueeze(0)).logits[0, -1].argmax())
            out.append(tok)
            if tok in v.eos_ids:
                break
            x = torch.cat([x, hf_input_embeddings(lm, torch.tensor([tok]))])
    return out


# -- metrics by hand ---------------------------------------------------------------------------------------------
def ref_metrics(a: Tensor, b: Tensor, variance: float | None) -> dict[str, float | None]:
    a, b = a.double(), b.double()
    d = a.numel()
    diff = a - b
    mse = float((diff**2).sum() / d)
    cos = float((a @ b) / (a.norm() * b.norm()))
    an = a / a.norm() * math.sqrt(d)
    bn = b / b.norm() * math.sqrt(d)
    nmse = float(((an - bn) ** 2).sum() / d)
    return {
        "mse": mse,
        "relative_rmse": math.sqrt(float((diff**2).sum())) / math.sqrt(float((a**2).sum())),
        "cosine": cos,
        "nmse": nmse,
        "fve": None if variance is None else 1.0 - nmse / variance,
    }


# -- tiny NLAs for tests -----------------------------------------------------------------------------------------
def sharpen(lm, factor: float = 30.0):
    """Scale the final norm so a random tiny model's next-token distributions are peaked, like a trained one's
    (near-uniform logits over 49k tokens make every sample a near-tie)."""
    norm = lm.model.transformer.ln_f if hasattr(lm.model, "transformer") else lm.model.model.norm
    with torch.no_grad():
        if lm.model.config.model_type in GEMMA_TYPES:  # Gemma's RMSNorm multiplies by (1 + weight)
            norm.weight.copy_((1 + norm.weight) * factor - 1)
        else:
            norm.weight.mul_(factor)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(factor)
    return lm


def perturb(module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trained tensor away from its init (identity projections, zero vectors) so tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() == 0:
                continue
            if p.float().abs().max() == 0:  # zero-initialised vectors: give them a scale of their own
                p.add_(torch.randn(p.shape, generator=g) * scale)
            else:
                p.add_(
                    torch.randn(p.shape, generator=g) * scale * (p.float().std() if p.numel() > 1 else 1.0)
                )


def tiny_nla(
    make_tiny,
    kind: str = "llama",
    *,
    layer: int = 1,
    patch_layers: int = 2,
    t_text: int = 4,
    seed: int = 0,
    fve_variance: float | None = 0.8,
    **kwargs,
):
    """An upstream-style NLA over a sharpened tiny random model, its trained tensors moved off their init."""
    from talkative.nla.checkpoint import NLA

    lm = sharpen(make_tiny(kind, seed=seed))
    nla = NLA.init(
        lm,
        layer,
        patch_layers=patch_layers,
        t_text=t_text,
        fve_variance=fve_variance,
        subject_source=f"tiny-{kind}",
        **kwargs,
    )
    perturb(nla.verbalizer, seed + 1)
    perturb(nla.reconstructor, seed + 2)
    return nla


OFFICIAL_TEMPLATE = "Explain the vector <concept>{injection_char}</concept> in a few words."


def tiny_official_nla(
    make_tiny, kind: str = "llama", *, layer: int = 1, max_new_tokens: int = 6, seed: int = 0
):
    """An official-style NLA (embedding replacement AV, template AR) over a sharpened tiny model."""
    from talkative.nla.checkpoint import NLA
    from talkative.nla.reconstructor import TemplateReconstructor
    from talkative.nla.verbalizer import EmbeddingReplacementVerbalizer

    lm = sharpen(make_tiny(kind, seed=seed))
    v = EmbeddingReplacementVerbalizer(
        lm, template=OFFICIAL_TEMPLATE, marker="§", injection_scale=12.0, max_new_tokens=max_new_tokens
    )
    r = TemplateReconstructor(lm, output_layer=2)
    perturb(r, seed + 2)
    return NLA(
        subject=lm,
        layer=layer,
        verbalizer=v,
        reconstructor=r,
        subject_source=f"tiny-{kind}",
        objective="nmse",
        fve_variance=0.9,
    )
