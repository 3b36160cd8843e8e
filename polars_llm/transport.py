"""HTTP to an OpenAI-compatible endpoint, with our own error types.

Two transports sit behind one protocol, and ``make_transport`` picks one
(``Settings.transport``):

- ``AiohttpTransport`` (``"aiohttp"``, the default) talks HTTP through one
  ``aiohttp.ClientSession`` and encodes and decodes JSON with orjson. It spends a fraction of
  the SDK's client CPU per request, which is what bounds a run against a fast local server.
- ``OpenAITransport`` (``"openai"``) goes through the official SDK, for providers with quirks
  that the SDK knows (Azure's ``api-version`` and ``api-key`` header).

One transport per endpoint, key and timeout lives on the engine loop. Neither retries: the engine
owns the retry policy, because the SDK's gives up after about 1.5 s, far too soon for a 429 storm.
Both turn an HTTP status into the same error (``status_error``) and read the same retry headers,
and both bound every request the same way:

- ``timeout`` covers the whole request, body included: a body that drips in slowly is cut off.
- A response body may hold at most ``CHAT_BODY_CAP`` bytes (chat) or ``EMBED_BODY_CAP`` bytes
  (embeddings); past that the row gets a ``ContentError`` and the connection is dropped, so a
  body that never ends cannot grow the process.
- An answer that is not valid UTF-8 or holds a lone surrogate (``"\\ud800"``) is that row's
  ``ContentError``; a ``usage`` field that is not a count counts 0 and keeps the answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import aiohttp
import orjson
from yarl import URL

from .errors import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    ContentError,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    RowError,
    ServerError,
)

if TYPE_CHECKING:  # the SDK is imported when an OpenAITransport is made: it takes a second
    import httpx2
    import openai

# Largest response bodies read, in bytes. A chat answer of a whole context window with logprobs
# fits in a few MB; embeddings of ``batch_size`` inputs are larger (256 inputs of 3,072
# dimensions are about 17 MB of JSON).
CHAT_BODY_CAP = 16 * 1024 * 1024
EMBED_BODY_CAP = 128 * 1024 * 1024
# Connecting may take at most this long (or the timeout, if shorter).
CONNECT_TIMEOUT = 10.0

# While a transport's pool fills (its first C requests), at most this many requests at a time
# go into aiohttp before they have a connection; each lets the next one in once it has its
# connection. Let in all at once, C requests advance a step each per turn of the loop, every
# connection is half made before any is whole, and at C=1,024 the first request reached the
# server 0.5-0.85 s after the call; now 0.11-0.26 s, and the others follow one by one.
OPENING = 32
# A request that waits its turn longer than this goes anyway (behind connects to a blackholed
# host, the queue would otherwise wait a connect timeout for each OPENING requests).
OPENING_WAIT = 1.0

TransportKind = Literal["aiohttp", "openai"]


def _connect_timeout(timeout: float | None) -> float:
    """Seconds a connection may take: CONNECT_TIMEOUT, or the request's timeout if shorter."""
    return CONNECT_TIMEOUT if timeout is None else min(timeout, CONNECT_TIMEOUT)


@dataclass(slots=True)  # one per answer: no frozen __setattr__ on the hot path
class Completion:
    """What a chat completion returned."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    headers: Mapping[str, str] = field(default_factory=dict)
    """The answer's ``x-ratelimit-*`` headers, names lower-cased, so a limiter can learn limits."""


@dataclass(frozen=True)
class Embeddings:
    """What an embeddings call returned: one vector per input, in input order."""

    vectors: list[list[float]]
    prompt_tokens: int


class Transport(Protocol):
    """Sends one request and returns its answer, or raises a ``RowError``."""

    async def chat(self, body: Mapping[str, Any]) -> Completion: ...

    async def embed(
        self, model: str, inputs: Sequence[str], params: Mapping[str, Any]
    ) -> Embeddings: ...

    async def aclose(self) -> None: ...


def make_transport(
    kind: TransportKind, base_url: str, api_key: str, timeout: float | None, concurrency: int
) -> Transport:
    """The transport ``kind`` for one endpoint and key, with a connection pool for ``concurrency``.

    ``timeout`` bounds each whole request; None leaves that to the caller (the engine bounds
    every request itself, so the transport need not arm a second timer per request).
    """
    if kind == "openai":
        return OpenAITransport(base_url, api_key, timeout, max_connections=max(1, concurrency))
    return AiohttpTransport(base_url, api_key, timeout, concurrency)


# --------------------------------------------------------------------------------------------
# The lean transport
# --------------------------------------------------------------------------------------------
class _Turn:
    """A request's place among the ``OPENING`` let in while the pool fills; given back once."""

    __slots__ = ("_gate",)

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self._gate: asyncio.Semaphore | None = gate

    def give_back(self) -> None:
        if self._gate is not None:
            self._gate.release()
            self._gate = None


# The turn of the request the current task is sending, seen by the connector.
_TURN: contextvars.ContextVar[_Turn | None] = contextvars.ContextVar(
    "polars_llm_turn", default=None
)


class _FillingConnector(aiohttp.TCPConnector):
    """A TCPConnector that lets its first ``fill`` requests at it ``OPENING`` at a time.

    ``turn()`` waits for a place while the pool fills; ``connect`` gives it back once the request
    has its connection (new, reused or failed). After ``fill`` requests nothing waits.
    """

    def __init__(self, fill: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filling = max(1, fill)  # requests still to let in one turn at a time
        self._gate = asyncio.Semaphore(OPENING)

    async def turn(self) -> _Turn | None:
        self.filling -= 1
        try:
            async with asyncio.timeout(OPENING_WAIT):
                await self._gate.acquire()
        except TimeoutError:  # the requests ahead are stuck connecting: go anyway
            return None
        turn = _Turn(self._gate)
        _TURN.set(turn)
        return turn

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().connect(*args, **kwargs)
        finally:
            if (turn := _TURN.get()) is not None:
                turn.give_back()


class AiohttpTransport:
    """One ``aiohttp.ClientSession`` for one endpoint and key, on the loop that first uses it."""

    def __init__(
        self, base_url: str, api_key: str, timeout: float | None, concurrency: int
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # Parsed once: aiohttp would parse a str URL on every request.
        self._chat_url = URL(self.base_url + "/chat/completions")
        self._embed_url = URL(self.base_url + "/embeddings")
        self._api_key = api_key
        # The limiter bounds requests in flight; the pool keeps a connection alive for each of
        # them. Its cap is a backstop with room to spare, so that a request sent beside a hung
        # one (a hedge) never waits for a socket.
        self._concurrency = max(1, concurrency)
        self._pool_size = 2 * self._concurrency
        self._session: aiohttp.ClientSession | None = None
        self._connector: _FillingConnector | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, on the loop that runs the requests: a session belongs to one loop.
        self._connector = connector = _FillingConnector(
            self._concurrency, limit=self._pool_size, limit_per_host=0
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "polars-llm",
            },
            # total bounds the whole request, the body included (aiohttp's sock_read alone
            # would let a body drip in for ever).
            timeout=aiohttp.ClientTimeout(
                total=self.timeout,
                sock_connect=_connect_timeout(self.timeout),
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            # Errors are read from the status ourselves; aiohttp's own check would raise first.
            raise_for_status=False,
        )
        return self._session

    async def chat(self, body: Mapping[str, Any]) -> Completion:
        """One chat completion."""
        data, headers = await self._post(self._chat_url, body, CHAT_BODY_CAP)
        return completion_from(data, headers)

    async def embed(
        self, model: str, inputs: Sequence[str], params: Mapping[str, Any]
    ) -> Embeddings:
        """Embeddings of several inputs in one request, in input order."""
        body = {"model": model, "input": list(inputs), "encoding_format": "float", **params}
        data, _ = await self._post(self._embed_url, body, EMBED_BODY_CAP)
        return embeddings_from(data, len(inputs))

    async def _post(self, url: URL, body: Mapping[str, Any], cap: int) -> tuple[Any, Any]:
        """POST a JSON body; the answer's JSON and headers, or our error."""
        session = self._session or self._open()
        try:
            payload = orjson.dumps(body)
        except TypeError:  # what orjson refuses (e.g. integer keys), the standard library takes
            payload = json.dumps(body).encode()
        connector = self._connector
        turn = await connector.turn() if connector is not None and connector.filling > 0 else None
        try:
            async with session.post(url, data=payload) as response:
                status = response.status
                raw = await _read_capped(response, cap, self.base_url)
                headers = response.headers
        except TimeoutError as e:  # aiohttp's timeouts are asyncio.TimeoutErrors too
            raise RequestTimeout(f"no answer from {self.base_url} within the timeout") from e
        except aiohttp.ClientError as e:
            raise ConnectionFailed(f"connection to {self.base_url} failed: {e}") from e
        finally:
            if turn is not None:  # never reached the connector (failed or cancelled before)
                turn.give_back()
                _TURN.set(None)
        if status >= 300:
            raise status_error(status, _error_body(raw), headers, self.base_url)
        return decode_json(raw), headers

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_capped(response: aiohttp.ClientResponse, cap: int, base_url: str) -> bytes:
    """The response body, or a ContentError (and a dropped connection) once it passes ``cap``."""
    length = response.content_length
    if length is not None and length > cap:
        response.close()
        raise _too_large(base_url, cap)
    if length is not None and "Content-Encoding" not in response.headers:
        return await response.read()  # the common case: a known, small, uncompressed length
    # Chunked, or compressed (the length is not what decompression gives): count as it comes.
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > cap:
            response.close()
            raise _too_large(base_url, cap)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(base_url: str, cap: int) -> ContentError:
    return ContentError(
        f"the answer from {base_url} passed {cap // (1024 * 1024)} MiB, the largest body "
        "polars-llm reads; the endpoint is misbehaving, or ask for less per request "
        "(max_tokens, or a smaller batch_size for embeddings)"
    )


# --------------------------------------------------------------------------------------------
# The SDK transport
# --------------------------------------------------------------------------------------------
# The SDK's switch for handing back the response with its body still unread, so that we can
# read it under the size cap.
_UNREAD_BODY = {"X-Stainless-Raw-Response": "stream"}


class OpenAITransport:
    """A long-lived ``AsyncOpenAI`` client (aiohttp backend) for one endpoint on one loop."""

    def __init__(
        self, base_url: str, api_key: str, timeout: float | None, max_connections: int
    ) -> None:
        import httpx2
        import openai

        self.base_url = base_url
        self.timeout = timeout
        # Keep-alive connections must cover the concurrency, or every request beyond the pool
        # pays for a new TCP connection.
        limits = httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=httpx2.Timeout(timeout, connect=_connect_timeout(timeout)),
            http_client=openai.DefaultAioHttpClient(limits=limits),
        )

    async def chat(self, body: Mapping[str, Any]) -> Completion:
        """One chat completion.

        Sent with the client's documented ``post`` for custom requests, which skips the SDK's
        per-request transformation of typed parameters and its response models; the body is
        plain JSON we built ourselves and the answer is read as raw JSON.
        """
        data, headers = await self._post_json("/chat/completions", body, CHAT_BODY_CAP)
        return completion_from(data, headers)

    async def embed(
        self, model: str, inputs: Sequence[str], params: Mapping[str, Any]
    ) -> Embeddings:
        """Embeddings of several inputs in one request, in input order."""
        body = {"model": model, "input": list(inputs), "encoding_format": "float", **params}
        data, _ = await self._post_json("/embeddings", body, EMBED_BODY_CAP)
        return embeddings_from(data, len(inputs))

    async def _post_json(self, path: str, body: Mapping[str, Any], cap: int) -> tuple[Any, Any]:
        """POST a JSON body through the SDK's client; the answer's JSON and headers, or our error."""
        import httpx2
        import openai

        try:
            # The SDK's timeouts are per read: only a deadline of our own bounds the body.
            raw, headers = await asyncio.wait_for(self._exchange(path, body, cap), self.timeout)
        except openai.OpenAIError as e:
            raise map_error(e, self.base_url) from e
        except (TimeoutError, httpx2.TimeoutException) as e:
            raise RequestTimeout(f"no answer from {self.base_url} within the timeout") from e
        except httpx2.TransportError as e:  # the body broke off after the SDK handed it over
            raise ConnectionFailed(f"connection to {self.base_url} failed: {e}") from e
        return decode_json(raw), headers

    async def _exchange(
        self, path: str, body: Mapping[str, Any], cap: int
    ) -> tuple[bytes, httpx2.Headers]:
        import httpx2

        response = await self._client.post(
            path, body=body, cast_to=httpx2.Response, options={"headers": _UNREAD_BODY}
        )
        try:
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise _too_large(self.base_url, cap)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise _too_large(self.base_url, cap)
                chunks.append(chunk)
        finally:
            await response.aclose()
        return b"".join(chunks), response.headers

    async def aclose(self) -> None:
        await self._client.close()


def map_error(error: openai.OpenAIError, base_url: str) -> RowError:
    """Our error for an SDK error, with a message that says what to do."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        refused = _connection_refused(error)
        if refused is not None:
            return ConnectionFailed(f"connection to {base_url} failed: {refused}")
        return RequestTimeout(f"no answer from {base_url} within the timeout")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        detail = f": {cause}" if cause else ""
        return ConnectionFailed(f"connection to {base_url} failed{detail}")
    if isinstance(error, openai.APIStatusError):
        return status_error(
            error.status_code, error.body, error.response.headers, base_url, str(error.message)
        )
    return RowError(f"unexpected error from the OpenAI client: {error}")


def _connection_refused(error: BaseException) -> BaseException | None:
    """The connection error behind a "timeout", if any.

    The SDK's aiohttp backend reports a refused connection as a connect timeout; telling them
    apart lets the engine stop a batch whose endpoint is not there at all.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, aiohttp.ClientConnectorError) and not isinstance(
            cause, aiohttp.ServerTimeoutError
        ):
            return cause
        if isinstance(cause, ConnectionRefusedError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


# --------------------------------------------------------------------------------------------
# Shared by both: answers, errors, retry headers
# --------------------------------------------------------------------------------------------
def decode_json(raw: bytes) -> Any:
    """The JSON of a 2xx body, or the error that says why it cannot be read."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _undecodable(raw) from e


def _undecodable(raw: bytes) -> RowError:
    # Only on the failure path: tell a broken answer (this row's problem) from a body that is not
    # JSON at all (a proxy's error page: the endpoint's problem, worth another attempt).
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return ContentError(f"the endpoint's answer is not valid UTF-8 ({e})")
    try:
        json.loads(text)
    except ValueError:
        return ServerError(f"the endpoint returned a body that is not JSON: {text[:200]!r}")
    # Valid for Python's json, refused by orjson: a lone surrogate escape such as "\ud800",
    # which no UTF-8 text (a cache entry, a Parquet column) can hold.
    return ContentError("the endpoint's answer holds a lone surrogate (an invalid \\ud800 escape)")


def completion_from(data: Any, headers: Mapping[str, str]) -> Completion:
    """A Completion from the JSON of a chat answer."""
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content")
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise _unexpected(data) from e
    if not (text is None or isinstance(text, str)):
        raise _unexpected(data)
    usage = data.get("usage")
    return Completion(
        text=text,
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=_count(usage, "prompt_tokens"),
        completion_tokens=_count(usage, "completion_tokens"),
        headers=_rate_headers(headers),
    )


def embeddings_from(data: Any, expected: int) -> Embeddings:
    """Embeddings from the JSON of an embeddings answer of ``expected`` inputs."""
    try:
        items = sorted(data["data"], key=lambda d: d.get("index", 0))
        vectors = [[float(x) for x in d["embedding"]] for d in items]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _unexpected(data) from e
    if len(vectors) != expected:
        raise ServerError(f"asked for {expected} embeddings, got {len(vectors)}")
    return Embeddings(vectors=vectors, prompt_tokens=_count(data.get("usage"), "prompt_tokens"))


def _count(usage: Any, name: str) -> int:
    """A token count from ``usage``; 0 when it is missing or not a count, so the answer stays."""
    if not isinstance(usage, dict):
        return 0
    value = usage.get(name)
    if type(value) is int:
        return max(0, value)
    if type(value) is float and value.is_integer():
        return max(0, int(value))
    return 0


def _rate_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    return {
        name.lower(): value
        for name, value in headers.items()
        if name[:12].lower() == "x-ratelimit-"
    }


def _unexpected(data: Any) -> ServerError:
    return ServerError(f"the endpoint returned an unexpected body: {str(data)[:200]}")


def _error_body(raw: bytes) -> Any:
    """An error answer's JSON, or its text when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()


def status_error(
    status: int, body: Any, headers: Mapping[str, str], base_url: str, fallback: str = ""
) -> RowError:
    """Our error for an HTTP error status, with a message that says what to do.

    ``body`` is the answer's JSON (or its text); ``fallback`` describes the error when the body
    says nothing.
    """
    detail = _error_detail(body) or fallback[:300] or f"HTTP {status}"
    if status == 429 and _error_code(body) == "insufficient_quota":
        return QuotaExceeded(
            f"{base_url} says the account is out of quota ({detail}). Add credit or use "
            "another key; retrying will not help.",
            status=status,
        )
    if status == 429:
        return RateLimited(
            f"rate limited (429) by {base_url}: {detail}",
            status=status,
            retry_after=retry_after(headers),
        )
    if status in (401, 403):
        return AuthError(
            f"{base_url} refused the API key ({status}: {detail}). Give a valid key that "
            "may use this model ($OPENAI_API_KEY, api_key= or --api-key).",
            status=status,
        )
    if status == 404:
        return ModelNotFound(
            f"{base_url} answered 404 ({detail}). Check the model name (model= or --model) "
            "and that the endpoint URL ends with the API root (usually /v1).",
            status=status,
        )
    if status in (408, 409) or status >= 500:
        return ServerError(
            f"{base_url} failed ({status}: {detail})",
            status=status,
            retry_after=retry_after(headers),
        )
    return BadRequest(f"{base_url} rejected the request ({status}: {detail})", status=status)


def _error_code(body: Any) -> str | None:
    inner = body.get("error", body) if isinstance(body, Mapping) else None
    if isinstance(inner, Mapping):
        return str(inner.get("code") or inner.get("type") or "") or None
    return None


def _error_detail(body: Any) -> str:
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])[:300]
        if body.get("message"):
            return str(body["message"])[:300]
        return ""
    return str(body)[:300] if body else ""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """Seconds in an x-ratelimit-reset value such as ``"1s"``, ``"6m0s"`` or ``"120ms"``."""
    parts = _DURATION.findall(text.strip())
    if not parts:
        return None
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * unit[u] for n, u in parts)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the endpoint asks us to wait, from retry-after-ms, retry-after or x-ratelimit-reset."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                parsed = None  # neither seconds nor an HTTP date: ignore it
            if parsed is not None:
                return max(0.0, parsed.timestamp() - time.time())
    resets = [
        r
        for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if headers.get(h) and (r := parse_duration(headers[h])) is not None
    ]
    return max(resets) if resets else None
