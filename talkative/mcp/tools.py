"""The tools, each written once over `talkative.client.AsyncClient`: whichever transport carries the client (the
network for `talkative mcp`, the server itself for `/mcp`), a tool makes the same API requests a script would.

`Tools` is given a `Connector`: a function that, for the MCP context of one call, opens the client that call
uses. Failures leave a tool as `ToolError`s whose text is the server's own reason (`400: …`, `404: …`,
`429: … retry in 12 s`), so an agent reads what to change; a tool never takes the MCP session down with it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Protocol

import anyio
import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from ..client import AsyncClient, Extraction
from ..client.types import APIError, JobFailed
from . import shapes as S

INSTRUCTIONS = """Talkative explains a language model's internal activations in words with a natural language
autoencoder (NLA): a verbalizer writes an explanation of the activation at a layer, a reconstructor maps the
explanation back to a vector, and the reconstruction error (mse, relative_rmse, fve, cosine; kl_divergence of the
next-token prediction with the reconstruction patched in) says how much of the activation the words capture.
Start with list_models, analyze a text, then test hypotheses about a token with score (your own explanation
against its activation) and describe. Lower mse/relative_rmse and higher fve/cosine mean a better explanation.
Rows flagged early_position, bos, system_prompt or outlier are known to be noisy."""

READ_ONLY = ToolAnnotations(readOnlyHint=True, openWorldHint=False)


class Connector(Protocol):
    """Opens the client one tool call uses, for the caller of that call."""

    def __call__(self, ctx: Context) -> AbstractAsyncContextManager[AsyncClient]: ...


def refusal(error: APIError) -> str:
    """`status: detail`, with the wait the server asked for when its detail does not already say it."""
    said = "retry" in error.detail.lower()
    hint = f"; retry in {error.retry_after:.0f} s" if error.retry_after and not said else ""
    return f"{error.status}: {error.detail}{hint}"


def _one_input(text: str | None, messages: Sequence[S.Message] | None) -> None:
    if (text is None) == (messages is None):
        raise ToolError("give exactly one of text or messages")


# -- argument types: each one's schema says what it takes -----------------------------------------------------------
TextArg = Annotated[S.Text | None, Field(description="The text (give text or messages).")]
MessagesArg = Annotated[
    S.Messages | None,
    Field(
        description="A chat, oldest message first, rendered with the model's chat template (or give text)."
    ),
]
ModelArg = Annotated[
    S.ModelId | None, Field(description="A model id from list_models; default: the caller's current model.")
]
BestOfK = Annotated[
    int | None,
    Field(
        ge=1,
        le=S.MAX_BEST_OF_K,
        description="Explanations sampled per token, the best reconstruction kept (server default 8; 1 is "
        "fastest).",
    ),
]
Salience = Annotated[
    bool, Field(description="Also rank each explanation's words by how much the reconstruction needs them.")
]
Timeout = Annotated[
    float,
    Field(gt=0, le=3600, description="Seconds to wait for the result; the request is cancelled after that."),
]
Positions = Annotated[
    list[int] | None,
    Field(
        max_length=S.MAX_POSITIONS,
        description="Token positions (0-based; negative counts from the end); default: every token.",
    ),
]


class Tools:
    """The tools of one MCP server, over the clients its connector opens."""

    def __init__(self, connect: Connector, *, poll: float = 0.5) -> None:
        self._connect = connect
        self._poll = poll

    @asynccontextmanager
    async def _client(self, ctx: Context) -> AsyncIterator[AsyncClient]:
        """The call's client; the errors of the API become tool errors that say what went wrong."""
        try:
            async with self._connect(ctx) as client:
                yield client
        except APIError as error:
            raise ToolError(refusal(error)) from None
        except JobFailed as error:
            raise ToolError(f"request {error.request_id} {error.status}: {error.error}") from None
        except httpx.TransportError as error:
            raise ToolError(f"cannot reach the Talkative server: {error}") from None
        except (ValueError, TimeoutError) as error:
            raise ToolError(str(error)) from None

    async def _finish(self, client: AsyncClient, request_id: str, timeout: float) -> dict[str, Any]:
        """Wait for a job's result; a job the caller stops waiting for (timeout, or the call cancelled) is
        cancelled, so no abandoned work holds the server."""
        try:
            status = await client.wait(request_id, timeout, self._poll)
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(APIError, httpx.HTTPError):
                await client.cancel(request_id)
            raise
        if not status.terminal:
            with contextlib.suppress(APIError):
                await client.cancel(request_id)
            raise ToolError(
                f"request {request_id} did not finish within {timeout:.0f} s and was cancelled: "
                "give fewer tokens, a lower best_of_k, or a longer timeout_s"
            )
        if status.status != "completed" or status.result is None:
            raise ToolError(f"request {request_id} {status.status}: {status.error}")
        return status.result

    async def _source(
        self,
        client: AsyncClient,
        text: str | None,
        messages: Sequence[S.Message] | None,
        positions: Sequence[int],
        model_id: str | None,
    ) -> Extraction:
        return await client.extract(
            text, S.message_dicts(messages), positions=list(positions), model_id=model_id
        )

    # -- the tools ----------------------------------------------------------------------------------------------
    async def list_models(self, ctx: Context) -> dict[str, Any]:
        """The models this caller may use (id, name, group, layer, whether loaded) and the current model.

        A model is a subject language model with an NLA at one layer; models of one group share their subject
        and switch at no cost."""
        async with self._client(ctx) as client:
            listing = await client.models()
        return {
            "current_model": listing.current_model,
            "models": [
                {
                    "id": m.id,
                    "name": m.name,
                    "group_id": m.group_id,
                    "layer": m.layer,
                    "is_loaded": m.is_loaded,
                    "is_current": m.is_current,
                }
                for m in listing.models
            ],
        }

    async def analyze(
        self,
        ctx: Context,
        text: TextArg = None,
        messages: MessagesArg = None,
        model_id: ModelArg = None,
        best_of_k: BestOfK = None,
        salience: Salience = False,
        kl: Annotated[
            bool,
            Field(description="Measure kl_divergence (the subject's prediction with the reconstruction)."),
        ] = True,
        seed: Annotated[
            int | None, Field(ge=0, le=2**31 - 1, description="Sampling seed (default 42).")
        ] = None,
        timeout_s: Timeout = 600,
    ) -> dict[str, Any]:
        """Explain every token of a text (or chat) at the model's layer.

        Returns one compact row per token: position, token, explanation, mse, relative_rmse, fve, cosine,
        kl_divergence, flags (early_position, bos, system_prompt, outlier: known-noisy positions) and, with salience, the
        explanation's most salient words; plus `summary` (means over unflagged rows) and the request_id."""
        _one_input(text, messages)
        options: dict[str, Any] = {"calculate_token_salience": salience, "no_kl": not kl}
        if best_of_k is not None:
            options["optimize_explanations_config"] = {"best_of_k": best_of_k}
        if seed is not None:
            options["seed"] = seed
        async with self._client(ctx) as client:
            accepted = await client.submit_analysis(text, S.message_dicts(messages), options, model_id)
            result = await self._finish(client, accepted.request_id, timeout_s)
        return S.compact_analysis(accepted.request_id, result.get("tokens", []), result.get("metadata", {}))

    async def tokenize(
        self, ctx: Context, text: TextArg = None, messages: MessagesArg = None, model_id: ModelArg = None
    ) -> dict[str, Any]:
        """The model's tokens of a text (or of a chat as rendered for analysis): position, token, token_id.
        Use it to pick positions for extract, describe and score."""
        _one_input(text, messages)
        async with self._client(ctx) as client:
            body = await client.tokenize(text, S.message_dicts(messages), model_id=model_id)
        return {"model_id": body.get("model_id"), "n_tokens": body["n_tokens"], "tokens": body["tokens"]}

    async def extract(
        self,
        ctx: Context,
        text: TextArg = None,
        messages: MessagesArg = None,
        positions: Positions = None,
        model_id: ModelArg = None,
        encoding: Annotated[
            str,
            Field(
                pattern="^(base64|list)$",
                description="base64 (exact little-endian float32, compact) or list (JSON numbers).",
            ),
        ] = "base64",
    ) -> dict[str, Any]:
        """The activations of a text's tokens at the model's layer, to pass to describe or score, or to keep.

        Returns layer, d_model, tokens [{position, token, token_id, norm}] and `activations` (row i belongs to
        tokens[i]): {data, shape, dtype} with base64, else a list of lists."""
        _one_input(text, messages)
        async with self._client(ctx) as client:
            ext = await client.extract(
                text, S.message_dicts(messages), positions=positions, model_id=model_id
            )
        return {
            "model_id": ext.raw.get("model_id"),
            "layer": ext.layer,
            "d_model": ext.raw.get("d_model"),
            "tokens": ext.tokens,
            "activations": S.pack(ext.activations) if encoding == "base64" else ext.activations,
        }

    async def describe(
        self,
        ctx: Context,
        vectors: Annotated[
            S.Vectors | None,
            Field(
                description="Vectors to explain: a list of vectors, or {data, shape} as extract returns them."
            ),
        ] = None,
        tokens: Annotated[
            list[S.TokenRef | None] | None,
            Field(
                max_length=S.MAX_VECTORS,
                description="With vectors: the token each was taken at (a string or an id), which the "
                "reconstructor reads; without it a neutral token stands in (token_assumed).",
            ),
        ] = None,
        text: TextArg = None,
        messages: MessagesArg = None,
        positions: Annotated[
            list[int] | None,
            Field(
                min_length=1,
                max_length=S.MAX_VECTORS,
                description="With text or messages: the positions whose activations to explain.",
            ),
        ] = None,
        model_id: ModelArg = None,
        best_of_k: BestOfK = None,
        salience: Salience = False,
    ) -> dict[str, Any]:
        """Explain activation vectors in words, with the reconstruction metrics of each explanation.

        Give `vectors` (any source: an extracted activation, a difference, a probe direction) or `text`/
        `messages` with `positions` (their activations are extracted first). Returns one result per vector:
        explanation, mse, relative_rmse, fve, cosine, and the most salient words with salience."""
        from_text = text is not None or messages is not None
        if from_text == (vectors is not None):
            raise ToolError("give vectors, or text (or messages) with positions")
        if from_text and not positions:
            raise ToolError("with text or messages, give the positions to describe")
        options: dict[str, Any] = {"calculate_token_salience": salience}
        if best_of_k is not None:
            options["optimize_explanations_config"] = {"best_of_k": best_of_k}
        async with self._client(ctx) as client:
            if vectors is not None:
                rows, refs, where = S.unpack(vectors), tokens, None
            else:
                ext = await self._source(client, text, messages, positions or [], model_id)
                rows, refs, where = ext.activations, [t["token_id"] for t in ext.tokens], ext.tokens
            described = await client.describe(rows, refs, options=options, model_id=model_id)
        results = []
        for i, r in enumerate(described.results):
            out: dict[str, Any] = {"index": r.get("index", i)}
            if where is not None:
                out["position"] = where[i]["position"]
            out |= {
                "token": r.get("token"),
                "token_assumed": r.get("token_assumed"),
                "explanation": r["explanation"],
                **S.metrics_of(r),
                "norm": S.rounded(r.get("norm")),
            }
            words = S.salient_words(r)
            if words is not None:
                out["salient_words"] = words
            results.append(out)
        return {
            "request_id": described.request_id,
            "model_id": described.raw.get("model_id"),
            "results": results,
        }

    async def score(
        self,
        ctx: Context,
        explanations: Annotated[
            list[S.Explanation],
            Field(
                min_length=1,
                max_length=S.MAX_EXPLANATIONS,
                description="Hypotheses: texts to score as explanations of the activation.",
            ),
        ],
        vector: Annotated[
            S.Vector | S.PackedVectors | None,
            Field(description="The activation: a list of numbers, or {data, shape} with one vector."),
        ] = None,
        token: Annotated[
            S.TokenRef | None, Field(description="With vector: the token it was taken at (string or id).")
        ] = None,
        text: TextArg = None,
        messages: MessagesArg = None,
        position: Annotated[
            int | None,
            Field(description="With text or messages: the token position (negative from the end)."),
        ] = None,
        model_id: ModelArg = None,
        salience: Salience = False,
    ) -> dict[str, Any]:
        """Test hypotheses: how well does each text, read as an explanation, reconstruct an activation?

        Give `vector` (with its `token`), or `text`/`messages` and a `position`. Returns per explanation mse,
        relative_rmse, fve and cosine (lower mse / higher fve: the text captures more of the activation), and
        with salience its most salient words; compare them with the model's own explanation from analyze."""
        from_text = text is not None or messages is not None
        if from_text == (vector is not None):
            raise ToolError("give vector, or text (or messages) with a position")
        if from_text and position is None:
            raise ToolError("with text or messages, give the position to score")
        async with self._client(ctx) as client:
            where: dict[str, Any] | None = None
            if vector is not None:
                rows = S.unpack(vector) if isinstance(vector, S.PackedVectors) else [list(vector)]
                if len(rows) != 1:
                    raise ToolError(f"vector holds {len(rows)} vectors; score takes one")
                ref = token
            else:
                ext = await self._source(client, text, messages, [position or 0], model_id)
                rows, where = ext.activations, ext.tokens[0]
                ref = where["token_id"]
            scored = await client.score(
                list(explanations), rows[0], token=ref, salience=salience, model_id=model_id
            )
        results = []
        for r in scored.results:
            out = {"explanation": r["explanation"], **S.metrics_of(r)}
            words = S.salient_words(r)
            if words is not None:
                out["salient_words"] = words
            results.append(out)
        head: dict[str, Any] = {"request_id": scored.request_id, "model_id": scored.raw.get("model_id")}
        if where is not None:
            head |= {"position": where["position"], "token": where["token"]}
        else:
            head |= {"token": scored.raw.get("token"), "token_assumed": scored.raw.get("token_assumed")}
        return {**head, "norm": S.rounded(scored.raw.get("norm")), "results": results}


def build_server(connect: Connector, *, name: str = "talkative", poll: float = 0.5) -> MCPServer:
    """An MCP server whose tools run over the clients `connect` opens."""
    tools = Tools(connect, poll=poll)
    server: MCPServer = MCPServer(name, instructions=INSTRUCTIONS)
    for tool in (
        tools.list_models,
        tools.analyze,
        tools.tokenize,
        tools.extract,
        tools.describe,
        tools.score,
    ):
        server.add_tool(tool, description=inspect.cleandoc(tool.__doc__ or ""), annotations=READ_ONLY)
    return server
