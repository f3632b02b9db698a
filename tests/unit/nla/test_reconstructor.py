"""Reconstructors against a full HF forward over `inputs_embeds` (no cache, no early exit)."""

from __future__ import annotations

import pytest
import torch
from nla_reference import hf_soft_reconstruct, hf_template_reconstruct, perturb, sharpen

from talkative.nla.reconstructor import SoftPromptReconstructor, TemplateReconstructor, space_token_id

EXPL = [[100, 2000, 30, 4000], [5, 6, 7, 8], [216, 216, 900, 12]]
CUR = [17, 800, 4001]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "gemma2", "gemma3"])
@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"prompt": "Summary of <text> in short:", "head": "linear"},
        {"add_current_token": False, "head": "linear_nobias"},
        {"special_last_token_vector": False, "output_layer": 3},
    ],
    ids=["default", "postfix+head", "no-current", "no-vector"],
)
def test_soft_prompt_reconstructor_matches_hf(make_tiny, kind, cfg):
    lm = make_tiny(kind)
    rec = SoftPromptReconstructor(lm, output_layer=cfg.pop("output_layer", 1), **cfg)
    perturb(rec, 3, scale=0.2)
    cur = None if not rec.add_current_token else torch.tensor(CUR)
    with torch.no_grad():
        got = rec.reconstruct(EXPL, cur)
    for i, e in enumerate(EXPL):
        want = hf_soft_reconstruct(rec, e, CUR[i] if cur is not None else None)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
    # the differentiable path (no cached prefix) gives the same numbers and carries gradients
    out = rec.reconstruct(EXPL, cur)
    torch.testing.assert_close(out.detach(), got, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert rec.soft_prompt.grad is not None and rec.soft_prompt.grad.abs().sum() > 0


def test_current_token_and_learned_vector_matter(make_tiny):
    lm = make_tiny("qwen2")
    rec = SoftPromptReconstructor(lm, output_layer=2)
    with torch.no_grad():
        a = rec.reconstruct(EXPL[:1], torch.tensor([5]))
        b = rec.reconstruct(EXPL[:1], torch.tensor([6]))
        rec.special_vector.add_(1.0)
        c = rec.reconstruct(EXPL[:1], torch.tensor([5]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(c[0], hf_soft_reconstruct(rec, EXPL[0], 5), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="current_ids"):
        rec.reconstruct(EXPL[:1], None)
    with pytest.raises(ValueError, match="one length"):
        rec.reconstruct([[1, 2], [1, 2, 3]], torch.tensor([1, 2]))


def test_soft_prompt_reconstructor_refuses_bad_configs(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(ValueError, match="at most once"):
        SoftPromptReconstructor(lm, prompt="<text> and <text>", output_layer=1)
    with pytest.raises(ValueError, match="output_layer"):
        SoftPromptReconstructor(lm, output_layer=4)
    with pytest.raises(ValueError, match="head"):
        SoftPromptReconstructor(lm, output_layer=1, head="mlp")


def test_space_token_is_a_lone_space(make_tiny):
    lm = make_tiny("llama")
    assert lm.tokenizer.decode([space_token_id(lm)]) == " "
    rec = SoftPromptReconstructor(lm, output_layer=1)
    assert rec.space_id == space_token_id(lm)
    assert rec.explanation_span([1, 2, 3]) == (0, 3)


def test_template_reconstructor_matches_hf_on_the_whole_template(make_tiny):
    lm = sharpen(make_tiny("qwen2"))
    rec = TemplateReconstructor(lm, output_layer=2, head_bias=True)
    perturb(rec, 1, scale=0.2)
    texts = ["A cat.", "The vector is about French cities and food", "x"]
    units = [rec.units(t) for t in texts]
    with torch.no_grad():
        got = rec.reconstruct(units)
    for i, t in enumerate(texts):
        torch.testing.assert_close(got[i], hf_template_reconstruct(rec, t), rtol=1e-4, atol=1e-4)
    out = rec.reconstruct(units)  # grad path, no cached prefix
    torch.testing.assert_close(out.detach(), got, rtol=1e-4, atol=1e-4)
    # the explanation span covers the explanation's tokens only
    for t, u in zip(texts, units, strict=True):
        start, stop = rec.explanation_span(u)
        body = lm.tokenizer.decode(u[start:stop])
        assert t.strip().split()[-1].rstrip(".") in body
        assert "</text>" not in body


def test_prefix_cache_follows_in_place_updates(make_tiny):
    lm = make_tiny("qwen2")
    rec = SoftPromptReconstructor(lm, output_layer=2)
    with torch.no_grad():
        before = rec.reconstruct(EXPL, torch.tensor(CUR))
        rec.soft_prompt.mul_(1.5)
        after = rec.reconstruct(EXPL, torch.tensor(CUR))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[1], hf_soft_reconstruct(rec, EXPL[1], CUR[1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"prompt": "Summary of <text> in short:", "head": "linear"},
        {"add_current_token": False},
        {"prompt": "<text>"},
    ],
    ids=["default", "postfix+head", "no-current", "no-prefix"],
)
def test_ablations_reuse_keys_and_equal_one_reconstruction_per_ablation(make_tiny, cfg):
    lm = make_tiny("qwen2")
    rec = SoftPromptReconstructor(lm, output_layer=2, **cfg)
    perturb(rec, 5, scale=0.2)
    cur = None if not rec.add_current_token else torch.tensor(CUR)
    pool = [*EXPL, [9, 99, 999, 9999]]
    hats, cache = rec.reconstruct_cached(pool, None if cur is None else torch.tensor([*CUR, 5]))
    with torch.no_grad():
        torch.testing.assert_close(
            hats, rec.reconstruct(pool, None if cur is None else torch.tensor([*CUR, 5]))
        )
    rows = [2, 0, 1]  # explanation g is row rows[g] of the cached pass
    units = [pool[r] for r in rows]
    current = None if cur is None else torch.tensor([[*CUR, 5][r] for r in rows])
    got = rec.ablations(units, current, cache, rows)
    assert got.shape == (3 * 4, lm.d_model)
    for g, u in enumerate(units):
        for i in range(4):
            ablated = list(u)
            ablated[i] = rec.space_id
            one = rec.reconstruct([ablated], None if current is None else current[g : g + 1])
            torch.testing.assert_close(got[g * 4 + i], one[0].detach(), rtol=1e-4, atol=1e-4)
