"""Analysis options: the seed API's `AnalyzeOptions`, validated once, shared by the CLI, the engine and the server.

Every option either changes what the engine does or is refused with a message that says why; nothing is accepted
and then ignored (upstream silently dropped several of these).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .steering import MAX_ALPHA, SOURCES, Steer

MAX_BEST_OF_K = 64
MAX_BATCH_SIZE = 4096
# Character bounds, checked when a request is parsed: a long piece is refused before anything tokenizes it.
MAX_PIECE_CHARS = 2000  # one prompt piece (add_tokens item, replace_left, replace_right)
MAX_MESSAGES = 10_000  # chat messages in one request
PromptPiece = Annotated[str, Field(max_length=MAX_PIECE_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class OptimizeExplanationsConfig(BaseModel):
    """Explanation search: sample `best_of_k` explanations per position, keep the best reconstruction."""

    model_config = ConfigDict(extra="forbid")
    use_batched: bool = Field(
        True, description="Batched best-of-k (the only search this engine runs; false gives the same result)."
    )
    best_of_k: int = Field(
        8, ge=1, le=MAX_BEST_OF_K, description="Explanations sampled per position; the best is kept."
    )
    n_groups_per_rollout: int | None = Field(
        None, ge=1, le=MAX_BATCH_SIZE, description="Positions per engine batch (same as batch_size)."
    )
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="Sampling temperature for explanations (overrides the top-level one); 0 = greedy.",
    )
    num_samples_per_iteration: int = Field(
        16, ge=1, le=64, description="Upstream's sequential optimiser only; must stay at its default."
    )
    salience_pct_threshold: float = Field(
        0.0, ge=0.0, le=1.0, description="Upstream's sequential optimiser only; must stay at its default."
    )

    @model_validator(mode="after")
    def _sequential_only(self) -> OptimizeExplanationsConfig:
        for name, default in (("num_samples_per_iteration", 16), ("salience_pct_threshold", 0.0)):
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name} only steers upstream's token-by-token sequential optimiser, which this server does not run; "
                    f"leave it at {default} and use best_of_k"
                )
        return self


def _flat(value: list[Any]) -> Iterator[Any]:
    """The entries of a vector given as a list, or as a list holding one list."""
    for x in value:
        if isinstance(x, list):
            yield from x
        else:
            yield x


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond float range
        return False


class SteerOption(BaseModel):
    """`steer`: add `alpha · ‖A‖ · unit(direction)` to each activation before it is explained (`nla.steering`)."""

    model_config = ConfigDict(extra="forbid")
    direction: dict[str, Any] = Field(
        description='One of {"vector": [d numbers] | {data, shape} | "<base64 float32>"}, {"text": "…"} (the '
        'reconstructor\'s vector for that explanation), {"from": {"text": "…", "position": N}} (that input\'s '
        "activation at the model's layer)."
    )
    alpha: float = Field(
        ge=-MAX_ALPHA, le=MAX_ALPHA, description="Push in units of the activation's own norm; 0 = no steer."
    )

    @field_validator("direction")
    @classmethod
    def _one_source(cls, v: dict[str, Any]) -> dict[str, Any]:
        if set(v) - set(SOURCES) or len(v) != 1:
            raise ValueError("direction must have exactly one key: vector, text or from")
        ((source, value),) = v.items()
        if source == "text" and (not isinstance(value, str) or len(value) > MAX_PIECE_CHARS):
            raise ValueError(f"direction.text must be a string of at most {MAX_PIECE_CHARS} characters")
        if source == "from":
            text = value.get("text") if isinstance(value, dict) else None
            if not isinstance(text, str) or len(text) > 200_000:
                raise ValueError('direction.from must be {"text": "…", "position": N}')
        if source == "vector" and isinstance(value, list):
            numbers = [x for x in _flat(value) if isinstance(x, int | float) and not isinstance(x, bool)]
            # NaN and infinity parse from JSON but can be neither used nor stored with the job
            if not all(map(_finite, numbers)):
                raise ValueError("the steering direction contains NaN or infinite values")
            if numbers and len(numbers) == len(list(_flat(value))) and not any(numbers):
                raise ValueError("the steering direction is zero: it has no orientation to steer along")
        return v

    def resolved(self) -> Steer:
        return Steer.of(self.direction, self.alpha)


class GenerationSteerOption(SteerOption):
    """`steer` of a generation: the direction is added at the layer's residual stream while the subject writes."""

    positions: Literal["all", "new"] = Field(
        "all", description="all: prompt and generated tokens; new: generated tokens only."
    )

    def resolved(self) -> Steer:
        return Steer.of(self.direction, self.alpha, self.positions)


class AnalyzeOptions(BaseModel):
    """Options of one analysis (the seed's AnalyzeOptions, plus `return_vectors` and `last_n_messages`)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH_SIZE,
        description="Positions per engine batch; automatic from a row budget when absent.",
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**63 - 1,
        description="Same seed, same explanations, whatever else is batched with them.",
    )
    no_eval: bool = Field(
        False, description="Leave out the reconstruction metrics and KL (explanations only)."
    )
    no_kl: bool = Field(False, description="Skip the KL divergence of the subject's next-token prediction.")
    tuned_lens: bool = Field(
        False, description="Add tuned-lens top tokens (needs TUNED_LENS_DIR on the server)."
    )
    logit_lens_analysis: bool = Field(
        False, description="Add logit-lens top tokens (final norm, then unembedding)."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Explanation sampling temperature (0.1–2; 0 = greedy). Default 1.0."
    )
    do_hard_tokens: bool = Field(
        False, description="Use the prompt's plain token embeddings instead of the trained soft prompt."
    )
    return_structured: bool = Field(True, description="Also return the explanation split into tokens.")
    move_devices: bool = Field(
        False, description="Upstream donor-model device shuffling; not applicable here, must be false."
    )
    calculate_salience: bool = Field(True, description="Compute salience (with calculate_token_salience).")
    calculate_token_salience: bool = Field(
        True, description="Per-explanation-token salience by ablation to a space."
    )
    add_tokens: list[PromptPiece] | None = Field(
        None,
        max_length=64,
        description=f"Forced start of every explanation (pieces of at most {MAX_PIECE_CHARS} characters).",
    )
    replace_left: str | None = Field(
        None, max_length=MAX_PIECE_CHARS, description="Replace the verbalizer prompt before the placeholder."
    )
    replace_right: str | None = Field(
        None, max_length=MAX_PIECE_CHARS, description="Replace the verbalizer prompt after the placeholder."
    )
    optimize_explanations_config: OptimizeExplanationsConfig | None = None
    last_n_messages: int | None = Field(
        None, ge=1, le=10_000, description="With chat messages: analyse only the last N messages."
    )
    return_vectors: bool = Field(
        False, description="Include the activation and its reconstruction in every row."
    )
    use_chat_format: bool | None = Field(
        None,
        description="Upstream UI flag: chat input is recognised by sending messages; when given, it must agree.",
    )
    steer: SteerOption | None = Field(
        None,
        description="Steer each activation along a direction before explaining it (and measure the steered one).",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < 0.1:
            raise ValueError("temperature must be 0 (greedy) or between 0.1 and 2.0")
        return v

    @field_validator("move_devices")
    @classmethod
    def _move(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "move_devices is an upstream workaround for donor models on another GPU; it does not apply here"
            )
        return v

    @model_validator(mode="after")
    def _opt_temperature(self) -> AnalyzeOptions:
        cfg = self.optimize_explanations_config
        if cfg is not None and cfg.temperature is not None and 0 < cfg.temperature < 0.1:
            raise ValueError(
                "optimize_explanations_config.temperature must be 0 (greedy) or between 0.1 and 2.0"
            )
        return self


@dataclass(frozen=True)
class Resolved:
    """Options with defaults and precedence applied; `merge_key` says which jobs may share an engine batch."""

    best_of_k: int
    temperature: float
    seed: int
    batch_size: int | None
    evaluate: bool
    kl: bool
    salience: bool
    structured: bool
    logit_lens: bool
    tuned_lens: bool
    return_vectors: bool
    add_tokens: tuple[str, ...] = ()
    replace_left: str | None = None
    replace_right: str | None = None
    hard_tokens: bool = False
    last_n_messages: int | None = None
    chat_format: bool | None = None
    steer: Steer | None = None

    def merge_key(self) -> tuple[object, ...]:
        """Jobs whose options agree on everything that shapes the engine batch can be merged (seeds may differ)."""
        return (
            self.best_of_k,
            self.temperature,
            self.evaluate,
            self.kl,
            self.salience,
            self.logit_lens,
            self.tuned_lens,
            self.add_tokens,
            self.replace_left,
            self.replace_right,
            self.hard_tokens,
            self.steer,
        )


def resolve(options: AnalyzeOptions | dict[str, Any] | None) -> Resolved:
    if options is None:
        options = AnalyzeOptions()
    elif isinstance(options, dict):
        options = AnalyzeOptions.model_validate(options)
    cfg = options.optimize_explanations_config or OptimizeExplanationsConfig()
    temperature = cfg.temperature if cfg.temperature is not None else options.temperature
    return Resolved(
        best_of_k=cfg.best_of_k,
        temperature=1.0 if temperature is None else float(temperature),
        seed=options.seed,
        batch_size=options.batch_size or cfg.n_groups_per_rollout,
        evaluate=not options.no_eval,
        kl=not options.no_eval and not options.no_kl,
        salience=not options.no_eval and options.calculate_token_salience and options.calculate_salience,
        structured=options.return_structured,
        logit_lens=options.logit_lens_analysis,
        tuned_lens=options.tuned_lens,
        return_vectors=options.return_vectors,
        add_tokens=tuple(options.add_tokens or ()),
        replace_left=options.replace_left,
        replace_right=options.replace_right,
        hard_tokens=options.do_hard_tokens,
        last_n_messages=options.last_n_messages,
        chat_format=options.use_chat_format,
        steer=options.steer.resolved() if options.steer is not None else None,
    )
