"""Text generation with the subject model, as a token iterator for streaming.

Continues a text or a chat (a trailing assistant message is continued, otherwise a new assistant turn starts) for
`num_completions` rows at once, each row sampling from its own seeded stream, with top-p, stopping at the end of
the turn. Tokens are detokenized incrementally so multi-byte characters split across tokens arrive whole.

A request may steer: `ResidualSteer` adds `alpha · ‖h‖ · unit(direction)` to the residual stream after block L
(what enters block L+1) at every position it covers, through the explicit block-range forward (`LM.forward`'s
`patch`), so the shared weights are never hooked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .kvcache import KVCache
from .lm import LM
from .prompts import end_of_turn_ids
from .sampling import sample_next, step_seeds
from .steering import SteerPositions, add_scaled


class GenerationError(ValueError):
    pass


@dataclass(frozen=True)
class ResidualSteer:
    """A resolved generation steer: the unit direction, where it is added and how hard.

    `positions="all"` steers the prompt and every generated token; `"new"` only the generated tokens' positions,
    so the first new token is sampled from the unsteered prompt and the steer acts from the second on.
    """

    layer: int  # the residual after this block (entering block layer + 1) is steered
    direction: torch.Tensor  # unit, [d]
    alpha: float
    positions: SteerPositions = "all"


@dataclass
class GenerationRequest:
    text: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    max_new_tokens: int = 50
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 42
    num_completions: int = 1
    stop_at_end_of_turn: bool = True
    max_prompt_tokens: int | None = None
    steer: ResidualSteer | None = None


@dataclass
class TokenEvent:
    completion: int  # which completion this token belongs to
    token: str  # newly decoded text (may be "" while a multi-byte character is incomplete)
    token_id: int
    position: int  # absolute position in the sequence (prompt tokens count)
    finish_reason: str | None = None  # "stop" (end of turn / EOS) or "length" on a completion's last token


@dataclass
class GenerationResult:
    prompt: str
    prompt_tokens: int
    completions: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    def full_texts(self) -> list[str]:
        return [self.prompt + c for c in self.completions]


def prompt_text(lm: LM, req: GenerationRequest) -> str:
    if (req.text is None) == (req.messages is None):
        raise GenerationError("give exactly one of text or messages")
    if req.text is not None:
        return req.text
    msgs = [dict(m) for m in req.messages or []]
    if not msgs:
        raise GenerationError("messages is empty")
    if not lm.tokenizer.chat_template:
        raise GenerationError("this model has no chat template; send text instead of messages")
    cont = msgs[-1]["role"] == "assistant"
    return str(
        lm.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
        )
    )


class _Detok:
    """Incremental detokenizer: emits only completed characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted) :]
        self.emitted = text
        return new


def _forward(
    lm: LM, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, steer: ResidualSteer | None
) -> torch.Tensor:
    """All blocks over `x`; with `steer`, its direction added to the residual after block `steer.layer`."""
    if steer is None or steer.alpha == 0:
        return lm.forward(x, pos, cache=cache)
    if (
        steer.layer + 1 >= lm.n_layers
    ):  # the last block's output: there is no block to enter, steer the output
        return add_scaled(lm.forward(x, pos, cache=cache), steer.direction, steer.alpha)

    def patch(i: int, h: torch.Tensor) -> torch.Tensor:
        return add_scaled(h, steer.direction, steer.alpha) if i == steer.layer + 1 else h

    return lm.forward(x, pos, cache=cache, patch=patch)


def stream(lm: LM, req: GenerationRequest, result: GenerationResult | None = None) -> Iterator[TokenEvent]:
    """Yield tokens as they are sampled; fills `result` (if given) with the finished completions."""
    if req.max_new_tokens < 1:
        raise GenerationError("max_new_tokens must be at least 1")
    if not 1 <= req.num_completions <= 64:
        raise GenerationError("num_completions must be between 1 and 64")
    if not 0 <= req.temperature <= 2:
        raise GenerationError("temperature must be between 0 and 2")
    if not 0 < req.top_p <= 1:
        raise GenerationError("top_p must be in (0, 1]")
    text = prompt_text(lm, req)
    ids = lm.encode(text)
    if not ids:
        raise GenerationError("the prompt has no tokens")
    if req.max_prompt_tokens is not None and len(ids) > req.max_prompt_tokens:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens, more than the limit of {req.max_prompt_tokens}"
        )
    n = req.num_completions
    res = result if result is not None else GenerationResult(prompt=text, prompt_tokens=len(ids))
    res.prompt, res.prompt_tokens = text, len(ids)
    stops = end_of_turn_ids(lm) if req.stop_at_end_of_turn else set()
    noise = (
        step_seeds(req.seed, [(c,) for c in range(n)], req.max_new_tokens) if req.temperature > 0 else None
    )
    detoks = [_Detok(lm.tokenizer) for _ in range(n)]
    done = [False] * n
    reasons = ["length"] * n
    with torch.no_grad():
        prefix = KVCache(1, len(ids))
        x = torch.tensor(ids, dtype=torch.long, device=lm.device).unsqueeze(0)
        pos = torch.arange(len(ids), device=lm.device).unsqueeze(0)
        on_prompt = req.steer if req.steer is not None and req.steer.positions == "all" else None
        h = _forward(lm, lm.add_positions(lm.embed(x), pos), pos, prefix, on_prompt)
        logits = lm.logits(lm.final_norm(h[:, -1])).expand(n, -1)
        cache = prefix.broadcast(n, extra_capacity=req.max_new_tokens)
        for t in range(req.max_new_tokens):
            seeds = noise[:, t] if noise is not None else None
            toks = sample_next(logits, req.temperature, seeds, top_p=req.top_p).tolist()
            position = len(ids) + t
            for c, tid in enumerate(toks):
                if done[c]:
                    continue
                finish = None
                if tid in stops:
                    finish, done[c] = "stop", True
                    reasons[c] = "stop"
                elif t == req.max_new_tokens - 1:
                    finish, done[c] = "length", True
                piece = "" if tid in stops else detoks[c].push(tid)
                yield TokenEvent(
                    completion=c, token=piece, token_id=tid, position=position, finish_reason=finish
                )
            if all(done):
                break
            step = torch.tensor(toks, dtype=torch.long, device=lm.device).unsqueeze(1)
            p = torch.full((n, 1), position, device=lm.device)
            h = _forward(lm, lm.add_positions(lm.embed(step), p), p, cache, req.steer)
            logits = lm.logits(lm.final_norm(h[:, -1]))
    res.completions = [d.tok.decode(d.ids, skip_special_tokens=False) for d in detoks]
    res.finish_reasons = reasons
    res.token_ids = [d.ids for d in detoks]


def generate(lm: LM, req: GenerationRequest) -> GenerationResult:
    result = GenerationResult(prompt="", prompt_tokens=0)
    for _ in stream(lm, req, result):
        pass
    return result
