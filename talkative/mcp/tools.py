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
from typing import Annotated, Any, Literal, Protocol

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
Rows flagged early_position, bos, system_prompt or outlier sit where activations are known to be noisy;
low_confidence (no better than a baseline), degenerate or truncated flag an explanation not to trust."""

#: seconds a describe, score, extract or tokenize call waits for its job, the server's own wait (REQUEST_TIMEOUT,
#: else 300 s) included: the client follows a job that outlasts that wait, and cancels it past this
VECTOR_TIMEOUT = 900.0
READ_ONLY = ToolAnnotations(readOnlyHint=True, openWorldHint=False)


class Connector(Protocol):
    """Opens the client one tool call uses, for the caller of that call."""

    def __call__(self, ctx: Context) -> AbstractAsyncContextManager[AsyncClient]: ...


def refusal(error: APIError) -> str:
    """`status: detail`, with the wait the server asked for when its detail does not already say it."""
    said = "retry" in error.detail.lower()
    hint = f"; retry in {error.retry_after:.0f} s" if error.retry_after and not said else ""
    return f"{error.status}: {error.detail}{hint}"


def _options(best_of_k: int | None, salience: bool, kl: bool, seed: int | None = None) -> dict[str, Any]:
    """The analysis options the tools expose, as the API spells them."""
    options: dict[str, Any] = {"calculate_token_salience": salience, "no_kl": not kl}
    if best_of_k is not None:
        options["optimize_explanations_config"] = {"best_of_k": best_of_k}
    if seed is not None:
        options["seed"] = seed
    return options


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
Seed = Annotated[int | None, Field(ge=0, le=2**31 - 1, description="Sampling seed (default 42).")]
SteerArg = Annotated[
    S.Steer | None,
    Field(
        description="Push each activation along a direction before explaining it: {direction: {text} | {from: "
        "{text, position}} | {vector}, alpha}; the explanation and metrics are then the pushed state's."
    ),
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
        self._metrics: tuple[str, ...] | None = None  # the compact rows' metrics, once the server said them

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

    async def _compact_metrics(self, client: AsyncClient) -> tuple[str, ...]:
        """The metrics compact rows keep, from the server's metric legend, asked for once: the tools serve one
        server (the app itself for `/mcp`, `--server` for stdio), whose metric table is fixed while it runs."""
        if self._metrics is None:
            self._metrics = S.compact_metrics(await client.metric_legend())
        return self._metrics

    async def _source(
        self,
        client: AsyncClient,
        text: str | None,
        messages: Sequence[S.Message] | None,
        positions: Sequence[int],
        model_id: str | None,
    ) -> Extraction:
        return await client.extract(
            text,
            S.message_dicts(messages),
            positions=list(positions),
            model_id=model_id,
            timeout=VECTOR_TIMEOUT,
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
        seed: Seed = None,
        steer: SteerArg = None,
        timeout_s: Timeout = 600,
    ) -> dict[str, Any]:
        """Explain every token of a text (or chat) at the model's layer.

        Returns one compact row per token: position, token, explanation, mse, relative_rmse, fve, cosine,
        kl_divergence, flags (early_position, bos, system_prompt, outlier: known-noisy positions;
        low_confidence, degenerate, truncated: an explanation not to trust) and, with salience, the explanation's
        most salient words; plus `summary` (means over the rows no flag excludes) and the request_id."""
        _one_input(text, messages)
        options = _options(best_of_k, salience, kl, seed)
        if steer is not None:
            options["steer"] = steer.wire()
        async with self._client(ctx) as client:
            accepted = await client.submit_analysis(text, S.message_dicts(messages), options, model_id)
            result = await self._finish(client, accepted.request_id, timeout_s)
            metrics = await self._compact_metrics(client)
        return S.compact_analysis(
            accepted.request_id, result.get("tokens", []), result.get("metadata", {}), metrics
        )

    async def tokenize(
        self, ctx: Context, text: TextArg = None, messages: MessagesArg = None, model_id: ModelArg = None
    ) -> dict[str, Any]:
        """The model's tokens of a text (or of a chat as rendered for analysis): position, token, token_id.
        Use it to pick positions for extract, describe and score."""
        _one_input(text, messages)
        async with self._client(ctx) as client:
            body = await client.tokenize(
                text, S.message_dicts(messages), model_id=model_id, timeout=VECTOR_TIMEOUT
            )
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
                text,
                S.message_dicts(messages),
                positions=positions,
                model_id=model_id,
                timeout=VECTOR_TIMEOUT,
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
        steer: SteerArg = None,
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
        if steer is not None:
            options["steer"] = steer.wire()
        async with self._client(ctx) as client:
            if vectors is not None:
                rows, refs, where = S.unpack(vectors), tokens, None
            else:
                ext = await self._source(client, text, messages, positions or [], model_id)
                rows, refs, where = ext.activations, [t["token_id"] for t in ext.tokens], ext.tokens
            described = await client.describe(
                rows, refs, options=options, model_id=model_id, timeout=VECTOR_TIMEOUT
            )
            metrics = await self._compact_metrics(client)
        results = []
        for i, r in enumerate(described.results):
            out: dict[str, Any] = {"index": r.get("index", i)}
            if where is not None:
                out["position"] = where[i]["position"]
            out |= {
                "token": r.get("token"),
                "token_assumed": r.get("token_assumed"),
                "explanation": r["explanation"],
                **S.metrics_of(r, metrics),
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
                list(explanations),
                rows[0],
                token=ref,
                salience=salience,
                model_id=model_id,
                timeout=VECTOR_TIMEOUT,
            )
            metrics = await self._compact_metrics(client)
        body = scored.raw
        results = []
        for r in scored.results:
            out = {"explanation": r["explanation"], **S.metrics_of(r, metrics)}
            words = S.salient_words(r)
            if words is not None:
                out["salient_words"] = words
            results.append(out)
        head: dict[str, Any] = {"request_id": scored.request_id, "model_id": body.get("model_id")}
        if where is not None:
            head |= {"position": where["position"], "token": where["token"]}
        else:
            head |= {"token": body.get("token"), "token_assumed": body.get("token_assumed")}
        return {**head, "norm": S.rounded(body.get("norm")), "results": results}

    async def diff(
        self,
        ctx: Context,
        a: Annotated[
            S.Side, Field(description="State A: {text | messages, position (default -1), model_id?}.")
        ],
        b: Annotated[
            S.Side, Field(description="State B, the same way (another text, or the same on another model).")
        ],
        model_id: ModelArg = None,
        best_of_k: BestOfK = None,
        salience: Salience = False,
        timeout_s: Timeout = 600,
    ) -> dict[str, Any]:
        """Compare two states: explain the difference A − B in words, and each state on its own.

        Each side is an input and a position (and, to compare a base with its fine-tune, its own model of the
        same group). Returns `difference` (explanation and metrics of A − B), `a` and `b` (each side's
        token, explanation and metrics) and `cosine_a_b`, the two states' cosine. Two identical states have no
        difference and are refused."""
        options: dict[str, Any] = {"calculate_token_salience": salience}
        if best_of_k is not None:
            options["optimize_explanations_config"] = {"best_of_k": best_of_k}
        async with self._client(ctx) as client:
            body = await client.diff(
                a.wire(), b.wire(), options=options, model_id=model_id, timeout=timeout_s
            )
            metrics = await self._compact_metrics(client)
        return S.compact_diff(body, metrics)

    async def steer_generate(
        self,
        ctx: Context,
        direction: Annotated[
            S.Direction,
            Field(
                description="Where to push: {text: words} (the reconstructor's vector for them), {from: {text, "
                "position}} (another input's activation, cleaner) or {vector: numbers | {data, shape}}."
            ),
        ],
        alpha: S.Alpha,
        text: TextArg = None,
        messages: MessagesArg = None,
        positions: Annotated[
            Literal["all", "new"],
            Field(description="Steer the prompt and the new tokens (all), or only the new tokens (new)."),
        ] = "all",
        max_new_tokens: Annotated[int, Field(ge=1, le=S.MAX_NEW_TOKENS, description="Most new tokens.")] = 40,
        temperature: Annotated[
            float | None, Field(ge=0, le=2, description="0 = greedy; default: the model's generation config.")
        ] = None,
        seed: Seed = None,
        num_completions: Annotated[
            int, Field(ge=1, le=S.MAX_COMPLETIONS, description="Independent samples.")
        ] = 1,
        compare: Annotated[
            bool, Field(description="Also generate without the steer (same seed), to see what it changed.")
        ] = True,
        model_id: ModelArg = None,
    ) -> dict[str, Any]:
        """Generate while pushing the subject model along a direction at the NLA's layer ("make it talk about
        the ocean": direction {text: "the ocean"}).

        alpha·‖h‖·unit(direction) is added to the residual stream after the layer while the model writes.
        Returns the steered `completions` and `finish_reasons`, the `steer` as the server applied it, and with
        compare the `unsteered` completions of the same request."""
        _one_input(text, messages)
        msgs = S.message_dicts(messages)
        steer = {
            "direction": direction.model_dump(by_alias=True, exclude_none=True),
            "alpha": alpha,
            "positions": positions,
        }
        settings: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            "num_completions": num_completions,
            "model_id": model_id,
        }
        async with self._client(ctx) as client:
            steered = await (await client.generate(text, msgs, steer=steer, **settings)).result()
            plain = await (await client.generate(text, msgs, **settings)).result() if compare else None
        out: dict[str, Any] = {
            "request_id": steered.request_id,
            "model_id": steered.metadata.get("model_id"),
            "steer": steered.metadata.get("steer"),
            "completions": steered.completions,
            "finish_reasons": steered.finish_reasons,
        }
        if plain is not None:
            out["unsteered"] = plain.completions
        return out

    async def batch_submit(
        self,
        ctx: Context,
        items: Annotated[
            list[S.BatchItem | S.Text],
            Field(
                min_length=1,
                max_length=S.MAX_BATCH_ITEMS,
                description="The inputs: texts (their ids are their indexes), or {id, text | messages} items.",
            ),
        ],
        model_id: ModelArg = None,
        best_of_k: BestOfK = None,
        salience: Salience = False,
        kl: Annotated[bool, Field(description="Measure kl_divergence for every item.")] = True,
    ) -> dict[str, Any]:
        """Analyse many inputs as one batch job, run as the server's interactive load allows.

        Answers at once with the batch_id and the item counts; read results with batch_fetch. A batch belongs
        to its caller. For more items than one call takes, upload JSONL to POST /api/v1/batches."""
        listed = [
            {"id": i, "text": item} if isinstance(item, str) else item.wire() for i, item in enumerate(items)
        ]
        async with self._client(ctx) as client:
            run = await client.batch(listed, options=_options(best_of_k, salience, kl), model_id=model_id)
        return S.batch_state(run.raw)

    async def batch_fetch(
        self,
        ctx: Context,
        batch_id: Annotated[
            str, Field(min_length=1, max_length=S.MAX_ID_CHARS, description="From batch_submit.")
        ],
        after: Annotated[
            int, Field(ge=0, description="Skip the first results (pass the previous call's next_after).")
        ] = 0,
        limit: Annotated[int, Field(ge=1, le=200, description="Most results to return in this call.")] = 20,
        wait_s: Annotated[
            float,
            Field(
                ge=1,
                le=600,
                description="Wait up to this many seconds for `limit` results or the batch's end, whichever "
                "comes first; what is done by then is returned.",
            ),
        ] = 30,
    ) -> dict[str, Any]:
        """A batch's progress and its finished items' results, in completion order, from `after` on.

        Each result: id, status (completed or failed), error, and for a completed item its compact rows (as
        analyze returns them) and summary. Call again with `next_after` until `status` is completed (or
        cancelled) and no results remain."""
        results: list[dict[str, Any]] = []
        async with self._client(ctx) as client:
            metrics = await self._compact_metrics(client)
            with anyio.move_on_after(wait_s):
                async for item in client.batch_results(batch_id, after, poll=self._poll):
                    results.append(S.batch_result(item.raw, metrics))
                    if len(results) >= limit:
                        break
            state = await client.batch_status(batch_id)
        return {**S.batch_state(state), "results": results, "next_after": after + len(results)}


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
        tools.diff,
        tools.steer_generate,
        tools.batch_submit,
        tools.batch_fetch,
    ):
        server.add_tool(tool, description=inspect.cleandoc(tool.__doc__ or ""), annotations=READ_ONLY)
    return server
