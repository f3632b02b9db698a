"""Official AV/AR checkpoints: built here as the release ships them (AV and AR model directories with sidecars), loaded by us, and
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
from talkative.nla.sampling import SEED_BOUND, step_seeds
from talkative.nla.verbalizer import PromptOverrides

MARKER = "<gh_stars>"  # a single, otherwise unused token of the SmolLM2 tokenizer (id 7)
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."
SCALE = 40.0


def _truncated_ar(full, layer: int, out: Path) -> None:
    """An AR directory as the release ships it: config.num_hidden_layers = K+1 (per-layer arrays sliced), blocks 0..K, no final norm,
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


def _ref_parse(tok, ids, reason) -> str:
    """The reference client's reading: its server returns the text without the end-of-turn token that
    stopped the sample; the first tagged body, stripped, else that whole text as it is."""
    raw = tok.decode(ids[:-1] if reason == "eos" else ids, skip_special_tokens=False)
    m = re.search(r"<explanation>(.*?)</explanation>", raw, re.DOTALL)
    return raw if m is None else m.group(1).strip()


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

    # sampled tokens under fixed step seeds: chat prompt, √d (Gemma), the marker row replaced by A rescaled
    ids = subject.encode(TEXT)
    acts = ref.activations(subject.model, ids, 2)
    A = acts[[3, 7, 11]]
    u = torch.randint(0, SEED_BOUND, (3, 8), generator=torch.Generator().manual_seed(9))
    eos = sorted(v.eos_ids)
    for temperature in (1.0, 0.0):
        out = v.generate(A, 1, u, temperature)
        for r in range(3):
            want, reason = ref.official_av_sample(
                av, tok, prompt, 7, A[r], SCALE, u[r], temperature, 8, eos=eos
            )
            assert out[r].ids == want and out[r].finish_reason == reason
    # equal tokens above pin the inputs down only if the tokens depend on them: the same step seeds with another
    # vector give other tokens (this tiny AV's logits move by ~0.005 with the vector, and the sampler keeps a token
    # unless the two best perturbed scores are that close: 64 samples per vector)
    many = torch.randint(0, SEED_BOUND, (192, 8), generator=torch.Generator().manual_seed(10))
    flipped = v.generate(-A, 64, many, 1.0)
    assert any(a.ids != b.ids for a, b in zip(flipped, v.generate(A, 64, many, 1.0), strict=True))

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
        uu = step_seeds(seed, [(q, j) for j in range(k)], 8)
        samples = [
            ref.official_av_sample(av, tok, prompt, 7, acts[q], SCALE, uu[j], 1.0, 8, eos=eos)
            for j in range(k)
        ]
        texts = [_ref_parse(tok, ids, reason) for ids, reason in samples]
        preds = [ref.official_ar(ar, tok, head, t, OFFICIAL_AR_TEMPLATE) for t in texts]
        scores = [ref.official_metrics(acts[q], p, 0.8) for p in preds]
        # a sample cut at the budget is a failed sample: it wins only when every sample was cut
        best = min(range(k), key=lambda j: (samples[j][1] == "length", scores[j]["nmse"]))
        assert row["explanation"] == texts[best]
        # the direction-only AR's output is reported on the activation's scale
        want = preds[best] / preds[best].norm() * acts[q].norm()
        torch.testing.assert_close(torch.tensor(row["reconstruction"]), want, rtol=1e-5, atol=1e-4)
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


# -- direction-only reconstructions are used on the activation's scale ----------------------------------------------
def _scale_value_head(ar_dir: Path, factor: float) -> None:
    """The released head × factor (kept in fp32: a bf16 round trip would change the direction too)."""
    f, orig = ar_dir / "value_head.safetensors", ar_dir / "value_head.orig"
    if not orig.exists():
        shutil.copy(f, orig)
    save_file({k: v.float() * factor for k, v in load_file(str(orig)).items()}, str(f))


def _fresh_load(root: Path, subject):
    pool = LMPool()
    pool.add(subject, "tiny-subject")
    return load_nla(root, pool=pool, max_new_tokens=8)


def test_the_value_head_scale_changes_no_number(make_tiny, tmp_path):
    """The official AR is trained on direction only: its output norm is arbitrary. Â is rescaled to ‖A‖ before the
    unit-dependent metrics and the KL patch, so scaling the value head (weight and bias) by 0.1 or 10 changes
    nothing the server reports."""
    subject, _ = build(tmp_path, make_tiny, "qwen2", bias=True)
    options = {"seed": 3, "return_vectors": True, "optimize_explanations_config": {"best_of_k": 2}}
    runs = {}
    for factor in (1.0, 0.1, 10.0):
        _scale_value_head(tmp_path / "ar", factor)
        nla = _fresh_load(tmp_path, subject)
        runs[factor] = analyze(nla, TEXT, options=options)
    base = runs[1.0]
    assert base.metadata["reconstruction_scaled_to_norm"] is True
    for factor in (0.1, 10.0):
        assert [r["explanation"] for r in runs[factor].rows] == [r["explanation"] for r in base.rows]
        for mine, ref_row in zip(runs[factor].rows, base.rows, strict=True):
            for name in ("nmse", "fve", "cosine", "kl_divergence", "mse", "relative_rmse"):
                assert math.isclose(mine[name], ref_row[name], rel_tol=1e-4, abs_tol=1e-6), (factor, name)
    for row in base.rows:
        assert math.isclose(torch.tensor(row["reconstruction"]).norm(), row["norm"], rel_tol=1e-5)
        # on A's scale, relative RMSE is a function of the direction alone
        assert math.isclose(row["relative_rmse"], math.sqrt(row["nmse"]), rel_tol=1e-4, abs_tol=1e-6)


def test_the_vector_endpoints_use_the_same_scale(make_tiny, tmp_path):
    from talkative.nla.options import resolve
    from talkative.nla.vectors import describe, score

    subject, _ = build(tmp_path, make_tiny, "qwen2", bias=True)
    v = ref.activations(subject.model, subject.encode(TEXT), 2)[5]
    texts = ["A fox.", "Final token is a comma."]
    opts = resolve({"seed": 1, "no_kl": True, "return_vectors": True})
    scored, described = [], []
    for step in (1.0, 10.0):
        _scale_value_head(tmp_path / "ar", step)
        nla = _fresh_load(tmp_path, subject)
        scored.append(score(nla, v, texts, return_vectors=True))
        described.append(describe(nla, v.unsqueeze(0), opts))
    for body in scored + described:
        assert body["metadata"]["reconstruction_scaled_to_norm"] is True
        hats = torch.tensor(body["reconstructions"])
        torch.testing.assert_close(hats.norm(dim=-1), v.norm().expand(hats.shape[0]), rtol=1e-5, atol=1e-4)
    for a, b in ((scored[0], scored[1]), (described[0], described[1])):
        for ra, rb in zip(a["results"], b["results"], strict=True):
            for name in ("mse", "relative_rmse", "cosine", "nmse", "fve"):
                assert math.isclose(ra[name], rb[name], rel_tol=1e-4, abs_tol=1e-6), name


class _ReconstructorDouble:
    """What the engine asks of a reconstructor, for doubles that only say how they read and reconstruct: a
    template-style reader with no shortcut for salience ablations."""

    mode = "template"
    keeps_verbalizer_ids = False
    one_length_per_pass = False
    add_current_token = False

    def text_units(self, text):
        return self.units(text)

    def row_tokens(self, n_units):
        return len(self.pre_ids) + n_units

    def reconstruct_cached(self, units, current=None):
        return self.reconstruct(units, current), None

    def ablate(self, units, spans, current, budget, cache=None, cache_rows=None):
        return None  # no shortcut: every ablated row is reconstructed on its own


class _ExactTimes(_ReconstructorDouble):
    """A reconstructor double that returns `factor` × the true activation of the position each row belongs to
    (told by the row's current token: the test's positions have distinct tokens), to pin down what the KL patch
    uses."""

    def __init__(self, real, by_token: dict[int, torch.Tensor], factor: float) -> None:
        self.real, self.by_token, self.factor = real, by_token, factor
        self.lm, self.space_id, self.pre_ids = real.lm, real.space_id, real.pre_ids

    def units(self, text):
        return self.real.units(text)

    def explanation_span(self, units):
        return self.real.explanation_span(units)

    def reconstruct(self, units, current=None):
        return self.factor * torch.stack([self.by_token[int(t)] for t in current])


def test_an_exact_direction_at_ten_times_the_norm_costs_no_kl(make_tiny, tmp_path):
    import dataclasses

    subject, pool = build(tmp_path, make_tiny, "llama")
    nla = load_nla(tmp_path, pool=pool, max_new_tokens=4)
    ids = subject.encode(TEXT)
    acts = ref.activations(subject.model, ids, 2)
    positions = [3, 6, 9]
    by_token = {ids[p]: acts[p] for p in positions}
    assert len(by_token) == len(positions)
    options = {"seed": 0, "calculate_token_salience": False, "optimize_explanations_config": {"best_of_k": 1}}
    for objective, factor in (("nmse", 10.0), ("nmse", 0.1), ("mse", 1.0)):
        double = dataclasses.replace(
            nla, objective=objective, reconstructor=_ExactTimes(nla.reconstructor, by_token, factor)
        )
        rows = analyze(double, TEXT, options=options, positions=positions).rows
        for row in rows:
            assert row["kl_divergence"] < 1e-6
            assert row["mse"] < 1e-8 * row["norm"] ** 2 and row["relative_rmse"] < 1e-4
            assert math.isclose(row["cosine"], 1.0, abs_tol=1e-6)
    # a unit-dependent objective keeps the reconstruction as given: ten times the norm is a real error there
    double = dataclasses.replace(
        nla, objective="mse", reconstructor=_ExactTimes(nla.reconstructor, by_token, 10.0)
    )
    rows = analyze(double, TEXT, options=options, positions=positions).rows
    assert all(
        r["kl_divergence"] > 1e-3 and math.isclose(r["relative_rmse"], 9.0, rel_tol=1e-4) for r in rows
    )


# -- truncated samples in best-of-k --------------------------------------------------------------------------------
class _ScriptedAV:
    """A verbalizer double whose k samples per position are given: (text, finish_reason) for sample j."""

    mode = "embedding_replacement"
    fixed_length = False
    edits_prompt = False
    t_text = None

    def __init__(self, real, samples: list[tuple[str, str]]) -> None:
        self.lm, self.prompt_ids, self.max_new_tokens, self.samples = real.lm, real.prompt_ids, 4, samples

    def max_added_tokens(self):
        return None

    def steps(self, overrides):
        return self.max_new_tokens

    def row_tokens(self, overrides):
        return len(self.prompt_ids) + len(overrides.add_ids) + self.max_new_tokens

    def generate(self, A, k, seeds, temperature, overrides=None, cancelled=None):
        from talkative.nla.verbalizer import Explanation, read_explanation

        assert k == len(self.samples)
        out = []
        for _ in range(A.shape[0]):
            for text, reason in self.samples:
                body, how = read_explanation(text)
                out.append(Explanation(ids=[1], text=body, finish_reason=reason, raw=text, parse=how))
        return out


class _ScoredAR(_ReconstructorDouble):
    """A reconstructor double: explanation text → the activation of the row's position (told by its current token)
    plus a text-dependent error."""

    def __init__(self, real, by_token: dict[int, torch.Tensor], error: dict[str, float]) -> None:
        self.lm, self.space_id, self.pre_ids = real.lm, real.space_id, real.pre_ids
        self.by_token, self.error = by_token, error
        acts = next(iter(by_token.values())).unsqueeze(0)
        self.direction = torch.randn(acts.shape[1], generator=torch.Generator().manual_seed(0))

    def units(self, text):
        return [ord(c) for c in text]

    def explanation_span(self, units):
        return 0, len(units)

    def reconstruct(self, units, current=None):
        rows = []
        for u, t in zip(units, current, strict=True):
            a = self.by_token[int(t)]
            rows.append(
                a + self.error["".join(map(chr, u))] * a.norm() * self.direction / self.direction.norm()
            )
        return torch.stack(rows)


@pytest.mark.parametrize(
    ("samples", "chosen", "all_truncated"),
    [
        # the truncated sample reconstructs best, but a complete one exists: the best complete sample wins
        (
            [("<explanation>cut", "length"), ("<explanation>bad</explanation>", "stop"), ("fine", "eos")],
            "fine",
            False,
        ),
        ([("<explanation>bad</explanation>", "stop"), ("<explanation>cut", "length")], "bad", False),
        # every sample hit the budget: the best of them, flagged
        ([("<explanation>cut", "length"), ("<explanation>also cut", "length")], "<explanation>cut", True),
    ],
)
def test_truncated_samples_never_beat_a_complete_one(make_tiny, tmp_path, samples, chosen, all_truncated):
    import dataclasses

    subject, pool = build(tmp_path, make_tiny, "llama")
    nla = load_nla(tmp_path, pool=pool, max_new_tokens=4)
    ids = subject.encode(TEXT)
    acts = ref.activations(subject.model, ids, 2)
    positions, k = [2, 5], len(samples)
    by_token = {ids[p]: acts[p] for p in positions}
    assert len(by_token) == len(positions)
    error = {
        "cut": 0.0,
        "<explanation>cut": 0.0,
        "also cut": 0.5,
        "<explanation>also cut": 0.5,
        "bad": 0.9,
        "fine": 0.3,
    }
    double = dataclasses.replace(
        nla,
        verbalizer=_ScriptedAV(nla.verbalizer, samples),
        reconstructor=_ScoredAR(nla.reconstructor, by_token, error),
    )
    options = {
        "seed": 0,
        "no_kl": True,
        "calculate_token_salience": False,
        "optimize_explanations_config": {"best_of_k": k},
    }
    rows = analyze(double, TEXT, options=options, positions=positions).rows
    for row in rows:
        assert row["explanation"] == chosen
        assert row["all_samples_truncated"] is all_truncated
        assert (row["finish_reason"] == "length") is all_truncated
    expected_parse = {"fine": "untagged", "bad": "tagged", "<explanation>cut": "unclosed"}[chosen]
    assert all(r["explanation_parse"] == expected_parse for r in rows)
