"""Per-token analysis: explain every position's layer-L activation and measure how faithful the explanation is.

The work is split so a scheduler can interleave and merge requests:

* `prepare` tokenizes the input, extracts the activations (early exit at block L, or a full clean run with its KV
  cache kept when KL is wanted) and picks the positions to analyse;
* `run_batch` analyses a batch of positions that may come from several prepared inputs with compatible options:
  best-of-k explanations (KV cache of the prompt shared by all rows and by the k samples of a position), one
  reconstructor pass for all samples, one for all salience ablations, and the KL of the subject's next-token
  prediction with the reconstruction patched in, each position costing one token through blocks L+1..end;
* `analyze` does both for one input, batch by batch, with progress and cancellation between batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import metrics as M
from .checkpoint import NLA
from .kvcache import KVCache, PrefixView
from .lens import TunedLens, format_top, logit_lens, tuned_lens_logits
from .options import AnalyzeOptions, ChatMessage, Resolved, resolve
from .reconstructor import SoftPromptReconstructor
from .sampling import row_uniforms
from .verbalizer import Explanation, LayerReplacementVerbalizer, PromptOverrides, encode_piece

DEFAULT_ROW_BUDGET = 256
KL_ROW_TOKENS = 1 << 17  # rows x cached tokens per KL sub-batch, bounds the transient key/value copies
OUTLIER_FACTOR = 5.0


class AnalysisError(ValueError):
    """Bad input or options for an analysis; the message is meant for the user."""


class Cancelled(Exception):
    """The caller asked to stop; no partial result is kept."""


@dataclass
class CleanRun:
    cache: KVCache  # every block's keys/values for the whole input (one row)
    final: Tensor  # final-normed hidden states [S, d]


@dataclass
class Prepared:
    """An input made ready for `run_batch`: ids, activations at layer L and the positions to analyse."""

    ids: list[int]
    tokens: list[str]
    positions: list[int]
    acts: Tensor  # [S, d] residual after block L
    options: Resolved
    clean: CleanRun | None = None
    text: str = ""
    seed: int = 42
    outliers: set[int] = field(default_factory=set)
    extract_seconds: float = 0.0


@dataclass
class Analysis:
    rows: list[dict[str, Any]]
    metadata: dict[str, Any]


Progress = Callable[[int, int], None]
Check = Callable[[], bool]


# -- input --------------------------------------------------------------------------------------------------------
def render_messages(nla: NLA, messages: Sequence[ChatMessage | dict[str, str]]) -> str:
    """The subject's chat template over the messages: a trailing user turn gets the generation prompt."""
    msgs = [m.model_dump() if isinstance(m, ChatMessage) else dict(m) for m in messages]
    if not msgs:
        raise AnalysisError("messages is empty")
    tok = nla.subject.tokenizer
    if not getattr(tok, "chat_template", None):
        raise AnalysisError(f"{nla.subject_source} has no chat template; send text instead of messages")
    last_user = msgs[-1]["role"] == "user"
    return str(
        tok.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=last_user,
            continue_final_message=not last_user and msgs[-1]["role"] == "assistant",
        )
    )


def _message_start(nla: NLA, messages: Sequence[Any], n: int, full_ids: list[int]) -> int:
    """Token index where the last `n` messages begin (0 when n covers them all)."""
    if n >= len(messages):
        return 0
    head = [m.model_dump() if isinstance(m, ChatMessage) else dict(m) for m in messages[:-n]]
    tok = nla.subject.tokenizer
    text = str(tok.apply_chat_template(head, tokenize=False, add_generation_prompt=False))
    head_ids = nla.subject.encode(text)
    k = 0
    for a, b in zip(head_ids, full_ids, strict=False):
        if a != b:
            break
        k += 1
    return k


def prepare(
    nla: NLA,
    text: str | None = None,
    messages: Sequence[ChatMessage | dict[str, str]] | None = None,
    options: AnalyzeOptions | dict[str, Any] | Resolved | None = None,
    *,
    max_tokens: int | None = None,
    positions: Sequence[int] | None = None,
) -> Prepared:
    opts = options if isinstance(options, Resolved) else resolve(options)
    if (text is None) == (messages is None):
        raise AnalysisError("give exactly one of text or messages")
    if opts.last_n_messages is not None and messages is None:
        raise AnalysisError("last_n_messages applies to chat messages only")
    if opts.chat_format is not None and opts.chat_format != (messages is not None):
        raise AnalysisError(
            "use_chat_format=true needs the chat sent as messages"
            if opts.chat_format
            else "use_chat_format=false contradicts the messages sent; send text instead"
        )
    rendered = text if text is not None else render_messages(nla, messages or [])
    if not rendered.strip():
        raise AnalysisError("the text is empty")
    lm = nla.subject
    ids = lm.encode(rendered)
    if not ids:
        raise AnalysisError("the text has no tokens")
    if max_tokens is not None and len(ids) > max_tokens:
        raise AnalysisError(f"the input has {len(ids)} tokens, more than the limit of {max_tokens}")
    start = 0
    if messages is not None and opts.last_n_messages is not None:
        start = _message_start(nla, messages, opts.last_n_messages, ids)
    chosen = list(range(start, len(ids)))
    if positions is not None:
        chosen = _resolve_positions(positions, len(ids))
    t0 = time.perf_counter()
    with torch.no_grad():
        acts, clean = _extract(nla, ids, want_clean=opts.kl)
    norms = acts.float().norm(dim=-1)
    outliers: set[int] = set()
    if len(ids) >= 4:
        med = float(norms.median())
        outliers = {i for i, n in enumerate(norms.tolist()) if n > OUTLIER_FACTOR * med}
    tokens = [lm.tokenizer.decode([t]) for t in ids]
    return Prepared(
        ids=ids,
        tokens=tokens,
        positions=chosen,
        acts=acts,
        options=opts,
        clean=clean,
        text=rendered,
        seed=opts.seed,
        outliers=outliers,
        extract_seconds=time.perf_counter() - t0,
    )


def _resolve_positions(positions: Sequence[int], n: int) -> list[int]:
    out = []
    for p in positions:
        q = p + n if p < 0 else p
        if not 0 <= q < n:
            raise AnalysisError(f"position {p} is outside the {n} tokens of the input")
        out.append(q)
    return sorted(set(out))


def _extract(nla: NLA, ids: list[int], *, want_clean: bool) -> tuple[Tensor, CleanRun | None]:
    lm = nla.subject
    x_ids = torch.tensor(ids, dtype=torch.long, device=lm.device).unsqueeze(0)
    positions = torch.arange(len(ids), device=lm.device).unsqueeze(0)
    x = lm.add_positions(lm.embed(x_ids), positions)
    if not want_clean:
        return lm.forward(x, positions, stop=nla.layer + 1)[0], None
    captured: dict[str, Tensor] = {}

    def capture(i: int, h: Tensor) -> Tensor:
        if i == nla.layer + 1:
            captured["h"] = h[0]
        return h

    cache = KVCache(1, len(ids))
    out = lm.forward(x, positions, cache=cache, patch=capture)
    acts = captured.get("h", out[0])
    return acts, CleanRun(cache=cache, final=lm.final_norm(out[0]))


# -- the batch ----------------------------------------------------------------------------------------------------
def overrides_for(nla: NLA, opts: Resolved) -> PromptOverrides:
    lm = nla.verbalizer.lm
    add_ids: list[int] = []
    for piece in opts.add_tokens:
        add_ids.extend(encode_piece(lm, piece))
    if (
        opts.replace_left is not None or opts.replace_right is not None or opts.hard_tokens
    ) and not isinstance(nla.verbalizer, LayerReplacementVerbalizer):
        raise AnalysisError(
            "replace_left, replace_right and do_hard_tokens need a layer-replacement (soft prompt) verbalizer"
        )
    if isinstance(nla.verbalizer, LayerReplacementVerbalizer) and len(add_ids) > nla.verbalizer.t_text:
        raise AnalysisError(
            f"add_tokens gives {len(add_ids)} tokens; explanations here are {nla.verbalizer.t_text} tokens long"
        )
    return PromptOverrides(
        add_ids=add_ids,
        replace_left_ids=None if opts.replace_left is None else encode_piece(lm, opts.replace_left),
        replace_right_ids=None if opts.replace_right is None else encode_piece(lm, opts.replace_right),
        hard_tokens=opts.hard_tokens,
    )


def check_options(nla: NLA, opts: Resolved, tuned: TunedLens | None = None) -> None:
    """Refuse options the NLA cannot honour, before any work is queued."""
    overrides_for(nla, opts)
    if opts.tuned_lens and tuned is None:
        raise AnalysisError("tuned_lens needs a tuned lens directory (TUNED_LENS_DIR); none is configured")


def _steps(nla: NLA, overrides: PromptOverrides) -> int:
    v = nla.verbalizer
    if isinstance(v, LayerReplacementVerbalizer):
        return max(v.t_text - len(overrides.add_ids), 1)
    return v.max_new_tokens


def _units(nla: NLA, expl: Explanation) -> list[int]:
    r = nla.reconstructor
    if isinstance(r, SoftPromptReconstructor):
        if r.lm.tokenizer is nla.verbalizer.lm.tokenizer or isinstance(
            nla.verbalizer, LayerReplacementVerbalizer
        ):
            return list(expl.ids)
        return encode_piece(r.lm, expl.text)
    return r.units(expl.text)


def _score(nla: NLA, a: Tensor, b: Tensor) -> Tensor:
    return M.nmse(a, b) if nla.objective == "nmse" else M.mse(a, b)


def scales_to_norm(nla: NLA) -> bool:
    """Whether reconstructions are rescaled to ‖A‖ before use: a direction-only objective (nmse) never constrains
    the reconstructor's output norm, so its raw norm is arbitrary and would dominate every unit-dependent number
    (mse, relative RMSE, the vector patched in for KL) without saying anything about the explanation."""
    return nla.objective == "nmse"


def reported_reconstruction(nla: NLA, A: Tensor, hats: Tensor) -> Tensor:
    """Â as the metrics, the KL patch and `return_vectors` use it: rescaled to ‖A‖ under a direction-only
    objective, as the reconstructor gave it otherwise."""
    return M.rescale_to_norm(hats, A) if scales_to_norm(nla) else hats


def _truncated(nla: NLA, explanations: Sequence[Explanation]) -> Tensor:
    """Which samples hit the token budget. Fixed-length verbalizers always stop there by design; for free-length
    ones a sample that did not end on its own is a failed sample in the reference recipe."""
    if isinstance(nla.verbalizer, LayerReplacementVerbalizer):
        return torch.zeros(len(explanations), dtype=torch.bool)
    return torch.tensor([e.finish_reason == "length" for e in explanations], dtype=torch.bool)


def _complete_first(scores: Tensor, truncated: Tensor) -> Tensor:
    """Scores [G, k] with truncated samples ranked after every complete one of their position."""
    ruled_out = truncated & ~truncated.all(dim=1, keepdim=True)
    return scores.masked_fill(ruled_out, float("inf"))


def _timed(timings: dict[str, float] | None, name: str, t0: float) -> float:
    now = time.perf_counter()
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + now - t0
    return now


def run_batch(
    nla: NLA,
    parts: Sequence[tuple[Prepared, Sequence[int]]],
    opts: Resolved,
    *,
    tuned: TunedLens | None = None,
    timings: dict[str, float] | None = None,
) -> list[list[dict[str, Any]]]:
    """Analyse the given positions of each prepared input in one engine batch; rows per part, in order."""
    items = [(p, list(pos)) for p, pos in parts if pos]
    if not items:
        return []
    with torch.no_grad():
        return _run_batch(nla, items, opts, tuned, timings)


def _run_batch(
    nla: NLA,
    parts: list[tuple[Prepared, list[int]]],
    opts: Resolved,
    tuned: TunedLens | None,
    timings: dict[str, float] | None,
) -> list[list[dict[str, Any]]]:
    k = opts.best_of_k
    overrides = overrides_for(nla, opts)
    A = torch.cat([p.acts[pos] for p, pos in parts]).float()
    cur_ids = [p.ids[q] for p, pos in parts for q in pos]
    G = A.shape[0]
    t = time.perf_counter()
    keys = [(q, j) for p, pos in parts for q in pos for j in range(k)]
    seeds = [p.seed for p, pos in parts for q in pos for j in range(k)]
    n_steps = _steps(nla, overrides)
    uniforms = None
    if opts.temperature > 0:
        uniforms = torch.stack(
            [row_uniforms(s, [key], n_steps)[0] for s, key in zip(seeds, keys, strict=True)]
        )
    explanations = nla.verbalizer.generate(A, k, uniforms, opts.temperature, overrides)
    t = _timed(timings, "verbalize", t)

    units = [_units(nla, e) for e in explanations]
    truncated = _truncated(nla, explanations).view(G, k)
    need_ar = opts.evaluate or k > 1
    best_idx = list(range(0, G * k, k))
    best_hat: Tensor | None = None
    best_score: Tensor | None = None
    rec = nla.reconstructor
    current = torch.tensor(cur_ids, dtype=torch.long).repeat_interleave(k)
    ar_cache: KVCache | None = None
    if need_ar:
        if isinstance(rec, SoftPromptReconstructor) and len({len(u) for u in units}) == 1:
            hats, ar_cache = rec.reconstruct_cached(units, current)  # its keys serve the salience ablations
        else:
            hats = _reconstruct_grouped(rec, units, current)
        scores = _score(nla, A.repeat_interleave(k, 0), hats).view(G, k)
        best_j = _complete_first(scores, truncated).argmin(dim=1)
        best_idx = [g * k + int(j) for g, j in enumerate(best_j)]
        best_hat = reported_reconstruction(nla, A, hats[best_idx])
        best_score = scores[torch.arange(G), best_j]
        t = _timed(timings, "reconstruct", t)

    salience: list[list[float] | None] = [None] * G
    if opts.salience and best_hat is not None and best_score is not None:
        salience = _salience(
            nla, A, [units[i] for i in best_idx], current[best_idx], best_score, ar_cache, best_idx
        )
        t = _timed(timings, "salience", t)

    kl: list[float | None] = [None] * G
    if opts.kl and best_hat is not None:
        kl = _kl(nla, parts, best_hat)
        t = _timed(timings, "kl", t)

    lens_top: list[str | None] = [None] * G
    tuned_top: list[str | None] = [None] * G
    if opts.logit_lens:
        lens_top = list(format_top(nla.subject, logit_lens(nla.subject, A)))
    if opts.tuned_lens and tuned is not None:
        tuned_top = list(format_top(nla.subject, tuned_lens_logits(nla.subject, tuned, A, nla.layer)))
    if opts.logit_lens or opts.tuned_lens:
        t = _timed(timings, "lens", t)

    metrics = (
        M.all_metrics(A, best_hat, nla.fve_variance) if (opts.evaluate and best_hat is not None) else None
    )
    out: list[list[dict[str, Any]]] = []
    g = 0
    for p, pos in parts:
        rows = []
        for q in pos:
            i = best_idx[g]
            e = explanations[i]
            row: dict[str, Any] = {
                "position": q,
                "token": p.tokens[q],
                "token_id": p.ids[q],
                "explanation": e.text,
                "explanation_structured": _structured(nla, units[i]) if p.options.structured else None,
                "token_salience": salience[g],
                "mse": None,
                "relative_rmse": None,
                "cosine": None,
                "nmse": None,
                "fve": None,
                "kl_divergence": kl[g],
                "logit_lens_top": lens_top[g],
                "tuned_lens_top": tuned_top[g],
                "norm": float(A[g].norm()),
                "outlier": q in p.outliers,
                "layer": nla.layer,
            }
            if e.finish_reason != "length" or not isinstance(nla.verbalizer, LayerReplacementVerbalizer):
                row["finish_reason"] = e.finish_reason
            if not isinstance(nla.verbalizer, LayerReplacementVerbalizer):
                row["all_samples_truncated"] = bool(truncated[g].all())
                row["explanation_parse"] = e.parse
            if metrics is not None:
                for name in ("mse", "relative_rmse", "cosine", "nmse", "fve"):
                    value = metrics[name]
                    row[name] = None if value is None else _finite(float(value[g]))
            if p.options.return_vectors:
                row["activation"] = A[g].tolist()
                row["reconstruction"] = None if best_hat is None else best_hat[g].tolist()
            rows.append(row)
            g += 1
        out.append(rows)
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _structured(nla: NLA, units: list[int]) -> list[str]:
    start, stop = nla.reconstructor.explanation_span(units)
    tok = nla.reconstructor.lm.tokenizer
    return [tok.decode([u]) for u in units[start:stop]]


def _salience(
    nla: NLA,
    A: Tensor,
    best_units: list[list[int]],
    current: Tensor,
    base: Tensor,
    cache: KVCache | None = None,
    cache_rows: list[int] | None = None,
) -> list[list[float] | None]:
    """(score with unit i replaced by a space − score) / score for every unit of every position.

    With the KV cache of the best explanations' own reconstructor pass (soft-prompt ARs), the keys before unit i
    are reused and one pass per index i recomputes units i.. of every position; otherwise all ablations of all
    positions go through one pass.
    """
    rec = nla.reconstructor
    spans = [rec.explanation_span(u) for u in best_units]
    owner = [g for g, (start, stop) in enumerate(spans) for _ in range(start, stop)]
    if not owner:
        return [[] for _ in best_units]
    idx = torch.tensor(owner)
    if cache is not None and cache_rows is not None and isinstance(rec, SoftPromptReconstructor):
        hats = rec.ablations(best_units, current, cache, cache_rows)  # rows g·T + i, as `owner`
    else:
        ablated = []
        for u, (start, stop) in zip(best_units, spans, strict=True):
            for i in range(start, stop):
                v = list(u)
                v[i] = rec.space_id
                ablated.append(v)
        hats = _reconstruct_grouped(rec, ablated, current[idx])
    scores = _score(nla, A[idx], hats)
    rel = ((scores - base[idx]) / base[idx].clamp_min(1e-12)).tolist()
    out: list[list[float] | None] = []
    j = 0
    for start, stop in spans:
        out.append([_finite(x) or 0.0 for x in rel[j : j + stop - start]])
        j += stop - start
    return out


def _reconstruct_grouped(rec: Any, units: list[list[int]], current: Tensor) -> Tensor:
    """Reconstruct rows of possibly different lengths: soft-prompt ARs need one length per call."""
    if isinstance(rec, SoftPromptReconstructor):
        by_len: dict[int, list[int]] = {}
        for i, u in enumerate(units):
            by_len.setdefault(len(u), []).append(i)
        if len(by_len) == 1:
            return rec.reconstruct(units, current)
        out = torch.empty(len(units), rec.lm.d_model)
        for idx in by_len.values():
            out[idx] = rec.reconstruct([units[i] for i in idx], current[idx])
        return out
    return rec.reconstruct(units, current)


def _kl(nla: NLA, parts: list[tuple[Prepared, list[int]]], best_hat: Tensor) -> list[float | None]:
    """KL(P_clean ‖ P_patched) at each position, Â patched after block L with the full clean left context."""
    lm = nla.subject
    out: list[float | None] = []
    g = 0
    for p, pos in parts:
        if p.clean is None:
            out.extend([None] * len(pos))
            g += len(pos)
            continue
        S = len(p.ids)
        step = max(1, KL_ROW_TOKENS // S)
        for s in range(0, len(pos), step):
            chunk = pos[s : s + step]
            P = len(chunk)
            q = torch.tensor(chunk, dtype=torch.long, device=lm.device)
            x = best_hat[g + s : g + s + P].to(lm.dtype).unsqueeze(1)
            visible = torch.arange(S, device=lm.device).unsqueeze(0) < q.unsqueeze(1)
            h = lm.forward(x, q.unsqueeze(1), start=nla.layer + 1, cache=PrefixView(p.clean.cache, visible))
            patched = lm.logits(lm.final_norm(h[:, 0]))
            clean = lm.logits(p.clean.final[q])
            out.extend(float(v) for v in M.kl_from_logits(clean, patched))
        g += len(pos)
    return out


# -- one input, start to finish -----------------------------------------------------------------------------------
def batch_positions(nla: NLA, opts: Resolved, row_budget: int = DEFAULT_ROW_BUDGET) -> int:
    if opts.batch_size is not None:
        return opts.batch_size
    return max(1, row_budget // max(opts.best_of_k, 1))


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the rows that are not norm outliers (attention sinks distort every average)."""
    kept = [r for r in rows if not r.get("outlier")]
    out: dict[str, Any] = {"positions": len(rows), "positions_in_summary": len(kept)}
    for name in ("mse", "relative_rmse", "cosine", "nmse", "fve", "kl_divergence"):
        vals = [r[name] for r in kept if r.get(name) is not None]
        out[f"mean_{name}"] = sum(vals) / len(vals) if vals else None
    return out


def analyze(
    nla: NLA,
    text: str | None = None,
    messages: Sequence[ChatMessage | dict[str, str]] | None = None,
    options: AnalyzeOptions | dict[str, Any] | None = None,
    *,
    progress: Progress | None = None,
    cancelled: Check | None = None,
    tuned: TunedLens | None = None,
    row_budget: int = DEFAULT_ROW_BUDGET,
    max_tokens: int | None = None,
    positions: Sequence[int] | None = None,
) -> Analysis:
    """Explain every position of `text` (or the rendered `messages`) and score each explanation."""
    opts = resolve(options)
    check_options(nla, opts, tuned)
    started = time.perf_counter()
    prep = prepare(nla, text, messages, opts, max_tokens=max_tokens, positions=positions)
    timings: dict[str, float] = {"extract": prep.extract_seconds}
    size = batch_positions(nla, opts, row_budget)
    rows: list[dict[str, Any]] = []
    total = len(prep.positions)
    for b in range(0, total, size):
        if cancelled is not None and cancelled():
            raise Cancelled()
        chunk = prep.positions[b : b + size]
        rows.extend(run_batch(nla, [(prep, chunk)], opts, tuned=tuned, timings=timings)[0])
        if progress is not None:
            progress(len(rows), total)
    return Analysis(
        rows=rows, metadata=metadata(nla, prep, opts, size, timings, time.perf_counter() - started, rows)
    )


def metadata(
    nla: NLA,
    prep: Prepared,
    opts: Resolved,
    batch_size: int,
    timings: dict[str, float],
    seconds: float,
    rows: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "model": nla.name,
        "subject": nla.subject_source,
        "layer": nla.layer,
        "d_model": nla.d_model,
        "t_text": nla.t_text,
        "verbalizer_mode": nla.verbalizer.mode,
        "reconstructor_mode": nla.reconstructor.mode,
        "objective": nla.objective,
        "reconstruction_scaled_to_norm": scales_to_norm(nla),
        "fve_variance": nla.fve_variance,
        "best_of_k": opts.best_of_k,
        "temperature": opts.temperature,
        "seed": opts.seed,
        "batch_size": batch_size,
        "n_tokens": len(prep.ids),
        "n_positions": len(prep.positions),
        "processing_time": seconds,
        "stage_seconds": timings,
        "summary": summarize(rows),
    }
