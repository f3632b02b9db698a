"""`talkative inspect` and `talkative convert` on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from upstream_writer import write_upstream

from talkative.cli import main as cli
from talkative.nla.checkpoint import NLA, CheckpointError, load_nla
from talkative.nla.formats.upstream import save_upstream
from talkative.nla.lm import LMPool
from talkative.nla.reconstructor import TemplateReconstructor
from talkative.nla.verbalizer import EmbeddingReplacementVerbalizer


def test_inspect_reads_an_upstream_file_without_its_models(make_tiny, tmp_path, capsys):
    lm = make_tiny("llama", seed=11)
    f = write_upstream(tmp_path / "run" / "ck.pt", lm, model_name="someorg/not-on-this-machine", patch=3)
    assert cli(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "upstream" in out and "someorg/not-on-this-machine" in out and "model-groups entry" in out
    assert cli(["inspect", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layer"], info["d_model"], info["t_text"], info["patch_all_layers"]) == (2, 64, 4, 3)
    assert info["tensors"]["decoder.proj_weight"] == [3, 64, 64]
    group = info["model_group"]
    assert group["base_model_path"] == "someorg/not-on-this-machine"
    assert group["models"][0]["checkpoint"] == str(f.resolve())


def test_convert_upstream_with_a_local_base_and_back(make_tiny, tmp_path, capsys):
    lm = make_tiny("qwen2", seed=11)
    base = tmp_path / "qwen-base"
    lm.model.save_pretrained(base)
    lm.tokenizer.save_pretrained(base)
    f = write_upstream(tmp_path / "ck.pt", lm, model_name="Qwen/Qwen2.5-14B-Instruct", dtype=torch.float32)
    assert cli(["convert", str(f), "--to", "native", str(tmp_path / "native"), "--base", str(base)]) == 0
    cfg = json.loads((tmp_path / "native" / "nla.json").read_text())
    assert (
        cfg["subject"]["source"] == str(base) and cfg["provenance"]["converted_from"]["format"] == "upstream"
    )
    assert cli(["convert", str(tmp_path / "native"), "--to", "upstream", str(tmp_path / "again.pt")]) == 0
    a = torch.load(f, weights_only=False)["models"]
    b = torch.load(tmp_path / "again.pt", weights_only=True)["models"]
    for part in ("decoder", "encoder"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    capsys.readouterr()
    assert (
        cli(["convert", str(tmp_path / "native"), "--to", "native", str(tmp_path / "x"), "--base", "y"]) == 1
    )
    assert "--base applies to upstream" in capsys.readouterr().err


def test_only_the_upstream_architecture_converts_to_upstream(make_tiny, tmp_path):
    lm = make_tiny("llama", seed=3)
    v = EmbeddingReplacementVerbalizer(
        lm,
        template="Describe <concept>{injection_char}</concept> please.",
        marker="<gh_stars>",
        injection_scale=5.0,
    )
    nla = NLA(
        subject=lm,
        layer=1,
        verbalizer=v,
        reconstructor=TemplateReconstructor(lm, output_layer=1),
        subject_source="tiny",
        objective="nmse",
    )
    with pytest.raises(CheckpointError, match="upstream architecture"):
        save_upstream(nla, tmp_path / "x.pt")
    pool = LMPool()
    pool.add(lm, "tiny")
    native = nla.save(tmp_path / "native")
    assert load_nla(native, pool=pool).verbalizer.injection_scale == 5.0
