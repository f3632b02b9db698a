#!/usr/bin/env python3
"""Real-size checkpoints of all three formats for the bundled SmolLM2-135M-Instruct, made from its weights.

    python scripts/make_checkpoints.py [--out DIR] [--native CHECKPOINT] [--force]

* `native/`: the native checkpoint given with `--native`, else the trained demo checkpoint when this checkout has
  it (`checkpoints/smollm2-135m-l12`), else an untrained `NLA.init` at the demo's layer saved here;
* `upstream/smollm2-135m-l<layer>/checkpoint_step0_epoch0_final.pt`: that native checkpoint exported to the upstream
  `.pt` format (what `talkative convert --to upstream` writes; it loads back bit for bit);
* `official/av` + `official/ar`: an official-format pair. The AV is a full model directory (its weights file is a
  symlink to the bundled model's, so it costs no disk) whose prompt carries the marker `<gh_stars>` (id 7: no
  character of U+3200–U+33FF is one SmolLM2 token); the AR keeps blocks 0..20 (bf16, no final norm, no LM head)
  with an identity value head; it reads layer 20 (the release's NLAs read layers two thirds deep). Both sidecars carry every key of the release, plus the FVE baseline measured on a
  built-in text. The pair is untrained: it describes what an instruct model says about an injected vector.

The output defaults to `$TALKATIVE_CACHE/checkpoints/smollm2-135m-l20` and is made once (a marker file records a
complete official pair; the native and upstream files are rewritten each run, they are small). Base weights are
never written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from talkative.defaults import DEFAULT_LAYER, demo_checkpoint  # noqa: E402
from talkative.nla import metrics as M  # noqa: E402
from talkative.nla.checkpoint import NLA, load_nla  # noqa: E402
from talkative.nla.formats import official as O  # noqa: E402
from talkative.nla.formats.upstream import save_upstream  # noqa: E402
from talkative.nla.lm import LM, LMPool  # noqa: E402
from talkative.nla.prompts import encode_piece  # noqa: E402
from talkative.nla.sources import DEFAULT_SOURCE, _locked, cache_root, ensure_bundled  # noqa: E402

NAME = "smollm2-135m-l20"  # the official pair's directory under the cache
OFFICIAL_LAYER = 20
MARKER = "<gh_stars>"
INJECTION_SCALE = 250.0  # "a round number a bit above the mean norm" (block-20 norms average about 231)
OFFICIAL_VERSION = "1"
SAMPLE_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had done. "
    "Ships passed far out at sea, their lights moving slowly against the dark water. In the morning he wrote "
    "down the weather, the wind and the names of the boats that came into the harbour. A storm in November "
    "had broken two windows, and the glass arrived from the city three weeks later. Children from the village "
    "sometimes visited to ask about the lamp, and he showed them how the lens turned and why the light could "
    "be seen for twenty miles. def mean(values):\n    return sum(values) / len(values)\n"
)


def default_out() -> Path:
    return cache_root() / "checkpoints" / NAME


# -- native and upstream ------------------------------------------------------------------------------------------
def make_native(out: Path, pool: LMPool, native: Path | None = None) -> Path:
    """The native checkpoint to export: given, the demo one, or an untrained NLA saved under `out/native`."""
    src = native or demo_checkpoint()
    if src is not None:
        return Path(src)
    subject = pool.get(DEFAULT_SOURCE)
    nla = NLA.init(
        subject, DEFAULT_LAYER, subject_source=DEFAULT_SOURCE, name=f"smollm2-135m-l{DEFAULT_LAYER}-untrained"
    )
    return nla.save(out / "native")


def make_upstream(out: Path, native: Path, pool: LMPool) -> Path:
    nla = load_nla(native, pool=pool)
    return save_upstream(nla, out / "upstream" / f"smollm2-135m-l{nla.layer}")


# -- official -----------------------------------------------------------------------------------------------------
def _rawvar(subject: LM, layer: int) -> tuple[float, int]:
    """Var(v_nrm) over the block-`layer` vectors of SAMPLE_TEXT (positions ≥ 10, norm outliers left out)."""
    ids = torch.tensor(subject.encode(SAMPLE_TEXT))
    with torch.no_grad():
        acts = subject.residual(ids, layer)[0].float()[10:]
    norms = acts.norm(dim=-1)
    keep = acts[norms <= 5 * norms.median()]
    return M.normalized_variance(keep), int(keep.shape[0])


def _ar_weights(base_dir: Path, layer: int, out: Path) -> None:
    """Blocks 0..layer and the embedding, bf16, without the final norm and the LM head."""
    state = load_file(str(base_dir / "model.safetensors"))
    keep = {}
    for key, tensor in state.items():
        if key.startswith("model.layers."):
            if int(key.split(".")[2]) > layer:
                continue
        elif key != "model.embed_tokens.weight":
            continue  # model.norm.weight, lm_head.weight
        keep[key] = tensor.to(torch.bfloat16).contiguous()
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})


def make_official(out: Path, pool: LMPool, *, force: bool = False) -> Path:
    target = out / "official"
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().strip() == OFFICIAL_VERSION and not force:
        return target
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".official.lock"):
        if marker.is_file() and marker.read_text().strip() == OFFICIAL_VERSION and not force:
            return target
        base_dir = ensure_bundled(DEFAULT_SOURCE.removeprefix("bundled:"), progress=False)
        subject = pool.get(DEFAULT_SOURCE)
        layer, d = OFFICIAL_LAYER, subject.d_model
        tmp = Path(tempfile.mkdtemp(prefix=".official-", dir=out))
        try:
            av, ar = tmp / "av", tmp / "ar"
            av.mkdir()
            ar.mkdir()
            for f in base_dir.iterdir():
                if f.name.startswith("."):
                    continue
                if f.name == "model.safetensors":
                    os.symlink(f.resolve(), av / f.name)  # the AV is the instruct model itself: no extra disk
                else:
                    shutil.copy2(f, av / f.name)
                    if f.name != "generation_config.json":
                        shutil.copy2(f, ar / f.name)
            cfg = json.loads((base_dir / "config.json").read_text())
            cfg["num_hidden_layers"] = layer + 1
            cfg["dtype"] = "bfloat16"
            (ar / "config.json").write_text(json.dumps(cfg, indent=2))
            _ar_weights(base_dir, layer, ar)
            O.write_value_head(ar, torch.eye(d, dtype=torch.bfloat16))

            tok = subject.tokenizer
            (marker_id,) = tok.encode(MARKER, add_special_tokens=False)
            prompt = tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": O.OFFICIAL_AV_TEMPLATE.replace("{injection_char}", MARKER)}],
                    tokenize=False,
                    add_generation_prompt=True,
                ),
                add_special_tokens=False,
            )["input_ids"]
            p = prompt.index(marker_id)
            post = O.OFFICIAL_AR_TEMPLATE.split("{explanation}")[1]
            variance, n = _rawvar(subject, layer)
            common = {
                "base_checkpoint": DEFAULT_SOURCE,
                "d_model": d,
                "layer": layer,
                "marker": MARKER,
                "marker_id": marker_id,
                "left_neighbor_id": prompt[p - 1],
                "right_neighbor_id": prompt[p + 1],
                "critic_suffix_ids": encode_piece(subject, post)[1:],
                "injection_scale": INJECTION_SCALE,
                "fve_variance": round(variance, 6),
            }
            O.write_sidecar(av, O.sidecar("av", **common))
            meta = O.sidecar("ar", **common)
            meta["fve_baseline"]["n_vectors"] = n
            O.write_sidecar(ar, meta)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text(OFFICIAL_VERSION + "\n")
    return target


def make_all(out: Path | None = None, *, native: Path | None = None, force: bool = False) -> dict[str, Path]:
    out = Path(out or default_out())
    pool = LMPool()
    native_path = make_native(out, pool, native)
    return {
        "native": native_path,
        "upstream": make_upstream(out, native_path, pool),
        "official": make_official(out, pool, force=force),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output directory (default {default_out()})")
    ap.add_argument(
        "--native", type=Path, help="native checkpoint to export (default: the demo one, or untrained)"
    )
    ap.add_argument("--force", action="store_true", help="rebuild the official pair")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for fmt, path in make_all(args.out, native=args.native, force=args.force).items():
        print(f"{fmt:9s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
