"""Activation reconstructors (AR): map an explanation back to a residual vector.

* `SoftPromptReconstructor` (upstream design, shared frozen base): [soft prefix][explanation token embeddings]
  [soft postfix][current token embedding + learned vector] → block `output_layer` at the last position → optional
  affine head.
* `TemplateReconstructor` (official design, its own truncated backbone): the text
  `Summary of the following text: <text>{explanation}</text> <summary>` → last block → value head.

Both take explanations as lists of their own token ids ("units"): the same units are ablated one at a time for
token salience. Every forward stops at `output_layer` (no later blocks, no LM head), and the prefix shared by all
rows is computed once and reused while the weights stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .kvcache import KVCache
from .lm import LM, sequence_bos_id
from .prompts import PrefixMemo, encode_piece, tensor_key
from .stopping import Check, stop_if

TEXT_PLACEHOLDER = "<text>"
DEFAULT_AR_PROMPT = "Summary of the text, encapsulating the main points and message, style and details:<text>"
OFFICIAL_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"


class PassBudget(Protocol):
    """How much one forward pass may hold, and when to stop (the engine's `analysis.Budget`)."""

    @property
    def cancelled(self) -> Check | None: ...

    def rows(self, tokens_per_row: int) -> int: ...

    def runs(self, row_tokens: Sequence[int]) -> list[slice]: ...

    def check(self) -> None: ...


class Reconstructor(Protocol):
    """What the engine (analysis, vectors) asks of a reconstructor, whichever design it is.

    The two designs differ in how they read an explanation (the verbalizer's own token ids, or the text
    re-tokenised inside a template), in whether rows of different lengths can share a pass, and in how salience
    ablations are computed fast; each answers for itself here, so callers never ask which class they hold."""

    mode: str
    lm: LM
    space_id: int  # the unit an ablated explanation unit is replaced with
    add_current_token: bool  # whether Â depends on the token the activation was taken at
    keeps_verbalizer_ids: bool  # reads the verbalizer's token ids as they are (when both share a tokenizer)
    one_length_per_pass: bool  # rows of one pass must have one length (else shorter rows are padded)

    def row_tokens(self, n_units: int) -> int:
        """Tokens one row holds for an explanation of `n_units` units, its copy of the shared prefix included."""
        ...

    def text_units(self, text: str) -> list[int]:
        """The units of a free-text explanation."""
        ...

    def explanation_span(self, units: Sequence[int]) -> tuple[int, int]: ...

    def reconstruct(
        self, units: Sequence[Sequence[int]], current: Sequence[int] | Tensor | None
    ) -> Tensor: ...

    def reconstruct_cached(
        self, units: Sequence[Sequence[int]], current: Sequence[int] | Tensor | None
    ) -> tuple[Tensor, KVCache | None]:
        """`reconstruct` of rows of one length in one pass, with the per-row keys `ablate` can reuse (None for a
        design whose ablations make their own pass)."""
        ...

    def ablate(
        self,
        units: Sequence[Sequence[int]],
        spans: Sequence[tuple[int, int]],
        current: Tensor,
        budget: PassBudget,
        cache: KVCache | None = None,
        cache_rows: Sequence[int] | None = None,
    ) -> Tensor | None:
        """Â for every explanation unit in `spans` replaced by `space_id` in turn (rows in span order), in passes
        within `budget`; None when this design has no faster way than reconstructing each ablated row."""
        ...


def space_token_id(lm: LM) -> int:
    """The token salience ablates with: a lone space (falls back to EOS when a space is not one token)."""
    ids = encode_piece(lm, " ")
    if len(ids) == 1:
        return ids[0]
    eos = lm.tokenizer.eos_token_id
    return int(eos if eos is not None else 0)


def identity_linear(d: int, *, bias: bool, device: torch.device | str = "cpu") -> nn.Linear:
    """A d×d affine initialised to the identity without drawing from the global RNG (loading a checkpoint must
    leave the caller's random state alone)."""
    lin = torch.nn.utils.skip_init(nn.Linear, d, d, bias=bias, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d, device=device))
        if lin.bias is not None:
            lin.bias.zero_()
    return lin


def _pad(units: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(u) for u in units], dtype=torch.long)
    width = int(lengths.max()) if len(units) else 0
    ids = torch.full((len(units), width), pad, dtype=torch.long)
    for i, u in enumerate(units):
        ids[i, : len(u)] = torch.tensor(list(u), dtype=torch.long)
    return ids, lengths


class SoftPromptReconstructor(nn.Module):
    """Upstream AR: a trained soft prompt around the verbalizer's own token ids, the shared frozen base."""

    mode = "soft_prompt"
    keeps_verbalizer_ids = True
    one_length_per_pass = True  # rows are not padded: a pass holds explanations of one length

    def __init__(
        self,
        lm: LM,
        *,
        prompt: str = DEFAULT_AR_PROMPT,
        output_layer: int,
        add_current_token: bool = True,
        special_last_token_vector: bool = True,
        head: str = "none",
    ) -> None:
        super().__init__()
        if prompt.count(TEXT_PLACEHOLDER) > 1:
            raise ValueError(
                f"the reconstructor prompt may contain {TEXT_PLACEHOLDER} at most once: {prompt!r}"
            )
        if not 0 <= output_layer < lm.n_layers:
            raise ValueError(f"output_layer must be in 0..{lm.n_layers - 1}, got {output_layer}")
        if head not in ("none", "linear", "linear_nobias"):
            raise ValueError(f"head must be none, linear or linear_nobias, got {head!r}")
        self.lm = lm
        self.prompt = prompt
        self.output_layer = output_layer
        self.add_current_token = add_current_token
        pre, post = prompt.split(TEXT_PLACEHOLDER) if TEXT_PLACEHOLDER in prompt else (prompt, "")
        self.pre_ids = encode_piece(lm, pre)
        self.post_ids = encode_piece(lm, post)
        d = lm.d_model
        dev = lm.device
        rows = lm.embed_rows(torch.tensor(self.pre_ids + self.post_ids, dtype=torch.long, device=dev)).float()
        self.soft_prompt = nn.Parameter(rows[: len(self.pre_ids)].clone())
        self.soft_prompt_post = nn.Parameter(rows[len(self.pre_ids) :].clone()) if self.post_ids else None
        self.special_vector = nn.Parameter(torch.zeros(d, device=dev)) if special_last_token_vector else None
        self.head_kind = head
        self.head: nn.Linear | None = None
        if head != "none":
            self.head = identity_linear(d, bias=head == "linear", device=dev)
        self.space_id = space_token_id(lm)
        self._memo = PrefixMemo()

    def _scale(self, x: Tensor) -> Tensor:
        s = self.lm.arch.embed_scale
        return x if s == 1.0 else x * torch.tensor(s, dtype=x.dtype)

    @classmethod
    def from_settings(cls, cfg: dict[str, Any], lm: LM) -> SoftPromptReconstructor:
        """The reconstructor a native `nla.json` describes (`settings` read back; absent keys take the defaults)."""
        return cls(
            lm,
            prompt=cfg.get("prompt", DEFAULT_AR_PROMPT),
            output_layer=int(cfg["output_layer"]),
            add_current_token=bool(cfg.get("add_current_token", True)),
            special_last_token_vector=bool(cfg.get("special_last_token_vector", True)),
            head=cfg.get("head", "none"),
        )

    def settings(self) -> dict[str, Any]:
        """What a native `nla.json` records of it, besides its mode and base."""
        return {
            "prompt": self.prompt,
            "output_layer": self.output_layer,
            "add_current_token": self.add_current_token,
            "special_last_token_vector": self.special_vector is not None,
            "head": self.head_kind,
        }

    def units(self, ids: Sequence[int]) -> list[int]:
        return list(ids)

    def text_units(self, text: str) -> list[int]:
        return encode_piece(self.lm, text)

    def row_tokens(self, n_units: int) -> int:
        return len(self.pre_ids) + n_units + len(self.post_ids) + 1  # + the current token (or its slot)

    def explanation_span(self, units: Sequence[int]) -> tuple[int, int]:
        """[start, stop) of the units that are explanation tokens (what salience ablates): all of them here."""
        return 0, len(units)

    def _rows(self, expl: Tensor, current: Tensor | None) -> Tensor:
        """Per-row inputs after the soft prefix: explanation, postfix, current token (+ learned vector)."""
        lm = self.lm
        B = expl.shape[0]
        parts = [lm.embed_rows(expl)]
        if self.soft_prompt_post is not None:
            parts.append(self.soft_prompt_post.to(lm.dtype).unsqueeze(0).expand(B, -1, -1))
        if self.add_current_token:
            if current is None:
                raise ValueError("this reconstructor reads the current token; pass current_ids")
            cur = lm.embed_rows(current).float()
            if self.special_vector is not None:
                cur = cur + self.special_vector
            parts.append(cur.to(lm.dtype).unsqueeze(1))
        elif self.special_vector is not None:
            parts[-1] = torch.cat(
                [parts[-1][:, :-1], (parts[-1][:, -1:].float() + self.special_vector).to(lm.dtype)], 1
            )
        return self._scale(torch.cat(parts, dim=1))

    def _prefix(self) -> KVCache | None:
        n = len(self.pre_ids)
        if n == 0:
            return None
        key = tensor_key(self.soft_prompt)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        lm = self.lm
        positions = torch.arange(n, device=lm.device).unsqueeze(0)
        x = lm.add_positions(self._scale(self.soft_prompt.to(lm.dtype).unsqueeze(0)), positions)
        cache = KVCache(1, n)
        lm.forward(x, positions, stop=self.output_layer + 1, cache=cache)
        self._memo.put(key, cache)
        return cache

    def forward(self, expl: Tensor, current: Tensor | None = None) -> Tensor:
        """Â [B, d] (fp32) for explanation ids [B, T] and current-token ids [B]."""
        return self._forward(expl, current)[0]

    def _forward(self, expl: Tensor, current: Tensor | None) -> tuple[Tensor, KVCache | None]:
        """Â and, without autograd, the KV cache of every row (prefix included) for `ablations`."""
        lm = self.lm
        expl = expl.to(lm.device)
        current = current.to(lm.device) if current is not None else None
        rows = self._rows(expl, current)
        B, n_rows = rows.shape[0], rows.shape[1]
        n_pre = len(self.pre_ids)
        positions = torch.arange(n_pre, n_pre + n_rows, device=lm.device).unsqueeze(0).expand(B, -1)
        rows = lm.add_positions(rows, positions)
        cache = None
        if torch.is_grad_enabled():
            if n_pre:
                pp = torch.arange(n_pre, device=lm.device).unsqueeze(0).expand(B, -1)
                pre = lm.add_positions(
                    self._scale(self.soft_prompt.to(lm.dtype)).unsqueeze(0).expand(B, -1, -1), pp
                )
                rows = torch.cat([pre, rows], dim=1)
                positions = torch.cat([pp, positions], dim=1)
            h = lm.forward(rows, positions, stop=self.output_layer + 1)
        else:
            prefix = self._prefix()
            cache = (
                prefix.broadcast(B, extra_capacity=n_rows)
                if prefix is not None
                else KVCache(B, n_rows, lm.device)
            )
            h = lm.forward(rows, positions, stop=self.output_layer + 1, cache=cache)
        out = h[:, -1].float()
        return (self.head(out) if self.head is not None else out), cache

    def _tensors(
        self, units: Sequence[Sequence[int]], current: Sequence[int] | Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        lengths = {len(u) for u in units}
        if len(lengths) > 1:
            raise ValueError("soft-prompt reconstructors take explanations of one length")
        expl = torch.tensor([list(u) for u in units], dtype=torch.long)
        cur = None if current is None else torch.as_tensor(current, dtype=torch.long)
        return expl, cur

    def reconstruct(self, units: Sequence[Sequence[int]], current: Sequence[int] | Tensor | None) -> Tensor:
        return self.forward(*self._tensors(units, current))

    def reconstruct_cached(
        self, units: Sequence[Sequence[int]], current: Sequence[int] | Tensor | None
    ) -> tuple[Tensor, KVCache]:
        """`reconstruct`, also returning every row's KV cache (no autograd) for `ablations` of chosen rows."""
        with torch.no_grad():
            out, cache = self._forward(*self._tensors(units, current))
        assert cache is not None
        return out, cache

    def ablate(
        self,
        units: Sequence[Sequence[int]],
        spans: Sequence[tuple[int, int]],
        current: Tensor,
        budget: PassBudget,
        cache: KVCache | None = None,
        cache_rows: Sequence[int] | None = None,
    ) -> Tensor | None:
        """With the rows' keys from `reconstruct_cached`, only the units from the ablated one on are recomputed
        (`ablations`), in chunks of positions within `budget`; without them there is no shortcut (None)."""
        if cache is None or cache_rows is None:
            return None
        step = budget.rows(self.row_tokens(len(units[0])))
        chunks = []
        for g in range(0, len(units), step):
            budget.check()
            sl = slice(g, g + step)
            chunks.append(self.ablations(units[sl], current[sl], cache, cache_rows[sl]))
        return torch.cat(chunks)  # rows g·T + i

    @torch.no_grad()
    def ablations(
        self,
        units: Sequence[Sequence[int]],
        current: Sequence[int] | Tensor | None,
        cache: KVCache,
        cache_rows: Sequence[int],
    ) -> Tensor:
        """Â [G·T, d] for each explanation with one unit at a time replaced by the space token (row g·T + i: unit
        i of explanation g). Row `cache_rows[g]` of `cache` (from `reconstruct_cached`) holds explanation g's keys
        unablated: ablating unit i leaves every key before it unchanged, so only units i.. are recomputed, one
        forward per i."""
        lm = self.lm
        expl, cur = self._tensors(units, current)
        expl = expl.to(lm.device)
        cur = cur.to(lm.device) if cur is not None else None
        G, T = expl.shape
        n_pre = len(self.pre_ids)
        picked = torch.as_tensor(list(cache_rows), dtype=torch.long, device=lm.device)
        out = torch.empty(G, T, lm.d_model, device=lm.device)
        for i in range(T):
            ablated = expl.clone()
            ablated[:, i] = self.space_id
            rows = self._rows(ablated, cur)[:, i:]
            n = rows.shape[1]
            positions = torch.arange(n_pre + i, n_pre + i + n, device=lm.device).unsqueeze(0).expand(G, -1)
            rows = lm.add_positions(rows, positions)
            kept = cache.select(picked, extra_capacity=n, length=n_pre + i)
            h = lm.forward(rows, positions, stop=self.output_layer + 1, cache=kept)[:, -1].float()
            out[:, i] = self.head(h) if self.head is not None else h
        return out.view(G * T, -1)


class TemplateReconstructor(nn.Module):
    """Official AR: its own backbone (blocks 0..K only), a text template, a value head."""

    mode = "template"
    keeps_verbalizer_ids = False  # it re-tokenises the explanation inside its template
    one_length_per_pass = False  # rows are padded to the longest of their pass

    def __init__(
        self,
        lm: LM,
        *,
        template: str = OFFICIAL_AR_TEMPLATE,
        output_layer: int | None = None,
        head_bias: bool = False,
    ) -> None:
        super().__init__()
        if template.count("{explanation}") != 1:
            raise ValueError("the AR template must contain {explanation} exactly once")
        self.lm = lm
        self.template = template
        bos = sequence_bos_id(lm.tokenizer)
        if bos is not None and lm.tokenizer("x", add_special_tokens=True)["input_ids"][:1] != [bos]:
            raise ValueError(
                f"the AR tokenizer has a BOS token ({lm.tokenizer.bos_token!r}) but does not add it; the official "
                "reconstructor reads BOS + template (without it FVE collapses): fix the tokenizer's "
                "add_bos_token / post-processor"
            )
        self.output_layer = lm.n_layers - 1 if output_layer is None else output_layer
        if not 0 <= self.output_layer < lm.n_layers:
            raise ValueError(f"output_layer {self.output_layer} outside the backbone's {lm.n_layers} blocks")
        d = lm.d_model
        self.head = identity_linear(d, bias=head_bias, device=lm.device)
        pre, post = template.split("{explanation}")
        self.pre_text, self.post_text = pre, post
        # The template's last prefix token may merge with the explanation's first characters, so the cached
        # prefix stops one token short and that token travels with each row.
        self.pre_ids = self._encode_full(pre)[:-1]
        self.post_ids = encode_piece(lm, post)
        self.space_id = space_token_id(lm)
        self.add_current_token = False
        self._memo = PrefixMemo()

    @classmethod
    def from_settings(cls, cfg: dict[str, Any], lm: LM) -> TemplateReconstructor:
        """The reconstructor a native `nla.json` describes (`settings` read back; absent keys take the defaults)."""
        return cls(
            lm,
            template=cfg.get("template", OFFICIAL_AR_TEMPLATE),
            output_layer=cfg.get("output_layer"),
            head_bias=bool(cfg.get("head_bias", False)),
        )

    def settings(self) -> dict[str, Any]:
        """What a native `nla.json` records of it, besides its mode and base."""
        return {
            "template": self.template,
            "output_layer": self.output_layer,
            "head_bias": self.head.bias is not None,
        }

    def _encode_full(self, text: str) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=True)["input_ids"])

    def units(self, text: str) -> list[int]:
        """Tokens of the full templated prompt after the shared prefix: the explanation, then the suffix.

        The whole prompt is tokenized at once, as the official scorer does, so BPE merges across the template's
        seams come out exactly as they would there.
        """
        full = self._encode_full(self.pre_text + text + self.post_text)
        start = len(self.pre_ids)
        if _common_prefix(full, self.pre_ids) < start:
            raise ValueError("this explanation changes how the AR template's prefix tokenizes")
        return full[start:]

    def text_units(self, text: str) -> list[int]:
        return self.units(text)

    def row_tokens(self, n_units: int) -> int:
        return len(self.pre_ids) + n_units

    def explanation_span(self, units: Sequence[int]) -> tuple[int, int]:
        """[start, stop) of the units that belong to the explanation (salience ablates only those)."""
        return 1, len(units) - _common_suffix(units, self.post_ids)

    @torch.no_grad()
    def reconstruct_cached(
        self, units: Sequence[Sequence[int]], current: object = None
    ) -> tuple[Tensor, None]:
        """`reconstruct`; no per-row keys are kept, since `ablate` makes its own unablated pass per chunk."""
        return self.reconstruct(units, current), None

    def ablate(
        self,
        units: Sequence[Sequence[int]],
        spans: Sequence[tuple[int, int]],
        current: Tensor,
        budget: PassBudget,
        cache: KVCache | None = None,
        cache_rows: Sequence[int] | None = None,
    ) -> Tensor:
        """`ablations` over runs of explanations within `budget` (rows padded to the widest of a run)."""
        chunks = []
        for sl in budget.runs([self.row_tokens(len(u)) for u in units]):
            budget.check()
            chunks.append(self.ablations(units[sl], spans[sl], budget.cancelled))
        return torch.cat(chunks)  # rows in span order

    def _prefix(self) -> KVCache:
        key = tensor_key(self.lm.embed_tokens.weight)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        lm = self.lm
        n = len(self.pre_ids)
        ids = torch.tensor(self.pre_ids, dtype=torch.long, device=lm.device).unsqueeze(0)
        positions = torch.arange(n, device=lm.device).unsqueeze(0)
        cache = KVCache(1, n)
        lm.forward(
            lm.add_positions(lm.embed(ids), positions), positions, stop=self.output_layer + 1, cache=cache
        )
        self._memo.put(key, cache)
        return cache

    def _padded(self, units: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [B, W] right-padded, lengths [B], positions [B, W] after the template's prefix), on the device."""
        lm = self.lm
        ids, lengths = _pad(units, lm.tokenizer.pad_token_id or 0)
        n = len(self.pre_ids)
        positions = torch.arange(n, n + ids.shape[1], device=lm.device).unsqueeze(0).expand(len(units), -1)
        return ids.to(lm.device), lengths.to(lm.device), positions

    def reconstruct(self, units: Sequence[Sequence[int]], current: object = None) -> Tensor:
        """Â [B, d] for explanation units (right-padded, last real token read, prefix computed once)."""
        lm = self.lm
        ids, lengths, positions = self._padded(units)
        B, W = ids.shape
        n = len(self.pre_ids)
        x = lm.add_positions(lm.embed(ids), positions)
        if torch.is_grad_enabled():
            pre = torch.tensor(self.pre_ids, device=lm.device).unsqueeze(0).expand(B, -1)
            pp = torch.arange(n, device=lm.device).unsqueeze(0).expand(B, -1)
            x = torch.cat([lm.add_positions(lm.embed(pre), pp), x], dim=1)
            h = lm.forward(x, torch.cat([pp, positions], 1), stop=self.output_layer + 1)[:, n:]
        else:
            cache = self._prefix().broadcast(B, extra_capacity=W)
            h = lm.forward(x, positions, stop=self.output_layer + 1, cache=cache)
        last = h[torch.arange(B, device=lm.device), lengths - 1].float()
        return self.head(last)

    @torch.no_grad()
    def ablations(
        self,
        units: Sequence[Sequence[int]],
        spans: Sequence[tuple[int, int]],
        cancelled: Check | None = None,
    ) -> Tensor:
        """Â for every explanation with one unit at a time replaced by the space token, rows in order (g, i) for i
        in `spans[g]`. Ablating unit i leaves every key before it unchanged, so one unablated pass keeps each
        row's keys and one forward per index i recomputes units i.. of the explanations that have a unit i: about
        half the work of reconstructing every ablation from its start. `cancelled` is asked before each forward."""
        lm = self.lm
        ids, lengths, positions = self._padded(units)
        G, W = ids.shape
        n = len(self.pre_ids)
        cache = self._prefix().broadcast(G, extra_capacity=W)
        lm.forward(
            lm.add_positions(lm.embed(ids), positions), positions, stop=self.output_layer + 1, cache=cache
        )
        hats: dict[tuple[int, int], Tensor] = {}
        for i in range(min((a for a, _ in spans), default=0), max((b for _, b in spans), default=0)):
            stop_if(cancelled)
            rows = [g for g, (a, b) in enumerate(spans) if a <= i < b]
            if not rows:
                continue
            picked = torch.tensor(rows, dtype=torch.long, device=lm.device)
            width = int(lengths[picked].max()) - i
            x_ids = ids[picked, i : i + width].clone()
            x_ids[:, 0] = self.space_id
            pos = torch.arange(n + i, n + i + width, device=lm.device).unsqueeze(0).expand(len(rows), -1)
            kept = cache.select(picked, extra_capacity=width, length=n + i)
            h = lm.forward(
                lm.add_positions(lm.embed(x_ids), pos), pos, stop=self.output_layer + 1, cache=kept
            )
            last = h[torch.arange(len(rows), device=lm.device), lengths[picked] - 1 - i].float()
            for g, v in zip(rows, self.head(last), strict=True):
                hats[(g, i)] = v
        order = [(g, i) for g, (a, b) in enumerate(spans) for i in range(a, b)]
        if not order:
            return torch.empty(0, lm.d_model, device=lm.device)
        return torch.stack([hats[key] for key in order])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


#: the reconstructor designs a checkpoint can hold (each a `Reconstructor`)
ReconstructorModule = SoftPromptReconstructor | TemplateReconstructor
