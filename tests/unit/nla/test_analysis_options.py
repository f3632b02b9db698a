"""Every analysis option does what it says: checked on the rows against hand computations (HF modules, no engine)."""

from __future__ import annotations

import json

import pytest
import torch
from nla_reference import hf_activations, hf_greedy_layer_replacement, tiny_nla, tiny_official_nla

from talkative.nla.analysis import AnalysisError, analyze
from talkative.nla.lens import LensError, TunedLens, load_tuned_lens
from talkative.nla.prompts import encode_piece

TEXT = "A small grey cat sat on the mat."
METRICS = ("mse", "relative_rmse", "cosine", "nmse", "fve")


@pytest.fixture(scope="module")
def nla(make_tiny):
    return tiny_nla(make_tiny, "qwen2", t_text=5)


def _opts(k=1, **kw):
    return {"optimize_explanations_config": {"best_of_k": k}, **kw}


def _greedy_rows(nla, **kw):
    return analyze(nla, TEXT, options=_opts(k=1, temperature=0, no_kl=True, **kw)).rows


def _hand_greedy(nla, **kw):
    lm = nla.subject
    ids = lm.encode(TEXT)
    acts = hf_activations(lm, ids, nla.layer)
    return [hf_greedy_layer_replacement(nla.verbalizer, acts[p], **kw) for p in range(len(ids))]


def test_temperature_zero_is_greedy(nla):
    rows = _greedy_rows(nla)
    want = _hand_greedy(nla, steps=5)
    tok = nla.subject.tokenizer
    assert [r["explanation"] for r in rows] == [tok.decode(w) for w in want]
    assert [r["explanation_structured"] for r in rows] == [[tok.decode([t]) for t in w] for w in want]
    # k samples at temperature 0 are all the greedy one
    rows_k = analyze(nla, TEXT, options=_opts(k=4, temperature=0, no_kl=True)).rows
    assert [r["explanation"] for r in rows_k] == [r["explanation"] for r in rows]
    # and the top-level temperature is overridden by the one in optimize_explanations_config
    cfg = {
        "optimize_explanations_config": {"best_of_k": 1, "temperature": 0},
        "temperature": 1.5,
        "no_kl": True,
    }
    assert [r["explanation"] for r in analyze(nla, TEXT, options=cfg).rows] == [
        r["explanation"] for r in rows
    ]


def test_add_tokens_force_the_start_of_every_explanation(nla):
    rows = _greedy_rows(nla, add_tokens=["Hello", " world"])
    add = encode_piece(nla.subject, "Hello") + encode_piece(nla.subject, " world")
    want = _hand_greedy(nla, steps=5 - len(add), add_ids=add)
    tok = nla.subject.tokenizer
    for r, w in zip(rows, want, strict=True):
        assert r["explanation"].startswith("Hello world")
        assert r["explanation"] == tok.decode(add + w)
        assert r["explanation_structured"][:2] == ["Hello", " world"]
    sampled = analyze(nla, TEXT, options=_opts(k=3, add_tokens=["Hello"], no_kl=True)).rows
    assert all(r["explanation"].startswith("Hello") for r in sampled)


@pytest.mark.parametrize("which", ["replace_left", "replace_right", "both", "do_hard_tokens"])
def test_prompt_overrides_use_the_plain_embeddings_of_their_text(nla, which):
    lm = nla.subject
    v = nla.verbalizer
    rows_of = lm.model.get_input_embeddings().weight.detach()
    left, right = "Describe", ", briefly:"
    opts, ref = {
        "replace_left": ({"replace_left": left}, {"left": rows_of[encode_piece(lm, left)]}),
        "replace_right": ({"replace_right": right}, {"right": rows_of[encode_piece(lm, right)]}),
        "both": (
            {"replace_left": left, "replace_right": right},
            {"left": rows_of[encode_piece(lm, left)], "right": rows_of[encode_piece(lm, right)]},
        ),
        "do_hard_tokens": (
            {"do_hard_tokens": True},
            {"left": rows_of[v.left_ids], "right": rows_of[v.right_ids]},
        ),
    }[which]
    rows = _greedy_rows(nla, **opts)
    want = [lm.tokenizer.decode(w) for w in _hand_greedy(nla, steps=5, **ref)]
    assert [r["explanation"] for r in rows] == want
    assert want != [r["explanation"] for r in _greedy_rows(nla)]


def test_no_eval_leaves_out_metrics_kl_and_salience(nla):
    for r in analyze(nla, TEXT, options=_opts(k=3, no_eval=True)).rows:
        assert r["explanation"]
        assert all(r[m] is None for m in METRICS)
        assert r["kl_divergence"] is None and r["token_salience"] is None


def test_no_kl_keeps_metrics(nla):
    for r in analyze(nla, TEXT, options=_opts(k=2, no_kl=True)).rows:
        assert r["kl_divergence"] is None
        assert all(r[m] is not None for m in METRICS)
        assert len(r["token_salience"]) == 5
    rows = analyze(nla, TEXT, options=_opts(k=2)).rows
    assert all(isinstance(r["kl_divergence"], float) and r["kl_divergence"] >= 0 for r in rows)


@pytest.mark.parametrize("flag", ["calculate_token_salience", "calculate_salience"])
def test_salience_can_be_switched_off(nla, flag):
    rows = analyze(nla, TEXT, options=_opts(k=2, no_kl=True, **{flag: False})).rows
    assert all(r["token_salience"] is None and r["mse"] is not None for r in rows)


def test_return_structured(nla):
    on = analyze(nla, TEXT, options=_opts(k=2, no_kl=True, seed=3)).rows
    off = analyze(nla, TEXT, options=_opts(k=2, no_kl=True, seed=3, return_structured=False)).rows
    assert all(r["explanation_structured"] is None for r in off)
    for a, b in zip(on, off, strict=True):
        assert len(a["explanation_structured"]) == 5
        assert "".join(a["explanation_structured"]) == a["explanation"] == b["explanation"]


def test_return_vectors(nla):
    rows = analyze(nla, TEXT, options=_opts(k=2, no_kl=True)).rows
    assert all("activation" not in r and "reconstruction" not in r for r in rows)
    rows = analyze(nla, TEXT, options=_opts(k=2, no_kl=True, return_vectors=True)).rows
    acts = hf_activations(nla.subject, nla.subject.encode(TEXT), nla.layer)
    for r in rows:
        assert len(r["activation"]) == len(r["reconstruction"]) == nla.d_model
        torch.testing.assert_close(torch.tensor(r["activation"]), acts[r["position"]], rtol=1e-4, atol=1e-5)
    rows = analyze(nla, TEXT, options=_opts(k=1, no_eval=True, return_vectors=True)).rows
    assert all(r["reconstruction"] is None and len(r["activation"]) == nla.d_model for r in rows)


def _top10(lm, logits):
    top = logits.topk(10).indices.tolist()
    return " ".join(repr(lm.tokenizer.decode([t])) for t in top)


def test_logit_lens_is_final_norm_then_unembedding(nla):
    lm = nla.subject
    rows = analyze(nla, TEXT, options=_opts(k=1, no_kl=True, logit_lens_analysis=True)).rows
    acts = hf_activations(lm, lm.encode(TEXT), nla.layer)
    with torch.no_grad():
        logits = lm.model.lm_head(lm.model.model.norm(acts))
    assert [r["logit_lens_top"] for r in rows] == [_top10(lm, logits[p]) for p in range(len(rows))]
    assert all(r["tuned_lens_top"] is None for r in rows)
    assert all(r["logit_lens_top"] is None for r in analyze(nla, TEXT, options=_opts(k=1, no_kl=True)).rows)


def test_tuned_lens_adds_the_translator_first(nla):
    lm = nla.subject
    lens = TunedLens(lm.d_model, lm.n_layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(torch.randn(t.weight.shape, generator=g) * 0.3)
            t.bias.copy_(torch.randn(t.bias.shape, generator=g))
    rows = analyze(nla, TEXT, options=_opts(k=1, no_kl=True, tuned_lens=True), tuned=lens).rows
    acts = hf_activations(lm, lm.encode(TEXT), nla.layer)
    # the activation after block L is HF hidden_states[L+1], the input of block L+1: tuned-lens translator L+1
    t = lens.layer_translators[nla.layer + 1]
    with torch.no_grad():
        logits = lm.model.lm_head(lm.model.model.norm(acts + acts @ t.weight.T + t.bias))
    assert [r["tuned_lens_top"] for r in rows] == [_top10(lm, logits[p]) for p in range(len(rows))]
    assert all(r["logit_lens_top"] is None for r in rows)
    # a lens given but not asked for is not used
    rows = analyze(nla, TEXT, options=_opts(k=1, no_kl=True), tuned=lens).rows
    assert all(r["tuned_lens_top"] is None for r in rows)


def _random_lens(d: int, n: int, seed: int = 0) -> TunedLens:
    lens = TunedLens(d, n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(torch.randn(t.weight.shape, generator=g) * 0.5)
            t.bias.copy_(torch.randn(t.bias.shape, generator=g))
    return lens


def test_tuned_lens_with_an_identity_translator_after_block_l_is_the_logit_lens(nla):
    lm = nla.subject
    lens = _random_lens(lm.d_model, lm.n_layers)
    with torch.no_grad():  # h + 0·h + 0: the identity, at the translator for hidden_states[L+1] only
        lens.layer_translators[nla.layer + 1].weight.zero_()
        lens.layer_translators[nla.layer + 1].bias.zero_()
    opts = _opts(k=1, no_kl=True, tuned_lens=True, logit_lens_analysis=True)
    rows = analyze(nla, TEXT, options=opts, tuned=lens).rows
    assert all(r["tuned_lens_top"] == r["logit_lens_top"] for r in rows)
    # any other translator zeroed instead changes the read-out
    other = _random_lens(lm.d_model, lm.n_layers)
    with torch.no_grad():
        other.layer_translators[nla.layer].weight.zero_()
        other.layer_translators[nla.layer].bias.zero_()
    rows = analyze(nla, TEXT, options=opts, tuned=other).rows
    assert any(r["tuned_lens_top"] != r["logit_lens_top"] for r in rows)


def test_tuned_lens_after_the_last_block_is_the_logit_lens(nla):
    from talkative.nla.lens import logit_lens, tuned_lens_logits

    lm = nla.subject
    lens = _random_lens(lm.d_model, lm.n_layers)
    h = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tuned_lens_logits(lm, lens, h, lm.n_layers - 1), logit_lens(lm, h))


def test_a_lens_saved_by_the_tuned_lens_package_loads(nla, tmp_path):
    """`tuned_lens.TunedLens.save`: params.pt = `layer_translators.state_dict()` (keys `0.weight`, `0.bias`, …),
    config.json = its `TunedLensConfig` fields."""
    lm = nla.subject
    lens = _random_lens(lm.d_model, lm.n_layers, seed=3)
    torch.save(
        {k: v.to(torch.float16) for k, v in lens.layer_translators.state_dict().items()},
        tmp_path / "params.pt",
    )
    config = {
        "base_model_name_or_path": "tiny-subject",
        "d_model": lm.d_model,
        "num_hidden_layers": lm.n_layers,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": "0123abcd",
        "lens_type": "linear_tuned_lens",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_tuned_lens(tmp_path, lm)
    assert len(loaded.layer_translators) == lm.n_layers
    want = lens.layer_translators[nla.layer + 1]
    got = loaded.layer_translators[nla.layer + 1]
    torch.testing.assert_close(got.weight, want.weight.half().float())
    opts = _opts(k=1, no_kl=True, tuned_lens=True)
    acts = hf_activations(lm, lm.encode(TEXT), nla.layer)
    with torch.no_grad():
        logits = lm.model.lm_head(lm.model.model.norm(acts + acts @ got.weight.T + got.bias))
    rows = analyze(nla, TEXT, options=opts, tuned=loaded).rows
    assert [r["tuned_lens_top"] for r in rows] == [_top10(lm, logits[p]) for p in range(len(rows))]
    # without biases (TunedLensConfig.bias = false) the keys are 0.weight, 1.weight, …
    torch.save(
        {f"{i}.weight": t.weight for i, t in enumerate(lens.layer_translators)}, tmp_path / "params.pt"
    )
    assert loaded.layer_translators[0].bias is not None
    assert load_tuned_lens(tmp_path, lm).layer_translators[0].bias is None
    config["num_hidden_layers"] = lm.n_layers + 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensError, match="blocks"):
        load_tuned_lens(tmp_path, lm)


def test_tuned_lens_directory_loads(nla, tmp_path):
    lens = TunedLens(nla.d_model, nla.subject.n_layers)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.normal_(0, 0.1)
    torch.save(lens.state_dict(), tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": nla.d_model}))
    loaded = load_tuned_lens(tmp_path, nla.subject)
    opts = _opts(k=1, no_kl=True, tuned_lens=True)
    assert (
        analyze(nla, TEXT, options=opts, tuned=loaded).rows
        == analyze(nla, TEXT, options=opts, tuned=lens).rows
    )
    (tmp_path / "config.json").write_text('{"d_model": 7}')
    with pytest.raises(LensError, match="d_model 7"):
        load_tuned_lens(tmp_path, nla.subject)
    with pytest.raises(LensError, match=r"no params\.pt"):
        load_tuned_lens(tmp_path / "nowhere", nla.subject)


def test_batch_size_is_automatic_from_the_row_budget(nla):
    assert analyze(nla, "Hi.", options=_opts(k=8, no_kl=True)).metadata["batch_size"] == 256 // 8
    assert analyze(nla, "Hi.", options=_opts(k=8, no_kl=True, batch_size=3)).metadata["batch_size"] == 3
    cfg = {"optimize_explanations_config": {"best_of_k": 2, "n_groups_per_rollout": 5}, "no_kl": True}
    assert analyze(nla, "Hi.", options=cfg).metadata["batch_size"] == 5


# -- chat messages --------------------------------------------------------------------------------------------------
CHAT = [
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is two plus two?"},
]


def _turn_starts(nla, ids):
    """Indices of <|im_start|> tokens that open a message (SmolLM2's template): not the default system turn the
    template adds, not the generation prompt at the end."""
    start = nla.subject.tokenizer.convert_tokens_to_ids("<|im_start|>")
    return [i for i, t in enumerate(ids) if t == start]


def test_messages_are_rendered_with_the_chat_template(nla):
    rows = analyze(nla, messages=CHAT, options=_opts(k=1, no_kl=True)).rows
    tok = nla.subject.tokenizer
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [r["token_id"] for r in rows] == ids
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_last_n_messages_limits_positions_to_the_last_messages(nla, n):
    rows = analyze(nla, messages=CHAT, options=_opts(k=1, no_kl=True, last_n_messages=n)).rows
    tok = nla.subject.tokenizer
    ids = tok(
        tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    starts = _turn_starts(nla, ids)  # [default system, user, assistant, user, generation prompt]
    assert len(starts) == 5
    first = 0 if n >= len(CHAT) else starts[1:-1][-n]
    assert [r["position"] for r in rows] == list(range(first, len(ids)))


def test_last_n_messages_with_a_final_assistant_message_continues_it(nla):
    chat = [*CHAT, {"role": "assistant", "content": "It is four"}]
    rows = analyze(nla, messages=chat, options=_opts(k=1, no_kl=True, last_n_messages=1)).rows
    tok = nla.subject.tokenizer
    text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text.endswith("It is four")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [r["position"] for r in rows] == list(range(_turn_starts(nla, ids)[-1], len(ids)))


# -- refusals the NLA decides (not the schema) ----------------------------------------------------------------------
def test_options_the_nla_cannot_honour_are_refused(nla, make_tiny):
    with pytest.raises(AnalysisError, match="tuned_lens"):
        analyze(nla, TEXT, options={"tuned_lens": True})
    with pytest.raises(AnalysisError, match=r"add_tokens gives 6 tokens; explanations here are 5"):
        analyze(nla, TEXT, options={"add_tokens": [" a b c d e f"]})
    official = tiny_official_nla(make_tiny)
    for opt in ({"replace_left": "x"}, {"replace_right": "x"}, {"do_hard_tokens": True}):
        with pytest.raises(AnalysisError, match="layer-replacement"):
            analyze(official, TEXT, options=opt)


def test_inputs_are_checked(nla):
    with pytest.raises(AnalysisError, match="last_n_messages"):
        analyze(nla, TEXT, options={"last_n_messages": 1})
    with pytest.raises(AnalysisError, match="use_chat_format=true needs the chat sent as messages"):
        analyze(nla, TEXT, options={"use_chat_format": True})
    with pytest.raises(AnalysisError, match="use_chat_format=false"):
        analyze(nla, messages=CHAT, options={"use_chat_format": False})
    analyze(nla, messages=CHAT[:1], options=_opts(no_kl=True, use_chat_format=True))
    analyze(nla, "Hi.", options=_opts(no_kl=True, use_chat_format=False))
    with pytest.raises(AnalysisError, match="exactly one of text or messages"):
        analyze(nla, TEXT, messages=CHAT)
    with pytest.raises(AnalysisError, match="exactly one of text or messages"):
        analyze(nla)
    for empty in ("", "   \n"):
        with pytest.raises(AnalysisError, match="empty"):
            analyze(nla, empty)
    with pytest.raises(AnalysisError, match="empty"):
        analyze(nla, messages=[])
    with pytest.raises(AnalysisError, match="limit"):
        analyze(nla, TEXT, max_tokens=3)
    with pytest.raises(AnalysisError, match="outside"):
        analyze(nla, TEXT, positions=[99])
    rows = analyze(nla, TEXT, options=_opts(no_kl=True), positions=[-1, 2]).rows
    assert [r["position"] for r in rows] == [2, len(nla.subject.encode(TEXT)) - 1]
