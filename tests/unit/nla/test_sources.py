"""Model sources: the bundled GGUF conversion is atomic, hub ids fail fast offline, bad paths say what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from talkative.nla.sources import (
    COMPLETE_MARKER,
    ModelSourceError,
    bundled_dir,
    ensure_bundled,
    resolve_source,
)

NAME = "smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TALKATIVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) if models.exists() else []


def test_a_failed_conversion_leaves_nothing_behind(cache, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the conversion

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_bundled(NAME, progress=False)
    assert _leftovers(cache) == []


KILLED = textwrap.dedent(
    """
    import os, signal
    import transformers
    from talkative.nla.sources import ensure_bundled

    def die(self, *a, **k):  # the model's weights are written by now: kill -9 mid-conversion
        os.kill(os.getpid(), signal.SIGKILL)

    transformers.PreTrainedTokenizerBase.save_pretrained = die
    ensure_bundled("smollm2-135m-instruct", progress=False)
    """
)


@pytest.mark.slow
def test_a_killed_conversion_never_leaves_a_broken_cache(cache):
    env = {**os.environ, "TALKATIVE_CACHE": str(cache.parent)}
    proc = subprocess.run([sys.executable, "-c", KILLED], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    target = bundled_dir(NAME)
    assert not target.exists()  # nothing at the real path
    stale = [p for p in cache.iterdir() if p.name.startswith(f".{NAME}-")]
    assert stale and any(f.name.endswith(".safetensors") for f in stale[0].iterdir())  # it was mid-write
    # a leftover directory without the completion marker (an older, non-atomic writer) is replaced too
    target.mkdir()
    (target / "config.json").write_text("{}")
    path = ensure_bundled(NAME, progress=False)
    assert path == target and (target / COMPLETE_MARKER).is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}
    assert _leftovers(cache) == [NAME]  # the stale temporary directory is gone
    from talkative.nla.lm import load_lm

    lm = load_lm(f"bundled:{NAME}", progress=False)
    assert (lm.n_layers, lm.d_model) == (30, 576)


def test_a_complete_cache_is_reused_without_converting(cache, monkeypatch):
    target = bundled_dir(NAME)
    target.mkdir(parents=True)
    (target / COMPLETE_MARKER).write_text("done")
    import talkative.nla.sources as sources

    monkeypatch.setattr(sources, "_convert_bundled", lambda *a, **k: pytest.fail("converted again"))
    assert ensure_bundled(NAME) == target


def test_unknown_bundled_model(cache):
    with pytest.raises(
        ModelSourceError, match="unknown bundled model 'nope'; available: smollm2-135m-instruct"
    ):
        resolve_source("bundled:nope")


def _check_hub_message(msg: str) -> None:
    assert "SomeOrg/some-model" in msg and "local path" in msg and "bundled:smollm2-135m-instruct" in msg


def test_a_hub_id_fails_fast_offline_naming_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelSourceError) as err:
        resolve_source("SomeOrg/some-model")
    assert time.perf_counter() - t0 < 5
    _check_hub_message(str(err.value))


HUB = textwrap.dedent(
    """
    import time
    from talkative.nla.sources import ModelSourceError, resolve_source
    t0 = time.perf_counter()
    try:
        resolve_source("SomeOrg/some-model")
    except ModelSourceError as exc:
        print(f"{time.perf_counter() - t0:.2f}")
        print(exc)
    """
)


@pytest.mark.parametrize("endpoint", [None, "https://10.255.255.1"], ids=["default-hub", "unroutable"])
def test_a_hub_id_without_a_reachable_hub_fails_fast(tmp_path, endpoint):
    """No HF_HUB_OFFLINE: the hub is tried for real (here it cannot be reached, or a proxy answers instead)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env["HF_HOME"] = str(tmp_path / "hf")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HUB], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, message = proc.stdout.split("\n", 1)
    assert float(seconds) < 15, (seconds, time.perf_counter() - t0)
    _check_hub_message(message)


def test_local_paths(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing-model"))
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == tmp_path
