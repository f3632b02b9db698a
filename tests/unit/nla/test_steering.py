"""`nla.steering`: the arithmetic, naming a direction three ways, alpha 0 as the identity on analyses and
describe, steered analyses measured against the steered vector, and steered generation on a tiny model."""

from __future__ import annotations

import pytest
import torch
from nla_reference import sharpen, tiny_nla

from talkative.nla import vectors as V
from talkative.nla.analysis import AnalysisError, analyze, prepare
from talkative.nla.diff import DiffError, Side, diff
from talkative.nla.generation import GenerationRequest, ResidualSteer, generate
from talkative.nla.options import AnalyzeOptions, resolve
from talkative.nla.steering import (
    MAX_ALPHA,
    Steer,
    SteerError,
    activations,
    add_scaled,
    resolve_direction,
    text_direction,
    unit,
)

TEXT = "The quick brown fox jumps over the lazy dog."
FAST = {"no_kl": True, "optimize_explanations_config": {"best_of_k": 2}}


@pytest.fixture(scope="module")
def nla(make_tiny):
    return tiny_nla(make_tiny, "llama")


# -- arithmetic -------------------------------------------------------------------------------------------------------
def test_add_scaled_pushes_each_row_by_alpha_times_its_own_norm() -> None:
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8)
    d = torch.randn(8)
    u = unit(d)
    assert torch.allclose(u.norm(), torch.tensor(1.0))
    out = add_scaled(h, u, 2.5)
    delta = out - h
    # every row moved along u, by 2.5 × its own norm
    assert torch.allclose(delta, 2.5 * h.norm(dim=-1, keepdim=True) * u, atol=1e-5)
    assert torch.allclose(delta.norm(dim=-1), 2.5 * h.norm(dim=-1), atol=1e-4)
    # scale of the direction does not matter, its sign does
    assert torch.allclose(add_scaled(h, unit(7 * d), 2.5), out, atol=1e-6)
    assert torch.allclose(add_scaled(h, unit(-d), -2.5), out, atol=1e-6)


def test_alpha_zero_returns_the_input_itself() -> None:
    h = torch.tensor([[-0.0, 1.0, 2.0]])
    assert add_scaled(h, unit(torch.tensor([1.0, 0.0, 0.0])), 0.0) is h


@pytest.mark.parametrize(
    ("direction", "fragment"),
    [
        (torch.zeros(4), "zero"),
        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), "NaN"),
        (torch.tensor([float("inf"), 0.0, 0.0, 0.0]), "infinite"),
    ],
)
def test_directions_without_an_orientation_are_refused(direction: torch.Tensor, fragment: str) -> None:
    with pytest.raises(SteerError, match=fragment):
        unit(direction)


def test_a_spec_needs_one_source_and_a_bounded_alpha() -> None:
    with pytest.raises(SteerError, match="exactly one"):
        Steer.of({"text": "a", "vector": [1.0]}, 1.0)
    with pytest.raises(SteerError, match="exactly one"):
        Steer.of({}, 1.0)
    with pytest.raises(SteerError, match="alpha"):
        Steer.of({"text": "a"}, MAX_ALPHA + 1)
    a = Steer.of({"vector": [1.0, 2.0]}, 1.0)
    assert a == Steer.of({"vector": [1.0, 2.0]}, 1.0) and hash(a) == hash(
        Steer.of({"vector": [1.0, 2.0]}, 1.0)
    )
    assert a != Steer.of({"vector": [1.0, 2.0]}, 2.0)


def test_options_refuse_bad_steers_when_parsed() -> None:
    for bad, fragment in (
        ({"direction": {"vector": [0, 0.0]}, "alpha": 1}, "zero"),
        ({"direction": {"vector": [float("nan"), 1.0]}, "alpha": 1}, "NaN or infinite"),
        ({"direction": {"vector": [[1.0, float("inf")]]}, "alpha": 1}, "NaN or infinite"),
        ({"direction": {"text": "a", "from": {"text": "b"}}, "alpha": 1}, "exactly one"),
        ({"direction": {"colour": "red"}, "alpha": 1}, "exactly one"),
        ({"direction": {"text": "a"}, "alpha": 11}, "less than or equal to 10"),
        ({"direction": {"from": "x"}, "alpha": 1}, "direction.from"),
    ):
        with pytest.raises(ValueError, match=fragment):
            AnalyzeOptions.model_validate({"steer": bad})


def test_steer_changes_the_merge_key() -> None:
    plain = resolve({})
    zero = resolve({"steer": {"direction": {"text": "ocean"}, "alpha": 0}})
    one = resolve({"steer": {"direction": {"text": "ocean"}, "alpha": 1}})
    other = resolve({"steer": {"direction": {"text": "forest"}, "alpha": 1}})
    assert len({plain.merge_key(), zero.merge_key(), one.merge_key(), other.merge_key()}) == 4


# -- naming a direction -----------------------------------------------------------------------------------------------
def test_vector_directions_decode_lists_and_base64(nla) -> None:
    d = torch.randn(nla.d_model, generator=torch.Generator().manual_seed(3))
    from_list = resolve_direction(nla, Steer.of({"vector": d.tolist()}, 1.0))
    packed = V.encode_vectors(d, "base64")
    from_dict = resolve_direction(nla, Steer.of({"vector": packed}, 1.0))
    from_str = resolve_direction(nla, Steer.of({"vector": packed["data"]}, 1.0))
    assert torch.allclose(from_list, d / d.norm()) and torch.equal(from_list, from_dict)
    assert torch.equal(from_dict, from_str)
    with pytest.raises(SteerError, match="have 3 values but this model's activations have"):
        resolve_direction(nla, Steer.of({"vector": [1.0, 2.0, 3.0]}, 1.0))


def test_text_directions_are_the_reconstruction_of_the_text(nla) -> None:
    got = resolve_direction(nla, Steer.of({"text": "the ocean"}, 1.0))
    want = text_direction(nla, "the ocean")
    rec = nla.reconstructor
    again = rec.reconstruct([rec.text_units("the ocean")], torch.tensor([rec.space_id]))[0].float()
    assert torch.allclose(want, again)
    assert torch.allclose(got, want / want.norm())
    assert not torch.allclose(got, resolve_direction(nla, Steer.of({"text": "a mountain"}, 1.0)))
    with pytest.raises(SteerError, match="non-empty"):
        text_direction(nla, "   ")


def test_from_directions_are_another_inputs_activation(nla) -> None:
    acts = activations(nla, TEXT)
    got = resolve_direction(nla, Steer.of({"from": {"text": TEXT, "position": 3}}, 1.0))
    assert torch.allclose(got, acts[3] / acts[3].norm())
    last = resolve_direction(nla, Steer.of({"from": {"text": TEXT, "position": -1}}, 1.0))
    assert torch.allclose(last, acts[-1] / acts[-1].norm())
    with pytest.raises(SteerError, match="outside the"):
        resolve_direction(nla, Steer.of({"from": {"text": TEXT, "position": 999}}, 1.0))


# -- analyses and describe ----------------------------------------------------------------------------------------------
def test_alpha_zero_is_exactly_the_unsteered_analysis(nla) -> None:
    plain = analyze(nla, TEXT, options=FAST)
    zero = analyze(nla, TEXT, options={**FAST, "steer": {"direction": {"text": "ocean"}, "alpha": 0}})
    assert zero.rows == plain.rows
    with_kl = {"optimize_explanations_config": {"best_of_k": 2}}
    assert (
        analyze(nla, TEXT, options={**with_kl, "steer": {"direction": {"text": "ocean"}, "alpha": 0.0}}).rows
        == analyze(nla, TEXT, options=with_kl).rows
    )
    assert zero.metadata["steer"] == {"source": "text", "alpha": 0.0, "text": "ocean"}


def test_a_steered_analysis_explains_and_measures_the_steered_vector(nla) -> None:
    steer = {"direction": {"text": "ocean"}, "alpha": 3.0}
    opts = {"optimize_explanations_config": {"best_of_k": 2}, "return_vectors": True}
    plain = analyze(nla, TEXT, options=opts)
    steered = analyze(nla, TEXT, options={**opts, "steer": steer})
    u = text_direction(nla, "ocean")
    u = u / u.norm()
    for p, s in zip(plain.rows, steered.rows, strict=True):
        a = torch.tensor(p["activation"])
        want = a + 3.0 * a.norm() * u
        assert torch.allclose(torch.tensor(s["activation"]), want, atol=1e-4)
        assert s["norm"] == pytest.approx(float(want.norm()), rel=1e-5)
        # the metrics are those of the reconstruction against the steered vector
        hat = torch.tensor(s["reconstruction"])
        assert s["mse"] == pytest.approx(float(((hat - want) ** 2).mean()), rel=1e-4)
        assert s["kl_divergence"] is not None and s["kl_divergence"] >= -1e-6
    assert [r["explanation"] for r in steered.rows] != [r["explanation"] for r in plain.rows]


def test_prepare_refuses_a_zero_direction_with_the_reason(nla) -> None:
    zero_text_units = {"direction": {"vector": [0.0] * nla.d_model}, "alpha": 1}
    with pytest.raises(ValueError, match="zero"):
        prepare(nla, TEXT, options={**FAST, "steer": zero_text_units})
    with pytest.raises(AnalysisError, match="outside the"):
        prepare(
            nla,
            TEXT,
            options={**FAST, "steer": {"direction": {"from": {"text": "a", "position": 5}}, "alpha": 1}},
        )


def test_describe_steers_before_explaining(nla) -> None:
    v = activations(nla, TEXT)[4:6].float()
    opts = {**FAST, "return_vectors": True}
    plain = V.describe(nla, v, resolve(opts))
    zero = V.describe(nla, v, resolve({**opts, "steer": {"direction": {"text": "ocean"}, "alpha": 0}}))
    assert zero["results"] == plain["results"] and zero["reconstructions"] == plain["reconstructions"]
    steer = {"direction": {"vector": v[1].tolist()}, "alpha": 2.0}
    steered = V.describe(nla, v, resolve({**opts, "steer": steer}))
    want = v + 2.0 * v.norm(dim=-1, keepdim=True) * (v[1] / v[1].norm())
    assert steered["results"][0]["norm"] == pytest.approx(float(want[0].norm()), rel=1e-5)
    direct = V.describe(nla, want, resolve(opts))
    assert [r["explanation"] for r in steered["results"]] == [r["explanation"] for r in direct["results"]]
    assert steered["metadata"]["steer"] == {"source": "vector", "alpha": 2.0}


# -- diff -------------------------------------------------------------------------------------------------------------
def test_diff_explains_a_minus_b_and_each_side(nla) -> None:
    opts = resolve({**FAST, "return_vectors": True})
    out = diff(Side(nla, TEXT, position=4), Side(nla, "A cat sat on the mat.", position=-1), opts)
    acts_a, acts_b = activations(nla, TEXT), activations(nla, "A cat sat on the mat.")
    d = acts_a[4] - acts_b[-1]
    assert out["difference"]["norm"] == pytest.approx(float(d.norm()), rel=1e-5)
    direct = V.describe(nla, d.unsqueeze(0), opts)["results"][0]
    assert out["difference"]["explanation"] == direct["explanation"]
    assert out["difference"]["mse"] == pytest.approx(direct["mse"])
    assert out["a"]["position"] == 4 and out["b"]["position"] == len(acts_b) - 1
    assert out["a"]["norm"] == pytest.approx(float(acts_a[4].norm()), rel=1e-5)
    assert torch.allclose(torch.tensor(out["vectors"]["a"]), acts_a[4], atol=1e-5)


def test_diff_refuses_a_zero_difference_and_positions_outside(nla) -> None:
    opts = resolve(FAST)
    with pytest.raises(DiffError, match="A − B is zero"):
        diff(Side(nla, TEXT, position=2), Side(nla, TEXT, position=2), opts)
    with pytest.raises(DiffError, match="position 99 is outside"):
        diff(Side(nla, TEXT, position=99), Side(nla, TEXT, position=2), opts)


def test_diff_refuses_sides_on_different_layers(make_tiny, nla) -> None:
    other = tiny_nla(make_tiny, "llama", layer=2)
    with pytest.raises(DiffError, match="different layers"):
        diff(Side(nla, TEXT), Side(other, TEXT), resolve(FAST))


# -- generation -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(make_tiny):
    return sharpen(make_tiny("llama", seed=4), 10.0)


def _next_token_probs(lm, text: str, steer: ResidualSteer | None) -> torch.Tensor:
    from talkative.nla.generation import _forward
    from talkative.nla.kvcache import KVCache

    ids = lm.encode(text)
    x = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        h = _forward(lm, lm.add_positions(lm.embed(x), pos), pos, KVCache(1, len(ids)), steer)
        return torch.softmax(lm.logits(lm.final_norm(h[:, -1]))[0].float(), -1)


def test_steering_toward_a_tokens_unembedding_raises_its_probability(lm) -> None:
    target = lm.encode(" ocean")[0]
    w = lm.model.get_output_embeddings().weight[target].detach().float()
    steer = ResidualSteer(layer=1, direction=unit(w), alpha=8.0)
    before = _next_token_probs(lm, "Once upon a time", None)[target]
    after = _next_token_probs(lm, "Once upon a time", steer)[target]
    assert after > before * 10
    away = ResidualSteer(layer=1, direction=unit(w), alpha=-8.0)
    assert _next_token_probs(lm, "Once upon a time", away)[target] < before


def test_steered_generation_is_deterministic_and_differs_from_unsteered(lm) -> None:
    target = lm.encode(" ocean")[0]
    w = lm.model.get_output_embeddings().weight[target].detach().float()
    base = GenerationRequest(text="Once upon a time", max_new_tokens=6, temperature=0.8, seed=7)
    steered = GenerationRequest(**{**base.__dict__, "steer": ResidualSteer(1, unit(w), 8.0)})
    plain, one, two = generate(lm, base), generate(lm, steered), generate(lm, steered)
    assert one.token_ids == two.token_ids
    assert one.token_ids != plain.token_ids
    assert one.token_ids[0].count(target) > plain.token_ids[0].count(target)
    zero = GenerationRequest(**{**base.__dict__, "steer": ResidualSteer(1, unit(w), 0.0)})
    assert generate(lm, zero).token_ids == plain.token_ids


def test_new_positions_only_leaves_the_first_token_to_the_prompt(lm) -> None:
    target = lm.encode(" ocean")[0]
    w = lm.model.get_output_embeddings().weight[target].detach().float()
    base = GenerationRequest(text="Once upon a time", max_new_tokens=5, temperature=0.0)
    plain = generate(lm, base)
    new = generate(lm, GenerationRequest(**{**base.__dict__, "steer": ResidualSteer(1, unit(w), 8.0, "new")}))
    every = generate(
        lm, GenerationRequest(**{**base.__dict__, "steer": ResidualSteer(1, unit(w), 8.0, "all")})
    )
    assert new.token_ids[0][0] == plain.token_ids[0][0]
    assert new.token_ids != plain.token_ids
    assert every.token_ids[0][0] == target


def test_steering_the_last_block_steers_the_output(lm) -> None:
    target = lm.encode(" ocean")[0]
    w = lm.model.get_output_embeddings().weight[target].detach().float()
    last = ResidualSteer(layer=lm.n_layers - 1, direction=unit(w), alpha=8.0)
    assert _next_token_probs(lm, "Once upon a time", last).argmax() == target
