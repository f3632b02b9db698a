"""What a plan is, and how `Client` and `AsyncClient` carry one out.

Every operation of the client is written once, as a plan: a generator that yields the I/O it needs (an effect
below) and receives the outcome, so retries, polling, deadlines and the WebSocket exchange live in one place and
hold no I/O. A driver carries the effects out: `Client` with `httpx.Client`, `time.sleep` and the blocking
WebSocket, `AsyncClient` with their asyncio twins. An effect that raises raises inside the plan, at the `yield`,
exactly as if the plan had done the I/O itself, so the plan's `try/except` reads as ordinary code.

The descriptors at the end turn a plan into a public method: on a `Client` a call that blocks for the answer, on
an `AsyncClient` a coroutine (or an async iterator), with the plan's own parameters, so both classes have the
same methods, written once, with their signatures checked by mypy.

Why plans rather than a `sync.py` generated from `aio.py`: a generated file is still a second copy to read,
review and keep fresh, with a check to say when it is stale; a plan is read once, and each driver is a page of
code that only knows how to wait.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar, overload

import httpx

if TYPE_CHECKING:
    from .aio import AsyncClient, AsyncGenerationStream
    from .sync import Client, GenerationStream

P = ParamSpec("P")
T = TypeVar("T")
E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)
F = TypeVar("F", bound=Callable[..., Any])


# -- effects: the I/O a plan asks its driver for ------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """An HTTP request; answered with its `httpx.Response`. A `stream` response is handed back unread (its lines
    are the plan's caller's to read), except when it is an error: then it is read and closed."""

    method: str
    path: str
    body: Any = None  # sent as JSON
    stream: bool = False
    content: bytes | None = None  # sent as it is, instead of a JSON body (a JSONL upload)
    content_type: str | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Connect:
    """Open a WebSocket; answered with the connection, which the driver closes when the plan ends."""

    url: str
    headers: dict[str, str] | None
    timeout: float


@dataclass(frozen=True)
class Send:
    socket: Any  # the connection `Connect` answered with: the driver's own kind
    text: str


@dataclass(frozen=True)
class Receive:
    """The next WebSocket message; `TimeoutError` when none comes within `timeout` seconds (None: no limit)."""

    socket: Any
    timeout: float | None


@dataclass(frozen=True)
class Notify:
    """Call the caller's callback; an `AsyncClient` awaits what it returns when that is a coroutine."""

    callback: Callable[[Any], object]
    value: Any


@dataclass(frozen=True)
class Emit(Generic[E_co]):
    """Hand an event to whoever iterates the operation (`iter_analyze`), then go on."""

    event: E_co


Effect: TypeAlias = Request | Sleep | Connect | Send | Receive | Notify
Plan: TypeAlias = Generator[Effect, Any, T]
"""An operation that ends in one answer, `T`."""
Events: TypeAlias = Generator[Effect | Emit[E], Any, None]
"""An operation that hands out events, `E`, as they come."""


class Steps(Generic[T]):
    """A plan on its way: `next()` is the effect it asks for, or None once it has returned (its answer is then
    `value`); the driver hands back each outcome with `answer`, or with `fail` when the effect raised."""

    def __init__(self, plan: Generator[Effect | Emit[Any], Any, T]) -> None:
        self._plan = plan
        self._reply: Any = None
        self._error: Exception | None = None

    def next(self) -> Effect | Emit[Any] | None:
        reply, error = self._reply, self._error
        self._reply, self._error = None, None
        try:
            return self._plan.throw(error) if error is not None else self._plan.send(reply)
        except StopIteration as stop:
            self.value: T = stop.value
            return None

    def answer(self, reply: Any) -> None:
        self._reply = reply

    def fail(self, error: Exception) -> None:
        self._error = error

    def close(self) -> None:
        """Stop a plan its caller left unfinished (an iteration broken off)."""
        self._plan.close()


# -- plans as public methods ----------------------------------------------------------------------------------------
def _bind(plan: Callable[..., Any], client: Any, drive: Callable[[Any], Any]) -> Callable[..., Any]:
    """The public method: builds the plan for the caller's arguments and hands it to the client's driver."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return drive(plan(client, *args, **kwargs))

    call.__name__ = plan.__name__
    call.__qualname__ = plan.__qualname__
    call.__doc__ = plan.__doc__
    return call


class _PlanMethod(Generic[F]):
    """A plan that is a public method; `plan` is the plan itself, for other plans to run as a step of theirs."""

    def __init__(self, plan: F) -> None:
        self.plan = plan
        self.__doc__ = plan.__doc__


class operation(_PlanMethod[Callable[Concatenate[Any, P], Plan[T]]]):
    """A method that ends in one answer: on a `Client` it blocks for it, on an `AsyncClient` it is awaited."""

    @overload
    def __get__(self, client: None, owner: type) -> operation[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: Client | AsyncClient | None, owner: type) -> Any:
        return self if client is None else _bind(self.plan, client, client._run)


class iteration(_PlanMethod[Callable[Concatenate[Any, P], Events[E]]]):
    """A method whose events are iterated as they come: an iterator on a `Client`, an async one on an
    `AsyncClient`."""

    @overload
    def __get__(self, client: None, owner: type) -> iteration[P, E]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, Iterator[E]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, AsyncIterator[E]]: ...
    def __get__(self, client: Client | AsyncClient | None, owner: type) -> Any:
        return self if client is None else _bind(self.plan, client, client._iterate)


class streaming(_PlanMethod[Callable[Concatenate[Any, P], Plan[httpx.Response]]]):
    """A method whose answer is a streamed generation: `GenerationStream` on a `Client`,
    `AsyncGenerationStream` (awaited) on an `AsyncClient`. The plan ends with the streamed response."""

    @overload
    def __get__(self, client: None, owner: type) -> streaming[P]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, GenerationStream]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type
    ) -> Callable[P, Coroutine[Any, Any, AsyncGenerationStream]]: ...
    def __get__(self, client: Client | AsyncClient | None, owner: type) -> Any:
        return self if client is None else _bind(self.plan, client, client._open_stream)
