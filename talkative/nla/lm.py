"""Subject and base language models, driven block by block.

Everything the NLA needs from a causal LM goes through `LM.forward`, which runs an explicit range of blocks over
hidden states we hand it: extraction stops at block L (no LM head, no later blocks), the verbalizer overwrites the
residual at one position before chosen blocks, the reconstructor reads a middle block, and the KL check starts at
block L+1 from a patched residual. Nothing is hooked onto the shared modules, so one copy of the weights can serve
every role and every thread at once.

Supported families: Llama-style (Llama, SmolLM2, Mistral, Qwen2, Qwen3), GPT-2, Gemma-2 and Gemma-3 (scaled
embeddings, sliding-window layers, final-logit softcap).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .kvcache import Cache, attention_mask
from .sources import ModelSourceError, resolve_source
from .sources import adapter_base as adapter_base_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2"}
GEMMA = {"gemma", "gemma2", "gemma3", "gemma3_text"}
SUPPORTED = LLAMA_LIKE | GEMMA | {"gpt2"}

Patch = Callable[[int, Tensor], Tensor]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}") from None


def text_config(config: Any) -> Any:
    """Multimodal wrappers (Gemma-3) keep the language model's config under `text_config`."""
    return getattr(config, "text_config", None) or config


@dataclass(frozen=True)
class Arch:
    model_type: str
    family: str  # "llama", "gpt2" or "gemma"
    n_layers: int
    d_model: int
    vocab_size: int
    embed_scale: float
    final_softcap: float | None
    layer_types: tuple[str, ...]
    sliding_window: int | None


def describe_arch(config: Any) -> Arch:
    cfg = text_config(config)
    mt = cfg.model_type
    if mt not in SUPPORTED:
        raise ValueError(f"model type {mt!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})")
    family = "gpt2" if mt == "gpt2" else ("gemma" if mt in GEMMA else "llama")
    n_layers = cfg.num_hidden_layers if family != "gpt2" else cfg.n_layer
    declared = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if declared:
        layer_types = tuple(declared)
    elif window is not None:
        # Mistral-style configs name one global window and no layer types: transformers windows every layer
        layer_types = ("sliding_attention",) * n_layers
    else:
        layer_types = ("full_attention",) * n_layers
    window = window if "sliding_attention" in layer_types else None
    return Arch(
        model_type=mt,
        family=family,
        n_layers=n_layers,
        d_model=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        embed_scale=float(cfg.hidden_size**0.5) if family == "gemma" else 1.0,
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        layer_types=layer_types,
        sliding_window=window,
    )


class LM:
    """A frozen causal LM and its tokenizer, with block-range forwards.

    `forward(h, positions, start, stop)` runs blocks `start..stop-1` on hidden states `h` [B, q, d] whose tokens sit
    at absolute `positions` [B, q]; `embed` gives what enters block 0 for token ids (Gemma's √d scale included).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, source: str = "<in memory>") -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self.arch = describe_arch(model.config)
        body: Any = getattr(model, "model", None) or model.transformer
        body = getattr(body, "language_model", body)  # multimodal Gemma-3 wrapper
        self.body = body
        self.blocks: Any
        self.norm: Any
        self.embed_tokens: Any
        self.wpe: Any
        self.rotary: Any
        if self.arch.family == "gpt2":
            self.blocks = body.h
            self.norm = body.ln_f
            self.embed_tokens = body.wte
            self.wpe = body.wpe
            self.rotary = None
        else:
            self.blocks = body.layers
            self.norm = body.norm
            self.embed_tokens = body.embed_tokens
            self.wpe = None
            self.rotary = body.rotary_emb
        self.lm_head: Any = getattr(model, "lm_head", None)
        self.attn_impl = text_config(model.config)._attn_implementation

    # -- properties --------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # -- embeddings ---------------------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """What enters block 0 for these token ids, before absolute position embeddings (GPT-2)."""
        rows = self.embed_tokens.weight[ids]
        if self.arch.embed_scale != 1.0:
            rows = rows * torch.tensor(self.arch.embed_scale, dtype=rows.dtype)
        return rows

    def embed_rows(self, ids: Tensor) -> Tensor:
        """Raw rows of the embedding matrix (no scaling): how soft prompts are initialised."""
        return self.embed_tokens.weight[ids]

    def add_positions(self, h: Tensor, positions: Tensor) -> Tensor:
        """GPT-2 adds learned absolute position embeddings at the input; rotary models do nothing here."""
        if self.wpe is None:
            return h
        return h + self.wpe(positions).to(h.dtype)

    # -- the forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        h: Tensor,
        positions: Tensor,
        *,
        start: int = 0,
        stop: int | None = None,
        cache: Cache | None = None,
        patch: Patch | None = None,
    ) -> Tensor:
        """Run blocks `start..stop-1`; `patch(i, h)` may rewrite the residual entering block i."""
        stop = self.n_layers if stop is None else stop
        if not 0 <= start <= stop <= self.n_layers:
            raise ValueError(f"block range {start}..{stop} outside 0..{self.n_layers}")
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(h.shape[0], -1)
        kpos = cache.begin(positions) if cache is not None else None
        try:
            masks = self._masks(positions, kpos, h.dtype)
            rope = self._rope(h, positions)
            for i in range(start, stop):
                if patch is not None:
                    h = patch(i, h)
                lt = self.arch.layer_types[i]
                kwargs: dict[str, Any] = {"attention_mask": masks[lt], "past_key_values": cache}
                if rope is not None:
                    kwargs["position_embeddings"] = rope[lt] if isinstance(rope, dict) else rope
                    kwargs["position_ids"] = positions
                out = self.blocks[i](h, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        finally:
            if cache is not None:
                cache.end()
        return h

    def _masks(self, qpos: Tensor, kpos: Tensor | None, dtype: torch.dtype) -> dict[str, Tensor | None]:
        types = set(self.arch.layer_types)
        if kpos is None:
            kpos = qpos
            q = qpos.shape[1]
            # A fresh causal forward over contiguous positions can use SDPA's own causal kernel (no mask tensor).
            window_ok = self.arch.sliding_window is None or q <= self.arch.sliding_window
            if self.attn_impl == "sdpa" and window_ok:
                contiguous = q == 1 or bool((qpos[:, 1:] - qpos[:, :-1] == 1).all())
                if contiguous:
                    return dict.fromkeys(types)
        out: dict[str, Tensor | None] = {}
        for lt in types:
            window = self.arch.sliding_window if lt == "sliding_attention" else None
            out[lt] = attention_mask(qpos, kpos, dtype, window)
        return out

    def _rope(self, h: Tensor, positions: Tensor) -> Any:
        if self.rotary is None:
            return None
        if self.arch.model_type.startswith("gemma3"):
            return {lt: self.rotary(h, positions, lt) for lt in set(self.arch.layer_types)}
        return self.rotary(h, positions)

    # -- heads ----------------------------------------------------------------------------------------------
    def final_norm(self, h: Tensor) -> Tensor:
        return self.norm(h)

    def logits(self, h_normed: Tensor, *, softcap: bool = True) -> Tensor:
        """Unembed final-normed states; `softcap=False` reproduces samplers that skip Gemma's logit softcap."""
        if self.lm_head is None:
            raise RuntimeError("this model has no LM head (truncated reconstructor backbone)")
        logits = self.lm_head(h_normed)
        cap = self.arch.final_softcap
        if softcap and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- convenience ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's special tokens, never a second BOS when the text already has one."""
        tok = self.tokenizer
        bos = tok.bos_token
        add = not (bos and text.startswith(bos))
        return list(tok(text, add_special_tokens=add)["input_ids"])

    def residual(self, ids: Tensor, layer: int) -> Tensor:
        """Residual stream after block `layer` (HF `hidden_states[layer+1]`) for one or more rows of ids."""
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        h = self.add_positions(self.embed(ids), positions)
        return self.forward(h, positions, stop=layer + 1)


def sequence_bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's BOS id when it is a real start-of-sequence token, None otherwise.

    Some tokenizers declare as BOS a token their chat template opens every turn with (SmolLM2: `<|im_start|>`,
    never added when encoding); such a token is a turn marker, not a BOS, and no prompt must start with it.
    """
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if not bos or bos_id is None:
        return None
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
            )
        except Exception:  # templates that refuse this conversation say nothing about the BOS
            return int(bos_id)
        if str(text).count(bos) > 1:
            return None
    return int(bos_id)


def load_lm(
    source: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    num_layers: int | None = None,
    progress: bool = True,
    adapter_base: str | None = None,
) -> LM:
    """Load an LM from a local directory, `bundled:NAME` or a hub id; `num_layers` keeps only the first blocks.

    A PEFT LoRA adapter directory loads as its base model (the adapter's `base_model_name_or_path`, or
    `adapter_base` when given: e.g. a local copy of that base) with the adapter merged into a private copy of
    the base weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_source(source, progress=progress)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    adapter_dir = None
    named_base = adapter_base_of(path)
    if named_base is not None:
        adapter_dir, path = path, resolve_source(adapter_base or named_base, progress=progress)
    config = AutoConfig.from_pretrained(path)
    tc = text_config(config)
    arch = describe_arch(config)
    if num_layers is not None:
        _truncate_config(tc, num_layers)
    # Gemma-2 softcaps attention scores, which SDPA cannot do.
    attn = "eager" if arch.model_type == "gemma2" else "sdpa"
    model: Any = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=parse_dtype(dtype),
        attn_implementation=attn,
        # A truncated reconstructor backbone may carry placeholder head weights of another shape
        # (the official release's Megatron-compatible ARs: lm_head = eye(d)); they are never used.
        ignore_mismatched_sizes=num_layers is not None,
    )
    if adapter_dir is not None:
        model = merge_adapter(model, adapter_dir)
    model.to(device)  # type: ignore[arg-type]
    tok_dir = adapter_dir if adapter_dir is not None and _has_tokenizer(adapter_dir) else path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return LM(model, tokenizer, source=source)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def merge_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Merge a PEFT (LoRA) adapter into `model`'s own weights; the model must be a private copy."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        raise ModelSourceError(
            f"{adapter_dir} is a PEFT adapter; loading it needs the peft package"
        ) from None
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except Exception as exc:
        raise ModelSourceError(f"cannot merge the adapter in {adapter_dir}: {exc}") from exc
    return merged  # type: ignore[no-any-return]


def _truncate_config(cfg: Any, n: int) -> None:
    cfg.num_hidden_layers = n
    for key in ("layer_types", "no_rope_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, list):
            setattr(cfg, key, value[:n])


class LMPool:
    """Loaded LMs keyed by (source, dtype, blocks kept): roles that name the same base share one copy of it."""

    def __init__(self, *, dtype: str | torch.dtype = "float32", device: str = "cpu") -> None:
        self.dtype = parse_dtype(dtype)
        self.device = device
        self._models: dict[tuple[str, torch.dtype, int | None], LM] = {}

    def get(
        self,
        source: str,
        *,
        num_layers: int | None = None,
        dtype: str | torch.dtype | None = None,
        adapter_base: str | None = None,
    ) -> LM:
        """`adapter_base` says where the base of a PEFT adapter source is (the merged model is its own copy)."""
        dt = self.dtype if dtype is None else parse_dtype(dtype)
        key = (source, dt, num_layers)
        if key not in self._models:
            full = self._models.get((source, dt, None))
            if num_layers is not None and full is not None:
                return full  # a full model serves any truncated role; its forwards stop early anyway
            self._models[key] = load_lm(
                source, dtype=dt, device=self.device, num_layers=num_layers, adapter_base=adapter_base
            )
        return self._models[key]

    def add(self, lm: LM, source: str | None = None) -> LM:
        self._models[(source or lm.source, lm.dtype, None)] = lm
        return lm

    def models(self) -> list[LM]:
        return list({id(m): m for m in self._models.values()}.values())
