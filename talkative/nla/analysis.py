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
from .flags import EXCLUDING_FLAGS, FLAGS, POSITION_FLAGS, count_flags, row_flags
from .kvcache import KVCache, PrefixView
from .lens import TunedLens, format_top, logit_lens, tuned_lens_logits
from .lm import sequence_bos_id
from .metrics import METRICS, MetricTable
from .options import AnalyzeOptions, ChatMessage, Resolved, resolve
from .prompts import encode_piece
from .reconstructor import Reconstructor
from .sampling import step_seeds
from .steering import SteerError, add_scaled, resolve_direction
from .stopping import Cancelled as Cancelled  # re-exported: callers catch it from here
from .stopping import Check, stop_if
from .verbalizer import Explanation, PromptOverrides, Verbalizer

DEFAULT_ROW_BUDGET = 256
# Rows × tokens per engine forward. Memory (keys and values of every block, attention) and time grow with both, and
# free-length explanations run to hundreds of tokens: a row count alone does not bound them. 8192 keeps a full
# 256-row batch of upstream's default prompts (about 30 tokens a row) in one pass, and allows about 24 rows of an
# official AV (a 134-token chat prompt on SmolLM2, 200 tokens of budget).
DEFAULT_ROW_TOKEN_BUDGET = 8192
# Tokens a user-supplied prompt piece (replace_left, replace_right, all add_tokens together) may have: each is
# prepended to every row of a batch, so it multiplies the batch's cost; refused beyond this, before any engine work.
MAX_PROMPT_PIECE_TOKENS = 256
KL_ROW_TOKENS = 1 << 17  # rows x cached tokens per KL sub-batch, bounds the transient key/value copies
# Known-noisy positions (the reference's exclusions): flagged in their rows and left out of the summary means
# (`POSITION_FLAGS`; the row flags of one outcome are in `flags.py`).
# positions 0..9: too little context, and the first token often acts as an attention sink
EARLY_POSITIONS = 10
# a norm above this many times the input's median norm is an attention-sink style outlier
OUTLIER_FACTOR = 3.0


class AnalysisError(ValueError):
    """Bad input or options for an analysis; the message is meant for the user."""


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
    flags: dict[int, list[str]] = field(default_factory=dict)  # position -> its FLAGS, flagged positions only
    extract_seconds: float = 0.0
    # `acts` were pushed along a steering direction: the KL reference is then the pushed vector
    steered: bool = False

    @property
    def outliers(self) -> set[int]:
        """Positions flagged as norm outliers (rows keep an `outlier` field of their own for older readers)."""
        return {i for i, f in self.flags.items() if "outlier" in f}


@dataclass
class Analysis:
    rows: list[dict[str, Any]]
    metadata: dict[str, Any]


Progress = Callable[[int, int], None]


# -- input --------------------------------------------------------------------------------------------------------
def render_messages(nla: NLA, messages: Sequence[ChatMessage | dict[str, str]]) -> str:
    """The subject's chat template over the messages: a trailing user turn gets the generation prompt."""
    msgs = [m.model_dump() if isinstance(m, ChatMessage) else dict(m) for m in messages]
    if not msgs:
        raise AnalysisError("messages is empty")
    tok = nla.subject.tokenizer
    if not tok.chat_template:
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


def _system_end(nla: NLA, messages: Sequence[Any], full_ids: list[int]) -> int:
    """Tokens from the start that belong to the system prompt, 0 when there is none.

    The system prompt is the leading system messages, or the default one a chat template adds when there are none
    (SmolLM2, Qwen). It ends where the first other message's content begins, so the scaffolding that opens that
    turn counts with it. A template adds a default system prompt when the text before the first message's content
    names the system role.
    """
    msgs = [m.model_dump() if isinstance(m, ChatMessage) else dict(m) for m in messages]
    n_sys = 0
    while n_sys < len(msgs) and msgs[n_sys]["role"] == "system":
        n_sys += 1
    if n_sys == len(msgs):
        return len(full_ids)
    tok = nla.subject.tokenizer
    first = msgs[n_sys]
    a, b = (
        str(
            tok.apply_chat_template(
                [*msgs[:n_sys], {**first, "content": content}], tokenize=False, add_generation_prompt=False
            )
        )
        for content in ("A", "B")
    )
    head = a[: next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))]
    if n_sys == 0 and "system" not in head.lower():
        return 0
    k = 0
    for x, y in zip(nla.subject.encode(head), full_ids, strict=False):
        if x != y:
            break
        k += 1
    return k


def position_flags(
    ids: Sequence[int], norms: Tensor, *, bos_id: int | None, system_end: int
) -> dict[int, list[str]]:
    """The known-noisy positions of an input and why (`POSITION_FLAGS` order): the first `EARLY_POSITIONS`, BOS tokens,
    system-prompt positions (before `system_end`) and norms above `OUTLIER_FACTOR` × the median norm."""
    outliers: set[int] = set()
    if len(ids) >= 4:  # a median of fewer norms says nothing
        med = float(norms.median())
        outliers = {i for i, n in enumerate(norms.tolist()) if n > OUTLIER_FACTOR * med}
    out: dict[int, list[str]] = {}
    for i, t in enumerate(ids):
        flags = [
            name
            for name, on in zip(
                POSITION_FLAGS,
                (i < EARLY_POSITIONS, bos_id is not None and t == bos_id, i < system_end, i in outliers),
                strict=True,
            )
            if on
        ]
        if flags:
            out[i] = flags
    return out


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
        direction = steer_direction(nla, opts, max_tokens=max_tokens)
    flags = position_flags(
        ids,
        acts.float().norm(dim=-1),
        bos_id=sequence_bos_id(lm.tokenizer),
        system_end=_system_end(nla, messages, ids) if messages is not None else 0,
    )
    tokens = [lm.tokenizer.decode([t]) for t in ids]
    if direction is not None and opts.steer is not None:  # after the flags: those judge the input's own norms
        acts = add_scaled(acts, direction, opts.steer.alpha)
    return Prepared(
        ids=ids,
        tokens=tokens,
        positions=chosen,
        acts=acts,
        options=opts,
        clean=clean,
        text=rendered,
        seed=opts.seed,
        flags=flags,
        extract_seconds=time.perf_counter() - t0,
        steered=opts.steer is not None and opts.steer.alpha != 0,
    )


def steer_direction(nla: NLA, opts: Resolved, *, max_tokens: int | None = None) -> Tensor | None:
    """The unit direction of the options' steer (None without one); a direction that cannot steer is refused."""
    if opts.steer is None:
        return None
    try:
        with torch.no_grad():
            return resolve_direction(nla, opts.steer, max_tokens=max_tokens)
    except SteerError as exc:
        raise AnalysisError(str(exc)) from None


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
        _bound_piece("add_tokens", add_ids)
    if (
        opts.replace_left is not None or opts.replace_right is not None or opts.hard_tokens
    ) and not nla.verbalizer.edits_prompt:
        raise AnalysisError(
            "replace_left, replace_right and do_hard_tokens need a layer-replacement (soft prompt) verbalizer"
        )
    most = nla.verbalizer.max_added_tokens()
    if most is not None and len(add_ids) > most:
        raise AnalysisError(
            f"add_tokens gives {len(add_ids)} tokens; explanations here are {most} tokens long"
        )
    left = (
        None
        if opts.replace_left is None
        else _bound_piece("replace_left", encode_piece(lm, opts.replace_left))
    )
    right = (
        None
        if opts.replace_right is None
        else _bound_piece("replace_right", encode_piece(lm, opts.replace_right))
    )
    return PromptOverrides(
        add_ids=add_ids, replace_left_ids=left, replace_right_ids=right, hard_tokens=opts.hard_tokens
    )


def _bound_piece(name: str, ids: list[int]) -> list[int]:
    if len(ids) > MAX_PROMPT_PIECE_TOKENS:
        raise AnalysisError(
            f"{name} is {len(ids)} tokens long; a prompt piece may have at most {MAX_PROMPT_PIECE_TOKENS} tokens"
        )
    return ids


def check_options(nla: NLA, opts: Resolved, tuned: TunedLens | None = None) -> None:
    """Refuse options the NLA cannot honour, before any work is queued."""
    overrides_for(nla, opts)
    steer_direction(nla, opts)
    if opts.tuned_lens and tuned is None:
        raise AnalysisError("tuned_lens needs a tuned lens directory (TUNED_LENS_DIR); none is configured")


def _steps(nla: NLA, overrides: PromptOverrides) -> int:
    return nla.verbalizer.steps(overrides)


def verbalizer_row_tokens(nla: NLA, overrides: PromptOverrides) -> int:
    """Tokens one verbalizer row holds at its longest (prompt, forced start, every sampled token): what its keys
    and values and its attention cost grow with."""
    return nla.verbalizer.row_tokens(overrides)


def reconstructor_row_tokens(rec: Reconstructor, n_units: int) -> int:
    """Tokens one reconstructor row holds for an explanation of `n_units` units (shared prefix included: every
    row carries its own copy of the prefix's keys)."""
    return rec.row_tokens(n_units)


def max_positions(
    nla: NLA,
    opts: Resolved,
    row_budget: int = DEFAULT_ROW_BUDGET,
    row_token_budget: int = DEFAULT_ROW_TOKEN_BUDGET,
    overrides: PromptOverrides | None = None,
) -> int:
    """The most positions one engine batch takes: k rows each, within the row budget and, with every verbalizer
    row at its longest, within the rows × tokens budget (at least one position: its k rows are then verbalized
    in several passes, see `_verbalize`)."""
    k = max(opts.best_of_k, 1)
    per_row = verbalizer_row_tokens(nla, overrides or overrides_for(nla, opts))
    return max(1, min(row_budget // k, row_token_budget // (k * per_row)))


def _units(nla: NLA, expl: Explanation) -> list[int]:
    r: Reconstructor = nla.reconstructor
    v: Verbalizer = nla.verbalizer
    if r.keeps_verbalizer_ids and (v.fixed_length or r.lm.tokenizer is v.lm.tokenizer):
        return list(expl.ids)
    return r.text_units(expl.text)


def objective_score(nla: NLA, a: Tensor, b: Tensor) -> Tensor:
    """What best-of-k and salience minimise: the checkpoint's own objective (raw mse, or direction-only nmse)."""
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
    if nla.verbalizer.fixed_length:
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
    row_token_budget: int = DEFAULT_ROW_TOKEN_BUDGET,
    cancelled: Check | None = None,
) -> list[list[dict[str, Any]]]:
    """Analyse the given positions of each prepared input in one engine batch; rows per part, in order.

    Every forward inside stays within `row_token_budget` rows × tokens (verbalizer, reconstructor and salience
    passes are split as needed), and `cancelled` is asked between decode steps and between those passes: when it
    answers True the call raises `Cancelled` (see `stopping`).
    """
    items = [(p, list(pos)) for p, pos in parts if pos]
    if not items:
        return []
    with torch.no_grad():
        return _run_batch(nla, items, opts, tuned, timings, Budget(row_token_budget, cancelled))


@dataclass(frozen=True)
class Budget:
    """How much one forward may hold (rows × tokens) and when to stop: what every pass of a batch is given."""

    row_tokens: int = DEFAULT_ROW_TOKEN_BUDGET
    cancelled: Check | None = None

    def rows(self, tokens_per_row: int) -> int:
        return max(1, self.row_tokens // max(tokens_per_row, 1))

    def check(self) -> None:
        stop_if(self.cancelled)

    def runs(self, row_tokens: Sequence[int]) -> list[slice]:
        """Consecutive rows in passes: each pass as many rows as fit when every row is padded to the pass's
        widest (`row_tokens[i]` tokens for row i), at least one."""
        out: list[slice] = []
        start = 0
        while start < len(row_tokens):
            stop, widest = start + 1, row_tokens[start]
            while stop < len(row_tokens):
                wider = max(widest, row_tokens[stop])
                if (stop + 1 - start) * wider > self.row_tokens:
                    break
                stop, widest = stop + 1, wider
            out.append(slice(start, stop))
            start = stop
        return out


def _verbalize(
    nla: NLA,
    A: Tensor,
    k: int,
    noise: Tensor | None,
    opts: Resolved,
    overrides: PromptOverrides,
    budget: Budget,
) -> list[Explanation]:
    """`generate` in passes of at most `budget` rows × tokens: whole positions while k rows fit, else the k
    samples of one position split over several passes (each row keeps its own seeds, so its sample is the same)."""
    v = nla.verbalizer
    G = A.shape[0]
    cap = budget.rows(verbalizer_row_tokens(nla, overrides))
    calls: list[tuple[slice, int, slice]] = []  # (positions, samples per position, rows)
    if G * k <= cap:
        calls.append((slice(0, G), k, slice(0, G * k)))
    elif k <= cap:
        step = cap // k
        calls.extend((slice(g, g + step), k, slice(g * k, min(g + step, G) * k)) for g in range(0, G, step))
    else:
        for g in range(G):
            for j in range(0, k, cap):
                n = min(cap, k - j)
                calls.append((slice(g, g + 1), n, slice(g * k + j, g * k + j + n)))
    out: list[Explanation] = []
    for positions, n, rows in calls:
        budget.check()
        seeds = None if noise is None else noise[rows]
        out.extend(
            v.generate(A[positions], n, seeds, opts.temperature, overrides, cancelled=budget.cancelled)
        )
    return out


def _run_batch(
    nla: NLA,
    parts: list[tuple[Prepared, list[int]]],
    opts: Resolved,
    tuned: TunedLens | None,
    timings: dict[str, float] | None,
    budget: Budget,
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
    noise = None
    if opts.temperature > 0:
        noise = torch.stack([step_seeds(s, [key], n_steps)[0] for s, key in zip(seeds, keys, strict=True)])
    explanations = _verbalize(nla, A, k, noise, opts, overrides, budget)
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
        budget.check()
        one_pass = len(units) * reconstructor_row_tokens(rec, max(map(len, units))) <= budget.row_tokens
        if len({len(u) for u in units}) == 1 and one_pass:
            hats, ar_cache = rec.reconstruct_cached(units, current)  # its keys (if any) serve the ablations
        else:
            hats = reconstruct_grouped(rec, units, current, budget)
        scores = objective_score(nla, A.repeat_interleave(k, 0), hats).view(G, k)
        best_j = _complete_first(scores, truncated).argmin(dim=1)
        best_idx = [g * k + int(j) for g, j in enumerate(best_j)]
        best_hat = reported_reconstruction(nla, A, hats[best_idx])
        best_score = scores[torch.arange(G), best_j]
        t = _timed(timings, "reconstruct", t)

    salience: list[list[float] | None] = [None] * G
    if opts.salience and best_hat is not None and best_score is not None:
        salience = token_salience(
            nla, A, [units[i] for i in best_idx], current[best_idx], best_score, budget, ar_cache, best_idx
        )
        t = _timed(timings, "salience", t)

    kl: list[float | None] = [None] * G
    if opts.kl and best_hat is not None:
        budget.check()
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
        nla.metrics.measure(A, best_hat, nla.fve_variance)
        if (opts.evaluate and best_hat is not None)
        else None
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
                **nla.metrics.empty(),
                "logit_lens_top": lens_top[g],
                "tuned_lens_top": tuned_top[g],
                "norm": float(A[g].norm()),
                "outlier": q in p.outliers,
                "flags": p.flags.get(q, []),
                "layer": nla.layer,
            }
            if e.finish_reason != "length" or not nla.verbalizer.fixed_length:
                row["finish_reason"] = e.finish_reason
            if not nla.verbalizer.fixed_length:
                row["all_samples_truncated"] = bool(truncated[g].all())
                row["explanation_parse"] = e.parse
            if M.KL in row:
                row[M.KL] = kl[g]
            if metrics is not None:
                for name, value in metrics.items():
                    row[name] = None if value is None else _finite(float(value[g]))
            row["flags"] = [*row["flags"], *row_flags(row, free_length=not nla.verbalizer.fixed_length)]
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


def token_salience(
    nla: NLA,
    A: Tensor,
    best_units: list[list[int]],
    current: Tensor,
    base: Tensor,
    budget: Budget | None = None,
    cache: KVCache | None = None,
    cache_rows: list[int] | None = None,
) -> list[list[float] | None]:
    """(score with unit i replaced by a space − score) / score for every unit of every position.

    The keys before unit i do not change when unit i is ablated, so the reconstructor's `ablate` reuses them: one
    pass per index i recomputes units i.. of the positions of a chunk (soft-prompt ARs reuse the keys of the best
    explanations' own reconstructor pass, template ARs make one unablated pass per chunk). Without that shortcut
    (a soft-prompt AR whose rows' keys were not kept) every ablation is a row of its own, reconstructed in chunks.
    Either way a pass holds at most `budget` rows × tokens, whatever the explanations' length.
    """
    budget = budget or Budget()
    rec = nla.reconstructor
    spans = [rec.explanation_span(u) for u in best_units]
    owner = [g for g, (start, stop) in enumerate(spans) for _ in range(start, stop)]
    if not owner:
        return [[] for _ in best_units]
    idx = torch.tensor(owner)
    fast = rec.ablate(best_units, spans, current, budget, cache, cache_rows)  # rows in `owner` order
    if fast is not None:
        hats = fast
    else:
        ablated = []
        for u, (start, stop) in zip(best_units, spans, strict=True):
            for i in range(start, stop):
                v = list(u)
                v[i] = rec.space_id
                ablated.append(v)
        hats = reconstruct_grouped(rec, ablated, current[idx], budget)
    scores = objective_score(nla, A[idx], hats)
    rel = ((scores - base[idx]) / base[idx].clamp_min(1e-12)).tolist()
    out: list[list[float] | None] = []
    j = 0
    for start, stop in spans:
        out.append([_finite(x) or 0.0 for x in rel[j : j + stop - start]])
        j += stop - start
    return out


def reconstruct_grouped(
    rec: Reconstructor, units: list[list[int]], current: Tensor, budget: Budget | None = None
) -> Tensor:
    """Reconstruct rows of possibly different lengths in passes of at most `budget` rows × tokens: soft-prompt ARs
    need one length per pass; template ARs pad to the longest row of a pass, so rows go in order of length."""
    budget = budget or Budget()
    if not units:
        return torch.empty(0, rec.lm.d_model)
    if rec.one_length_per_pass:
        groups: dict[int, list[int]] = {}
        for i, u in enumerate(units):
            groups.setdefault(len(u), []).append(i)
        passes: list[list[int]] = []
        for n, idx in groups.items():
            step = budget.rows(reconstructor_row_tokens(rec, n))
            passes.extend(idx[s : s + step] for s in range(0, len(idx), step))
    else:
        order = sorted(range(len(units)), key=lambda i: len(units[i]))
        widths = [reconstructor_row_tokens(rec, len(units[i])) for i in order]
        passes = [order[sl] for sl in budget.runs(widths)]
    if len(passes) == 1 and passes[0] == list(range(len(units))):
        budget.check()
        return rec.reconstruct(units, current)
    out = torch.empty(len(units), rec.lm.d_model, device=rec.lm.device)
    for idx in passes:
        budget.check()
        out[idx] = rec.reconstruct([units[i] for i in idx], current[idx]).float()
    return out


def _kl(nla: NLA, parts: list[tuple[Prepared, list[int]]], best_hat: Tensor) -> list[float | None]:
    """KL(P_clean ‖ P_patched) at each position, Â patched after block L with the full clean left context.

    For a steered input the reference is the steered activation patched in the same way (the vector that was
    explained), so KL, like every metric, measures the explanation of the steered state."""
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
            if p.steered:
                ref = p.acts[q].to(lm.dtype).unsqueeze(1)
                r = lm.forward(
                    ref, q.unsqueeze(1), start=nla.layer + 1, cache=PrefixView(p.clean.cache, visible)
                )
                clean = lm.logits(lm.final_norm(r[:, 0]))
            else:
                clean = lm.logits(p.clean.final[q])
            out.extend(float(v) for v in M.kl_from_logits(clean, patched))
        g += len(pos)
    return out


# -- one input, start to finish -----------------------------------------------------------------------------------
def batch_positions(
    nla: NLA,
    opts: Resolved,
    row_budget: int = DEFAULT_ROW_BUDGET,
    row_token_budget: int = DEFAULT_ROW_TOKEN_BUDGET,
) -> int:
    """Positions per engine batch: the request's batch_size, never more than the budgets allow (`max_positions`)."""
    cap = max_positions(nla, opts, row_budget, row_token_budget)
    return cap if opts.batch_size is None else max(1, min(opts.batch_size, cap))


def summarize(rows: Sequence[dict[str, Any]], table: MetricTable = METRICS) -> dict[str, Any]:
    """Means over the rows without an excluding flag: known-noisy positions (early, BOS, system prompt, norm
    outliers) are not what the NLA was trained on, and degenerate or truncated explanations are not explanations;
    both distort every average. `low_confidence` rows stay in (`flags.py` says why). Says how many rows each
    flag left out, and how many rows carry each flag."""
    kept = [r for r in rows if not set(r.get("flags") or ()) & set(EXCLUDING_FLAGS) and not r.get("outlier")]
    return {
        "positions": len(rows),
        "positions_in_summary": len(kept),
        "positions_excluded": len(rows) - len(kept),
        "excluded_by_flag": count_flags(rows, EXCLUDING_FLAGS),
        "flagged": count_flags(rows, FLAGS),
        **table.summarize(kept),
    }


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
    row_token_budget: int = DEFAULT_ROW_TOKEN_BUDGET,
    max_tokens: int | None = None,
    positions: Sequence[int] | None = None,
) -> Analysis:
    """Explain every position of `text` (or the rendered `messages`) and score each explanation; `cancelled` is
    asked between batches and inside them (decode steps, reconstruction and salience passes)."""
    opts = resolve(options)
    check_options(nla, opts, tuned)
    started = time.perf_counter()
    prep = prepare(nla, text, messages, opts, max_tokens=max_tokens, positions=positions)
    timings: dict[str, float] = {"extract": prep.extract_seconds}
    size = batch_positions(nla, opts, row_budget, row_token_budget)
    rows: list[dict[str, Any]] = []
    total = len(prep.positions)
    for b in range(0, total, size):
        stop_if(cancelled)
        chunk = prep.positions[b : b + size]
        rows.extend(
            run_batch(
                nla,
                [(prep, chunk)],
                opts,
                tuned=tuned,
                timings=timings,
                row_token_budget=row_token_budget,
                cancelled=cancelled,
            )[0]
        )
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
        "summary": summarize(rows, nla.metrics),
        **({"steer": opts.steer.describe()} if opts.steer is not None else {}),
    }
