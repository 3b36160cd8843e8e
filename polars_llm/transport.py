"""HTTP to an OpenAI-compatible endpoint through the official SDK, with our own error types.

One ``OpenAITransport`` per endpoint, key and timeout lives on the engine loop for the life of
the process. The
SDK's own retries are off (``max_retries=0``): the engine owns the retry policy, because the SDK
gives up after about 1.5 s, far too soon for a 429 storm.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx2
import openai

from .errors import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    RowError,
    ServerError,
)


@dataclass(frozen=True)
class Completion:
    """What a chat completion returned."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


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


class OpenAITransport:
    """A long-lived ``AsyncOpenAI`` client (aiohttp backend) for one endpoint on one loop."""

    def __init__(self, base_url: str, api_key: str, timeout: float, max_connections: int) -> None:
        self.base_url = base_url
        # Keep-alive connections must cover the concurrency, or every request beyond the pool
        # pays for a new TCP connection.
        limits = httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)),
            http_client=openai.DefaultAioHttpClient(limits=limits),
        )

    async def chat(self, body: Mapping[str, Any]) -> Completion:
        """One chat completion.

        Sent with the client's documented ``post`` for custom requests, which skips the SDK's
        per-request transformation of typed parameters and its response models (together about
        a third of the client's CPU per request); the body is plain JSON we built ourselves and
        the answer is read as raw JSON.
        """
        data = await self._post_json("/chat/completions", body)
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Completion(
                text=choice["message"].get("content"),
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise _unexpected(data) from e

    async def embed(
        self, model: str, inputs: Sequence[str], params: Mapping[str, Any]
    ) -> Embeddings:
        """Embeddings of several inputs in one request, in input order."""
        body = {"model": model, "input": list(inputs), "encoding_format": "float", **params}
        data = await self._post_json("/embeddings", body)
        try:
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in d["embedding"]] for d in items]
            usage = data.get("usage") or {}
            tokens = int(usage.get("prompt_tokens") or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _unexpected(data) from e
        if len(vectors) != len(inputs):
            raise ServerError(f"asked for {len(inputs)} embeddings, got {len(vectors)}")
        return Embeddings(vectors=vectors, prompt_tokens=tokens)

    async def _post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST a JSON body through the SDK's client; the answer's JSON, or our error."""
        try:
            response = await self._client.post(path, body=body, cast_to=httpx2.Response)
            return json.loads(response.content)
        except openai.OpenAIError as e:
            raise map_error(e, self.base_url) from e
        except json.JSONDecodeError as e:
            raise ServerError(f"the endpoint returned a body that is not JSON: {e}") from e

    async def aclose(self) -> None:
        await self._client.close()


def _unexpected(data: Any) -> ServerError:
    return ServerError(f"the endpoint returned an unexpected body: {str(data)[:200]}")


def map_error(error: openai.OpenAIError, base_url: str) -> RowError:
    """Our error for an SDK error, with a message that says what to do."""
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
        status = error.status_code
        detail = _error_detail(error)
        headers = error.response.headers
        if status == 429 and _error_code(error) == "insufficient_quota":
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


def _error_code(error: openai.APIStatusError) -> str | None:
    body = error.body
    inner = body.get("error", body) if isinstance(body, Mapping) else None
    if isinstance(inner, Mapping):
        return str(inner.get("code") or inner.get("type") or "") or None
    return None


def _error_detail(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])[:300]
        if body.get("message"):
            return str(body["message"])[:300]
    return str(error.message)[:300]


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
        parse_duration(headers[h])
        for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if headers.get(h)
    ]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None
