"""A Python client of a Talkative server: `Client` (blocking) and `AsyncClient` (asyncio).

    from talkative.client import Client

    with Client("http://localhost:8000") as client:          # API key: api_key=..., or $TALKATIVE_API_KEY
        analysis = client.analyze("The capital of France is Paris.", options={"no_kl": True})
        for row in analysis.tokens:
            print(row["token"], row["explanation"], row["mse"])
        stream = client.generate("Once upon a time", max_new_tokens=20)
        for token in stream:
            print(token.token, end="", flush=True)
        print(stream.result.completions)

Requests refused for room or rate (429, 503) are retried after the server's `Retry-After`; a refusal that does not
pass raises `APIError`, a request that ends failed or cancelled raises `JobFailed`.

The package, as a map: `types` (the results and errors), `_wire` (request bodies and reading answers, no I/O),
`_operations` (every operation, written once as a plan of I/O steps), `_plan` (what a plan is and how a method
runs one), `sync` and `aio` (the two drivers that carry a plan out: blocking, or awaited).
"""

from .aio import AsyncClient, AsyncGenerationStream
from .sync import Client, GenerationStream
from .types import (
    Accepted,
    Analysis,
    APIError,
    BatchItemResult,
    BatchRun,
    Extraction,
    Generation,
    JobFailed,
    JobStatus,
    ModelInfo,
    ModelListing,
    Progress,
    SwitchResult,
    TokenEvent,
    VectorResults,
)

__all__ = [
    "APIError",
    "Accepted",
    "Analysis",
    "AsyncClient",
    "AsyncGenerationStream",
    "BatchItemResult",
    "BatchRun",
    "Client",
    "Extraction",
    "Generation",
    "GenerationStream",
    "JobFailed",
    "JobStatus",
    "ModelInfo",
    "ModelListing",
    "Progress",
    "SwitchResult",
    "TokenEvent",
    "VectorResults",
]
