"""Upstream "talkative autoencoder" checkpoints: one `torch.save` pickle per save, `.pt`, in a run directory.

Layout (see `docs/checkpoints.md`): top-level `config` (the resolved training config), `models.decoder` and
`models.encoder` (the trained tensors only, base weights dropped), plus training state we never read (optimizer,
scheduler, RNG states...). The decoder is our `LayerReplacementVerbalizer`, the encoder our
`SoftPromptReconstructor`; `DECODER_KEYS` / `ENCODER_KEYS` map their parameter names onto ours.

Loading never unpickles arbitrary objects unless asked to: `torch.load(weights_only=True)` with a small allow-list
(numpy arrays of the saved RNG states); a file that needs more is refused unless `trust_checkpoint=True`. Nothing
here touches global RNG state (upstream restored the training RNG on load).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import NLA, CheckpointError, utc_now
from ..lm import LM, LMPool
from ..reconstructor import SoftPromptReconstructor
from ..sources import adapter_base
from ..verbalizer import EMBED_PLACEHOLDER, LayerReplacementVerbalizer
from .native import atomic_write, load_trained_state
from .spec import CheckpointFormat

log = logging.getLogger(__name__)

# upstream decoder / encoder state-dict key -> our parameter name (under `verbalizer.` / `reconstructor.`)
DECODER_KEYS = {
    "proj_weight": "proj_weight",  # [N, d, d], per-layer projections W_i
    "proj_bias": "proj_bias",  # [N, d], b_i
    "prompt_left_emb": "prompt_left_emb",  # [n_left, d], soft prompt before <embed>
    "prompt_right_emb": "prompt_right_emb",  # [n_right, d], soft prompt after <embed>
}
ENCODER_KEYS = {
    "soft_prompt_embeddings": "soft_prompt",  # [n_pre, d]
    "soft_prompt_embeddings_postfix": "soft_prompt_post",  # [n_post, d]
    "special_last_token_vector": "special_vector",  # [d], added to the last input row
    "proj.weight": "head.weight",  # optional d x d affine on the read-out ("use_projection_layer")
    "proj.bias": "head.bias",
}
# upstream keys that hold no trained behaviour
DECODER_IGNORED = {"prompt_ids"}  # left + [eos] + right token ids, for logging; checked against our tokenizer
COMPILE_PREFIX = "_orig_mod."


class _SafeLoadRefused(CheckpointError):
    pass


# -- reading the file ---------------------------------------------------------------------------------------------
def candidate_files(path: Path) -> list[Path]:
    """A `.pt` file, or a run directory's `*.pt` files newest first."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        raise CheckpointError(f"{path} holds no *.pt checkpoint")
    return files


def _safe_globals() -> list[Any]:
    """What weights-only unpickling may build besides tensors and containers: numpy arrays (saved RNG states)."""
    out: list[Any] = []
    try:
        import numpy as np

        out += [np.ndarray, np.dtype]
        try:
            from numpy._core.multiarray import _reconstruct, scalar
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
        out += [_reconstruct, scalar]
        out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "int32", "bool")]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return out


class _Unreadable(Exception):
    pass


def _load_pickle(file: Path, trust: bool) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:  # a well-formed file that names globals outside the allow-list, or just a broken file?
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception:
            needed = []
        if not needed:
            raise _Unreadable(str(exc).splitlines()[0]) from None
        if not trust:
            extra = [n for n in needed if not n.startswith("numpy")] or needed
            raise _SafeLoadRefused(
                f"{file} needs arbitrary unpickling to load (it contains {', '.join(extra)}). Unpickling can run "
                "code from the file: pass --trust-checkpoint (trust_checkpoint=True) only for a file whose "
                "origin you trust."
            ) from None
        obj = torch.load(file, map_location="cpu", weights_only=False)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not an upstream checkpoint dict")
    return dict(obj)


def read_checkpoint_file(path: Path, *, trust: bool = False) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint at `path` (a file or a run directory) and its contents.

    An unreadable file (truncated or corrupt archive) is skipped in favour of the next newest, as upstream does;
    a file refused for safety is never silently replaced by an older one.
    """
    errors = []
    for file in candidate_files(path):
        try:
            return file, _load_pickle(file, trust)
        except CheckpointError:
            raise
        except (_Unreadable, RuntimeError, EOFError, OSError, ValueError) as exc:
            errors.append(f"{file.name}: {exc}".splitlines()[0])
            log.warning("skipping unreadable checkpoint %s: %s", file, exc)
    raise CheckpointError(f"no readable checkpoint in {path}: " + "; ".join(errors))


# -- the configuration --------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """Hydra/OmegaConf containers (present in trusted pickles) as plain dicts and lists."""
    if isinstance(obj, Mapping) or (hasattr(obj, "items") and not isinstance(obj, (str, bytes, Tensor))):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    return obj


@dataclass
class UpstreamConfig:
    """What the analyzer needs from an upstream checkpoint's `config`."""

    layer: int
    t_text: int
    decoder_prompt: str
    encoder_prompt: str
    patch_all_layers: bool | int | str
    per_layer_projections: bool
    new_decoder: bool
    output_layer: int
    add_current_token: bool
    special_last_token_vector: bool
    use_projection_layer: bool
    model_name: str
    tokenizer_name: str | None
    orig_model_name: str | None
    model_dtype: str | None
    talkative: dict[str, Any] = field(default_factory=dict)

    def patch_layers(self, n_layers: int) -> int:
        """N: True = every block, an int = the first N, False / "just_input" = none (input embedding only)."""
        p = self.patch_all_layers
        if p is True:
            return n_layers
        if p is False or p is None or p == "just_input":
            return 0
        if isinstance(p, int) and 0 <= p <= n_layers:
            return p
        raise CheckpointError(
            f"patch_all_layers={p!r} is not True, False, 'just_input' or an int in 0..{n_layers}"
        )


UNSUPPORTED_DECODER = {
    "output_head": "a trained output head",
    "subtract_add_pos_embeddings": "position-embedding subtraction",
    "base_model": "a fine-tuned base model",
}
UNSUPPORTED_ENCODER = {
    "subtract_add_pos_embeddings": "position-embedding subtraction",
    "base_model": "a fine-tuned base model",
}


def parse_config(raw: Any, where: str) -> UpstreamConfig:
    cfg = _plain(raw)
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{where} has no `config` dict: not an upstream talkative-autoencoder checkpoint"
        )
    tc = cfg.get("trainable_components") or {}
    dec = tc.get("decoder") or {}
    enc = tc.get("encoder") or {}
    missing = [k for k in ("layer_l", "t_text", "decoder_prompt", "model_name") if cfg.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: config lacks {', '.join(missing)}")
    for flags, names, role in ((dec, UNSUPPORTED_DECODER, "decoder"), (enc, UNSUPPORTED_ENCODER, "encoder")):
        for key, what in names.items():
            if flags.get(key):
                raise CheckpointError(
                    f"{where}: the {role} uses {what} ({key}=True), which Talkative does not run"
                )
    if enc.get("use_base_model") is False:
        raise CheckpointError(f"{where}: the encoder does not run on the base model (use_base_model=False)")
    encoder_prompt = enc.get("soft_prompt_init_text") or cfg.get("encoder_prompt")
    if not encoder_prompt:
        if enc.get("soft_prompt_length"):
            raise CheckpointError(
                f"{where}: the encoder soft prompt was initialised randomly (no soft_prompt_init_text); "
                "Talkative sizes soft prompts from their init text"
            )
        encoder_prompt = ""
    decoder_prompt = str(cfg["decoder_prompt"])
    if decoder_prompt.count(EMBED_PLACEHOLDER) != 1:
        raise CheckpointError(
            f"{where}: decoder_prompt must contain {EMBED_PLACEHOLDER} once: {decoder_prompt!r}"
        )
    layer = int(cfg["layer_l"])
    return UpstreamConfig(
        layer=layer,
        t_text=int(cfg["t_text"]),
        decoder_prompt=decoder_prompt,
        encoder_prompt=str(encoder_prompt),
        patch_all_layers=dec.get("patch_all_layers", False),
        per_layer_projections=bool(dec.get("per_layer_projections", False)),
        new_decoder=bool(dec.get("new_decoder", False)),
        output_layer=int(enc["output_layer"]) if enc.get("output_layer") is not None else layer,
        add_current_token=bool(enc.get("add_current_token", False)),
        special_last_token_vector=bool(enc.get("special_last_token_vector", False)),
        use_projection_layer=bool(enc.get("use_projection_layer", False)),
        model_name=str(cfg["model_name"]),
        tokenizer_name=cfg.get("tokenizer_name"),
        orig_model_name=cfg.get("orig_model_name"),
        model_dtype=cfg.get("model_dtype"),
        talkative=cfg.get("talkative") or {},
    )


def _strip(state: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} is missing")
    out = {}
    for k, v in state.items():
        key = str(k)
        while key.startswith(COMPILE_PREFIX):
            key = key[len(COMPILE_PREFIX) :]
        out[key] = v
    return out


@dataclass
class UpstreamCheckpoint:
    file: Path
    config: UpstreamConfig
    decoder: dict[str, Tensor]
    encoder: dict[str, Tensor]
    step: Any = None


def read_upstream(path: Path, *, trust: bool = False) -> UpstreamCheckpoint:
    file, obj = read_checkpoint_file(path, trust=trust)
    if "config" not in obj or "models" not in obj:
        raise CheckpointError(
            f"{file} lacks `config` or `models`: not an upstream talkative-autoencoder checkpoint"
        )
    cfg = parse_config(obj["config"], str(file))
    models = obj["models"] if isinstance(obj["models"], Mapping) else {}
    return UpstreamCheckpoint(
        file=file,
        config=cfg,
        decoder=_strip(models.get("decoder"), f"{file}: models.decoder"),
        encoder=_strip(models.get("encoder"), f"{file}: models.encoder"),
        step=obj.get("step"),
    )


# -- mapping onto the engine --------------------------------------------------------------------------------------
def _decoder_state(ck: UpstreamCheckpoint, n_patch: int) -> dict[str, Tensor]:
    """Decoder tensors under our names; a single `proj` serves every patched block, `new_decoder` drops the
    input map that block 0's replacement overwrites."""
    where = f"{ck.file}: models.decoder"
    dec = dict(ck.decoder)
    unknown = sorted(set(dec) - set(DECODER_KEYS) - DECODER_IGNORED - {"proj.weight", "proj.bias"})
    if unknown:
        raise CheckpointError(f"{where} has tensors Talkative does not know how to run: {unknown}")
    n_ours = max(n_patch, 1)
    if "proj_weight" in dec:
        W, b = dec["proj_weight"], dec.get("proj_bias")
        if b is None:
            b = torch.zeros(W.shape[:2], dtype=W.dtype)
        if ck.config.new_decoder:
            # index 0 is the input map, block i uses index i + 1: with N > 0 block 0's replacement overwrites
            # the input map's output, so only the block maps matter
            W, b = (W[1:], b[1:]) if n_patch > 0 else (W[:1], b[:1])
    elif "proj.weight" in dec:
        w = dec["proj.weight"]
        bias = dec.get("proj.bias", torch.zeros(w.shape[0], dtype=w.dtype))
        W = w.unsqueeze(0).expand(n_ours, -1, -1).clone()
        b = bias.unsqueeze(0).expand(n_ours, -1).clone()
    else:
        raise CheckpointError(f"{where} has no projection (proj_weight or proj.weight)")
    if W.dim() != 3 or W.shape[0] != n_ours:
        raise CheckpointError(
            f"{where}: {tuple(W.shape)} projections for patch_all_layers={ck.config.patch_all_layers!r} "
            f"(expected {n_ours})"
        )
    out = {"verbalizer.proj_weight": W, "verbalizer.proj_bias": b}
    for key in ("prompt_left_emb", "prompt_right_emb"):
        if key not in dec:
            raise CheckpointError(f"{where} lacks {key}")
        out[f"verbalizer.{DECODER_KEYS[key]}"] = dec[key]
    return out


def _encoder_state(ck: UpstreamCheckpoint) -> tuple[dict[str, Tensor], list[str]]:
    where = f"{ck.file}: models.encoder"
    enc = dict(ck.encoder)
    unknown = sorted(set(enc) - set(ENCODER_KEYS))
    if unknown:
        raise CheckpointError(f"{where} has tensors Talkative does not know how to run: {unknown}")
    ignored = []
    out = {}
    for key, ours in ENCODER_KEYS.items():
        if key not in enc:
            continue
        if key.startswith("proj.") and not ck.config.use_projection_layer:
            ignored.append(key)  # upstream builds no projection then and loads non-strictly
            continue
        if key == "special_last_token_vector" and not ck.config.special_last_token_vector:
            ignored.append(key)
            continue
        out[f"reconstructor.{ours}"] = enc[key]
    return out, ignored


def _check_prompt_ids(ck: UpstreamCheckpoint, verbalizer: LayerReplacementVerbalizer) -> None:
    ids = ck.decoder.get("prompt_ids")
    if ids is None:
        return
    got = [int(t) for t in ids.reshape(-1).tolist()]
    left, right = verbalizer.left_ids, verbalizer.right_ids
    if len(got) != len(left) + 1 + len(right) or got[: len(left)] != left or got[len(left) + 1 :] != right:
        raise CheckpointError(
            f"{ck.file}: the decoder prompt tokenizes to {left} <embed> {right} with this tokenizer, but the "
            f"checkpoint was trained with {got}: the base model's tokenizer is not the one it was trained with"
        )


def _output_layer(cfg: UpstreamConfig, n_layers: int, where: str) -> int:
    if cfg.output_layer == -1:
        return n_layers - 1
    if not 0 <= cfg.output_layer < n_layers:
        raise CheckpointError(
            f"{where}: encoder output_layer {cfg.output_layer} is not a block of the base (0..{n_layers - 1}; "
            "-2, the embedding output, is not supported)"
        )
    return cfg.output_layer


def _subject(
    cfg: UpstreamConfig, pool: LMPool, base: LM, base_source: str, subject_override: str | None
) -> tuple[LM, str]:
    """The model whose activations are explained: a donor override, else `orig_model_name`, else the base.

    A PEFT adapter whose base is the checkpoint's base model is merged into a copy of that base (the local one
    when the base was overridden with a local path)."""
    source = subject_override or cfg.orig_model_name or cfg.model_name
    if source in (cfg.model_name, base_source):
        return base, base_source
    named = adapter_base(source) if Path(source).expanduser().is_dir() else None
    adapter_on = base_source if named is not None and named in (cfg.model_name, base_source) else None
    return pool.get(source, adapter_base=adapter_on), source


def build_nla(
    ck: UpstreamCheckpoint,
    *,
    pool: LMPool,
    subject_override: str | None = None,
    base_override: str | None = None,
    fve_variance: float | None = None,
) -> NLA:
    cfg = ck.config
    where = str(ck.file)
    base_source = base_override or cfg.model_name
    base = pool.get(base_source)
    subject, subject_source = _subject(cfg, pool, base, base_source, subject_override)
    if subject.d_model != base.d_model:
        raise CheckpointError(
            f"{where}: subject {subject_source} has d_model {subject.d_model}, the base {base_source} {base.d_model}"
        )
    if not 0 <= cfg.layer < subject.n_layers:
        raise CheckpointError(f"{where}: layer_l {cfg.layer} outside the subject's 0..{subject.n_layers - 1}")
    n_patch = cfg.patch_layers(base.n_layers)
    try:
        verbalizer = LayerReplacementVerbalizer(
            base,
            prompt=cfg.decoder_prompt,
            patch_layers=n_patch,
            t_text=cfg.t_text,
            softcap_sampling=False,
            grammar=cfg.talkative.get("grammar"),
        )
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    _check_prompt_ids(ck, verbalizer)
    enc_state, ignored = _encoder_state(ck)
    head = "none"
    if cfg.use_projection_layer:
        if "reconstructor.head.weight" not in enc_state:
            raise CheckpointError(
                f"{where}: use_projection_layer is set but models.encoder has no proj.weight"
            )
        head = "linear" if "reconstructor.head.bias" in enc_state else "linear_nobias"
    reconstructor = SoftPromptReconstructor(
        base,
        prompt=cfg.encoder_prompt,
        output_layer=_output_layer(cfg, base.n_layers, where),
        add_current_token=cfg.add_current_token,
        special_last_token_vector=cfg.special_last_token_vector,
        head=head,
    )
    extra = cfg.talkative
    baseline = extra.get("fve_baseline")
    if fve_variance is not None:
        baseline = {"variance": float(fve_variance), "kind": "given"}
    base_ref: Any = "subject" if base is subject else {"source": base_source}
    provenance = dict(extra.get("provenance") or {})
    provenance.setdefault("from", "upstream")
    provenance.update(
        {
            "upstream_file": str(ck.file),
            "upstream_step": ck.step,
            "model_dtype": cfg.model_dtype,
            "tokenizer_name": cfg.tokenizer_name,
            **({"ignored_tensors": ignored} if ignored else {}),
        }
    )
    nla = NLA(
        subject=subject,
        layer=cfg.layer,
        verbalizer=verbalizer,
        reconstructor=reconstructor,
        subject_source=subject_source,
        fve_variance=None if not baseline else float(baseline["variance"]),
        objective=str(extra.get("objective", "mse")),
        name=str(extra.get("name") or (ck.file.parent.name if ck.file.parent.name else ck.file.stem)),
        provenance=provenance,
        fve_baseline=baseline,
        bases={"verbalizer": base_ref, "reconstructor": base_ref},
    )
    state = {**_decoder_state(ck, n_patch), **enc_state}
    load_trained_state(nla, state, where)
    if ignored:
        log.warning("%s: ignored tensors switched off by the config: %s", where, ignored)
    return nla


def detect(path: Path) -> bool:
    return path.suffix == ".pt" if path.is_file() else any(path.glob("*.pt"))


def load_upstream(
    path: Path,
    *,
    pool: LMPool,
    trust_checkpoint: bool = False,
    subject_override: str | None = None,
    base_override: str | None = None,
    fve_variance: float | None = None,
    **_: Any,
) -> NLA:
    """An NLA from an upstream `.pt` (or the newest readable one of a run directory).

    `base_override` replaces the base model the checkpoint names (e.g. a local copy of a hub model);
    `subject_override` names a donor whose activations are explained instead (a model or a PEFT adapter dir).
    """
    ck = read_upstream(Path(path), trust=trust_checkpoint)
    return build_nla(
        ck,
        pool=pool,
        subject_override=subject_override,
        base_override=base_override,
        fve_variance=fve_variance,
    )


# -- writing ------------------------------------------------------------------------------------------------------
def _source_of(nla: NLA, role: str) -> str:
    base = nla.bases.get(role, "subject")
    if base == "subject":
        return nla.subject_source
    if isinstance(base, dict) and "source" in base:
        return str(base["source"])
    raise CheckpointError(f"the {role} runs on {base!r}: upstream checkpoints name their base by model id")


def upstream_state(nla: NLA) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """(config, decoder state, encoder state) of an NLA of the upstream architecture, as upstream saves them."""
    v, r = nla.verbalizer, nla.reconstructor
    if not isinstance(v, LayerReplacementVerbalizer) or not isinstance(r, SoftPromptReconstructor):
        raise CheckpointError(
            f"only NLAs of the upstream architecture (layer_replacement verbalizer + soft_prompt reconstructor) "
            f"convert to upstream .pt; this one has {v.mode} + {r.mode}"
        )
    base_source = _source_of(nla, "verbalizer")
    if _source_of(nla, "reconstructor") != base_source:
        raise CheckpointError("upstream decoders and encoders share one base model; these two differ")
    if v.softcap_sampling:
        raise CheckpointError("upstream decoders sample without the logit softcap; this one uses it")
    lm = v.lm
    eos = lm.tokenizer.eos_token_id
    prompt_ids = torch.tensor([*v.left_ids, eos if eos is not None else 0, *v.right_ids], dtype=torch.long)
    decoder = {
        "proj_weight": v.proj_weight.detach().clone(),
        "proj_bias": v.proj_bias.detach().clone(),
        "prompt_left_emb": v.prompt_left_emb.detach().clone(),
        "prompt_right_emb": v.prompt_right_emb.detach().clone(),
        "prompt_ids": prompt_ids,
    }
    encoder = {"soft_prompt_embeddings": r.soft_prompt.detach().clone()}
    if r.soft_prompt_post is not None:
        encoder["soft_prompt_embeddings_postfix"] = r.soft_prompt_post.detach().clone()
    if r.special_vector is not None:
        encoder["special_last_token_vector"] = r.special_vector.detach().clone()
    if r.head is not None:
        encoder["proj.weight"] = r.head.weight.detach().clone()
        if r.head.bias is not None:
            encoder["proj.bias"] = r.head.bias.detach().clone()
    dtype = str(v.proj_weight.dtype).removeprefix("torch.")
    config = {
        "layer_l": nla.layer,
        "t_text": v.t_text,
        "decoder_prompt": v.prompt,
        "encoder_prompt": r.prompt,
        "model_name": base_source,
        "tokenizer_name": base_source,
        "orig_model_name": nla.subject_source,
        "model_dtype": dtype,
        "trainable_components": {
            "decoder": {
                "base_model": False,
                "projection_layer": True,
                "output_head": False,
                "trainable_prompts": True,
                "use_kv_cache": True,
                "patch_all_layers": v.patch_layers if v.patch_layers > 0 else "just_input",
                "per_layer_projections": True,
            },
            "encoder": {
                "base_model": False,
                "use_base_model": True,
                "projection_layer": r.head is not None,
                "use_projection_layer": r.head is not None,
                "output_layer": r.output_layer,
                "soft_prompt_init_text": r.prompt,
                "add_current_token": r.add_current_token,
                "special_last_token_vector": r.special_vector is not None,
            },
        },
        # Talkative's own fields, so that native -> upstream -> native keeps everything
        "talkative": {
            "name": nla.name,
            "objective": nla.objective,
            "fve_baseline": nla.fve_baseline
            or (None if nla.fve_variance is None else {"variance": nla.fve_variance, "kind": "rawvar"}),
            "provenance": nla.provenance,
            # upstream's own code samples free text; Talkative reads the grammar back and samples in it
            "grammar": v.grammar,
        },
    }
    return config, decoder, encoder


def save_upstream(nla: NLA, path: Path, *, step: int = 0) -> Path:
    """Write an upstream `.pt` (a file path ending in .pt, or a run directory to write one into)."""
    config, decoder, encoder = upstream_state(nla)
    path = Path(path)
    if path.suffix != ".pt":
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"checkpoint_step{step}_epoch0_final.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "step": step,
        "epoch": 0,
        "models": {"decoder": decoder, "encoder": encoder},
        "config": config,
        "metrics": {},
        "created_by": f"talkative convert ({utc_now()})",
    }
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


# -- inspection ---------------------------------------------------------------------------------------------------
def describe_upstream(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """What `talkative inspect` prints, without loading any model."""
    ck = read_upstream(Path(path), trust=trust)
    cfg = ck.config
    W = ck.decoder.get("proj_weight", ck.decoder.get("proj.weight"))
    d = int(W.shape[-1]) if W is not None else None
    n_params = sum(t.numel() for t in [*ck.decoder.values(), *ck.encoder.values()] if t.is_floating_point())
    return {
        "format": "upstream",
        "file": str(ck.file),
        "file_bytes": ck.file.stat().st_size,
        "step": ck.step,
        "subject": cfg.orig_model_name or cfg.model_name,
        "base": cfg.model_name,
        "tokenizer": cfg.tokenizer_name,
        "layer": cfg.layer,
        "d_model": d,
        "t_text": cfg.t_text,
        "patch_all_layers": cfg.patch_all_layers,
        "per_layer_projections": cfg.per_layer_projections,
        "encoder_output_layer": cfg.output_layer,
        "add_current_token": cfg.add_current_token,
        "special_last_token_vector": cfg.special_last_token_vector,
        "encoder_projection": cfg.use_projection_layer,
        "model_dtype": cfg.model_dtype,
        "trained_parameters": n_params,
        "tensors": {
            **{f"decoder.{k}": list(v.shape) for k, v in ck.decoder.items()},
            **{f"encoder.{k}": list(v.shape) for k, v in ck.encoder.items()},
        },
    }


SPEC = CheckpointFormat(
    name="upstream",
    expects="*.pt (upstream run directory)",
    detect=detect,
    load=load_upstream,
    describe=describe_upstream,
    save=save_upstream,
    file_hint="an upstream .pt checkpoint",
    base_by_id=True,
)
