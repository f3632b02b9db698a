"""Independent references for the checkpoint-format tests, written from the formats' descriptions with plain HF calls.

They read the checkpoint's own data (upstream state dicts, official AV/AR directories), never our modules: HF
forwards over the whole sequence with `inputs_embeds` (no KV cache), forward hooks on HF blocks only where the
upstream decoder replaces the residual at a block's input or the encoder reads a block's output.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from talkative.nla.sampling import sample_next

GEMMA = {"gemma", "gemma2", "gemma3", "gemma3_text"}


def scale_of(model) -> float:
    cfg = model.config
    return math.sqrt(cfg.hidden_size) if cfg.model_type in GEMMA else 1.0


def body(model):
    """The HF transformer without its head (GPT-2 adds its position embeddings to `inputs_embeds` itself)."""
    return model.transformer if hasattr(model, "transformer") else model.model


def blocks(model):
    b = body(model)
    return b.h if hasattr(b, "h") else b.layers


def rows(model, ids: Sequence[int]) -> Tensor:
    """Raw embedding rows (unscaled), fp32."""
    return model.get_input_embeddings().weight[torch.tensor(list(ids), dtype=torch.long)].float()


@contextlib.contextmanager
def block_input_replaced(model, replacements: dict[int, tuple[int, Tensor]]) -> Iterator[None]:
    """The residual entering block i at position p is `vec`, for every i -> (p, vec)."""
    handles = []
    for i, (p, vec) in replacements.items():

        def pre(module, args, kwargs, p=p, vec=vec):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, p] = vec.to(h.dtype)
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        handles.append(blocks(model)[i].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def block_output(model, inputs_embeds: Tensor, layer: int) -> Tensor:
    """Output of block `layer` (before any final norm) for one sequence of input embeddings [S, d] → [S, d]."""
    seen: dict[str, Tensor] = {}

    def hook(module, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    handle = blocks(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            body(model)(inputs_embeds=inputs_embeds.unsqueeze(0))
    finally:
        handle.remove()
    return seen["h"][0].float()


def activations(model, ids: Sequence[int], layer: int) -> Tensor:
    """A = HF hidden_states[layer + 1] (the output of block `layer`) for a text's token ids."""
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].float()


def sample_token(logits: Tensor, seed: int, temperature: float) -> int:
    """The engine's sampling rule (pinned against softmax by tests/unit/test_sampling.py) on reference logits, with
    one step seed; T = 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    return int(sample_next(logits.float().unsqueeze(0), temperature, torch.tensor([int(seed)]))[0])


# -- upstream ("talkative autoencoder") ---------------------------------------------------------------------------
def upstream_decoder_logits(
    model, dec: dict[str, Tensor], n_patch: int, A: Tensor, tokens: Sequence[int]
) -> Tensor:
    """Raw (un-softcapped) next-token logits after the prompt and each of `tokens`: [len(tokens)+1, V].

    Upstream decoder: [left soft prompt, P_0(A), right soft prompt] × √d (Gemma), then the residual at the placeholder is
    replaced by P_i(A) = W_i A + b_i at the input of blocks 0..N-1; sampled tokens are fed back as embedding
    rows × √d (Gemma); logits = lm_head(final_norm(h)) with no softcap.
    """
    s = scale_of(model)
    W, b = dec["proj_weight"].float(), dec["proj_bias"].float()
    P = [W[i] @ A.float() + b[i] for i in range(max(n_patch, 1))]
    left, right = dec["prompt_left_emb"].float(), dec["prompt_right_emb"].float()
    seq = torch.cat([left, P[0].unsqueeze(0), right, rows(model, tokens)]) * s
    embed_pos = left.shape[0]
    with torch.no_grad(), block_input_replaced(model, {i: (embed_pos, P[i]) for i in range(n_patch)}):
        h = body(model)(inputs_embeds=seq.unsqueeze(0)).last_hidden_state[0]
        logits = model.lm_head(h).float()
    n_prompt = left.shape[0] + 1 + right.shape[0]
    return logits[n_prompt - 1 :]


def upstream_sample(
    model, dec, n_patch: int, A: Tensor, T: int, seeds: Tensor, temperature: float
) -> list[int]:
    tokens: list[int] = []
    for t in range(T):
        logits = upstream_decoder_logits(model, dec, n_patch, A, tokens)[-1]
        tokens.append(sample_token(logits, int(seeds[t]), temperature))
    return tokens


def upstream_encode(model, enc: dict[str, Tensor], flags: dict, expl: Sequence[int], current: int) -> Tensor:
    """Upstream encoder: [soft prefix, explanation rows, soft postfix, current-token row + learned vector] × √d (Gemma) →
    output of block `output_layer` at the last position → optional affine."""
    s = scale_of(model)
    parts = [enc["soft_prompt_embeddings"].float(), rows(model, expl)]
    if "soft_prompt_embeddings_postfix" in enc:
        parts.append(enc["soft_prompt_embeddings_postfix"].float())
    if flags.get("add_current_token"):
        parts.append(rows(model, [current]))
    x = torch.cat(parts)
    if flags.get("special_last_token_vector"):
        x[-1] = x[-1] + enc["special_last_token_vector"].float()
    a = block_output(model, x * s, flags["output_layer"])[-1]
    if flags.get("use_projection_layer"):
        a = a @ enc["proj.weight"].float().T + (enc["proj.bias"].float() if "proj.bias" in enc else 0.0)
    return a


# -- official release ---------------------------------------------------------------------------------------------
def official_prompt_ids(tokenizer, template: str, marker: str) -> list[int]:
    content = template.replace("{injection_char}", marker)
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def official_av_sample(
    av_model,
    tokenizer,
    prompt_ids: Sequence[int],
    marker_id: int,
    v: Tensor,
    injection_scale: float,
    seeds: Tensor,
    temperature: float,
    max_new_tokens: int,
    stop: str = "</explanation>",
    eos: Sequence[int] = (),
) -> tuple[list[int], str]:
    """Official AV: embeddings of the chat prompt (the HF embedding module: ×√d for Gemma), the marker's row replaced by v
    rescaled to norm `injection_scale`; sample until EOS, the stop string or the budget (model logits as the
    model computes them)."""
    emb = av_model.get_input_embeddings()
    E = emb(torch.tensor(list(prompt_ids))).float().clone()
    (p,) = [i for i, t in enumerate(prompt_ids) if t == marker_id]
    E[p] = v.float() / (v.float().norm() / injection_scale)
    out: list[int] = []
    reason = "length"
    for t in range(max_new_tokens):
        x = torch.cat([E, emb(torch.tensor(out, dtype=torch.long)).float()]) if out else E
        with torch.no_grad():
            logits = av_model(inputs_embeds=x.unsqueeze(0)).logits[0, -1].float()
        tok = sample_token(logits, int(seeds[t]), temperature)
        out.append(tok)
        if tok in eos:
            reason = "eos"
            break
        if stop in tokenizer.decode(out):
            reason = "stop"
            break
    return out, reason


def official_ar(ar_model, tokenizer, head: dict[str, Tensor], explanation: str, template: str) -> Tensor:
    """Official AR: BOS + template (add_special_tokens=True), K+1 blocks with the final norm as identity, last token,
    value head."""
    ids = tokenizer(template.replace("{explanation}", explanation), add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        h = body(ar_model)(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].float()
    pred = h @ head["weight"].float().T
    if "bias" in head:
        pred = pred + head["bias"].float()
    return pred


def official_metrics(gold: Tensor, pred: Tensor, variance: float | None) -> dict[str, float | None]:
    d = gold.shape[-1]
    g = gold.double() / gold.double().norm() * math.sqrt(d)
    p = pred.double() / pred.double().norm() * math.sqrt(d)
    mse_nrm = float(((p - g) ** 2).mean())
    cos = float((p @ g) / (p.norm() * g.norm()))
    return {"nmse": mse_nrm, "cosine": cos, "fve": None if variance is None else 1 - mse_nrm / variance}
