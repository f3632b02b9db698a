"""The three checkpoint formats side by side on the bundled SmolLM2-135M-Instruct (real size, made from its weights
by `scripts/make_checkpoints.py` once per session)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from talkative.cli import main as cli
from talkative.nla.analysis import analyze
from talkative.nla.lm import LMPool
from talkative.nla.loading import open_nla

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEXT = "The cat sat on the mat."
OPTIONS = {"seed": 1, "no_kl": True, "optimize_explanations_config": {"best_of_k": 2}}


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_checkpoints", REPO / "scripts" / "make_checkpoints.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, smol_dir):
    mk = _script()
    out = tmp_path_factory.mktemp("smol-checkpoints")
    pool = LMPool()
    native = mk.make_native(out, pool)
    return {
        "native": native,  # the committed demo checkpoint (layer 12)
        "upstream": mk.make_upstream(out, native, pool),
        "official": mk.make_official(mk.default_out(), pool),  # cached across sessions: 200 MB of AR weights
    }


@pytest.fixture(scope="session")
def served(checkpoints):
    """The three NLAs in one pool, as one model group would hold them."""
    pool = LMPool()
    return {
        fmt: open_nla(str(path), pool=pool, **({"max_new_tokens": 16} if fmt == "official" else {}))
        for fmt, path in checkpoints.items()
    }


def _layers(checkpoints) -> dict[str, int]:
    """The upstream file is the native checkpoint exported; the official pair reads its own layer (20)."""
    native = json.loads((Path(checkpoints["native"]) / "nla.json").read_text())["layer"]
    return {"native": native, "upstream": native, "official": _script().OFFICIAL_LAYER}


def test_the_native_checkpoint_is_the_committed_demo(checkpoints):
    assert Path(checkpoints["native"]) == REPO / "checkpoints" / "smollm2-135m-l12-v2"
    assert _layers(checkpoints) == {"native": 12, "upstream": 12, "official": 20}


def test_the_official_pair_is_what_the_release_describes(checkpoints):
    import yaml

    av, ar = checkpoints["official"] / "av", checkpoints["official"] / "ar"
    av_meta = yaml.safe_load((av / "nla_meta.yaml").read_text())
    ar_meta = yaml.safe_load((ar / "nla_meta.yaml").read_text())
    for key in (
        "kind",
        "schema_version",
        "role",
        "stage",
        "base_checkpoint",
        "d_model",
        "extraction",
        "tokens",
        "prompt_templates",
        "extraction_layer_index",
        "trained_on",
        "parent_checkpoints",
        "created_at",
        "created_by",
        "training",
    ):
        assert key in av_meta and key in ar_meta, key
    assert ar_meta["critic"]["extraction_layer_index"] == 20
    assert av_meta["tokens"]["injection_token_id"] == 7
    assert (
        av_meta["tokens"]["injection_left_neighbor_id"],
        av_meta["tokens"]["injection_right_neighbor_id"],
    ) == (46, 9617)
    assert ar_meta["tokens"]["critic_suffix_ids"] == [2692, 46, 2067, 18347, 46]
    assert json.loads((ar / "config.json").read_text())["num_hidden_layers"] == 21
    weights = load_file(str(ar / "model.safetensors"))
    assert "model.norm.weight" not in weights and "lm_head.weight" not in weights
    assert max(int(k.split(".")[2]) for k in weights if k.startswith("model.layers.")) == 20
    head = load_file(str(ar / "value_head.safetensors"))
    assert set(head) == {"weight"} and torch.equal(head["weight"].float(), torch.eye(576))
    assert (av / "model.safetensors").is_symlink()  # the AV is the instruct model itself: no extra disk


def test_three_formats_side_by_side(served, checkpoints):
    nlas = served
    layers = _layers(checkpoints)
    subjects = {id(n.subject) for n in nlas.values()}
    assert len(subjects) == 1  # one copy of the subject serves all three
    results = {fmt: analyze(nla, TEXT, options=OPTIONS) for fmt, nla in nlas.items()}
    n_tokens = len(nlas["native"].subject.encode(TEXT))
    for fmt, res in results.items():
        assert [r["position"] for r in res.rows] == list(range(n_tokens)), fmt
        assert res.metadata["layer"] == layers[fmt] and res.metadata["d_model"] == 576
        for r in res.rows:
            assert r["explanation"] is not None
            assert math.isfinite(r["mse"]) and r["mse"] >= 0
            assert -1.0 <= r["cosine"] <= 1.0
            assert math.isclose(r["nmse"], 2 * (1 - r["cosine"]), abs_tol=1e-4)
    # the upstream export of the native checkpoint gives the same rows under the same seed
    assert results["upstream"].rows == results["native"].rows
    assert all(len(r["token_salience"]) == nlas["native"].t_text for r in results["native"].rows)
    official = results["official"].rows
    assert all(r["fve"] is not None and r["finish_reason"] in ("stop", "length", "eos") for r in official)
    assert nlas["official"].objective == "nmse" and nlas["official"].fve_variance > 0


def test_convert_round_trips_and_inspect(checkpoints, tmp_path, capsys):
    native, upstream = checkpoints["native"], checkpoints["upstream"]
    assert cli(["convert", str(native), "--to", "upstream", str(tmp_path / "up.pt")]) == 0
    assert cli(["convert", str(tmp_path / "up.pt"), "--to", "native", str(tmp_path / "back")]) == 0
    a = load_file(str(Path(native) / "weights.safetensors"))
    b = load_file(str(tmp_path / "back" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours = torch.load(tmp_path / "up.pt", weights_only=True)["models"]
    script = torch.load(upstream, weights_only=True)["models"]
    assert all(torch.equal(ours[p][k], script[p][k]) for p in ours for k in ours[p])

    assert cli(["convert", str(checkpoints["official"]), "--to", "native", str(tmp_path / "off")]) == 0
    cfg = json.loads((tmp_path / "off" / "nla.json").read_text())
    assert cfg["verbalizer"]["base"] == {"path": "av"} and cfg["reconstructor"]["base"] == {"path": "ar"}
    assert cfg["objective"] == "nmse" and cfg["fve_baseline"]["variance"] > 0
    nla = open_nla(str(tmp_path / "off"), pool=LMPool())
    assert nla.verbalizer.inject_pos == 117 and nla.reconstructor.lm.n_layers == 21

    capsys.readouterr()
    layers = _layers(checkpoints)
    for fmt, path in checkpoints.items():
        assert cli(["inspect", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == fmt and info["layer"] == layers[fmt] and info["d_model"] == 576, fmt
        assert info["subject"] == "bundled:smollm2-135m-instruct"
        entry = info["model_group"]["models"][0]
        assert Path(entry["checkpoint"]) == Path(path).resolve() and entry["layer"] == layers[fmt]


def test_a_model_groups_file_serves_the_three(checkpoints, tmp_path):
    registry = pytest.importorskip("talkative.serve.catalog.registry")
    layers = _layers(checkpoints)
    groups = {
        "model_groups": [
            {
                "group_id": "smollm2-formats",
                "group_name": "SmolLM2 135M, three formats",
                "base_model_path": "bundled:smollm2-135m-instruct",
                "models": [
                    {
                        "id": "native",
                        "name": "native",
                        "checkpoint": str(checkpoints["native"]),
                        "layer": layers["native"],
                    },
                    {
                        "id": "upstream",
                        "name": "upstream",
                        "lens_checkpoint_path": str(checkpoints["upstream"]),
                        "different_activations_orig_path": None,
                        "layer": layers["upstream"],
                    },
                    {
                        "id": "official",
                        "name": "official",
                        "checkpoint": str(checkpoints["official"]),
                        "layer": layers["official"],
                    },
                ],
            }
        ],
        "settings": {"default_group": "smollm2-formats"},
    }
    f = tmp_path / "model_groups.json"
    f.write_text(json.dumps(groups))
    reg = registry.load_registry(f)
    pool = LMPool()
    for mid in ("native", "upstream", "official"):
        entry = reg.model(mid)
        nla = open_nla(entry.checkpoint, pool=pool)
        assert nla.layer == entry.layer == layers[mid]
    assert len({id(m) for m in pool.models()}) == 3  # subject (shared by all), official AV, official AR
