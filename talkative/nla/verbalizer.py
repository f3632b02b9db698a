"""Activation verbalizers (AV): turn a residual vector into a short explanation.

Two injection designs, both over an LM driven by `LM.forward`:

* `LayerReplacementVerbalizer` (upstream "talkative autoencoder"): a frozen base reads a soft prompt split at an
  `<embed>` placeholder; the residual at the placeholder is overwritten with `W_i·A + b_i` at the input of each of
  the first N blocks; exactly T tokens are sampled from the raw LM-head logits.
* `EmbeddingReplacementVerbalizer` (official NLA release): the AV's chat prompt carries a marker token whose input
  embedding is replaced by A rescaled to a fixed L2 norm; sampling runs until `</explanation>` or a token budget.

The prompt before the placeholder is the same for every row, so its KV cache is computed once and reused (and kept
across calls while the weights do not change); the rest of the prompt is computed once per position and the cache
is then copied to the k samples of that position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .constrained import GRAMMARS, GuidedSampler, check_grammar
from .kvcache import KVCache
from .lm import LM, sequence_bos_id
from .prompts import PrefixMemo, encode_piece, end_of_turn_ids, tensor_key
from .sampling import sample_next
from .stopping import Check, stop_if

EMBED_PLACEHOLDER = "<embed>"
DEFAULT_AV_PROMPT = "Short explanation of <embed>. Language, topic, sentiment, claims, speaker, style, etc:"
EXPLANATION_RE = re.compile(r"<explanation>\s*(.*?)\s*</explanation>", re.DOTALL)


@dataclass
class Explanation:
    """One sampled explanation: its AV token ids (forced prefix included), text and why sampling stopped."""

    ids: list[int]
    text: str
    finish_reason: str = "length"  # "length" | "stop" | "eos"
    raw: str = ""  # the generated text without the end-of-turn token that stopped it
    # how `text` was read from `raw` by a free-length verbalizer ("tagged" | "unclosed" | "untagged")
    parse: str | None = None


@dataclass
class PromptOverrides:
    """Per-request changes to the verbalizer prompt (all optional)."""

    add_ids: list[int] = field(default_factory=list)
    replace_left_ids: list[int] | None = None
    replace_right_ids: list[int] | None = None
    hard_tokens: bool = False

    def key(self) -> tuple[object, ...]:
        return (
            tuple(self.add_ids),
            _tup(self.replace_left_ids),
            _tup(self.replace_right_ids),
            self.hard_tokens,
        )


def _tup(x: list[int] | None) -> tuple[int, ...] | None:
    return None if x is None else tuple(x)


class Verbalizer(Protocol):
    """What the engine (analysis) asks of a verbalizer, whichever design it is.

    The designs differ in how long an explanation is (exactly `t_text` tokens, or free until a stop string, an
    end-of-turn token or a budget) and in which prompt edits they accept; each answers for itself here, so
    callers never ask which class they hold."""

    mode: str
    lm: LM
    fixed_length: bool  # exactly t_text tokens: no stop, nothing to parse, the budget is no failure
    edits_prompt: bool  # accepts replace_left / replace_right / hard tokens (a soft prompt around A)
    # the explanation language sampling keeps to (`constrained.GRAMMARS`), None: free text
    grammar: str | None

    def max_added_tokens(self) -> int | None:
        """The most forced tokens (`add_tokens`) an explanation can hold, None for no limit but the budget."""
        ...

    def steps(self, overrides: PromptOverrides) -> int:
        """Decode steps one explanation takes at most."""
        ...

    def row_tokens(self, overrides: PromptOverrides) -> int:
        """Tokens one row holds at its longest (prompt, forced start, every sampled token)."""
        ...


class LayerReplacementVerbalizer(nn.Module):
    """Upstream design: trained soft prompt + per-layer projections of A, frozen shared base."""

    mode = "layer_replacement"
    fixed_length = True
    edits_prompt = True

    def __init__(
        self,
        lm: LM,
        *,
        prompt: str = DEFAULT_AV_PROMPT,
        patch_layers: int = 5,
        t_text: int = 8,
        softcap_sampling: bool = False,
        grammar: str | None = None,
    ) -> None:
        super().__init__()
        if prompt.count(EMBED_PLACEHOLDER) != 1:
            raise ValueError(
                f"the verbalizer prompt must contain {EMBED_PLACEHOLDER} exactly once: {prompt!r}"
            )
        if not 0 <= patch_layers <= lm.n_layers:
            raise ValueError(f"patch_layers must be in 0..{lm.n_layers}, got {patch_layers}")
        if t_text < 1:
            raise ValueError("t_text must be at least 1")
        self.lm = lm
        self.prompt = prompt
        self.patch_layers = patch_layers
        self.t_text = t_text
        self.softcap_sampling = softcap_sampling
        self.grammar = check_grammar(grammar)
        self._token_texts: list[str] | None = None  # each token's text alone, built on the first need
        left, right = prompt.split(EMBED_PLACEHOLDER)
        self.left_ids = encode_piece(lm, left)
        self.right_ids = encode_piece(lm, right)
        d = lm.d_model
        ids = torch.tensor(self.left_ids + self.right_ids, dtype=torch.long, device=lm.device)
        rows = lm.embed_rows(ids).float() if len(ids) else torch.zeros(0, d, device=lm.device)
        self.prompt_left_emb = nn.Parameter(rows[: len(self.left_ids)].clone())
        self.prompt_right_emb = nn.Parameter(rows[len(self.left_ids) :].clone())
        n_proj = max(patch_layers, 1)
        self.proj_weight = nn.Parameter(torch.eye(d, device=lm.device).repeat(n_proj, 1, 1))
        self.proj_bias = nn.Parameter(torch.zeros(n_proj, d, device=lm.device))
        self._memo = PrefixMemo()

    # -- layout ------------------------------------------------------------------------------------------------
    def project(self, A: Tensor, i: int) -> Tensor:
        """P_i(A) = W_i·A + b_i in the LM's dtype."""
        return torch.nn.functional.linear(A.float(), self.proj_weight[i], self.proj_bias[i]).to(self.lm.dtype)

    def _left(self, ov: PromptOverrides) -> Tensor:
        return self._side(ov.replace_left_ids, self.left_ids, self.prompt_left_emb, hard=ov.hard_tokens)

    def _right(self, ov: PromptOverrides) -> Tensor:
        return self._side(ov.replace_right_ids, self.right_ids, self.prompt_right_emb, hard=ov.hard_tokens)

    def _side(self, replaced: list[int] | None, ids: list[int], soft: Tensor, *, hard: bool) -> Tensor:
        """One side of the soft prompt: the request's own tokens, the prompt's tokens embedded as hard tokens,
        or (by default) the trained soft embeddings."""
        if replaced is not None or hard:
            chosen = replaced if replaced is not None else ids
            return self.lm.embed_rows(torch.tensor(chosen, dtype=torch.long, device=self.lm.device))
        return soft.to(self.lm.dtype)

    def _scale(self, x: Tensor) -> Tensor:
        s = self.lm.arch.embed_scale
        return x if s == 1.0 else x * torch.tensor(s, dtype=x.dtype)

    def _patch(self, projections: list[Tensor], index: int):  # type: ignore[no-untyped-def]
        """Replace the residual at `index` with P_i(A) before block i < N (out of place: keeps autograd happy)."""
        n = self.patch_layers
        idx = torch.tensor([index], device=self.lm.device)

        def patch(i: int, h: Tensor) -> Tensor:
            if i < n:
                return h.index_copy(1, idx, projections[i].unsqueeze(1).to(h.dtype))
            return h

        return patch if n > 0 else None

    def _rest_inputs(
        self, A: Tensor, ov: PromptOverrides, n_left: int, extra_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Inputs from the placeholder on: [P_0(A); right prompt; forced prefix; extra teacher-forced tokens]."""
        lm = self.lm
        G = A.shape[0]
        projections = [self.project(A, i) for i in range(max(self.patch_layers, 1))]
        parts = [projections[0].unsqueeze(1), self._right(ov).unsqueeze(0).expand(G, -1, -1)]
        if ov.add_ids:
            add = lm.embed_rows(torch.tensor(ov.add_ids, dtype=torch.long, device=lm.device))
            parts.append(add.unsqueeze(0).expand(G, -1, -1))
        if extra_ids is not None:
            parts.append(lm.embed_rows(extra_ids))
        x = self._scale(torch.cat(parts, dim=1))
        positions = torch.arange(n_left, n_left + x.shape[1], device=lm.device).unsqueeze(0).expand(G, -1)
        return lm.add_positions(x, positions), positions, projections

    def _prefix(self, ov: PromptOverrides) -> tuple[int, KVCache | None]:
        left = self._left(ov)
        n = left.shape[0]
        if n == 0:
            return 0, None
        key = (
            ov.replace_left_ids and tuple(ov.replace_left_ids),
            ov.hard_tokens,
            *tensor_key(self.prompt_left_emb),
        )
        cached = None if torch.is_grad_enabled() else self._memo.get(key)
        if cached is not None:
            return n, cached
        cache = KVCache(1, n)
        positions = torch.arange(n, device=self.lm.device).unsqueeze(0)
        x = self.lm.add_positions(self._scale(left.unsqueeze(0)), positions)
        self.lm.forward(x, positions, cache=cache)
        if not torch.is_grad_enabled():
            self._memo.put(key, cache)
        return n, cache

    # -- configuration ---------------------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, cfg: dict[str, Any], lm: LM) -> LayerReplacementVerbalizer:
        """The verbalizer a native `nla.json` describes (`settings` read back; absent keys take the defaults)."""
        return cls(
            lm,
            prompt=cfg.get("prompt", DEFAULT_AV_PROMPT),
            patch_layers=int(cfg.get("patch_layers", 5)),
            t_text=int(cfg.get("t_text", 8)),
            softcap_sampling=bool(cfg.get("softcap_sampling", False)),
            grammar=cfg.get("grammar"),
        )

    def settings(self) -> dict[str, Any]:
        """What a native `nla.json` records of it, besides its mode and base (`grammar` only when set, so the
        configs of free-text checkpoints read as before)."""
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "patch_layers": self.patch_layers,
            "t_text": self.t_text,
            "softcap_sampling": self.softcap_sampling,
        }
        if self.grammar is not None:
            out["grammar"] = self.grammar
        return out

    # -- sizes -----------------------------------------------------------------------------------------------------
    def max_added_tokens(self) -> int | None:
        return self.t_text

    def steps(self, overrides: PromptOverrides) -> int:
        return max(self.t_text - len(overrides.add_ids), 1)

    def row_tokens(self, overrides: PromptOverrides) -> int:
        left = len(self.left_ids if overrides.replace_left_ids is None else overrides.replace_left_ids)
        right = len(self.right_ids if overrides.replace_right_ids is None else overrides.replace_right_ids)
        return left + 1 + right + max(self.t_text, len(overrides.add_ids))

    # -- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        A: Tensor,
        k: int,
        seeds: Tensor | None,
        temperature: float,
        overrides: PromptOverrides | None = None,
        *,
        cancelled: Check | None = None,
    ) -> list[Explanation]:
        """k explanations for each row of A [G, d], rows ordered position-major (row g*k + j).

        `seeds` [G*k, T] holds each row's step seeds (see `sampling.step_seeds`); None at temperature 0.
        `cancelled` is asked before every decode step (see `stopping`).
        """
        ov = overrides or PromptOverrides()
        lm = self.lm
        n_forced = len(ov.add_ids)
        n_sample = self.t_text - n_forced
        if n_sample < 0:
            raise ValueError(
                f"add_tokens gives {n_forced} tokens, more than the explanation length {self.t_text}"
            )
        G = A.shape[0]
        n_left, prefix = self._prefix(ov)
        x, positions, projections = self._rest_inputs(A, ov, n_left, None)
        cache = (
            prefix.broadcast(G, extra_capacity=x.shape[1] + 1)
            if prefix is not None
            else KVCache(G, x.shape[1] + 1)
        )
        sampled: list[Tensor] = []
        guide = (
            GuidedSampler(GRAMMARS[self.grammar], lm.tokenizer, ov.add_ids, G * k, self.token_texts, n_sample)
            if self.grammar is not None
            else None
        )
        if n_sample > 0:
            h = lm.forward(x, positions, cache=cache, patch=self._patch(projections, 0))
            logits = lm.logits(lm.final_norm(h[:, -1]), softcap=self.softcap_sampling).repeat_interleave(k, 0)
            cache = cache.repeat_interleave(k, extra_capacity=n_sample)
            pos = int(positions[0, -1]) + 1
            for t in range(n_sample):
                stop_if(cancelled)
                this_step = seeds[:, t] if seeds is not None else None
                tok = (
                    sample_next(logits, temperature, this_step)
                    if guide is None
                    else guide.next(logits, temperature, this_step, steps_left=n_sample - 1 - t)
                )
                sampled.append(tok)
                if t == n_sample - 1:
                    break
                p = torch.full((tok.shape[0], 1), pos, device=lm.device)
                h = lm.forward(lm.add_positions(lm.embed(tok.unsqueeze(1)), p), p, cache=cache)
                logits = lm.logits(lm.final_norm(h[:, -1]), softcap=self.softcap_sampling)
                pos += 1
        rows = G * k
        forced = torch.tensor(ov.add_ids, dtype=torch.long).unsqueeze(0).expand(rows, -1)
        ids = torch.cat([forced, torch.stack(sampled, 1).cpu()] if sampled else [forced], dim=1)
        texts = lm.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=False)
        return [
            Explanation(ids=r, text=t, finish_reason="length", raw=t)
            for r, t in zip(ids.tolist(), texts, strict=True)
        ]

    def token_texts(self) -> list[str]:
        """Every token id's text decoded alone (the constrained sampler's whole-vocabulary fallback), kept."""
        if self._token_texts is None:
            tok = self.lm.tokenizer
            self._token_texts = [tok.decode([i]) for i in range(len(tok))]
        return self._token_texts

    # -- training ------------------------------------------------------------------------------------------------
    def token_logprobs(
        self, A: Tensor, ids: Tensor, overrides: PromptOverrides | None = None
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced log p(ids[:, t]) and entropies [B, T] given A [B, d] (differentiable, no cache)."""
        ov = overrides or PromptOverrides()
        lm = self.lm
        left = self._left(ov)
        n_left = left.shape[0]
        x, positions, projections = self._rest_inputs(
            A, ov, n_left, ids[:, :-1] if ids.shape[1] > 1 else None
        )
        B = A.shape[0]
        if n_left:
            lp = torch.arange(n_left, device=lm.device).unsqueeze(0).expand(B, -1)
            left_x = lm.add_positions(self._scale(left.unsqueeze(0).expand(B, -1, -1)), lp)
            x = torch.cat([left_x, x], dim=1)
            positions = torch.cat([lp, positions], dim=1)
        h = lm.forward(x, positions, patch=self._patch(projections, n_left))
        T = ids.shape[1]
        logits = lm.logits(lm.final_norm(h[:, -T:]), softcap=self.softcap_sampling).float()
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy


class EmbeddingReplacementVerbalizer(nn.Module):
    """Official design: the AV's own chat prompt, marker embedding replaced by A rescaled to `injection_scale`."""

    mode = "embedding_replacement"
    fixed_length = False
    edits_prompt = False
    grammar: str | None = None  # the official design writes free text until its stop string
    t_text = None  # explanations have no fixed length

    def __init__(
        self,
        lm: LM,
        *,
        template: str,
        marker: str,
        injection_scale: float | None,
        marker_id: int | None = None,
        left_neighbor_id: int | None = None,
        right_neighbor_id: int | None = None,
        max_new_tokens: int = 200,
        stop: str = "</explanation>",
    ) -> None:
        super().__init__()
        self.lm = lm
        self.template = template
        self.marker = marker
        # None: the raw vector goes in (the official sidecar's `null`); a float: A is rescaled to that L2 norm.
        self.injection_scale = None if injection_scale is None else float(injection_scale)
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        tok = lm.tokenizer
        enc = list(tok.encode(marker, add_special_tokens=False))
        if len(enc) != 1 or (tok.unk_token_id is not None and enc[0] == tok.unk_token_id):
            raise ValueError(f"injection marker {marker!r} must encode to exactly one known token, got {enc}")
        if marker_id is not None and enc[0] != marker_id:
            raise ValueError(
                f"injection marker {marker!r} encodes to {enc[0]}, the checkpoint says {marker_id}"
            )
        self.marker_id = enc[0]
        self.prompt_ids = self.render(template.replace("{injection_char}", marker))
        hits = [i for i, t in enumerate(self.prompt_ids) if t == self.marker_id]
        if len(hits) != 1 or not 0 < hits[0] < len(self.prompt_ids) - 1:
            raise ValueError(
                f"the AV prompt must contain the marker exactly once, inside the prompt; found at {hits}"
            )
        self.inject_pos = hits[0]
        for name, want, got in (
            ("left", left_neighbor_id, self.prompt_ids[self.inject_pos - 1]),
            ("right", right_neighbor_id, self.prompt_ids[self.inject_pos + 1]),
        ):
            if want is not None and want != got:
                raise ValueError(f"{name} neighbour of the marker is token {got}, the checkpoint says {want}")
        bos = sequence_bos_id(tok)
        if bos is not None and self.prompt_ids.count(bos) > 1:
            raise ValueError(
                f"the AV prompt starts with {self.prompt_ids.count(bos)} BOS tokens; the chat template must give one"
            )
        if lm.d_model != lm.embed_tokens.weight.shape[1]:
            raise ValueError("d_model differs from the embedding width")
        self.eos_ids = end_of_turn_ids(lm)
        self._memo = PrefixMemo()

    @classmethod
    def from_settings(cls, cfg: dict[str, Any], lm: LM) -> EmbeddingReplacementVerbalizer:
        """The verbalizer a native `nla.json` describes (`settings` read back; absent keys take the defaults)."""
        return cls(
            lm,
            template=cfg["template"],
            marker=cfg["marker"],
            injection_scale=None if cfg["injection_scale"] is None else float(cfg["injection_scale"]),
            marker_id=cfg.get("marker_id"),
            left_neighbor_id=cfg.get("left_neighbor_id"),
            right_neighbor_id=cfg.get("right_neighbor_id"),
            max_new_tokens=int(cfg.get("max_new_tokens", 200)),
            stop=cfg.get("stop", "</explanation>"),
        )

    def settings(self) -> dict[str, Any]:
        """What a native `nla.json` records of it, besides its mode and base (the marker's neighbours too, so a
        tokenizer that renders the template differently is caught at load)."""
        return {
            "template": self.template,
            "marker": self.marker,
            "marker_id": self.marker_id,
            "left_neighbor_id": self.prompt_ids[self.inject_pos - 1],
            "right_neighbor_id": self.prompt_ids[self.inject_pos + 1],
            "injection_scale": self.injection_scale,
            "max_new_tokens": self.max_new_tokens,
            "stop": self.stop,
        }

    def max_added_tokens(self) -> int | None:
        return None

    def steps(self, overrides: PromptOverrides) -> int:
        return self.max_new_tokens

    def row_tokens(self, overrides: PromptOverrides) -> int:
        return len(self.prompt_ids) + len(overrides.add_ids) + self.max_new_tokens

    def render(self, content: str) -> list[int]:
        """Chat-templated user turn with the generation prompt, exactly one BOS (render, then encode plain)."""
        tok = self.lm.tokenizer
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def inject(self, A: Tensor) -> Tensor:
        """A rescaled to L2 norm `injection_scale` (rescaled, not multiplied), in fp32."""
        a = A.float()
        if self.injection_scale is None:
            return a
        return a / (a.norm(dim=-1, keepdim=True).clamp_min(1e-12) / self.injection_scale)

    def _prefix(self) -> KVCache:
        key = ("official", *tensor_key(self.lm.embed_tokens.weight))
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        n = self.inject_pos
        ids = torch.tensor(self.prompt_ids[:n], dtype=torch.long, device=self.lm.device).unsqueeze(0)
        positions = torch.arange(n, device=self.lm.device).unsqueeze(0)
        cache = KVCache(1, n)
        self.lm.forward(self.lm.add_positions(self.lm.embed(ids), positions), positions, cache=cache)
        self._memo.put(key, cache)
        return cache

    @torch.no_grad()
    def generate(
        self,
        A: Tensor,
        k: int,
        seeds: Tensor | None,
        temperature: float,
        overrides: PromptOverrides | None = None,
        max_new_tokens: int | None = None,
        *,
        cancelled: Check | None = None,
    ) -> list[Explanation]:
        """k explanations for each row of A [G, d] (position-major rows), each sampled until the stop string, an
        end-of-turn token or the token budget; `cancelled` is asked before every decode step."""
        ov = overrides or PromptOverrides()
        if ov.replace_left_ids is not None or ov.replace_right_ids is not None or ov.hard_tokens:
            raise ValueError(
                "replace_left, replace_right and do_hard_tokens apply to layer-replacement verbalizers only"
            )
        lm = self.lm
        budget = max_new_tokens or self.max_new_tokens
        G = A.shape[0]
        prefix = self._prefix()
        rest_ids = torch.tensor(
            self.prompt_ids[self.inject_pos :] + ov.add_ids, dtype=torch.long, device=lm.device
        )
        x = lm.embed(rest_ids).unsqueeze(0).expand(G, -1, -1).clone()
        x[:, 0] = self.inject(A).to(x.dtype)
        positions = (
            torch.arange(self.inject_pos, self.inject_pos + x.shape[1], device=lm.device)
            .unsqueeze(0)
            .expand(G, -1)
        )
        x = lm.add_positions(x, positions)
        cache = prefix.broadcast(G, extra_capacity=x.shape[1])
        h = lm.forward(x, positions, cache=cache)
        logits = lm.logits(lm.final_norm(h[:, -1])).repeat_interleave(k, 0)
        rows = G * k
        cache = cache.repeat_interleave(k, extra_capacity=budget)
        alive = torch.arange(rows)
        out: list[list[int]] = [list(ov.add_ids) for _ in range(rows)]
        reasons = ["length"] * rows
        pos = int(positions[0, -1]) + 1
        stop_tail = max(8, len(encode_piece(lm, self.stop)) + 2)
        done = [False] * rows
        n_live = rows
        for t in range(budget):
            stop_if(cancelled)
            tok = sample_next(logits, temperature, seeds[alive, t] if seeds is not None else None).cpu()
            for r, tid in zip(alive.tolist(), tok.tolist(), strict=True):
                if done[r]:
                    continue  # a finished row still in the cache: its token is never read
                out[r].append(tid)
                if tid in self.eos_ids:
                    reasons[r], done[r] = "eos", True
                elif self.stop and self.stop in lm.tokenizer.decode(out[r][-stop_tail:]):
                    reasons[r], done[r] = "stop", True
                n_live -= done[r]
            if t == budget - 1 or n_live == 0:
                break
            # Compacting copies the whole cache, which costs about as much as a decode step of the same rows:
            # finished rows ride along until a quarter of the cache is dead, so each row is copied a few times at
            # most instead of once per finishing row.
            if 4 * (len(alive) - n_live) >= len(alive):
                idx = torch.tensor([j for j, r in enumerate(alive.tolist()) if not done[r]], dtype=torch.long)
                alive, tok = alive[idx], tok[idx]
                cache = cache.select(idx.to(lm.device), extra_capacity=budget - t)
            p = torch.full((len(alive), 1), pos, device=lm.device)
            h = lm.forward(lm.add_positions(lm.embed(tok.to(lm.device).unsqueeze(1)), p), p, cache=cache)
            logits = lm.logits(lm.final_norm(h[:, -1]))
            pos += 1
        # The reference client reads the text its server returns, which leaves out the end-of-turn token that
        # stopped the sample; a tagless reply must be read the same way to give the reconstructor the same text.
        raws = lm.tokenizer.batch_decode(
            [ids[:-1] if reason == "eos" else ids for ids, reason in zip(out, reasons, strict=True)],
            skip_special_tokens=False,
        )
        read = [read_explanation(raw) for raw in raws]
        return [
            Explanation(ids=ids, text=text, finish_reason=reason, raw=raw, parse=how)
            for ids, raw, reason, (text, how) in zip(out, raws, reasons, read, strict=True)
        ]


def read_explanation(raw: str) -> tuple[str, str]:
    """(explanation, how it was read) from a free-length verbalizer's output, as the official reference client
    reads it, so that its reconstructor gets the same text:

    * `"tagged"`: the body of the first `<explanation>…</explanation>`, whitespace stripped;
    * `"unclosed"`: an `<explanation>` that never closes (the sample hit its token budget or ended early): the
      reference keeps the whole raw text, opening tag included;
    * `"untagged"`: no `<explanation>` at all (a verbalizer trained without tags): the raw text is the explanation.
    """
    m = EXPLANATION_RE.search(raw)
    if m:
        return m.group(1).strip(), "tagged"
    return raw, "unclosed" if "<explanation>" in raw else "untagged"


#: the verbalizer designs a checkpoint can hold (each a `Verbalizer`)
VerbalizerModule = LayerReplacementVerbalizer | EmbeddingReplacementVerbalizer
