"""An NLA's identity: a digest of everything its rows depend on, read from what is loaded, never from a path.

Two loads of the same files give the same digest; a checkpoint replaced in place, a different base model under
the same name, or a tuned lens added gives another. It covers the configuration (less provenance, which records
when a file was written), the trained tensors, every base model's weights and vocabulary, and the tuned lens.
Base weights are hashed once per load even when several NLAs share them (`memo`), tensor by tensor on a few
threads (hashlib releases the GIL on large buffers), so a multi-gigabyte base costs seconds, once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from .checkpoint import NLA
from .lens import TunedLens
from .lm import LM

HASH_THREADS = 8


def _tensor_digest(name: str, t: torch.Tensor) -> bytes:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(data.data)  # the array's own buffer: no copy
    return h.digest()


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One digest of named tensors (names, dtypes, shapes and bytes), whatever device they are on."""
    items = sorted(tensors, key=lambda kv: kv[0])
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        parts = list(pool.map(lambda kv: _tensor_digest(*kv), items))
    h = hashlib.blake2b(digest_size=32)
    for part in parts:
        h.update(part)
    return h.hexdigest()


def lm_digest(lm: LM) -> str:
    """A base model's weights and vocabulary (buffers included: rotary tables and the like shape activations)."""
    vocab = sorted(lm.tokenizer.get_vocab().items())
    h = hashlib.blake2b(digest_size=32)
    h.update(tensors_digest([*lm.model.named_parameters(), *lm.model.named_buffers()]).encode())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    return h.hexdigest()


def content_hash(nla: NLA, tuned: TunedLens | None = None, memo: dict[int, str] | None = None) -> str:
    """The NLA's identity (hex); `memo` (id of a base model -> its digest) shares base digests between the NLAs
    of one load."""
    memo = {} if memo is None else memo
    config = {k: v for k, v in nla.config().items() if k != "provenance"}
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(tensors_digest(nla.trained_state().items()).encode())
    for lm in (nla.subject, nla.verbalizer.lm, nla.reconstructor.lm):  # their roles matter, not only the set
        if id(lm) not in memo:
            memo[id(lm)] = lm_digest(lm)
        h.update(memo[id(lm)].encode())
    if tuned is not None:
        h.update(tensors_digest(tuned.state_dict().items()).encode())
    return h.hexdigest()
