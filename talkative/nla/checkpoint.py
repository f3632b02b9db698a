"""The NLA: a subject model, a layer, a verbalizer and a reconstructor, plus what scoring needs (FVE baseline).

`NLA.init` builds an untrained one over a subject (identity projections, prompts from text: already a
training-free Patchscope). `load_nla` reads a checkpoint of any format of the registry in `formats/` (native,
upstream `.pt`, official AV/AR directories) after detecting which one a path holds; `NLA.save` writes the native
format.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .lm import LM, LMPool
from .metrics import METRICS, MetricTable
from .reconstructor import (
    DEFAULT_AR_PROMPT,
    ReconstructorModule,
    SoftPromptReconstructor,
    TemplateReconstructor,
)
from .verbalizer import (
    DEFAULT_AV_PROMPT,
    EmbeddingReplacementVerbalizer,
    LayerReplacementVerbalizer,
    VerbalizerModule,
)

FORMAT = "talkative-nla"
FORMAT_VERSION = 1
DEFAULT_PATCH_LAYERS = 5


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the model it names; the message says what is wrong."""


@dataclass
class NLA:
    subject: LM
    layer: int
    verbalizer: VerbalizerModule
    reconstructor: ReconstructorModule
    subject_source: str
    fve_variance: float | None = None
    objective: str = "mse"  # what best-of-k and salience minimise: "mse" (raw) or "nmse" (direction only)
    name: str = "nla"
    provenance: dict[str, Any] = field(default_factory=dict)
    fve_baseline: dict[str, Any] | None = None
    bases: dict[str, Any] = field(
        default_factory=lambda: {"verbalizer": "subject", "reconstructor": "subject"}
    )
    metrics: MetricTable = METRICS  # what its rows and summaries report

    @property
    def d_model(self) -> int:
        return self.subject.d_model

    @property
    def t_text(self) -> int | None:
        return self.verbalizer.t_text

    @classmethod
    def init(
        cls,
        subject: LM,
        layer: int,
        *,
        subject_source: str | None = None,
        av_prompt: str = DEFAULT_AV_PROMPT,
        patch_layers: int | None = None,
        t_text: int = 8,
        ar_prompt: str = DEFAULT_AR_PROMPT,
        output_layer: int | None = None,
        add_current_token: bool = True,
        special_last_token_vector: bool = True,
        head: str = "none",
        objective: str = "mse",
        name: str = "untrained",
        fve_variance: float | None = None,
    ) -> NLA:
        """An untrained NLA over `subject` at `layer`, upstream architecture, sharing the subject's weights."""
        if not 0 <= layer < subject.n_layers:
            raise CheckpointError(f"layer {layer} outside 0..{subject.n_layers - 1} for {subject.source}")
        if patch_layers is None:  # upstream's 5, or every block of a smaller model
            patch_layers = min(DEFAULT_PATCH_LAYERS, subject.n_layers)
        verbalizer = LayerReplacementVerbalizer(
            subject, prompt=av_prompt, patch_layers=patch_layers, t_text=t_text
        )
        reconstructor = SoftPromptReconstructor(
            subject,
            prompt=ar_prompt,
            output_layer=layer if output_layer is None else output_layer,
            add_current_token=add_current_token,
            special_last_token_vector=special_last_token_vector,
            head=head,
        )
        return cls(
            subject=subject,
            layer=layer,
            verbalizer=verbalizer,
            reconstructor=reconstructor,
            subject_source=subject_source or subject.source,
            fve_variance=fve_variance,
            objective=objective,
            name=name,
            provenance={"from": "init", "created_at": utc_now()},
        )

    # -- config ---------------------------------------------------------------------------------------------------
    def verbalizer_config(self) -> dict[str, Any]:
        v = self.verbalizer
        return {"mode": v.mode, "base": self.bases.get("verbalizer", "subject"), **v.settings()}

    def reconstructor_config(self) -> dict[str, Any]:
        r = self.reconstructor
        return {"mode": r.mode, "base": self.bases.get("reconstructor", "subject"), **r.settings()}

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "subject": {
                "source": self.subject_source,
                "model_type": self.subject.arch.model_type,
                "n_layers": self.subject.n_layers,
            },
            "layer": self.layer,
            "d_model": self.d_model,
            "objective": self.objective,
            "verbalizer": self.verbalizer_config(),
            "reconstructor": self.reconstructor_config(),
            "fve_baseline": self.fve_baseline
            or (None if self.fve_variance is None else {"variance": self.fve_variance, "kind": "rawvar"}),
            "provenance": self.provenance,
        }

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What the native format stores: the trained tensors of both halves, base weights excluded."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in (("verbalizer.", self.verbalizer), ("reconstructor.", self.reconstructor)):
            for k, v in module.state_dict().items():
                out[prefix + k] = v.detach().contiguous()
        return out

    def save(self, path: str | Path) -> Path:
        from .formats.native import save_native

        return save_native(self, Path(path))

    def lms(self) -> list[LM]:
        """The distinct language models this NLA runs on (one when subject, AV and AR share a base)."""
        found = [self.subject, self.verbalizer.lm, self.reconstructor.lm]
        return list({id(m): m for m in found}.values())

    def to(self, device: torch.device | str) -> NLA:
        """Move every base model and the trained tensors; cached prompt prefixes are dropped with the move."""
        for lm in self.lms():
            lm.model.to(device)
        for module in (self.verbalizer, self.reconstructor):
            module.to(device)
            module._memo = type(module._memo)()
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.verbalizer.parameters(), *self.reconstructor.parameters()]


def utc_now() -> str:
    """Now, in UTC, to the second: what provenance records."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


#: the designs by the `mode` a config names
VERBALIZER_MODES: dict[str, type[VerbalizerModule]] = {
    cls.mode: cls for cls in (LayerReplacementVerbalizer, EmbeddingReplacementVerbalizer)
}
RECONSTRUCTOR_MODES: dict[str, type[ReconstructorModule]] = {
    cls.mode: cls for cls in (SoftPromptReconstructor, TemplateReconstructor)
}


def build_verbalizer(cfg: dict[str, Any], lm: LM) -> VerbalizerModule:
    design = VERBALIZER_MODES.get(str(cfg.get("mode")))
    if design is None:
        raise CheckpointError(
            f"unknown verbalizer mode {cfg.get('mode')!r} ({' or '.join(VERBALIZER_MODES)})"
        )
    try:
        return design.from_settings(cfg, lm)
    # a setting the design refuses (prompt without its placeholder, unknown grammar)
    except ValueError as exc:
        raise CheckpointError(f"verbalizer: {exc}") from None


def build_reconstructor(cfg: dict[str, Any], lm: LM) -> ReconstructorModule:
    design = RECONSTRUCTOR_MODES.get(str(cfg.get("mode")))
    if design is None:
        raise CheckpointError(
            f"unknown reconstructor mode {cfg.get('mode')!r} ({' or '.join(RECONSTRUCTOR_MODES)})"
        )
    return design.from_settings(cfg, lm)


def detect_format(path: str | Path) -> str:
    """'native', 'upstream' or 'official' for a checkpoint path, or CheckpointError saying why not."""
    from .formats import format_of  # the format modules build on this module

    return format_of(path).name


def load_nla(
    path: str | Path,
    *,
    pool: LMPool | None = None,
    dtype: str = "float32",
    subject_override: str | None = None,
    trust_checkpoint: bool = False,
    **kwargs: Any,
) -> NLA:
    """Load a checkpoint of any supported format; models come from (and are shared through) `pool`. `kwargs` are
    format options (`fve_variance`, `base_override`, `max_new_tokens`); a format ignores those it has no use for."""
    from .formats import format_of  # the format modules build on this module

    return format_of(path).load(
        Path(path),
        pool=pool or LMPool(dtype=dtype),
        subject_override=subject_override,
        trust_checkpoint=trust_checkpoint,
        **kwargs,
    )
