"""Engine benchmark: per-token analysis on the bundled SmolLM2 against upstream's algorithm, same run, same dtype.

For each dtype (fp32, bf16) it measures, on one ~50-token text at best-of-k = 8, T = 8, salience and KL on:

* the engine: `talkative.nla.analysis.analyze` (positions per second, best of `--repeats` runs after a warm-up);
* the naive path: upstream's algorithm as its code does it, written below with plain HF calls — a full forward
  with the LM head to extract the activations; the decoder prompt recomputed for every position *and every one
  of the k samples* (no prefix sharing, no prompt cache; KV-cached decoding within a sample, as upstream); the
  layer replacement at the input of the first N blocks; the encoder through the full model and LM head (logits
  for every position, as `base(inputs_embeds=...)` computes them); salience as T encoder passes, one per ablated
  token index; KL as a full forward with the patched residual, LM head included, per position (the positions of
  a batch as rows of one call, which only helps the naive path);
* a plain matmul (M = N = K = 2048) in the same dtype, to put the engine's achieved GFLOP/s in context; the engine's
  FLOPs are counted analytically from the model's dimensions and the work it does (see `engine_flops`).

Both paths use the same NLA weights (the first demo checkpoint, `checkpoints/smollm2-135m-l12`, when the checkout
has one: upstream's shape, free sampling of exactly T = 8 tokens, which is what the naive path implements; the
default demo samples 24 tokens inside a grammar, which upstream's algorithm has no counterpart for; else, or with
`--untrained-layer L`, an untrained `NLA.init` with upstream's default prompts), the same k, T, temperature and
batch size (the engine's automatic 256-row budget: 32 positions).

With `--official DIR` (an official AV/AR pair, e.g. the one `scripts/make_checkpoints.py` builds for the bundled
model) it measures the official format instead, in fp32:

* one analysis of a short text at k = 1, temperature 0, salience and KL on, as `talkative analyze` runs it: its
  stage seconds and the process's peak RSS (nothing else is loaded before it);
* the cost per generated token-row of each verbalizer at equal rows (`--rows`, greedy, after a warm-up): the
  official AV against the native demo checkpoint's, wall and process-CPU seconds.

Usage: python bench/analyze.py [--dtypes fp32,bf16] [--repeats 2] [--tokens 50] [--untrained-layer 20]
       [--json out.json] [--check]
       python bench/analyze.py --official DIR [--rows 24] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from talkative.defaults import DEFAULT_LAYER, checkpoints_dir  # noqa: E402
from talkative.nla.analysis import analyze, batch_positions, prepare  # noqa: E402
from talkative.nla.checkpoint import NLA, load_nla  # noqa: E402
from talkative.nla.lm import LM, LMPool  # noqa: E402
from talkative.nla.options import resolve  # noqa: E402
from talkative.nla.sources import DEFAULT_SOURCE  # noqa: E402

TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp and "
    "a notebook in which he recorded the ships that passed, the colour of the sea, and the names of the birds "
    "that nested on the rocks below the tower."
)
K, T_TEXT, TEMPERATURE, SEED = 8, 8, 1.0, 42


# -- the NLA -------------------------------------------------------------------------------------------------------
FIRST_DEMO = "smollm2-135m-l12"  # the NLA the published engine figures were measured on (see the docstring)


def open_bench_nla(
    dtype: str, untrained_layer: int | None = None, t_text: int | None = None
) -> tuple[NLA, str]:
    """The first demo checkpoint, or (when asked, or when the checkout has none) an untrained NLA.init, whose prompts
    are upstream's defaults: longer than the demo's, so the shared prefixes save more."""
    pool = LMPool(dtype=dtype)
    demo = checkpoints_dir() / FIRST_DEMO
    if (demo / "nla.json").is_file() and untrained_layer is None:
        return load_nla(demo, pool=pool), f"demo checkpoint {demo.name}"
    layer = DEFAULT_LAYER if untrained_layer is None else untrained_layer
    lm = pool.get(DEFAULT_SOURCE)
    if t_text is None:
        return NLA.init(lm, layer, subject_source=DEFAULT_SOURCE), f"untrained NLA.init at layer {layer}"
    nla = NLA.init(lm, layer, subject_source=DEFAULT_SOURCE, t_text=t_text)
    return nla, f"untrained NLA.init at layer {layer}, T = {t_text}"


# -- the naive path: upstream's algorithm with plain HF calls -------------------------------------------------------
def _blocks(lm: LM) -> Any:
    return lm.model.model.layers


@contextlib.contextmanager
def capture_output(block: Any) -> Iterator[list[Tensor]]:
    got: list[Tensor] = []

    def hook(module: Any, args: Any, out: Any) -> None:
        got.append(out[0] if isinstance(out, tuple) else out)

    handle = block.register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


@contextlib.contextmanager
def replace_input(lm: LM, replacements: list[Tensor], pos: int) -> Iterator[None]:
    """The residual entering block i at `pos` := replacements[i] (rows of the batch), for i < len(replacements)."""
    handles = []
    for i, vec in enumerate(replacements):

        def pre(module: Any, args: Any, kwargs: Any, vec: Tensor = vec) -> Any:
            h = args[0].clone()
            h[:, pos] = vec.to(h.dtype)
            return (h, *args[1:]), kwargs

        handles.append(_blocks(lm)[i].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_output(lm: LM, layer: int, positions: Tensor, values: Tensor) -> Iterator[None]:
    """Block `layer`'s output at row r, position positions[r] := values[r] (upstream's vectorized replacement)."""

    def post(module: Any, args: Any, out: Any) -> Any:
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[torch.arange(h.shape[0]), positions] = values.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = _blocks(lm)[layer].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def gumbel_sample(logits: Tensor, temperature: float, g: torch.Generator) -> Tensor:
    """Categorical sampling the way upstream's F.gumbel_softmax(hard=True) does it; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    u = torch.rand(x.shape, generator=g).clamp_min(1e-20)
    return (x - torch.log(-torch.log(u))).argmax(-1)


def naive_analyze(
    nla: NLA, text: str, k: int, temperature: float, seed: int, batch: int
) -> list[dict[str, Any]]:
    lm = nla.subject
    model = lm.model
    dt = lm.dtype
    v, r = nla.verbalizer, nla.reconstructor
    L, Lout = nla.layer, r.output_layer
    embed = model.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([lm.encode(text)])
    S = ids.shape[1]
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        # 1. activations: a full forward, LM head included, read block L through a hook
        with capture_output(_blocks(lm)[L]) as got:
            clean_logits = model(ids).logits[0].float()
        acts = got[0][0].float()
        left = v.prompt_left_emb.to(dt)
        right = v.prompt_right_emb.to(dt)
        n_left = left.shape[0]
        soft = r.soft_prompt.to(dt)
        special = r.special_vector.float() if r.special_vector is not None else 0.0

        def score(a: Tensor, b: Tensor) -> Tensor:
            """What best-of-k minimises and salience is relative to: MSE, or nMSE for `objective: nmse`."""
            if nla.objective == "nmse":
                d = a.shape[-1] ** 0.5
                a = a / a.norm(dim=-1, keepdim=True) * d
                b = b / b.norm(dim=-1, keepdim=True) * d
            return (a - b).pow(2).mean(-1)

        def encode(tokens: Tensor, current: Tensor) -> Tensor:
            """Upstream AR: the full model and LM head over [soft prefix][explanation][current + v], then the
            optional projection (upstream's `proj`: the trained linear head) on the last position's residual."""
            n = tokens.shape[0]
            cur = (embed(current).float() + special).to(dt).unsqueeze(1)
            x = torch.cat([soft.unsqueeze(0).expand(n, -1, -1), embed(tokens), cur], 1)
            with capture_output(_blocks(lm)[Lout]) as out:
                model(inputs_embeds=x)  # computes logits for every position, as upstream's forward does
            last = out[0][:, -1].float()
            return r.head(last) if r.head is not None else last

        for start in range(0, S, batch):
            pos = torch.arange(start, min(start + batch, S))
            G = len(pos)
            A = acts[pos].repeat_interleave(k, 0)  # [G*k, d]: every sample gets its own full prompt
            R = A.shape[0]
            proj = [
                torch.nn.functional.linear(A, v.proj_weight[i], v.proj_bias[i]).to(dt)
                for i in range(v.patch_layers)
            ]
            x = torch.cat(
                [
                    left.unsqueeze(0).expand(R, -1, -1),
                    proj[0].unsqueeze(1),
                    right.unsqueeze(0).expand(R, -1, -1),
                ],
                1,
            )
            # 2. the decoder: whole prompt for every row, then T-1 cached single-token steps
            with replace_input(lm, proj, n_left):
                out = model.model(inputs_embeds=x, use_cache=True)
            cache = out.past_key_values
            logits = model.lm_head(out.last_hidden_state[:, -1])
            toks = []
            for t in range(T_TEXT):
                tok = gumbel_sample(logits, temperature, g)
                toks.append(tok)
                if t < T_TEXT - 1:
                    out = model.model(
                        inputs_embeds=embed(tok).unsqueeze(1), past_key_values=cache, use_cache=True
                    )
                    cache = out.past_key_values
                    logits = model.lm_head(out.last_hidden_state[:, -1])
            tokens = torch.stack(toks, 1)  # [R, T]
            current = ids[0, pos].repeat_interleave(k)
            # 3. the encoder on every sample, best of k by MSE
            hats = encode(tokens, current)
            scores = score(A, hats).view(G, k)
            best = scores.argmin(1)
            m = scores[torch.arange(G), best]
            best_tokens = tokens.view(G, k, T_TEXT)[torch.arange(G), best]
            hat = hats.view(G, k, -1)[torch.arange(G), best]
            if nla.objective == "nmse":
                # a direction-only reconstructor's norm is arbitrary: MSE and the KL patch use Â at ‖A‖
                hat = hat / hat.norm(dim=-1, keepdim=True) * acts[pos].norm(dim=-1, keepdim=True)
            mse = (acts[pos] - hat).pow(2).mean(-1)
            # 4. salience: one encoder pass per ablated index, each over the batch's positions
            sal = torch.empty(G, T_TEXT)
            for i in range(T_TEXT):
                abl = best_tokens.clone()
                abl[:, i] = r.space_id
                sal[:, i] = (score(acts[pos], encode(abl, ids[0, pos])) - m) / m
            # 5. KL: a full forward per position with block L's output at that position replaced by Â
            with replace_output(lm, L, pos, hat):
                patched = model(ids.expand(G, -1)).logits[torch.arange(G), pos].float()
            lp = torch.log_softmax(clean_logits[pos], -1)
            lq = torch.log_softmax(patched, -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            for j in range(G):
                rows.append(
                    {
                        "position": int(pos[j]),
                        "explanation": lm.tokenizer.decode(best_tokens[j].tolist()),
                        "mse": float(mse[j]),
                        "token_salience": sal[j].tolist(),
                        "kl_divergence": float(kl[j]),
                    }
                )
    return rows


# -- FLOP counting --------------------------------------------------------------------------------------------------
@dataclass
class Dims:
    n_layers: int
    d: int
    d_q: int  # heads x head_dim
    d_kv: int  # kv heads x head_dim
    d_ff: int
    vocab: int

    @classmethod
    def of(cls, lm: LM) -> Dims:
        c = lm.model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads * hd,
            c.num_key_value_heads * hd,
            c.intermediate_size,
            c.vocab_size,
        )

    def linear(self) -> int:
        """MACs of one token through one block's linear layers."""
        return self.d * (self.d_q + 2 * self.d_kv) + self.d_q * self.d + 3 * self.d * self.d_ff

    def tokens(self, n_tokens: int, layers: int, ctx_sum: int) -> int:
        """FLOPs of n tokens through `layers` blocks attending to ctx_sum keys in total (per layer)."""
        return 2 * layers * (n_tokens * self.linear() + 2 * self.d_q * ctx_sum)

    def head(self, n_tokens: int) -> int:
        return 2 * n_tokens * self.d * self.vocab


def _causal(start: int, n: int) -> int:
    """Sum of context lengths for n tokens at positions start..start+n-1 (each sees itself and everything before)."""
    return sum(start + i + 1 for i in range(n))


@dataclass
class Work:
    S: int  # text tokens (all analysed)
    k: int
    T: int
    n_left: int  # AV prompt before the placeholder
    n_rest: int  # placeholder + AV prompt after it
    n_pre: int  # AR soft prefix
    L: int
    Lout: int


def engine_flops(d: Dims, w: Work) -> dict[str, int]:
    """What the engine computes: clean run with KV cache (all blocks) and the clean logits at each position; the
    AV's left prompt once; the rest of the AV prompt once per position; k·(T−1) cached decode steps per position
    (logits each step, plus once after the prompt); AR rows of T+1 tokens through blocks 0..Lout over a cached
    prefix for the k samples of each position; for salience ablation i, the T+1−i tokens from unit i on over the
    best sample's cached keys; KL: one token through blocks L+1.. per position."""
    P = w.n_left + w.n_rest
    out = {
        "extract": d.tokens(w.S, d.n_layers, _causal(0, w.S)) + d.head(w.S),
        "verbalize": d.tokens(w.n_left, d.n_layers, _causal(0, w.n_left))
        + w.S * (d.tokens(w.n_rest, d.n_layers, _causal(w.n_left, w.n_rest)) + d.head(1))
        + w.S * w.k * sum(d.tokens(1, d.n_layers, P + t + 1) + d.head(1) for t in range(w.T - 1)),
    }
    ar_row = d.tokens(w.T + 1, w.Lout + 1, _causal(w.n_pre, w.T + 1))
    ar_prefix = d.tokens(w.n_pre, w.Lout + 1, _causal(0, w.n_pre))
    out["reconstruct"] = ar_prefix + w.S * w.k * ar_row
    # salience: ablating unit i reuses the best explanation's keys before it: units i.. (T + 1 − i tokens) only
    out["salience"] = w.S * sum(
        d.tokens(w.T + 1 - i, w.Lout + 1, _causal(w.n_pre + i, w.T + 1 - i)) for i in range(w.T)
    )
    out["kl"] = sum(d.tokens(1, d.n_layers - w.L - 1, p + 1) + d.head(1) for p in range(w.S))
    return out


def naive_flops(d: Dims, w: Work) -> dict[str, int]:
    P = w.n_left + w.n_rest
    n_ar = w.n_pre + w.T + 1
    ar_row = d.tokens(n_ar, d.n_layers, _causal(0, n_ar)) + d.head(n_ar)
    full_text = d.tokens(w.S, d.n_layers, _causal(0, w.S)) + d.head(w.S)
    return {
        "extract": full_text,
        "verbalize": w.S
        * w.k
        * (
            d.tokens(P, d.n_layers, _causal(0, P))
            + d.head(1)
            + sum(d.tokens(1, d.n_layers, P + t + 1) + d.head(1) for t in range(w.T - 1))
        ),
        "reconstruct": w.S * w.k * ar_row,
        "salience": w.S * w.T * ar_row,
        "kl": w.S * full_text,
    }


# -- measurement -----------------------------------------------------------------------------------------------------
class Clock:
    """Wall and process-CPU seconds of a block. With one thread on a shared machine the CPU seconds are what the
    work costs when the machine is quiet (other processes only delay it); the wall time is the headline figure."""

    def __enter__(self) -> Clock:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> dict[str, float]:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    wall = cpu = float("inf")
    for _ in range(reps):
        with Clock() as c:
            torch.mm(a, b)
        wall, cpu = min(wall, c.wall), min(cpu, c.cpu)
    return {"wall": 2 * n**3 / wall / 1e9, "cpu": 2 * n**3 / max(cpu, 1e-9) / 1e9}


def run_dtype(
    dtype: str, repeats: int, tokens: int | None, untrained_layer: int | None = None
) -> dict[str, Any]:
    nla, what = open_bench_nla(dtype, untrained_layer)
    lm = nla.subject
    text = TEXT
    ids = lm.encode(text)
    if tokens is not None and tokens < len(ids):
        text = lm.tokenizer.decode(ids[:tokens])
        ids = lm.encode(text)
    S = len(ids)
    options = {"optimize_explanations_config": {"best_of_k": K}, "temperature": TEMPERATURE, "seed": SEED}
    batch = batch_positions(nla, resolve(options))
    v, r = nla.verbalizer, nla.reconstructor
    work = Work(
        S=S,
        k=K,
        T=v.t_text,
        n_left=len(v.left_ids),
        n_rest=1 + len(v.right_ids),
        n_pre=len(r.pre_ids),
        L=nla.layer,
        Lout=r.output_layer,
    )
    dims = Dims.of(lm)
    res: dict[str, Any] = {
        "dtype": dtype,
        "nla": what,
        "tokens": S,
        "batch_positions": batch,
        "threads": torch.get_num_threads(),
    }
    load_before = os.getloadavg()[0]

    mm = [matmul_gflops(lm.dtype)]
    analyze(
        nla, "Warm up the engine.", options=options
    )  # fills the prompt-prefix caches, as a server would be
    runs = []
    for _ in range(repeats):
        with Clock() as c:
            out = analyze(nla, text, options=options)
        runs.append((c.wall, c.cpu, out.metadata["stage_seconds"]))
    assert len(out.rows) == S and all(
        x["kl_divergence"] is not None and x["token_salience"] for x in out.rows
    )
    with Clock() as naive_clock:
        naive_rows = naive_analyze(nla, text, K, TEMPERATURE, SEED, batch)
    assert len(naive_rows) == S
    mm.append(matmul_gflops(lm.dtype))

    ef, nf = engine_flops(dims, work), naive_flops(dims, work)
    e_flop, n_flop = sum(ef.values()), sum(nf.values())
    best = min(runs, key=lambda x: x[0])
    for clock, e_s, n_s in (
        ("wall", best[0], naive_clock.wall),
        ("cpu", min(x[1] for x in runs), naive_clock.cpu),
    ):
        m = max(x[clock] for x in mm)
        res[clock] = {
            "engine_seconds": e_s,
            "naive_seconds": n_s,
            "engine_positions_per_s": S / e_s,
            "naive_positions_per_s": S / n_s,
            "speedup": n_s / e_s,
            "engine_gflops": e_flop / e_s / 1e9,
            "naive_gflops": n_flop / n_s / 1e9,
            "matmul_gflops": m,
            "engine_fraction_of_matmul": e_flop / e_s / 1e9 / m,
        }
    res.update(
        engine_runs_wall=[x[0] for x in runs],
        engine_runs_cpu=[x[1] for x in runs],
        matmul_gflops_before_after=mm,
        engine_gflop=e_flop / 1e9,
        naive_gflop=n_flop / 1e9,
        flop_ratio=n_flop / e_flop,
        engine_stage_seconds=best[2],
        engine_stage_gflop={k: v / 1e9 for k, v in ef.items()},
        naive_stage_gflop={k: v / 1e9 for k, v in nf.items()},
        mean_mse_engine=statistics.fmean(x["mse"] for x in out.rows[1:]),
        mean_mse_naive=statistics.fmean(x["mse"] for x in naive_rows[1:]),
        load_average_before_after=[load_before, os.getloadavg()[0]],
    )
    return res


def check(dtype: str, untrained_layer: int | None = None) -> None:
    """At temperature 0 both paths must give the same rows: the naive path is the same algorithm. In bf16 a greedy
    decode can take another branch at a near tie (the two paths round differently), so rows are compared where
    the explanations agree and the agreement is reported."""
    nla, _ = open_bench_nla(dtype, untrained_layer)
    text = "The capital of France is Paris."
    opts = {"optimize_explanations_config": {"best_of_k": 2}, "temperature": 0}
    rows = analyze(nla, text, options=opts).rows
    naive = naive_analyze(nla, text, 2, 0.0, SEED, 4)
    tol = 1e-3 if dtype == "fp32" else 5e-2
    same = [(a, b) for a, b in zip(rows, naive, strict=True) if a["explanation"] == b["explanation"]]
    if dtype == "fp32":
        assert len(same) == len(rows), [
            (a["explanation"], b["explanation"]) for a, b in zip(rows, naive, strict=False)
        ]
    for a, b in same:
        for name in ("mse", "kl_divergence"):
            assert abs(a[name] - b[name]) <= tol * max(1.0, abs(b[name])), (name, a[name], b[name])
        for x, y in zip(a["token_salience"], b["token_salience"], strict=True):
            assert abs(x - y) <= tol * max(1.0, abs(y)), (x, y)
    print(f"{dtype}: {len(same)}/{len(rows)} greedy explanations identical; their MSE, salience and KL agree")


# -- the official format ---------------------------------------------------------------------------------------------
OFFICIAL_TEXT = "The cat sat on the mat."


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def verbalizer_cost(nla: NLA, rows: int, repeats: int) -> dict[str, float]:
    """Seconds per generated token-row of `nla`'s verbalizer, greedy, on `rows` activations of TEXT at its layer
    (each row decodes until it stops; the prompt's prefill is part of the cost)."""
    A = prepare(nla, TEXT).acts.float()
    A = A[1 : rows + 1] if len(A) > rows else A[1:]  # position 0 is an attention sink, unlike the others
    nla.verbalizer.generate(A[:2], 1, None, 0.0)  # warm-up: the shared prompt prefix is computed once
    best: dict[str, float] = {}
    for _ in range(repeats):
        with Clock() as c:
            out = nla.verbalizer.generate(A, 1, None, 0.0)
        n = sum(len(e.ids) for e in out)
        if not best or c.wall / n < best["wall_per_token_row"]:
            best = {
                "rows": len(A),
                "token_rows": n,
                "wall_seconds": c.wall,
                "cpu_seconds": c.cpu,
                "wall_per_token_row": c.wall / n,
                "cpu_per_token_row": c.cpu / n,
            }
    return best


def run_official(official: Path, rows: int, repeats: int, with_analysis: bool = True) -> dict[str, Any]:
    from talkative.nla.loading import open_nla

    pool = LMPool(dtype="fp32")
    nla = open_nla(str(official), pool=pool)
    res: dict[str, Any] = {"threads": torch.get_num_threads()}
    if with_analysis:
        res["analysis"] = official_analysis(nla)
    res["official"] = verbalizer_cost(nla, rows, repeats)
    native, what = open_bench_nla("fp32")
    res["native"] = verbalizer_cost(native, rows, repeats) | {"nla": what}
    for clock in ("wall", "cpu"):
        key = f"{clock}_per_token_row"
        res[f"official_over_native_{clock}"] = res["official"][key] / res["native"][key]
    return res


def official_analysis(nla: NLA) -> dict[str, Any]:
    """What `talkative analyze --checkpoint DIR -k 1 --temperature 0 TEXT` does, with its peak RSS."""
    opts = {"optimize_explanations_config": {"best_of_k": 1}, "temperature": 0}
    with Clock() as c:
        out = analyze(nla, OFFICIAL_TEXT, options=opts)
    assert all(r["token_salience"] is not None for r in out.rows)
    return {
        "text": OFFICIAL_TEXT,
        "positions": len(out.rows),
        "wall_seconds": c.wall,
        "cpu_seconds": c.cpu,
        "stage_seconds": out.metadata["stage_seconds"],
        "batch_positions": out.metadata["batch_size"],
        "explanation_units": [len(r["token_salience"] or []) for r in out.rows],
        "peak_rss_mib": _peak_rss_mib(),
    }


def print_official(res: dict[str, Any]) -> None:
    print(f"\nmachine: {machine()}")
    a = res.get("analysis")
    if a is not None:
        print(
            f"official analysis of {a['text']!r} (k=1, greedy, salience and KL on): {a['positions']} positions, "
            f"{a['batch_positions']} per batch, explanation lengths {a['explanation_units']}, "
            f"{a['wall_seconds']:.1f} s wall / {a['cpu_seconds']:.1f} s CPU, peak RSS {a['peak_rss_mib']:.0f} MiB"
        )
        print("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in a["stage_seconds"].items()))
    for name in ("official", "native"):
        v = res[name]
        print(
            f"{name:<8} verbalizer: {v['rows']} rows, {v['token_rows']} token-rows, "
            f"{1e3 * v['wall_per_token_row']:.2f} ms wall / {1e3 * v['cpu_per_token_row']:.2f} ms CPU per token-row"
        )
    print(
        f"official / native per token-row at equal rows: {res['official_over_native_wall']:.2f}x wall, "
        f"{res['official_over_native_cpu']:.2f}x CPU"
    )


def machine() -> str:
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = " ".join(
                    f for f in line.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                )
                break
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), {flags}"


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\nmachine: {machine()}")
    r0 = results[0]
    print(
        f"k={K}, T={T_TEXT}, temperature={TEMPERATURE}, salience and KL on; {r0['nla']}; {r0['tokens']} positions, "
        f"{r0['batch_positions']} per batch; {r0['threads']} thread(s)\n"
    )
    head = (
        f"{'dtype':<5} {'clock':<5} {'engine pos/s':>12} {'naive pos/s':>11} {'speedup':>8} {'FLOP ratio':>10} "
        f"{'engine GFLOP/s':>14} {'naive GFLOP/s':>13} {'matmul GFLOP/s':>14} {'engine/matmul':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        for clock in ("wall", "cpu"):
            c = r[clock]
            print(
                f"{r['dtype']:<5} {clock:<5} {c['engine_positions_per_s']:>12.2f} {c['naive_positions_per_s']:>11.3f} "
                f"{c['speedup']:>7.2f}x {r['flop_ratio']:>9.2f}x {c['engine_gflops']:>14.1f} {c['naive_gflops']:>13.1f} "
                f"{c['matmul_gflops']:>14.1f} {c['engine_fraction_of_matmul']:>12.0%}"
            )
    print()
    for r in results:
        stages = ", ".join(
            f"{k} {r['engine_stage_seconds'].get(k, 0):.2f}s/{r['engine_stage_gflop'][k]:.0f}GF"
            for k in r["engine_stage_gflop"]
        )
        print(f"{r['dtype']}: engine stages (wall seconds / GFLOP): {stages}")
        print(
            f"{r['dtype']}: engine runs wall {', '.join(f'{t:.2f}' for t in r['engine_runs_wall'])} s, "
            f"cpu {', '.join(f'{t:.2f}' for t in r['engine_runs_cpu'])} s; naive wall {r['wall']['naive_seconds']:.1f} s, "
            f"cpu {r['cpu']['naive_seconds']:.1f} s; GFLOP engine {r['engine_gflop']:.0f}, naive {r['naive_gflop']:.0f}; "
            f"mean MSE (positions 1..) engine {r['mean_mse_engine']:.2f}, naive {r['mean_mse_naive']:.2f}; "
            f"load average {r['load_average_before_after'][0]:.2f} -> {r['load_average_before_after'][1]:.2f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=2, help="engine runs per dtype (the best is reported)")
    ap.add_argument("--tokens", type=int, default=None, help="cut the text to this many tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--untrained-layer",
        type=int,
        default=None,
        help="bench an untrained NLA.init at this layer (upstream's default prompts) instead of the demo",
    )
    ap.add_argument("--check", action="store_true", help="only check that both paths agree at temperature 0")
    ap.add_argument("--official", type=Path, help="bench this official AV/AR pair instead (see the module)")
    ap.add_argument("--rows", type=int, default=24, help="with --official: verbalizer rows compared")
    ap.add_argument(
        "--no-analysis", action="store_true", help="with --official: only the verbalizer comparison"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, one per core)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    if args.official is not None:
        res = run_official(args.official, args.rows, args.repeats, not args.no_analysis)
        print_official(res)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "official": res}, indent=2))
        return 0
    if args.check:
        for dt in args.dtypes.split(","):
            check(dt, args.untrained_layer)
        return 0
    results = [
        run_dtype(dt, args.repeats, args.tokens, args.untrained_layer) for dt in args.dtypes.split(",")
    ]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
