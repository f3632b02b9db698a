"""`nla.vectors`: wire decoding, describe (= analysis rows of given vectors), score, extract and tokenize, checked
against plain HF forwards on a tiny upstream-style NLA."""

from __future__ import annotations

import base64
import math

import pytest
import torch
from nla_reference import hf_activations, hf_soft_reconstruct, ref_metrics, tiny_nla

from talkative.nla import vectors as V
from talkative.nla.analysis import AnalysisError, analyze
from talkative.nla.options import resolve
from talkative.nla.prompts import encode_piece

TEXT = "The quick brown fox jumps over the lazy dog."
FAST = {"no_kl": True, "optimize_explanations_config": {"best_of_k": 2}}


@pytest.fixture(scope="module")
def nla(make_tiny):
    return tiny_nla(make_tiny, "llama")


# -- wire format ----------------------------------------------------------------------------------------------------
def test_lists_and_base64_decode_to_the_same_matrix() -> None:
    rows = [[0.5, -1.25, 3.0], [1e-3, 2.0, -0.0]]
    from_lists = V.decode_vectors(rows, d_model=3)
    packed = V.encode_vectors(torch.tensor(rows), "base64")
    assert packed["shape"] == [2, 3] and packed["dtype"] == "float32"
    assert base64.b64decode(packed["data"])[:4] == bytes.fromhex("0000003f")  # 0.5 little-endian
    assert torch.equal(V.decode_vectors(packed, d_model=3), from_lists)
    assert V.decode_vectors([1.0, 2.0, 3.0], d_model=3).shape == (1, 3)
    one = V.encode_vectors(torch.tensor([1.0, 2.0, 3.0]), "base64")
    assert V.decode_vectors(one, d_model=3).tolist() == [[1.0, 2.0, 3.0]]
    assert torch.allclose(torch.tensor(V.encode_vectors(torch.tensor(rows), "list")), from_lists)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([[1.0, 2.0]], "have 2 values but this model's activations have 3"),
        ([], "empty"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0]], "different lengths"),
        ([[1.0, float("nan"), 3.0]], "NaN"),
        ([[1.0, "x", 3.0]], "must be a number"),
        ([[True, 1.0, 3.0]], "must be a number"),
        ([[1.0, 2.0, 3.0]] * 5, "more than the limit of 4"),
        ({"data": "!!", "shape": [3]}, "not valid base64"),
        ({"data": base64.b64encode(b"\0" * 8).decode(), "shape": [3]}, "holds 8 bytes"),
        ({"data": "", "shape": [3], "dtype": "float16"}, "float32"),
        ({"data": "", "shape": "3"}, "shape"),
        ({"data": "", "shape": [3], "extra": 1}, "unknown keys"),
        ("1,2,3", "must be a list"),
        ([[[1.0, 2.0, 3.0]]], "must be a number"),
    ],
)
def test_bad_vectors_are_refused_with_the_reason(value: object, fragment: str) -> None:
    with pytest.raises(V.VectorError) as err:
        V.decode_vectors(value, d_model=3, max_rows=4)
    assert fragment in str(err.value)


# -- describe -------------------------------------------------------------------------------------------------------
def test_describe_of_a_texts_activations_gives_its_analysis_rows(nla) -> None:
    analysis = analyze(nla, TEXT, options=FAST)
    ids = nla.subject.encode(TEXT)
    acts = hf_activations(nla.subject, ids, nla.layer)
    out = V.describe(nla, acts, resolve(FAST), tokens=ids, row_budget=6)
    assert len(out["results"]) == len(ids)
    for row, ref in zip(out["results"], analysis.rows, strict=True):
        assert row["index"] == ref["position"] and row["token_id"] == ref["token_id"]
        assert row["explanation"] == ref["explanation"]
        assert row["mse"] == pytest.approx(ref["mse"], rel=1e-4)
        assert row["token_salience"] == pytest.approx(ref["token_salience"], rel=1e-3, abs=1e-6)
        assert row["token_assumed"] is False and "kl_divergence" not in row and "position" not in row
    meta = out["metadata"]
    assert meta["n_vectors"] == len(ids) and meta["batch_size"] == 3 and meta["reads_current_token"] is True


def test_describe_without_a_token_uses_the_neutral_token(nla) -> None:
    v = torch.randn(2, nla.d_model, generator=torch.Generator().manual_seed(0)) * 3
    out = V.describe(nla, v, resolve({**FAST, "return_vectors": True}), tokens=[None, " fox"])
    first, second = out["results"]
    space = nla.reconstructor.space_id
    assert first["token_assumed"] is True and first["token_id"] == space
    assert second["token_assumed"] is False and second["token_id"] == encode_piece(nla.subject, " fox")[0]
    hats = out["reconstructions"]
    assert len(hats) == 2 and len(hats[0]) == nla.d_model
    assert first["mse"] == pytest.approx(float(((v[0] - torch.tensor(hats[0])) ** 2).mean()), rel=1e-5)


def test_describe_refuses_bad_tokens_and_kl(nla) -> None:
    v = torch.zeros(1, nla.d_model)
    with pytest.raises(V.VectorError, match="2 tokens"):
        V.describe(nla, v, resolve(FAST), tokens=[" fox jumps"])
    with pytest.raises(V.VectorError, match="outside the vocabulary"):
        V.describe(nla, v, resolve(FAST), tokens=[10**9])
    with pytest.raises(V.VectorError, match="one per vector"):
        V.describe(nla, v, resolve(FAST), tokens=[1, 2])
    with pytest.raises(V.VectorError, match="KL"):
        V.describe(nla, v, resolve({}), tokens=[1])


# -- score ----------------------------------------------------------------------------------------------------------
def test_score_matches_a_reference_reconstruction(nla) -> None:
    ids = nla.subject.encode(TEXT)
    acts = hf_activations(nla.subject, ids, nla.layer)
    vector, token = acts[4], ids[4]
    texts = ["a fox", "the colour of the sky in spring"]
    out = V.score(nla, vector, texts, token=token, salience=True, return_vectors=True, encoding="base64")
    assert out["token_id"] == token and out["token_assumed"] is False
    assert out["norm"] == pytest.approx(float(vector.norm()), rel=1e-5)
    hats = V.decode_vectors(out["reconstructions"], d_model=nla.d_model)
    for i, text in enumerate(texts):
        units = encode_piece(nla.reconstructor.lm, text)
        ref_hat = hf_soft_reconstruct(nla.reconstructor, units, token)
        ref = ref_metrics(vector, ref_hat, nla.fve_variance)
        row = out["results"][i]
        for name in ("mse", "relative_rmse", "cosine", "nmse", "fve"):
            assert row[name] == pytest.approx(ref[name], rel=1e-3, abs=1e-5), name
        assert torch.allclose(hats[i], ref_hat.float(), atol=1e-4)
        assert len(row["token_salience"]) == len(units) == len(row["explanation_structured"])
        assert all(math.isfinite(x) for x in row["token_salience"])


def test_score_refuses_what_it_cannot_score(nla) -> None:
    v = torch.zeros(nla.d_model)
    with pytest.raises(V.VectorError, match=f"have {nla.d_model}"):
        V.score(nla, torch.zeros(nla.d_model + 1), ["x"])
    with pytest.raises(V.VectorError, match="empty"):
        V.score(nla, v, ["  "])
    with pytest.raises(V.VectorError, match="at least one"):
        V.score(nla, v, [])


# -- extract and tokenize -------------------------------------------------------------------------------------------
def test_extract_negative_positions_and_encodings(nla) -> None:
    ids = nla.subject.encode(TEXT)
    ref = hf_activations(nla.subject, ids, nla.layer)
    out = V.extract(nla, TEXT, positions=[-1, 0, -1], encoding="base64")
    assert [t["position"] for t in out["tokens"]] == [0, len(ids) - 1]
    assert [t["token_id"] for t in out["tokens"]] == [ids[0], ids[-1]]
    acts = V.decode_vectors(out["activations"], d_model=nla.d_model)
    assert torch.allclose(acts, ref[[0, len(ids) - 1]].float(), atol=1e-4)
    assert out["tokens"][1]["norm"] == pytest.approx(float(ref[-1].norm()), rel=1e-4)
    every = V.extract(nla, TEXT)
    assert len(every["activations"]) == len(ids) == every["n_tokens"] and every["layer"] == nla.layer
    with pytest.raises(AnalysisError, match="outside"):
        V.extract(nla, TEXT, positions=[len(ids)])
    with pytest.raises(V.VectorError, match="at most 3 positions"):
        V.extract(nla, TEXT, max_positions=3)
    with pytest.raises(V.VectorError, match="more than the limit of 3"):
        V.extract(nla, TEXT, positions=[0, 1, 2, 3], max_positions=3)


def test_tokenize_text_and_chat(nla) -> None:
    out = V.tokenize(nla, TEXT)
    ids = nla.subject.encode(TEXT)
    assert [t["token_id"] for t in out["tokens"]] == ids and out["prompt"] == TEXT
    chat = V.tokenize(nla, messages=[{"role": "user", "content": "Hi"}])
    assert "Hi" in chat["prompt"] and chat["n_tokens"] == len(chat["tokens"]) > 2
    with pytest.raises(V.VectorError, match="more than the limit"):
        V.tokenize(nla, TEXT, max_tokens=2)
