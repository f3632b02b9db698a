"""`POST /api/v1/diff`: compare two states, the explanation of A − B and of each side.

Each side is an input, a position and (optionally) its own model; both models must be in one group (one device
holds them together) and read the same layer. What can be checked without the engine (models, groups, layers,
text lengths) is refused here with 400; the rest (widths, positions outside the input, a zero difference) fails
the job with the engine's message, answered as 400 as well. The job is a vector job (`jobs/vectors.py`), answered
when done, or 202 with its `request_id` when it outlasts the wait.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from ..deps import Identity, ServiceDep, model_for
from ..schemas import DiffRequest
from ..vector_jobs import run_vector_job, vector_router

router = vector_router()


@router.post("/diff", summary="Explain the difference of two activations (A − B), and each of them")
async def diff(body: DiffRequest, svc: ServiceDep, who: Identity) -> Any:
    """Answer: `{request_id, model_id, difference, a, b, cosine_a_b, metadata}`; `difference` is a `describe`
    result row for A − B plus its `norm`, `a` and `b` the rows of each side's own activation plus `model_id,
    position, token, token_id, n_tokens, norm`."""
    default = body.model_id
    model_a = await model_for(svc, body.a.model_id or default, who)
    model_b = await model_for(svc, body.b.model_id or default, who)
    ma, mb = svc.registry.model(model_a), svc.registry.model(model_b)
    if ma.group_id != mb.group_id:
        raise HTTPException(
            400,
            f"the sides' models are in different groups ({ma.group_id} and {mb.group_id}); a diff compares "
            "models of one group",
        )
    if ma.layer is not None and mb.layer is not None and ma.layer != mb.layer:
        raise HTTPException(
            400, f"the sides read different layers ({ma.layer} and {mb.layer}); a diff needs one layer"
        )
    for name, side in (("a", body.a), ("b", body.b)):
        if side.text_length() > svc.settings.max_text_length:
            raise HTTPException(
                400, f"{name}: the input has {side.text_length()} characters, more than MAX_TEXT_LENGTH"
            )
    job_request = {
        "a": {**body.a.input(), "position": body.a.position, "model_id": model_a},
        "b": {**body.b.input(), "position": body.b.position, "model_id": model_b},
        "options": body.options.model_dump(exclude_unset=True) if body.options else {},
        "encoding": body.encoding,
    }
    return await run_vector_job(svc, who, "diff", job_request, model_a)
