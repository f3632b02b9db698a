"""Native checkpoints: exact round trip, and every kind of broken checkpoint refused with a message naming it."""

from __future__ import annotations

import json

import pytest
import torch
from nla_reference import tiny_nla
from safetensors.torch import load_file, save_file

from talkative.nla.analysis import analyze
from talkative.nla.checkpoint import CheckpointError, detect_format, load_nla
from talkative.nla.lm import LMPool
from talkative.nla.loading import open_nla, parse_init

OPTS = {"optimize_explanations_config": {"best_of_k": 3}, "seed": 5, "return_vectors": True}


@pytest.fixture(scope="module")
def nla(make_tiny):
    return tiny_nla(make_tiny, "qwen2", t_text=4, fve_variance=0.75)


def _pool(nla):
    pool = LMPool()
    pool.add(nla.subject, nla.subject_source)
    return pool


@pytest.fixture
def saved(nla, tmp_path):
    path = nla.save(tmp_path / "ckpt")
    return path


def test_round_trip_is_exact(nla, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["nla.json", "weights.safetensors"]
    assert detect_format(saved) == "native" == detect_format(saved / "nla.json")
    back = load_nla(saved, pool=_pool(nla))
    a, b = nla.trained_state(), back.trained_state()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert back.config() == nla.config()
    assert (back.layer, back.fve_variance, back.objective, back.t_text) == (nla.layer, 0.75, "mse", 4)
    assert back.subject is nla.subject  # the pool shares the base
    assert (
        analyze(back, "One two three.", options=OPTS).rows
        == analyze(nla, "One two three.", options=OPTS).rows
    )


def test_only_trained_tensors_are_stored(nla, saved):
    state = load_file(str(saved / "weights.safetensors"))
    assert all(k.startswith(("verbalizer.", "reconstructor.")) for k in state)
    n_trained = sum(v.numel() for v in state.values())
    n_base = sum(p.numel() for p in nla.subject.model.parameters())
    assert n_trained < n_base / 4


def test_config_holds_what_a_reader_needs(nla, saved):
    cfg = json.loads((saved / "nla.json").read_text())
    assert cfg["format"] == "talkative-nla" and cfg["format_version"] == 1
    assert cfg["layer"] == nla.layer and cfg["d_model"] == nla.d_model
    assert cfg["subject"]["source"] == nla.subject_source
    assert cfg["verbalizer"]["mode"] == "layer_replacement" and cfg["verbalizer"]["t_text"] == 4
    assert cfg["reconstructor"]["mode"] == "soft_prompt"
    assert cfg["fve_baseline"]["variance"] == 0.75
    assert "created_at" in cfg["provenance"]


def test_save_overwrites_atomically(nla, saved):
    nla.save(saved)
    assert sorted(p.name for p in saved.iterdir()) == [
        "nla.json",
        "weights.safetensors",
    ]  # no temp files left


def test_a_subject_saved_next_to_the_checkpoint_loads_from_a_relative_source(nla, saved):
    nla.subject.model.save_pretrained(saved / "subject")
    nla.subject.tokenizer.save_pretrained(saved / "subject")
    cfg = json.loads((saved / "nla.json").read_text())
    cfg["subject"]["source"] = "./subject"
    (saved / "nla.json").write_text(json.dumps(cfg))
    back = load_nla(saved)
    assert back.subject is not nla.subject
    for k, v in nla.trained_state().items():
        assert torch.equal(back.trained_state()[k], v)
    text = "Four five six."
    assert analyze(back, text, options=OPTS).rows == analyze(nla, text, options=OPTS).rows


# -- broken checkpoints ---------------------------------------------------------------------------------------------
def _edit_weights(path, fn):
    state = load_file(str(path / "weights.safetensors"))
    fn(state)
    save_file(state, str(path / "weights.safetensors"))


def _edit_config(path, fn):
    cfg = json.loads((path / "nla.json").read_text())
    fn(cfg)
    (path / "nla.json").write_text(json.dumps(cfg))


BROKEN = {
    "missing key": (
        lambda p: _edit_weights(p, lambda s: s.pop("verbalizer.proj_bias")),
        r"missing \['verbalizer.proj_bias'\]",
    ),
    "unexpected key": (
        lambda p: _edit_weights(p, lambda s: s.update({"reconstructor.extra": torch.zeros(3)})),
        r"unexpected \['reconstructor.extra'\]",
    ),
    "wrong shape": (
        lambda p: _edit_weights(p, lambda s: s.update({"reconstructor.special_vector": torch.zeros(65)})),
        r"reconstructor.special_vector: file \(65,\) vs model \(64,\)",
    ),
    "bad json": (lambda p: (p / "nla.json").write_text("{not json"), r"nla.json is not valid JSON"),
    "wrong d_model": (
        lambda p: _edit_config(p, lambda c: c.update(d_model=128)),
        r"checkpoint d_model 128 but subject .* has d_model 64",
    ),
    "missing weights": (lambda p: (p / "weights.safetensors").unlink(), r"weights.safetensors is missing"),
    "corrupt weights": (
        lambda p: (p / "weights.safetensors").write_bytes(b"\x00garbage" * 10),
        r"weights.safetensors cannot be read",
    ),
    "layer out of range": (lambda p: _edit_config(p, lambda c: c.update(layer=9)), r"layer 9 outside"),
    "missing layer": (lambda p: _edit_config(p, lambda c: c.pop("layer")), r"lacks the required key 'layer'"),
    "newer format": (
        lambda p: _edit_config(p, lambda c: c.update(format_version=99)),
        r"format_version 99; this Talkative reads up to 1",
    ),
    "not ours": (
        lambda p: _edit_config(p, lambda c: c.update(format="other")),
        r"not a talkative-nla config",
    ),
    "unknown verbalizer": (
        lambda p: _edit_config(p, lambda c: c["verbalizer"].update(mode="magic")),
        r"unknown verbalizer mode 'magic'",
    ),
    "unknown reconstructor": (
        lambda p: _edit_config(p, lambda c: c["reconstructor"].update(mode="magic")),
        r"unknown reconstructor mode 'magic'",
    ),
    "t_text changes shapes": (
        lambda p: _edit_config(p, lambda c: c["verbalizer"].update(patch_layers=3)),
        r"verbalizer.proj_weight: file \(2, 64, 64\) vs model \(3, 64, 64\)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_fail_naming_the_problem(nla, saved, case):
    breaker, message = BROKEN[case]
    breaker(saved)
    with pytest.raises(CheckpointError, match=message):
        load_nla(saved, pool=_pool(nla))


def test_paths_that_hold_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_format(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        detect_format(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"not an upstream \.pt checkpoint"):
        detect_format(tmp_path / "x.txt")


def test_init_specs(nla):
    assert parse_init("init:bundled:smollm2-135m-instruct@20") == ("bundled:smollm2-135m-instruct", 20)
    with pytest.raises(CheckpointError, match="init:SOURCE@LAYER"):
        parse_init("init:bundled:smollm2-135m-instruct")
    pool = _pool(nla)
    fresh = open_nla(f"init:{nla.subject_source}@2", pool=pool)
    assert fresh.layer == 2 and fresh.subject is nla.subject
    assert open_nla(f"init:{nla.subject_source}@2", pool=pool, layer=1).layer == 1
    with pytest.raises(CheckpointError, match="outside"):
        open_nla(f"init:{nla.subject_source}@7", pool=pool)


def test_a_trained_checkpoint_fixes_its_layer(nla, saved):
    with pytest.raises(CheckpointError, match=f"explains layer {nla.layer}"):
        open_nla(str(saved), pool=_pool(nla), layer=nla.layer + 1)
    assert open_nla(str(saved), pool=_pool(nla), layer=nla.layer).layer == nla.layer
