"""The official NLA release: an AV model directory and an AR model directory, each with an `nla_meta.yaml` sidecar.

* AV: a full fine-tune of the subject's instruct model (`config.json`, safetensors, tokenizer). It reads its chat
  template with a marker token whose input embedding is replaced by the activation rescaled to `injection_scale`
  (`EmbeddingReplacementVerbalizer`).
* AR: the first K+1 blocks of a fine-tune (no final norm, no LM head) plus `value_head.safetensors`
  (`weight` [d, d], optional `bias`), reading `Summary of the following text: <text>{explanation}</text> <summary>`
  (`TemplateReconstructor`). Scores are direction-only (`objective="nmse"`), FVE against the rawvar baseline.

On disk, Talkative accepts (see `docs/checkpoints.md`):
1. a directory holding `av/` and `ar/` (each a model directory with its sidecar; symlinks are fine);
2. the AV (or AR) directory itself when its partner sits beside it under the release naming (`…-av` / `…-ar`,
   `…actor…` / `…critic…`).

The sidecar keys are read leniently (releases name the roles av/ar, actor/critic or verbalizer/reconstructor),
and every startup check of the reference implementation is made with a message saying what does not match.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..checkpoint import NLA, CheckpointError, utc_now
from ..lm import LM, LMPool
from ..prompts import encode_piece
from ..reconstructor import OFFICIAL_AR_TEMPLATE, TemplateReconstructor
from ..verbalizer import EmbeddingReplacementVerbalizer
from .spec import CheckpointFormat

SIDECAR = "nla_meta.yaml"
VALUE_HEAD = "value_head.safetensors"
AV_ROLES = ("av", "actor", "verbalizer")
AR_ROLES = ("ar", "critic", "reconstructor")
INJECT_PLACEHOLDER = "<INJECT>"
OFFICIAL_AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from a "
    "language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets "
    "describing that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\n"
    "Please provide an explanation."
)

# Var(v_nrm) ("rawvar", the FVE denominator) of the released pairs: the public sidecars do not carry it.
RELEASED_VARIANCES: dict[tuple[str, int], float] = {
    ("Qwen/Qwen2.5-7B-Instruct", 20): 0.7335,
    ("google/gemma-3-12b-it", 32): 0.0302,
    ("google/gemma-3-27b-it", 41): 0.0579,
    ("meta-llama/Llama-3.3-70B-Instruct", 53): 0.9169,
}


# -- layout -------------------------------------------------------------------------------------------------------
def read_sidecar(directory: Path) -> dict[str, Any]:
    f = directory / SIDECAR
    if not f.is_file():
        raise CheckpointError(f"{directory} has no {SIDECAR}: not an official NLA AV/AR directory")
    try:
        meta = yaml.safe_load(f.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{f} is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} does not hold a mapping")
    return meta


def role_of(meta: dict[str, Any], where: Path) -> str:
    role = str(meta.get("role", "")).lower()
    if role in AV_ROLES:
        return "av"
    if role in AR_ROLES:
        return "ar"
    raise CheckpointError(f"{where / SIDECAR}: role {meta.get('role')!r} is none of {AV_ROLES + AR_ROLES}")


def _partner(directory: Path, role: str) -> Path | None:
    name = directory.name
    if name in ("av", "ar"):  # one half of an av/ + ar/ pair
        cand = directory.with_name("ar" if name == "av" else "av")
        return cand if (cand / SIDECAR).is_file() else None
    swaps = [("-av", "-ar"), ("_av", "_ar"), ("actor", "critic"), ("verbalizer", "reconstructor")]
    if role == "ar":
        swaps = [(b, a) for a, b in swaps]
    for a, b in swaps:
        if a in name:
            head, tail = name.rsplit(a, 1)
            cand = directory.with_name(head + b + tail)
            if (cand / SIDECAR).is_file():
                return cand
    return None


def detect(path: Path) -> bool:
    return path.is_dir() and (
        (path / SIDECAR).is_file() or ((path / "av").is_dir() and (path / "ar").is_dir())
    )


def locate_pair(path: Path) -> tuple[Path, Path]:
    """(AV directory, AR directory) for a checkpoint path."""
    path = Path(path).expanduser()
    if (path / "av").is_dir() and (path / "ar").is_dir():
        return path / "av", path / "ar"
    if (path / SIDECAR).is_file():
        role = role_of(read_sidecar(path), path)
        other = _partner(path, role)
        if other is None:
            want = "AR" if role == "av" else "AV"
            raise CheckpointError(
                f"{path} is an {role.upper()} directory but no {want} directory with a sidecar sits beside it "
                "under the release naming (…-av / …-ar); put both in one directory as av/ and ar/"
            )
        return (path, other) if role == "av" else (other, path)
    raise CheckpointError(
        f"{path} is not an official NLA checkpoint: expected av/ + ar/ or a directory with {SIDECAR}"
    )


# -- sidecar fields -----------------------------------------------------------------------------------------------
def _get(meta: dict[str, Any], *path: str) -> Any:
    cur: Any = meta
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _template(meta: dict[str, Any], roles: tuple[str, ...]) -> str | None:
    templates = meta.get("prompt_templates") or {}
    for role in roles:
        if isinstance(templates, dict) and templates.get(role):
            return str(templates[role])
    return None


def extraction_layer(ar_meta: dict[str, Any], ar_config: dict[str, Any]) -> int:
    """K for the AR: critic.extraction_layer_index, critic.num_hidden_layers (schema 1), the top-level
    extraction_layer_index, else config.num_hidden_layers − 1."""
    for path in (
        ("critic", "extraction_layer_index"),
        ("reconstructor", "extraction_layer_index"),
        ("ar", "extraction_layer_index"),
        ("critic", "num_hidden_layers"),
        ("extraction_layer_index",),
    ):
        value = _get(ar_meta, *path)
        if value is not None:
            return int(value)
    n = (ar_config.get("text_config") or ar_config).get("num_hidden_layers")
    if n is None:
        raise CheckpointError("the AR names no extraction layer and its config.json no num_hidden_layers")
    return int(n) - 1


def _check_ar_depth(ar_config: dict[str, Any], layer: int, where: Path) -> None:
    """The AR backbone must hold exactly blocks 0..K: its output is read after its last block.

    Forcing K+1 onto a config that says otherwise would either drop trained blocks or append a randomly
    initialised one, and the reconstruction would silently read another layer than the one it was trained on.
    """
    n = (ar_config.get("text_config") or ar_config).get("num_hidden_layers")
    if n is not None and int(n) != layer + 1:
        raise CheckpointError(
            f"{where}: the sidecar says extraction layer {layer} (an AR keeps blocks 0..{layer}, i.e. {layer + 1}), "
            f"but config.json has num_hidden_layers {n}; fix whichever of the two is wrong"
        )


def _injection_scale(meta: dict[str, Any], d: int, where: Path) -> float | None:
    extraction = meta.get("extraction") or {}
    if "injection_scale" not in extraction:
        raise CheckpointError(f"{where / SIDECAR} lacks extraction.injection_scale")
    value = extraction["injection_scale"]
    if value is None:
        return None
    if value == "sqrt_d_model":
        return math.sqrt(d)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{where / SIDECAR}: extraction.injection_scale {value!r} is not a number"
        ) from None


def _check_mse_scale(meta: dict[str, Any], d: int, where: Path) -> None:
    value = _get(meta, "extraction", "mse_scale")
    if value is None:
        return
    if value == "sqrt_d_model":
        return
    if not math.isclose(float(value), math.sqrt(d), rel_tol=1e-3):
        raise CheckpointError(
            f"{where / SIDECAR}: mse_scale {value} is not √d = {math.sqrt(d):.4g}; Talkative scores official "
            "reconstructions with both vectors rescaled to norm √d"
        )


def fve_baseline(
    av_meta: dict[str, Any], ar_meta: dict[str, Any], layer: int, override: float | None
) -> dict[str, Any] | None:
    """The FVE denominator: given > either sidecar (`fve_baseline.variance`, `fve_variance`) > the published
    constant of a released pair > none."""
    if override is not None:
        return {"variance": float(override), "kind": "given"}
    for meta in (ar_meta, av_meta):
        for path in (("fve_baseline", "variance"), ("fve_variance",), ("extraction", "fve_variance")):
            value = _get(meta, *path)
            if value is not None:
                kind = _get(meta, "fve_baseline", "kind") or "rawvar"
                return {"variance": float(value), "kind": str(kind)}
    base = ar_meta.get("base_checkpoint") or av_meta.get("base_checkpoint")
    known = RELEASED_VARIANCES.get((str(base), layer))
    if known is not None:
        return {"variance": known, "kind": "rawvar", "source": "published constant of the released pair"}
    return None


def _config_json(directory: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((directory / "config.json").read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json") from None


# -- loading ------------------------------------------------------------------------------------------------------
def _check_d_model(meta: dict[str, Any], lm: LM, where: Path) -> None:
    d = meta.get("d_model")
    width = int(lm.embed_tokens.weight.shape[1])
    if d is not None and int(d) != width:
        raise CheckpointError(f"{where / SIDECAR}: d_model {d} but the model's embedding width is {width}")


def load_value_head(directory: Path, d: int) -> dict[str, torch.Tensor]:
    f = directory / VALUE_HEAD
    if not f.is_file():
        raise CheckpointError(f"{directory} has no {VALUE_HEAD} (the AR's d×d value head)")
    try:
        raw = load_file(str(f))
    except Exception as exc:
        raise CheckpointError(f"{f} cannot be read: {exc}") from None
    head = {k.removeprefix("value_head."): v for k, v in raw.items()}
    if "weight" not in head:
        raise CheckpointError(f"{f} has no `weight` tensor (keys: {sorted(raw)})")
    unknown = sorted(set(head) - {"weight", "bias"})
    if unknown:
        raise CheckpointError(f"{f} has unexpected tensors {unknown}")
    if tuple(head["weight"].shape) != (d, d) or ("bias" in head and tuple(head["bias"].shape) != (d,)):
        raise CheckpointError(
            f"{f}: value head shapes {[tuple(t.shape) for t in head.values()]} do not fit d_model {d}"
        )
    return head


def _check_suffix(meta: dict[str, Any], rec: TemplateReconstructor, where: Path) -> None:
    want = _get(meta, "tokens", "critic_suffix_ids")
    if not want:
        return
    got = encode_piece(rec.lm, rec.post_text)[1:]
    if [int(t) for t in want] != got:
        raise CheckpointError(
            f"{where / SIDECAR}: critic_suffix_ids {want} but the AR template's suffix tokenizes to {got} "
            "(after its first token): the AR tokenizer or template differs from the one it was trained with"
        )


def load_official(
    path: Path,
    *,
    pool: LMPool,
    subject_override: str | None = None,
    fve_variance: float | None = None,
    max_new_tokens: int | None = None,
    **_: Any,
) -> NLA:
    """An NLA from an official AV/AR pair; the subject is the sidecar's `base_checkpoint` unless overridden."""
    av_dir, ar_dir = (p.resolve() for p in locate_pair(Path(path)))
    av_meta, ar_meta = read_sidecar(av_dir), read_sidecar(ar_dir)
    if role_of(av_meta, av_dir) != "av":
        raise CheckpointError(f"{av_dir / SIDECAR} says role {av_meta.get('role')!r}, expected an AV")
    if role_of(ar_meta, ar_dir) != "ar":
        raise CheckpointError(f"{ar_dir / SIDECAR} says role {ar_meta.get('role')!r}, expected an AR")
    ar_config = _config_json(ar_dir)
    layer = extraction_layer(ar_meta, ar_config)
    _check_ar_depth(ar_config, layer, ar_dir)
    av_layer = av_meta.get("extraction_layer_index")
    if av_layer is not None and int(av_layer) != layer:
        raise CheckpointError(f"the AV was trained on layer {av_layer}, the AR on layer {layer}")
    av_template = _template(av_meta, AV_ROLES) or _template(ar_meta, AV_ROLES)
    if av_template is None:
        raise CheckpointError(f"{av_dir / SIDECAR} has no AV prompt template (prompt_templates.av/actor)")
    av_template = av_template.replace(INJECT_PLACEHOLDER, "{injection_char}")
    ar_template = _template(ar_meta, AR_ROLES) or _template(av_meta, AR_ROLES) or OFFICIAL_AR_TEMPLATE
    tokens = av_meta.get("tokens") or {}
    marker = tokens.get("injection_char")
    if not marker:
        raise CheckpointError(f"{av_dir / SIDECAR} lacks tokens.injection_char")

    av_lm = pool.get(str(av_dir))
    ar_lm = pool.get(str(ar_dir), num_layers=layer + 1)
    if not 0 <= layer < ar_lm.n_layers:
        raise CheckpointError(f"{ar_dir}: extraction layer {layer} but the AR keeps {ar_lm.n_layers} blocks")
    _check_d_model(av_meta, av_lm, av_dir)
    _check_d_model(ar_meta, ar_lm, ar_dir)
    d = av_lm.d_model
    if ar_lm.d_model != d:
        raise CheckpointError(f"the AV has d_model {d}, the AR {ar_lm.d_model}")
    _check_mse_scale(av_meta, d, av_dir)
    _check_mse_scale(ar_meta, d, ar_dir)

    subject_source = subject_override or av_meta.get("base_checkpoint") or ar_meta.get("base_checkpoint")
    if not subject_source:
        raise CheckpointError("neither sidecar names the subject model (base_checkpoint); pass a subject")
    subject = pool.get(str(subject_source))
    if subject.d_model != d:
        raise CheckpointError(f"subject {subject_source} has d_model {subject.d_model}, the AV/AR {d}")
    if not 0 <= layer < subject.n_layers:
        raise CheckpointError(f"layer {layer} outside the subject's 0..{subject.n_layers - 1}")

    generation: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)} if max_new_tokens else {}
    try:
        verbalizer = EmbeddingReplacementVerbalizer(
            av_lm,
            template=av_template,
            marker=str(marker),
            injection_scale=_injection_scale(av_meta, d, av_dir),
            marker_id=tokens.get("injection_token_id"),
            left_neighbor_id=tokens.get("injection_left_neighbor_id"),
            right_neighbor_id=tokens.get("injection_right_neighbor_id"),
            **generation,
        )
    except ValueError as exc:
        raise CheckpointError(f"{av_dir}: {exc}") from None
    head = load_value_head(ar_dir, d)
    try:
        reconstructor = TemplateReconstructor(
            ar_lm, template=ar_template, output_layer=layer, head_bias="bias" in head
        )
    except ValueError as exc:
        raise CheckpointError(f"{ar_dir}: {exc}") from None
    _check_suffix(ar_meta, reconstructor, ar_dir)
    with torch.no_grad():
        reconstructor.head.weight.copy_(head["weight"].float())
        if "bias" in head and reconstructor.head.bias is not None:
            reconstructor.head.bias.copy_(head["bias"].float())
    baseline = fve_baseline(av_meta, ar_meta, layer, fve_variance)
    return NLA(
        subject=subject,
        layer=layer,
        verbalizer=verbalizer,
        reconstructor=reconstructor,
        subject_source=str(subject_source),
        fve_variance=None if baseline is None else float(baseline["variance"]),
        objective="nmse",
        name=Path(path).name,
        provenance={
            "from": "official",
            "av": str(av_dir),
            "ar": str(ar_dir),
            "stage": {"av": av_meta.get("stage"), "ar": ar_meta.get("stage")},
            "trained_on": av_meta.get("trained_on"),
            "created_at": av_meta.get("created_at"),
        },
        fve_baseline=baseline,
        bases={"verbalizer": {"path": str(av_dir)}, "reconstructor": {"path": str(ar_dir)}},
    )


# -- writing (used by scripts/make_checkpoints.py) ------------------------------------------------------------------
def sidecar(
    role: str,
    *,
    base_checkpoint: str,
    d_model: int,
    layer: int,
    marker: str,
    marker_id: int,
    left_neighbor_id: int,
    right_neighbor_id: int,
    critic_suffix_ids: list[int],
    injection_scale: float,
    av_template: str = OFFICIAL_AV_TEMPLATE,
    ar_template: str = OFFICIAL_AR_TEMPLATE,
    fve_variance: float | None = None,
    trained_on: str = "untrained (identity value head)",
) -> dict[str, Any]:
    """A released-style model sidecar (schema 2, scrubbed role names) with every key of the format."""
    meta: dict[str, Any] = {
        "kind": "nla_model",
        "schema_version": 2,
        "role": role,
        "stage": "sl",
        "base_checkpoint": base_checkpoint,
        "d_model": d_model,
        "extraction": {
            "injection_scale": injection_scale if role == "av" else None,
            "mse_scale": math.sqrt(d_model),
        },
        "tokens": {
            "injection_char": marker,
            "injection_token_id": marker_id,
            "injection_left_neighbor_id": left_neighbor_id,
            "injection_right_neighbor_id": right_neighbor_id,
            "critic_suffix_ids": critic_suffix_ids if role == "ar" else None,
        },
        "prompt_templates": {"av": av_template, "ar": ar_template},
        "extraction_layer_index": layer,
        "trained_on": trained_on,
        "parent_checkpoints": [base_checkpoint],
        "created_at": utc_now(),
        "created_by": "talkative scripts/make_checkpoints.py",
        "training": {"lr": None, "loss_type": None, "global_batch_size": None},
    }
    if role == "ar":
        meta["critic"] = {"extraction_layer_index": layer}
    if fve_variance is not None:
        meta["fve_baseline"] = {"variance": fve_variance, "kind": "rawvar"}
    return meta


def write_sidecar(directory: Path, meta: dict[str, Any]) -> None:
    (directory / SIDECAR).write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))


def write_value_head(directory: Path, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    tensors = {"weight": weight.contiguous()}
    if bias is not None:
        tensors["bias"] = bias.contiguous()
    save_file(tensors, str(directory / VALUE_HEAD))


def link_tree(src: Path, dst: Path, how: str = "hard") -> None:
    """Copy a model directory, each file hard-linked (default), symlinked or copied."""
    if how not in ("hard", "symlink", "copy"):
        raise ValueError(f"link mode must be hard, symlink or copy, got {how!r}")
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        target = dst / item.name
        if item.is_dir():
            link_tree(item, target, how)
            continue
        if target.exists() or target.is_symlink():
            target.unlink()
        real = item.resolve()
        if how == "symlink":
            os.symlink(real, target)
            continue
        if how == "hard":
            try:
                os.link(real, target)
                continue
            except OSError:
                pass  # another filesystem: copy
        shutil.copy2(real, target)


def describe_official(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """What `talkative inspect` prints, without loading any model (`trust` is unused: nothing here unpickles)."""
    av_dir, ar_dir = locate_pair(Path(path))
    av_meta, ar_meta = read_sidecar(av_dir), read_sidecar(ar_dir)
    ar_cfg = _config_json(ar_dir)
    av_cfg = _config_json(av_dir)
    layer = extraction_layer(ar_meta, ar_cfg)
    d = av_meta.get("d_model") or (av_cfg.get("text_config") or av_cfg).get("hidden_size")

    def size(directory: Path) -> int:
        return sum(f.stat().st_size for f in directory.resolve().rglob("*") if f.is_file())

    baseline = fve_baseline(av_meta, ar_meta, layer, None)
    tokens = av_meta.get("tokens") or {}
    return {
        "format": "official",
        "av": str(av_dir),
        "ar": str(ar_dir),
        "subject": av_meta.get("base_checkpoint") or ar_meta.get("base_checkpoint"),
        "layer": layer,
        "d_model": d,
        "av_blocks": (av_cfg.get("text_config") or av_cfg).get("num_hidden_layers"),
        "ar_blocks": (ar_cfg.get("text_config") or ar_cfg).get("num_hidden_layers"),
        "injection_char": tokens.get("injection_char"),
        "injection_token_id": tokens.get("injection_token_id"),
        "injection_scale": _get(av_meta, "extraction", "injection_scale"),
        "mse_scale": _get(av_meta, "extraction", "mse_scale"),
        "fve_variance": None if baseline is None else baseline["variance"],
        "value_head_bias": "bias" in load_file(str(ar_dir / VALUE_HEAD))
        if (ar_dir / VALUE_HEAD).is_file()
        else None,
        "av_bytes": size(av_dir),
        "ar_bytes": size(ar_dir),
        "stage": {"av": av_meta.get("stage"), "ar": ar_meta.get("stage")},
    }


def carry_bases(nla: NLA, out: Path, link: str) -> None:
    """The AV and AR model directories (the NLA's bases, named by path) go into OUT as `av/` and `ar/`, so the
    converted checkpoint is whole on its own."""
    for role, sub in (("verbalizer", "av"), ("reconstructor", "ar")):
        link_tree(Path(nla.bases[role]["path"]), out / sub, link)
        nla.bases[role] = {"path": sub}


SPEC = CheckpointFormat(
    name="official",
    expects="an AV/AR pair with nla_meta.yaml (official)",
    detect=detect,
    load=load_official,
    describe=describe_official,
    carry_bases=carry_bases,
)
