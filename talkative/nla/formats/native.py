"""Native checkpoint format: a directory with `nla.json` and `weights.safetensors`.

`nla.json` says everything needed to rebuild the NLA around its base model(s): subject source, layer, d_model,
verbalizer and reconstructor configuration, the FVE variance baseline and provenance. The safetensors file holds
only trained tensors (`verbalizer.*`, `reconstructor.*`), never base weights, so a checkpoint for a frozen-base NLA
is a few MB. Loading is strict: every missing, unexpected or mis-shaped tensor is named.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import FORMAT, FORMAT_VERSION, NLA, CheckpointError, build_reconstructor, build_verbalizer
from ..lm import LM, LMPool
from .spec import CheckpointFormat

CONFIG = "nla.json"
WEIGHTS = "weights.safetensors"


def save_native(nla: NLA, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in nla.trained_state().items()}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    text = json.dumps(nla.config(), indent=2, sort_keys=False) + "\n"
    atomic_write(path / CONFIG, lambda tmp: Path(tmp).write_text(text))
    return path


def atomic_write(target: Path, write: Any) -> None:
    """`write(tmp)` to a temporary file beside `target`, then rename it over `target`: a reader never sees half a
    checkpoint, and a failed write leaves the old one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG if path.is_dir() else path
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path} is missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(
            f"{cfg_path} is not a {FORMAT} config (format={cfg.get('format') if isinstance(cfg, dict) else None!r})"
        )
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version {version!r}; this Talkative reads up to {FORMAT_VERSION}"
        )
    for key in ("subject", "layer", "d_model", "verbalizer", "reconstructor"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_path} lacks the required key {key!r}")
    return cfg


def _resolve(path: Path, source: str) -> str:
    """Sources written relative to the checkpoint directory resolve against it."""
    if source.startswith(("./", "../")):
        return str((path / source).resolve())
    return source


def _base(
    cfg: dict[str, Any], role: str, path: Path, subject: LM, pool: LMPool, num_layers: int | None
) -> LM:
    base = cfg.get("base", "subject")
    if base == "subject":
        return subject
    if isinstance(base, dict) and "path" in base:
        return pool.get(str((path / base["path"]).resolve()), num_layers=num_layers)
    if isinstance(base, dict) and "source" in base:
        return pool.get(_resolve(path, base["source"]), num_layers=num_layers)
    raise CheckpointError(
        f"{role}.base must be 'subject', {{'path': ...}} or {{'source': ...}}, got {base!r}"
    )


def detect(path: Path) -> bool:
    return path.name == CONFIG if path.is_file() else (path / CONFIG).is_file()


def load_native(
    path: Path,
    *,
    pool: LMPool,
    subject_override: str | None = None,
    fve_variance: float | None = None,
    **_: Any,
) -> NLA:
    """An NLA from a native directory (or its `nla.json`); `fve_variance` replaces the recorded FVE baseline."""
    if path.is_file():
        path = path.parent
    cfg = read_config(path)
    subj = cfg["subject"]
    source = subject_override or _resolve(path, subj["source"] if isinstance(subj, dict) else str(subj))
    subject = pool.get(source)
    layer = int(cfg["layer"])
    if subject.d_model != int(cfg["d_model"]):
        raise CheckpointError(
            f"checkpoint d_model {cfg['d_model']} but subject {source} has d_model {subject.d_model}"
        )
    if not 0 <= layer < subject.n_layers:
        raise CheckpointError(f"checkpoint layer {layer} outside the subject's 0..{subject.n_layers - 1}")
    vcfg, rcfg = cfg["verbalizer"], cfg["reconstructor"]
    av_lm = _base(vcfg, "verbalizer", path, subject, pool, None)
    ar_layers = None if rcfg.get("mode") != "template" else int(rcfg.get("output_layer", layer)) + 1
    ar_lm = _base(rcfg, "reconstructor", path, subject, pool, ar_layers)
    for role, lm in (("verbalizer", av_lm), ("reconstructor", ar_lm)):
        if lm.d_model != subject.d_model:
            raise CheckpointError(f"{role} base has d_model {lm.d_model}, the subject {subject.d_model}")
    verbalizer = build_verbalizer(vcfg, av_lm)
    reconstructor = build_reconstructor(rcfg, ar_lm)
    baseline = cfg.get("fve_baseline")
    if fve_variance is not None:
        baseline = {"variance": fve_variance, "kind": "given"}
    nla = NLA(
        subject=subject,
        layer=layer,
        verbalizer=verbalizer,
        reconstructor=reconstructor,
        subject_source=source,
        fve_variance=None if not baseline else float(baseline["variance"]),
        objective=cfg.get("objective", "mse"),
        name=cfg.get("name", path.name),
        provenance=cfg.get("provenance", {}),
        fve_baseline=baseline,
        bases={"verbalizer": vcfg.get("base", "subject"), "reconstructor": rcfg.get("base", "subject")},
    )
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"{weights} cannot be read: {exc}") from None
    load_trained_state(nla, state, str(weights))
    return nla


def load_trained_state(nla: NLA, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy tensors into the NLA, refusing any missing, unexpected or mis-shaped key."""
    expected = nla.trained_state()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append(f"wrong shapes {shapes}")
    if problems:
        raise CheckpointError(f"{where} does not fit its config: " + "; ".join(problems))
    with torch.no_grad():
        for prefix, module in (("verbalizer.", nla.verbalizer), ("reconstructor.", nla.reconstructor)):
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            current = module.state_dict()
            for k, v in own.items():
                current[k].copy_(v.to(current[k].dtype))


def describe_native(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """What `talkative inspect` prints: the config and the tensors' shapes (`trust` is unused: nothing here
    unpickles)."""
    directory = path.parent if path.is_file() else path
    cfg = read_config(directory)
    subj = cfg["subject"]
    tensors: dict[str, list[int]] = {}
    n = 0
    weights = directory / WEIGHTS
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = list(f.get_slice(key).get_shape())
                tensors[key] = shape
                count = 1
                for s in shape:
                    count *= s
                n += count
    v, r = cfg["verbalizer"], cfg["reconstructor"]
    return {
        "format": "native",
        "dir": str(directory),
        "name": cfg.get("name"),
        "subject": subj.get("source") if isinstance(subj, dict) else subj,
        "subject_model_type": subj.get("model_type") if isinstance(subj, dict) else None,
        "layer": cfg["layer"],
        "d_model": cfg["d_model"],
        "objective": cfg.get("objective", "mse"),
        "verbalizer": {
            k: v.get(k) for k in ("mode", "base", "patch_layers", "t_text", "injection_scale") if k in v
        },
        "reconstructor": {
            k: r.get(k) for k in ("mode", "base", "output_layer", "head", "head_bias") if k in r
        },
        "fve_variance": (cfg.get("fve_baseline") or {}).get("variance"),
        "trained_parameters": n,
        "weights_bytes": weights.stat().st_size if weights.is_file() else 0,
        "tensors": tensors,
    }


SPEC = CheckpointFormat(
    name="native",
    expects="nla.json (native)",
    detect=detect,
    load=load_native,
    describe=describe_native,
    save=save_native,
    file_hint="a native nla.json",
    holds_bases=True,
)
