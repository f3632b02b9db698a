"""Upstream `.pt` checkpoints: built here the way upstream's trainer saves them, loaded by us, and
compared against the reference in `tests/formats_ref.py`, which reads the file's tensors directly."""

from __future__ import annotations

import json
import math
import os
import time
from fractions import Fraction

import formats_ref as ref
import numpy as np
import pytest
import torch
from upstream_writer import write_upstream

from talkative.nla.analysis import analyze
from talkative.nla.checkpoint import NLA, CheckpointError, detect_format, load_nla
from talkative.nla.formats.upstream import DECODER_KEYS, ENCODER_KEYS, read_upstream, save_upstream
from talkative.nla.lm import LMPool
from talkative.nla.sampling import SEED_BOUND, step_seeds
from talkative.nla.sources import ModelSourceError

FAMILIES = ["llama", "qwen2", "gpt2", "gemma2", "gemma3"]
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."


def _pool(lm, name):
    pool = LMPool()
    pool.add(lm, name)
    return pool


def _family(make_tiny, kind, tmp_path, **kw):
    lm = make_tiny(kind, seed=11)
    name = f"tiny-{kind}"
    f = write_upstream(tmp_path / "run" / "checkpoint_step1234_epoch2_x.pt", lm, model_name=name, **kw)
    return lm, f, _pool(lm, name)


@pytest.mark.parametrize("kind", FAMILIES)
def test_decoder_and_encoder_match_the_reference(make_tiny, kind, tmp_path):
    lm, f, pool = _family(make_tiny, kind, tmp_path, compiled=kind == "qwen2")
    nla = load_nla(tmp_path / "run", pool=pool)
    raw = torch.load(f, weights_only=False)
    strip = {
        p: {k.removeprefix("_orig_mod."): v for k, v in raw["models"][p].items()}
        for p in ("decoder", "encoder")
    }
    dec, enc = strip["decoder"], strip["encoder"]
    flags = raw["config"]["trainable_components"]["encoder"]
    model = lm.model
    A = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(1)) * 2.0
    T = nla.t_text
    assert T == 4 and nla.layer == 2 and nla.verbalizer.patch_layers == 2

    # teacher-forced log-probabilities: the whole decoder input (soft prompts, P_0(A), √d, replacement at the input
    # of blocks 0..N-1) and the un-softcapped head
    ids = torch.randint(100, 1000, (3, T), generator=torch.Generator().manual_seed(2))
    got, _ = nla.verbalizer.token_logprobs(A, ids)
    for r in range(3):
        logits = ref.upstream_decoder_logits(model, dec, 2, A[r], ids[r].tolist())[:-1]
        want = torch.log_softmax(logits, -1).gather(-1, ids[r].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-5)

    # sampled tokens under fixed step seeds (KV-cached decoding vs whole-sequence reference), sampling and greedy
    u = torch.randint(0, SEED_BOUND, (3, T), generator=torch.Generator().manual_seed(3))
    for temperature in (1.0, 0.0):
        out = nla.verbalizer.generate(A, 1, u, temperature)
        for r in range(3):
            assert out[r].ids == ref.upstream_sample(model, dec, 2, A[r], T, u[r], temperature)

    # reconstruction vectors
    expl = [[101, 202, 303, 404], [505, 606, 707, 808]]
    cur = [55, 66]
    hats = nla.reconstructor.reconstruct(expl, cur)
    for r in range(2):
        want = ref.upstream_encode(model, enc, flags, expl[r], cur[r])
        torch.testing.assert_close(hats[r], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_analysis_rows_match_the_reference(make_tiny, kind, tmp_path):
    """Whole pipeline: activations, best-of-k over sampled explanations, mse, relative_rmse, salience."""
    lm, f, pool = _family(make_tiny, kind, tmp_path)
    nla = load_nla(f, pool=pool)
    raw = torch.load(f, weights_only=False)
    dec, enc = raw["models"]["decoder"], raw["models"]["encoder"]
    flags = raw["config"]["trainable_components"]["encoder"]
    k, seed = 3, 7
    rows = analyze(
        nla, TEXT, options={"seed": seed, "no_kl": True, "optimize_explanations_config": {"best_of_k": k}}
    ).rows
    ids = lm.encode(TEXT)
    acts = ref.activations(lm.model, ids, 2)
    space = lm.tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    for row in rows[:6]:
        q = row["position"]
        u = step_seeds(seed, [(q, j) for j in range(k)], 4)
        samples = [ref.upstream_sample(lm.model, dec, 2, acts[q], 4, u[j], 1.0) for j in range(k)]
        mses = [
            float(((acts[q] - ref.upstream_encode(lm.model, enc, flags, s, ids[q])) ** 2).mean())
            for s in samples
        ]
        best = min(range(k), key=lambda j: mses[j])
        assert row["explanation"] == lm.tokenizer.decode(samples[best])
        assert math.isclose(row["mse"], mses[best], rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(
            row["relative_rmse"], math.sqrt(mses[best]) / float(acts[q].pow(2).mean().sqrt()), rel_tol=1e-4
        )
        for i, sal in enumerate(row["token_salience"]):
            abl = list(samples[best])
            abl[i] = space
            m = float(((acts[q] - ref.upstream_encode(lm.model, enc, flags, abl, ids[q])) ** 2).mean())
            assert math.isclose(sal, (m - mses[best]) / mses[best], rel_tol=1e-3, abs_tol=1e-5)


def test_single_projection_serves_every_patched_block(make_tiny, tmp_path):
    _, f, pool = _family(make_tiny, "llama", tmp_path, per_layer=False, patch=3)
    nla = load_nla(f, pool=pool)
    dec = torch.load(f, weights_only=False)["models"]["decoder"]
    W = nla.verbalizer.proj_weight
    assert W.shape[0] == 3
    for i in range(3):
        torch.testing.assert_close(W[i], dec["proj.weight"].float())
        torch.testing.assert_close(nla.verbalizer.proj_bias[i], dec["proj.bias"].float())


@pytest.mark.parametrize(("patch", "want"), [(True, 4), (3, 3), ("just_input", 0), (False, 0)])
def test_patch_all_layers_semantics(make_tiny, tmp_path, patch, want):
    lm, f, pool = _family(make_tiny, "llama", tmp_path, patch=patch)
    nla = load_nla(f, pool=pool)
    assert nla.verbalizer.patch_layers == want
    if want == 0:
        # the projection only enters as an input embedding, scaled like every other prompt row
        raw = torch.load(f, weights_only=False)["models"]["decoder"]
        A = torch.randn(1, lm.d_model)
        ids = torch.tensor([[11, 12, 13, 14]])
        got, _ = nla.verbalizer.token_logprobs(A, ids)
        logits = ref.upstream_decoder_logits(lm.model, raw, 0, A[0], ids[0].tolist())[:-1]
        want_lp = torch.log_softmax(logits, -1).gather(-1, ids[0].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got[0], want_lp, rtol=1e-5, atol=1e-5)


def test_run_directory_takes_the_newest_readable_file(make_tiny, tmp_path, caplog):
    lm = make_tiny("llama", seed=11)
    old = write_upstream(tmp_path / "run" / "checkpoint_step10.pt", lm, model_name="tiny-llama", t_text=3)
    newer = write_upstream(tmp_path / "run" / "checkpoint_step20.pt", lm, model_name="tiny-llama", t_text=5)
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(newer, (now - 50, now - 50))
    pool = _pool(lm, "tiny-llama")
    assert detect_format(tmp_path / "run") == "upstream"
    assert load_nla(tmp_path / "run", pool=pool).t_text == 5
    broken = tmp_path / "run" / "checkpoint_step30.pt"
    broken.write_bytes(newer.read_bytes()[:5000])  # a save killed half-way
    assert load_nla(tmp_path / "run", pool=pool).t_text == 5
    assert "skipping unreadable checkpoint" in caplog.text
    newer.write_bytes(b"garbage")
    old.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_nla(tmp_path / "run", pool=pool)


def test_arbitrary_pickles_are_refused_unless_trusted(make_tiny, tmp_path):
    lm = make_tiny("llama", seed=11)
    f = write_upstream(tmp_path / "x.pt", lm, model_name="tiny-llama", extra={"scaler": Fraction(1, 3)})
    pool = _pool(lm, "tiny-llama")
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction.*--trust-checkpoint"):
        load_nla(f, pool=pool)
    assert load_nla(f, pool=pool, trust_checkpoint=True).layer == 2


def test_loading_leaves_global_rng_state_alone(make_tiny, tmp_path):
    lm = make_tiny("llama", seed=11)
    torch.manual_seed(999)
    np.random.seed(999)
    f = write_upstream(tmp_path / "x.pt", lm, model_name="tiny-llama")  # saves the current RNG states
    torch.manual_seed(5)
    np.random.seed(5)
    t_state, n_state = torch.get_rng_state(), np.random.get_state()
    load_nla(f, pool=_pool(lm, "tiny-llama"))
    assert torch.equal(torch.get_rng_state(), t_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), n_state, strict=True))


def test_native_to_upstream_round_trip_is_exact(make_tiny, tmp_path):
    lm = make_tiny("gemma3", seed=4)
    pool = _pool(lm, "tiny-gemma3")
    nla = NLA.init(
        lm, 2, subject_source="tiny-gemma3", patch_layers=3, t_text=5, head="linear", fve_variance=0.5
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in nla.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    native = nla.save(tmp_path / "native")
    f = save_upstream(load_nla(native, pool=pool), tmp_path / "up")
    back = load_nla(f, pool=pool)
    a, b = nla.trained_state(), back.trained_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = nla.config(), back.config()
    ca.pop("provenance"), cb.pop("provenance")
    assert ca == cb
    opts = {"seed": 3, "optimize_explanations_config": {"best_of_k": 2}}
    assert analyze(nla, TEXT, options=opts).rows == analyze(back, TEXT, options=opts).rows
    ck = read_upstream(f)
    assert set(ck.decoder) == {*DECODER_KEYS, "prompt_ids"}
    assert set(ck.encoder) == {k for k in ENCODER_KEYS if k != "soft_prompt_embeddings_postfix"}


def test_tensors_are_checked_by_name_and_shape(make_tiny, tmp_path):
    _, f, pool = _family(make_tiny, "llama", tmp_path)
    obj = torch.load(f, weights_only=False)
    obj["models"]["encoder"]["soft_prompt_embeddings"] = obj["models"]["encoder"]["soft_prompt_embeddings"][
        :-1
    ]
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match=r"wrong shapes.*reconstructor\.soft_prompt"):
        load_nla(f, pool=pool)
    obj["models"]["encoder"]["activation_pos_embedder.weight"] = torch.zeros(3)
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match="activation_pos_embedder"):
        load_nla(f, pool=pool)


def test_a_different_tokenizer_is_detected(make_tiny, tmp_path):
    _, f, pool = _family(make_tiny, "llama", tmp_path)
    obj = torch.load(f, weights_only=False)
    obj["models"]["decoder"]["prompt_ids"] = obj["models"]["decoder"]["prompt_ids"] + 1
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_nla(f, pool=pool)


def test_unsupported_configurations_are_refused(make_tiny, tmp_path):
    lm = make_tiny("llama", seed=11)
    pool = _pool(lm, "tiny-llama")
    f = write_upstream(
        tmp_path / "a.pt", lm, model_name="tiny-llama", extra_config={"decoder_prompt": "no placeholder"}
    )
    with pytest.raises(CheckpointError, match="<embed>"):
        load_nla(f, pool=pool)
    f = write_upstream(tmp_path / "b.pt", lm, model_name="tiny-llama")
    obj = torch.load(f, weights_only=False)
    obj["config"]["trainable_components"]["decoder"]["output_head"] = True
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match="output head"):
        load_nla(f, pool=pool)
    torch.save({"models": {}}, f)
    with pytest.raises(CheckpointError, match="not an upstream"):
        load_nla(f, pool=pool)


def test_a_hub_base_that_is_not_here_fails_clearly(make_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    lm = make_tiny("llama", seed=11)
    f = write_upstream(tmp_path / "x.pt", lm, model_name="google/gemma-2-9b-it")
    with pytest.raises(ModelSourceError, match="cannot be reached"):
        load_nla(f, pool=LMPool())


def test_orig_model_name_is_the_subject(make_tiny, tmp_path):
    base = make_tiny("llama", seed=11)
    donor = make_tiny("llama", seed=12)
    pool = _pool(base, "tiny-base")
    pool.add(donor, "tiny-donor")
    f = write_upstream(
        tmp_path / "x.pt", base, model_name="tiny-base", extra_config={"orig_model_name": "tiny-donor"}
    )
    nla = load_nla(f, pool=pool)
    assert nla.subject is donor and nla.verbalizer.lm is base and nla.reconstructor.lm is base
    assert nla.subject_source == "tiny-donor" and nla.bases["verbalizer"] == {"source": "tiny-base"}
    # a donor override (model groups' different_activations_orig_path) wins; naming the base means no donor
    assert load_nla(f, pool=pool, subject_override="tiny-base").subject is base


def test_a_lora_donor_is_merged_into_a_copy_of_the_base(make_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = make_tiny("llama", seed=11)
    base_dir = tmp_path / "base"
    base.model.save_pretrained(base_dir)
    base.tokenizer.save_pretrained(base_dir)
    torch.manual_seed(0)
    lora = get_peft_model(
        make_tiny("llama", seed=11).model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    import json

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someorg/tiny-base"  # the hub id the checkpoint names
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    f = write_upstream(tmp_path / "x.pt", base, model_name="someorg/tiny-base")
    pool = LMPool()
    nla = load_nla(f, pool=pool, base_override=str(base_dir), subject_override=str(adapter))
    assert nla.subject is not nla.verbalizer.lm
    # reference: W + (alpha / r) · B A on the donor's q and v projections, by hand
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    merged = make_tiny("llama", seed=11)
    with torch.no_grad():
        for i, layer in enumerate(merged.model.model.layers):
            for name in ("q_proj", "v_proj"):
                key = f"base_model.model.model.layers.{i}.self_attn.{name}"
                A_, B_ = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
                getattr(layer.self_attn, name).weight.add_(B_ @ A_ * (8 / 4))
    ids = nla.subject.encode(TEXT)
    torch.testing.assert_close(
        nla.subject.residual(torch.tensor(ids), 2)[0],
        ref.activations(merged.model, ids, 2),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not torch.allclose(
        nla.verbalizer.lm.residual(torch.tensor(ids), 2)[0], ref.activations(merged.model, ids, 2)
    )


def test_pickle_errors_are_not_mistaken_for_corruption(make_tiny, tmp_path):
    """A file refused for safety is never silently replaced by an older checkpoint of the run."""
    lm = make_tiny("llama", seed=11)
    old = write_upstream(tmp_path / "run" / "a.pt", lm, model_name="tiny-llama")
    new = write_upstream(tmp_path / "run" / "b.pt", lm, model_name="tiny-llama", extra={"x": Fraction(1, 2)})
    os.utime(old, (1, 1))
    assert new.stat().st_mtime > old.stat().st_mtime
    with pytest.raises(CheckpointError, match="trust"):
        load_nla(tmp_path / "run", pool=_pool(lm, "tiny-llama"))


def test_the_explanation_grammar_survives_native_to_upstream_and_back(make_tiny, tmp_path):
    lm = make_tiny("llama", seed=5)
    pool = _pool(lm, "tiny-llama")
    native = NLA.init(lm, 1, subject_source="tiny-llama", t_text=8).save(tmp_path / "native")
    cfg = json.loads((native / "nla.json").read_text())
    cfg["verbalizer"]["grammar"] = "sentence"
    (native / "nla.json").write_text(json.dumps(cfg))
    guided = load_nla(native, pool=pool)
    back = load_nla(save_upstream(guided, tmp_path / "up"), pool=pool)
    assert back.verbalizer.grammar == "sentence" == guided.verbalizer.grammar
    assert back.config()["verbalizer"] == guided.config()["verbalizer"]
