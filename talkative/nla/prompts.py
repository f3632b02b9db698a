"""Prompt helpers shared by the verbalizers, reconstructors, generation and analysis: how a prompt fragment is
tokenised, which tokens end a turn, and the memo that keeps a shared prompt prefix's KV cache between calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from torch import Tensor
from transformers import GenerationConfig

from .kvcache import KVCache
from .lm import LM

#: end-of-turn markers of the chat templates Talkative serves (each counts only where the tokenizer has it)
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<return>")


def encode_piece(lm: LM, text: str) -> list[int]:
    """Tokens of a prompt fragment, no special tokens added (a literal `<bos>` in the text still parses)."""
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def end_of_turn_ids(lm: LM) -> set[int]:
    """Every token id that ends a turn for this model: EOS, the chat templates' end markers it knows, and the
    ids its generation config names."""
    tok = lm.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for name in END_OF_TURN_TOKENS:
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
            ids.add(tid)
    # every transformers model has one (None when it cannot generate); torch's Module typing cannot tell
    config = cast(GenerationConfig | None, lm.model.generation_config)
    gen_eos = None if config is None else config.eos_token_id
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, Sequence):
        ids.update(int(i) for i in gen_eos)
    return ids


class PrefixMemo:
    """Remembers the KV cache of a shared prompt prefix until the tensors it was computed from change."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._cache: KVCache | None = None

    def get(self, key: tuple[object, ...]) -> KVCache | None:
        return self._cache if key == self._key else None

    def put(self, key: tuple[object, ...], cache: KVCache) -> None:
        self._key, self._cache = key, cache


def tensor_key(*tensors: Tensor | None) -> tuple[object, ...]:
    """A key that changes whenever one of the tensors is replaced or written in place (its version counter)."""
    return tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)
