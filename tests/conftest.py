"""Shared fixtures: tiny random models built from configs (fast), and the bundled SmolLM2 (one per session)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from talkative.nla.lm import LM, load_lm
from talkative.nla.sources import DEFAULT_SOURCE, ensure_bundled


@pytest.fixture(autouse=True)
def _ray_address_unchanged():
    """A test that leaves RAY_ADDRESS changed in this process's environment would send every later test's Ray
    cluster (and every server process started after it) to that address: put it back and fail that test."""
    before = os.environ.get("RAY_ADDRESS")
    yield
    after = os.environ.get("RAY_ADDRESS")
    if after != before:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before
        pytest.fail(f"the test left RAY_ADDRESS={after!r} in the environment (was {before!r})")


@pytest.fixture(scope="session")
def smol_dir():
    """The converted bundled model directory (tokenizer and weights)."""
    return ensure_bundled("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def _tiny_config(kind: str, vocab: int):
    from transformers import Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
    if kind == "qwen2":
        return Qwen2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=512)
    if kind == "gemma2":
        return Gemma2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=8,
            query_pre_attn_scalar=16,
        )
    if kind == "gemma3":
        return Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        )
    raise ValueError(kind)


@pytest.fixture(scope="session")
def make_tiny(tokenizer) -> Callable[..., LM]:
    """Build a tiny random LM of a family; same seed, same weights."""
    from transformers import AutoModelForCausalLM

    def build(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> LM:
        cfg = _tiny_config(kind, len(tokenizer))
        cfg._attn_implementation = "eager" if kind == "gemma2" else "sdpa"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        return LM(model, tokenizer, source=f"tiny-{kind}")

    return build


@pytest.fixture(scope="session")
def tiny_llama(make_tiny) -> LM:
    return make_tiny("llama")


@pytest.fixture(scope="session")
def smollm2() -> LM:
    """The bundled SmolLM2-135M-Instruct, loaded once per test session (fp32)."""
    return load_lm(DEFAULT_SOURCE, progress=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, make_tiny, tokenizer):
    """A tiny random Llama saved as an HF directory (with the SmolLM2 tokenizer): a model source for loaders."""
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = make_tiny("llama", seed=3)
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server (tests/pg_cluster.py), started once per session and removed after it."""
    from pg_cluster import pg_cluster

    with pg_cluster() as server:
        yield server


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh, empty PostgreSQL database for one test, dropped after it."""
    url = pg_server.fresh_database()
    yield url
    pg_server.drop_database(url)
