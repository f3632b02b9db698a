"""An upstream `.pt` checkpoint written the way upstream writes it (section 7.1 of the model spec), for the format and
CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DECODER_PROMPT = "<bos>Short explanation of <embed>. Language, topic, sentiment, claims, speaker, style, etc:"


ENCODER_PROMPT = "Summary of the text, encapsulating the main points and message, style and details:<text> so"


def write_upstream(
    path: Path,
    lm,
    *,
    model_name: str,
    layer: int = 2,
    t_text: int = 4,
    patch=2,
    per_layer: bool = True,
    projection: bool = True,
    compiled: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    extra_config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """An upstream checkpoint pickle as `lens/utils/checkpoint.py:save` writes it: trained tensors only (keys without
    "base"), in the base dtype, plus optimizer state, RNG states and the resolved config."""
    g = torch.Generator().manual_seed(seed)
    tok = lm.tokenizer
    E = lm.model.get_input_embeddings().weight.detach().float()
    d = E.shape[1]

    def noise(*shape, s=0.02):
        return torch.randn(*shape, generator=g) * s

    left, right = DECODER_PROMPT.split("<embed>")
    left_ids = tok(left, add_special_tokens=False)["input_ids"]
    right_ids = tok(right, add_special_tokens=False)["input_ids"]
    pre, post = ENCODER_PROMPT.split("<text>")
    pre_ids = tok(pre, add_special_tokens=False)["input_ids"]
    post_ids = tok(post, add_special_tokens=False)["input_ids"]
    n_layers = lm.n_layers
    n_proj = n_layers if patch is True else (patch if isinstance(patch, int) and patch > 0 else 1)
    decoder = {
        "prompt_left_emb": E[left_ids] + noise(len(left_ids), d),
        "prompt_right_emb": E[right_ids] + noise(len(right_ids), d),
        "prompt_ids": torch.tensor([*left_ids, tok.eos_token_id, *right_ids]),
    }
    if per_layer:
        decoder["proj_weight"] = torch.eye(d).repeat(n_proj, 1, 1) * 3.0 + noise(n_proj, d, d, s=0.2)
        decoder["proj_bias"] = noise(n_proj, d)
    else:
        decoder["proj.weight"] = torch.eye(d) * 3.0 + noise(d, d, s=0.2)
        decoder["proj.bias"] = noise(d)
    encoder = {
        "soft_prompt_embeddings": E[pre_ids] + noise(len(pre_ids), d),
        "soft_prompt_embeddings_postfix": E[post_ids] + noise(len(post_ids), d),
        "special_last_token_vector": noise(d),
    }
    if projection:
        encoder["proj.weight"] = torch.eye(d) + noise(d, d, s=0.05)
        encoder["proj.bias"] = noise(d)
    cast = (
        {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in decoder.items()},
        {k: v.to(dtype) for k, v in encoder.items()},
    )
    if compiled:
        cast = tuple({f"_orig_mod.{k}": v for k, v in part.items()} for part in cast)
    config = {
        "layer_l": layer,
        "t_text": t_text,
        "model_name": model_name,
        "tokenizer_name": model_name,
        "orig_model_name": model_name,
        "model_dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": "eager",
        "decoder_prompt": DECODER_PROMPT,
        "encoder_prompt": ENCODER_PROMPT,
        "trainable_components": {
            "decoder": {
                "base_model": False,
                "projection_layer": True,
                "eye_init": True,
                "output_head": False,
                "use_kv_cache": True,
                "patch_all_layers": patch,
                "per_layer_projections": per_layer,
                "use_dropout": False,
                "trainable_prompts": True,
            },
            "encoder": {
                "base_model": False,
                "use_base_model": True,
                "projection_layer": True,
                "use_projection_layer": projection,
                "output_layer": layer,
                "soft_prompt_init_text": ENCODER_PROMPT,
                "special_last_token_vector": True,
                "add_current_token": True,
                "use_dropout": False,
            },
        },
        "gumbel_tau_schedule": {"end_value": 1.0},
        "group_n": 8,
        **(extra_config or {}),
    }
    obj = {
        "step": 1234,
        "epoch": 2,
        "models": {"decoder": cast[0], "encoder": cast[1]},
        "optim": {
            "state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(5.0)}},
            "param_groups": [{"lr": 3e-4}],
        },
        "scheduler": {"last_epoch": 5},
        "rng_states": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        "metrics": {"loss": 0.5},
        "config": config,
        "tau": 1.0,
        "alpha": 0.1,
        "wandb_run_id": "abc",
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path
