"""Training configuration: one dataclass for every stage, read from YAML or JSON, with sensible defaults.

Unknown keys are refused (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

STAGES = ("ar-sft", "av-sft", "grpo")


@dataclass
class ArchConfig:
    """The NLA built when a stage starts from `init` (ignored when starting from a checkpoint)."""

    source: str = "bundled:smollm2-135m-instruct"
    layer: int = 20
    t_text: int = 16
    patch_layers: int = 5
    head: str = "linear"
    objective: str = "nmse"
    av_prompt: str = "Short explanation of <embed>. Language, topic, sentiment, claims, speaker, style, etc:"
    ar_prompt: str = (
        "Summary of the text, encapsulating the main points and message, style and details:<text>"
    )


@dataclass
class TrainConfig:
    stage: str = "ar-sft"
    data: str | list[str] = "data/smollm2-l20"  # dataset directory (or several) with train/ and heldout/
    out: str = "runs/ar-sft"
    init: str = "init"  # "init" (build from `arch`) or a native checkpoint directory from an earlier stage
    arch: ArchConfig = field(default_factory=ArchConfig)
    dtype: str = (
        "bfloat16"  # base model weights; trained tensors stay fp32 (mixed precision without autocast)
    )
    device: str = "auto"  # "auto": cuda when available, else cpu
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_minutes: float = 5.0
    eval_every: int = 100
    eval_samples: int = 256
    log_every: int = 10
    # av-sft / grpo
    train_reconstructor: bool = True  # grpo: the reconstructor keeps training on the rollouts
    # grpo
    group_size: int = 8
    temperature: float = 1.0
    ar_lr: float = 3e-4
    kl_weight: float = 0.0
    kl_reference: str = "init"  # "init": the verbalizer the stage started from; "base": the untrained prompt
    entropy_weight: float = 0.0
    # which trained tensors move in this stage ("all" or a comma list of name prefixes)
    trainable: str = "all"
    # scale term of the reconstructor loss: nmse + scale_weight * log(|Â|/|A|)^2
    scale_weight: float = 0.1
    # the warm-start explanation language: "context" (the t_text tokens before the position) or "sentence"
    # (nla/explanations.py: genre, the subject's next_tokens top tokens, the quote_tokens tokens before the position)
    explanations: str = "context"
    quote_tokens: int = 6
    next_tokens: int = 2
    state_genre: bool = True
    # grpo: subtracted from the reward (-nMSE) of an explanation that does not parse in the sentence language,
    # so GRPO cannot buy FVE by leaving the language
    parse_penalty: float = 0.0
    # grpo: claim_reward · `claim_score` (the share of the explanation's claims that are true of the sample: genre,
    # quote, first next token) is added to the reward, so the explanations GRPO favours state true claims
    claim_reward: float = 0.0

    def validate(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("steps", "batch_size", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.lr <= 0 or self.ar_lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.kl_reference not in ("init", "base"):
            raise ValueError("kl_reference must be init or base")
        if self.explanations not in ("context", "sentence"):
            raise ValueError("explanations must be context or sentence")
        if self.parse_penalty < 0 or (self.parse_penalty > 0 and self.explanations != "sentence"):
            raise ValueError("parse_penalty is a non-negative penalty of the sentence language")
        if self.claim_reward < 0 or (self.claim_reward > 0 and self.explanations != "sentence"):
            raise ValueError("claim_reward is a non-negative reward of the sentence language's claims")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} keys: {unknown}; known: {sorted(known)}")
    kwargs = dict(data)
    if cls is TrainConfig and "arch" in kwargs:
        kwargs["arch"] = _build(ArchConfig, kwargs["arch"] or {}, "arch")
    return cls(**kwargs)


def load_config(path: str | Path | None = None, stage: str | None = None, **overrides: Any) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = (json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
    if stage is not None:
        if data.get("stage") not in (None, stage):
            raise ValueError(f"{path} is a {data['stage']} config, not {stage}")
        data["stage"] = stage
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build(TrainConfig, data, "config").validate()
