"""Official AV/AR checkpoints: built here as the release describes them (§1 of the format spec), loaded by us, and
compared against the reference in `tests/formats_ref.py`, which runs the saved HF directories directly."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import formats_ref as ref
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from talkative.nla.analysis import analyze
from talkative.nla.checkpoint import CheckpointError, detect_format, load_nla
from talkative.nla.formats.official import OFFICIAL_AV_TEMPLATE, RELEASED_VARIANCES
from talkative.nla.lm import LMPool
from talkative.nla.reconstructor import OFFICIAL_AR_TEMPLATE
from talkative.nla.sampling import row_uniforms
from talkative.nla.verbalizer import PromptOverrides

MARKER = "<gh_stars>"  # a single, otherwise unused token of the SmolLM2 tokenizer (id 7)
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."
SCALE = 40.0


def _truncated_ar(full, layer: int, out: Path) -> None:
    """AR directory per §1.3: config.num_hidden_layers = K+1 (per-layer arrays sliced), blocks 0..K, no final norm,
    no lm_head, tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    cfg = full.model.config.__class__.from_dict(full.model.config.to_dict())
    cfg.num_hidden_layers = layer + 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[: layer + 1]
    ar = AutoModelForCausalLM.from_config(cfg)
    ar.load_state_dict(full.model.state_dict(), strict=False)
    ar.save_pretrained(out)
    full.tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    state = {
        k: v
        for k, v in state.items()
        if not re.fullmatch(r"(model\.norm|transformer\.ln_f)\..*|lm_head\..*", k)
    }
    save_file(state, str(weights), metadata={"format": "pt"})


def _neighbours(tok, template=OFFICIAL_AV_TEMPLATE, marker=MARKER):
    ids = ref.official_prompt_ids(tok, template, marker)
    p = ids.index(tok.convert_tokens_to_ids(marker))
    return ids[p - 1], ids[p + 1]


def _meta(role: str, tok, *, layer: int, d: int, **over) -> dict:
    left, right = _neighbours(tok)
    suffix = tok("</text> <summary>", add_special_tokens=False)["input_ids"][1:]
    meta = {
        "kind": "nla_model",
        "schema_version": 2,
        "role": role,
        "stage": "rl" if role == "av" else "sl",
        "base_checkpoint": "tiny-subject",
        "d_model": d,
        "extraction": {"injection_scale": SCALE if role == "av" else None, "mse_scale": math.sqrt(d)},
        "tokens": {
            "injection_char": MARKER,
            "injection_token_id": 7,
            "injection_left_neighbor_id": left,
            "injection_right_neighbor_id": right,
            "critic_suffix_ids": suffix if role == "ar" else None,
        },
        "prompt_templates": {"av": OFFICIAL_AV_TEMPLATE, "ar": OFFICIAL_AR_TEMPLATE},
        "extraction_layer_index": layer,
        "trained_on": "50/50 WildChat + Ultra-FineWeb",
        "parent_checkpoints": ["tiny-subject"],
        "created_at": "2026-03-16T00:00:00Z",
        "created_by": "nla.train_actor.NLAFSDPActor",
        "training": {"lr": 1e-5, "loss_type": "policy_loss", "global_batch_size": 1024},
    }
    if role == "ar":
        meta["critic"] = {"extraction_layer_index": layer}
        meta["fve_baseline"] = {"variance": 0.8, "kind": "rawvar"}
    for key, value in over.items():
        meta[key] = value
    return meta


def build(
    root: Path,
    make_tiny,
    kind: str = "llama",
    *,
    layer: int = 2,
    bias: bool = False,
    av_meta=None,
    ar_meta=None,
):
    """root/av + root/ar, and a pool holding the subject under the sidecar's base_checkpoint."""
    subject = make_tiny(kind, seed=20)
    av = make_tiny(kind, seed=21)
    ar_full = make_tiny(kind, seed=22)
    d = subject.d_model
    av_dir, ar_dir = root / "av", root / "ar"
    av.model.save_pretrained(av_dir)
    av.tokenizer.save_pretrained(av_dir)
    _truncated_ar(ar_full, layer, ar_dir)
    g = torch.Generator().manual_seed(5)
    head = {"weight": (torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)).to(torch.bfloat16)}
    if bias:
        head["bias"] = (0.1 * torch.randn(d, generator=g)).to(torch.bfloat16)
    save_file(head, str(ar_dir / "value_head.safetensors"))
    from transformers import AutoTokenizer

    for directory, role, edit in ((av_dir, "av", av_meta), (ar_dir, "ar", ar_meta)):
        meta = _meta(role, AutoTokenizer.from_pretrained(directory), layer=layer, d=d)
        if edit:
            edit(meta)
        (directory / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    pool = LMPool()
    pool.add(subject, "tiny-subject")
    return subject, pool


def _reference_models(root: Path):
    from transformers import AutoModelForCausalLM

    av = AutoModelForCausalLM.from_pretrained(root / "av").eval()
    ar = AutoModelForCausalLM.from_pretrained(root / "ar").eval()
    ref.body(ar).norm = torch.nn.Identity()
    head = load_file(str(root / "ar" / "value_head.safetensors"))
    return av, ar, head


def _ref_parse(tok, ids) -> str:
    raw = tok.decode(ids, skip_special_tokens=False)
    m = re.search(r"<explanation>\s*(.*?)\s*</explanation>", raw, re.DOTALL)
    if m:
        return m.group(1).strip()
    body = raw.split("<explanation>", 1)[-1]
    for s in tok.all_special_tokens:
        body = body.replace(s, "")
    return body.replace("</explanation>", "").strip()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "gemma3"])
def test_official_pair_matches_the_reference(make_tiny, kind, tmp_path):
    subject, pool = build(tmp_path, make_tiny, kind, bias=kind == "qwen2")
    nla = load_nla(tmp_path, pool=pool, max_new_tokens=8)
    from transformers import AutoTokenizer

    av, ar, head = _reference_models(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path / "av")  # the AV and AR ship their own tokenizer
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "ar").get_vocab()
    v = nla.verbalizer
    prompt = ref.official_prompt_ids(tok, OFFICIAL_AV_TEMPLATE, MARKER)
    assert v.prompt_ids == prompt and prompt.count(7) == 1 and v.inject_pos == prompt.index(7)
    assert nla.layer == 2 and nla.objective == "nmse" and nla.fve_variance == 0.8
    assert nla.reconstructor.lm.n_layers == 3 and (nla.reconstructor.head.bias is not None) == (
        kind == "qwen2"
    )

    # sampled tokens under fixed uniforms: chat prompt, √d (Gemma), the marker row replaced by A rescaled
    ids = subject.encode(TEXT)
    acts = ref.activations(subject.model, ids, 2)
    A = acts[[3, 7, 11]]
    u = torch.rand(3, 8, generator=torch.Generator().manual_seed(9))
    eos = sorted(v.eos_ids)
    for temperature in (1.0, 0.0):
        out = v.generate(A, 1, u, temperature)
        for r in range(3):
            want, reason = ref.official_av_sample(
                av, tok, prompt, 7, A[r], SCALE, u[r], temperature, 8, eos=eos
            )
            assert out[r].ids == want and out[r].finish_reason == reason
    # inverse-CDF sampling over a near-flat distribution moves with the smallest change of the inputs, so equal
    # tokens above pin the inputs down: the same uniforms with another vector give other tokens
    flipped = v.generate(-A, 1, u, 1.0)
    assert any(a.ids != b.ids for a, b in zip(flipped, v.generate(A, 1, u, 1.0), strict=True))

    # reconstruction vectors and metrics of the whole pipeline
    k, seed = 2, 4
    rows = analyze(
        nla,
        TEXT,
        options={
            "seed": seed,
            "no_kl": True,
            "return_vectors": True,
            "optimize_explanations_config": {"best_of_k": k},
        },
    ).rows
    for row in rows[2:5]:
        q = row["position"]
        uu = row_uniforms(seed, [(q, j) for j in range(k)], 8)
        texts = [
            _ref_parse(
                tok, ref.official_av_sample(av, tok, prompt, 7, acts[q], SCALE, uu[j], 1.0, 8, eos=eos)[0]
            )
            for j in range(k)
        ]
        preds = [ref.official_ar(ar, tok, head, t, OFFICIAL_AR_TEMPLATE) for t in texts]
        scores = [ref.official_metrics(acts[q], p, 0.8) for p in preds]
        best = min(range(k), key=lambda j: scores[j]["nmse"])
        assert row["explanation"] == texts[best]
        torch.testing.assert_close(torch.tensor(row["reconstruction"]), preds[best], rtol=1e-5, atol=1e-5)
        for name in ("nmse", "cosine", "fve"):
            assert math.isclose(row[name], scores[best][name], rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(row["nmse"], 2 * (1 - row["cosine"]), abs_tol=1e-5)


def test_generation_stops_at_the_close_tag_and_parses(make_tiny, tmp_path):
    subject, pool = build(tmp_path, make_tiny)
    nla = load_nla(tmp_path, pool=pool, max_new_tokens=8)
    tok = subject.tokenizer
    forced = tok("<explanation>\nA fox.\n\nIt jumps.\n</explanation", add_special_tokens=False)["input_ids"]
    A = torch.randn(2, subject.d_model)
    out = nla.verbalizer.generate(A, 1, None, 0.0, PromptOverrides(add_ids=forced))
    for e in out:
        if e.finish_reason == "stop":
            assert e.text == "A fox.\n\nIt jumps."
            assert e.raw.endswith(tok.decode(e.ids[len(forced) :]))
        else:  # the greedy token did not close the tag: the budget ran out
            assert e.finish_reason in ("length", "eos")


# -- startup checks, one test each ----------------------------------------------------------------------------------
def _tokens(**kw):
    def edit(meta):
        meta["tokens"].update(kw)

    return edit


def test_check_marker_is_one_token(make_tiny, tmp_path):
    _, pool = build(tmp_path, make_tiny, av_meta=_tokens(injection_char="㈎"))  # splits into byte tokens
    with pytest.raises(CheckpointError, match="exactly one known token"):
        load_nla(tmp_path, pool=pool)


def test_check_marker_id_matches(make_tiny, tmp_path):
    _, pool = build(tmp_path, make_tiny, av_meta=_tokens(injection_token_id=16))
    with pytest.raises(CheckpointError, match="encodes to 7, the checkpoint says 16"):
        load_nla(tmp_path, pool=pool)


def test_check_marker_appears_once(make_tiny, tmp_path):
    twice = OFFICIAL_AV_TEMPLATE + " {injection_char}"

    def edit(meta):
        meta["prompt_templates"]["av"] = twice

    _, pool = build(tmp_path, make_tiny, av_meta=edit)
    with pytest.raises(CheckpointError, match="exactly once"):
        load_nla(tmp_path, pool=pool)


def test_check_neighbours_match(make_tiny, tmp_path):
    _, pool = build(tmp_path, make_tiny, av_meta=_tokens(injection_right_neighbor_id=46))
    with pytest.raises(CheckpointError, match="right neighbour of the marker is token"):
        load_nla(tmp_path, pool=pool)


def test_check_d_model_matches_the_embedding_width(make_tiny, tmp_path):
    def edit(meta):
        meta["d_model"] = 3584

    _, pool = build(tmp_path, make_tiny, ar_meta=edit)
    with pytest.raises(CheckpointError, match="d_model 3584 but the model's embedding width is 64"):
        load_nla(tmp_path, pool=pool)


def test_check_ar_tokenizer_adds_its_bos(make_tiny, tmp_path):
    from transformers import AutoTokenizer

    _, pool = build(tmp_path, make_tiny)
    cfg_file = tmp_path / "ar" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["bos_token"] = "<|endoftext|>"  # a real BOS (not a chat-turn marker) that the tokenizer does not add
    cfg_file.write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(tmp_path / "ar")
    assert tok("x")["input_ids"][0] != tok.bos_token_id
    with pytest.raises(CheckpointError, match="does not add it"):
        load_nla(tmp_path, pool=pool)


def test_check_ar_suffix_ids(make_tiny, tmp_path):
    _, pool = build(tmp_path, make_tiny, ar_meta=_tokens(critic_suffix_ids=[1, 2, 3]))
    with pytest.raises(CheckpointError, match="critic_suffix_ids"):
        load_nla(tmp_path, pool=pool)


def test_check_mse_scale_is_sqrt_d(make_tiny, tmp_path):
    def edit(meta):
        meta["extraction"]["mse_scale"] = 1.0

    _, pool = build(tmp_path, make_tiny, av_meta=edit)
    with pytest.raises(CheckpointError, match="mse_scale"):
        load_nla(tmp_path, pool=pool)


def test_check_value_head_present(make_tiny, tmp_path):
    _, pool = build(tmp_path, make_tiny)
    (tmp_path / "ar" / "value_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="value_head"):
        load_nla(tmp_path, pool=pool)


def test_check_roles(make_tiny, tmp_path):
    def edit(meta):
        meta["role"] = "critic"

    _, pool = build(tmp_path, make_tiny, av_meta=edit)
    with pytest.raises(CheckpointError, match="expected an AV"):
        load_nla(tmp_path, pool=pool)


@pytest.mark.parametrize("sidecar_layer", [1, 3])
def test_check_sidecar_layer_agrees_with_the_ar_config(make_tiny, tmp_path, sidecar_layer):
    """The AR's config.json keeps K+1 = 3 blocks; a sidecar naming another K is refused, never forced onto the
    config (one block more would be randomly initialised, one fewer would read another layer)."""

    def edit(meta):
        if "critic" in meta:
            meta["critic"]["extraction_layer_index"] = sidecar_layer
        meta["extraction_layer_index"] = sidecar_layer

    _, pool = build(tmp_path, make_tiny, layer=2, ar_meta=edit, av_meta=edit)
    with pytest.raises(
        CheckpointError, match=rf"extraction layer {sidecar_layer} .*config\.json has num_hidden_layers 3"
    ):
        load_nla(tmp_path, pool=pool)


# -- lenient keys, layouts, baselines -------------------------------------------------------------------------------
def test_training_era_sidecar_keys_are_read(make_tiny, tmp_path):
    def av_edit(meta):
        meta["role"] = "actor"
        meta["prompt_templates"] = {"actor": OFFICIAL_AV_TEMPLATE.replace("{injection_char}", "<INJECT>")}
        del meta["extraction_layer_index"]

    def ar_edit(meta):
        meta["role"] = "critic"
        meta["schema_version"] = 1
        meta["prompt_templates"] = {"critic": OFFICIAL_AR_TEMPLATE}
        meta["critic"] = {"num_hidden_layers": 2}
        del meta["extraction_layer_index"]

    _, pool = build(tmp_path, make_tiny, av_meta=av_edit, ar_meta=ar_edit)
    nla = load_nla(tmp_path, pool=pool)
    assert nla.layer == 2 and nla.verbalizer.template.endswith("Please provide an explanation.")

    def none(meta):
        meta.pop("critic", None)
        meta.pop("extraction_layer_index", None)

    shutil.rmtree(tmp_path)
    _, pool = build(tmp_path, make_tiny, ar_meta=none, av_meta=none)
    assert load_nla(tmp_path, pool=pool).layer == 2  # config.num_hidden_layers − 1


def test_release_naming_finds_the_partner(make_tiny, tmp_path):
    _, pool = build(tmp_path / "x", make_tiny)
    assert load_nla(tmp_path / "x" / "ar", pool=pool).layer == 2  # one half of an av/ + ar/ pair
    (tmp_path / "x" / "av").rename(tmp_path / "nla-tiny-L2-av")
    (tmp_path / "x" / "ar").rename(tmp_path / "nla-tiny-L2-ar")
    for p in ("nla-tiny-L2-av", "nla-tiny-L2-ar"):
        assert detect_format(tmp_path / p) == "official"
        assert load_nla(tmp_path / p, pool=pool).layer == 2
    (tmp_path / "nla-tiny-L2-ar").rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="no AR directory"):
        load_nla(tmp_path / "nla-tiny-L2-av", pool=pool)


def test_fve_baseline_sources(make_tiny, tmp_path):
    def drop(meta):
        meta.pop("fve_baseline", None)

    _, pool = build(tmp_path, make_tiny, ar_meta=drop)
    assert load_nla(tmp_path, pool=pool).fve_variance is None
    assert load_nla(tmp_path, pool=pool, fve_variance=0.5).fve_variance == 0.5
    assert RELEASED_VARIANCES[("Qwen/Qwen2.5-7B-Instruct", 20)] == 0.7335


def test_subject_named_by_a_hub_id_fails_clearly_offline(make_tiny, tmp_path, monkeypatch):
    from talkative.nla.sources import ModelSourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def hub(meta):
        meta["base_checkpoint"] = "Qwen/Qwen2.5-7B-Instruct"

    build(tmp_path / "c", make_tiny, av_meta=hub, ar_meta=hub)
    with pytest.raises(ModelSourceError, match=r"Qwen/Qwen2\.5-7B-Instruct"):
        load_nla(tmp_path / "c", pool=LMPool())


def test_a_gemma3_av_with_the_multimodal_wrapper(make_tiny, tmp_path):
    """The released Gemma AVs keep `Gemma3ForConditionalGeneration` (config.text_config, model.language_model)."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    subject, pool = build(tmp_path, make_tiny, "gemma3")
    text = subject.model.config.to_dict()
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = Gemma3Config(
        text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=5
    )
    torch.manual_seed(3)
    av = Gemma3ForConditionalGeneration(cfg).eval()
    av.save_pretrained(tmp_path / "av")
    nla = load_nla(tmp_path, pool=pool, max_new_tokens=4)
    assert type(nla.verbalizer.lm.model).__name__ == "Gemma3ForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(tmp_path / "av")
    prompt = ref.official_prompt_ids(tok, OFFICIAL_AV_TEMPLATE, MARKER)
    A = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    u = torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    out = nla.verbalizer.generate(A, 1, u, 1.0)
    eos = sorted(nla.verbalizer.eos_ids)
    for r in range(2):
        want, _ = ref.official_av_sample(av, tok, prompt, 7, A[r], SCALE, u[r], 1.0, 4, eos=eos)
        assert out[r].ids == want


def test_a_megatron_compatible_ar_loads(make_tiny, tmp_path):
    """`--megatron-compat` ARs carry a dummy final norm and lm_head = eye(d) [d, d]; both are ignored."""
    subject, pool = build(tmp_path, make_tiny, "qwen2")
    reference = load_nla(tmp_path, pool=pool)
    want = reference.reconstructor.reconstruct([reference.reconstructor.units("a fox")], None)
    weights = tmp_path / "ar" / "model.safetensors"
    state = load_file(str(weights))
    d = subject.d_model
    state["model.norm.weight"] = torch.ones(d)
    state["lm_head.weight"] = torch.eye(d)
    save_file(state, str(weights), metadata={"format": "pt"})
    fresh = LMPool()
    fresh.add(subject, "tiny-subject")
    nla = load_nla(tmp_path, pool=fresh)
    got = nla.reconstructor.reconstruct([nla.reconstructor.units("a fox")], None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
