"""A fake OpenAI-compatible HTTP server for tests, benchmarks and users' own tests.

It speaks enough of the OpenAI API for the official ``openai`` SDK to talk to it
unchanged, over real HTTP on 127.0.0.1::

    from polars_llm.testing import FakeServer

    with FakeServer(latency=0.05, rpm=600, error_rate=0.1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        ...
        assert server.stats().status_counts[200] > 0

What it serves:

- ``POST /v1/chat/completions``: replies ``"echo: <last user message>"``; with
  ``response_format`` of type ``json_schema`` a JSON document that validates against the
  schema; a ``reply(body)`` callable overrides both. ``max_tokens`` truncates the reply
  and sets ``finish_reason`` to ``"length"``.
- ``POST /v1/embeddings``: deterministic unit-norm vectors (equal texts, equal vectors).
- ``GET /v1/models``: the configured models, or ``fake-model``.
- ``GET /_fake/stats`` and ``POST /_fake/reset``: the counters, for a server in another
  process (see :func:`spawn_server`); ``GET /_fake/timeline``: when each call arrived and
  was answered (:meth:`FakeServer.timeline`).
- ``/v1/files`` and ``/v1/batches``: the Batch API, on a clock tests can advance
  (``advance_batches``, ``POST /_fake/batches/advance``); see :mod:`polars_llm._fake_batches`.

Faults (bad key, unknown model, RPM/TPM limits with OpenAI's 429 headers, 5xx, hung
requests, reset connections) are decided per request by a random generator seeded with
``seed``, so a given arrival order always gives the same faults.

``python -m polars_llm.testing --port 0 ...`` runs one from the command line and prints
its base URL as the first line of its output.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ._fake_batches import FakeBatches
from .options import CHAT_PARAMS, EMBED_PARAMS

__all__ = [
    "FakeServer",
    "FakeStats",
    "FakeTimeline",
    "RemoteFakeServer",
    "embedding_vector",
    "estimate_tokens",
    "schema_example",
    "spawn_server",
]

DEFAULT_MODEL = "fake-model"

# Past this depth a recursive JSON schema gets its smallest valid value (null, [] or
# only the required keys), so that generation always ends.
_MAX_SCHEMA_DEPTH = 12

# How long stop() waits for the server loop to wind down before giving up on it. The
# loop runs in a daemon thread, so a server that does not stop in time cannot keep the
# process alive either.
_STOP_TIMEOUT = 5.0


@dataclass
class FakeStats:
    """What the fake server has seen since it started or was last reset (a snapshot)."""

    calls: int = 0
    """Every request to /v1/chat/completions or /v1/embeddings, whatever the answer."""
    chat_calls: int = 0
    embedding_calls: int = 0
    embedding_inputs: int = 0
    """Total inputs across embedding calls."""
    in_flight: int = 0
    max_in_flight: int = 0
    """The highest number of requests being handled at once."""
    status_counts: dict[int, int] = field(default_factory=dict)
    """HTTP status -> count. Reset connections count under 0; hung requests under none."""
    prompts: dict[str, int] = field(default_factory=dict)
    """Last user message of each chat call -> how many times it was received."""
    paid: dict[str, int] = field(default_factory=dict)
    """Last user message of each chat call admitted past the rate limits (charged) -> count."""
    tokens: int = 0
    """Tokens charged to admitted requests, estimated as for the TPM limit."""
    files_uploaded: int = 0
    batches_created: int = 0
    batch_lines: int = 0
    """Request lines in the input files of the batches created."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FakeStats:
        """Rebuild a snapshot from its JSON form, where status codes became strings."""
        data = dict(data)
        data["status_counts"] = {int(k): v for k, v in data.get("status_counts", {}).items()}
        return cls(**data)


@dataclass
class FakeTimeline:
    """When each call arrived and when it was answered since the server started or was last
    reset, in ``time.monotonic()`` seconds: one clock for every process of the machine, so a
    client can set the times against its own (benchmarks read the pace of a run from it)."""

    arrived: list[float] = field(default_factory=list)
    """Arrival of every chat and embeddings call, in order."""
    answered: list[float] = field(default_factory=list)
    """The moment each answer (of any status) was handed to the connection, in order; calls
    cut short (hung, reset, cancelled) have none."""


def estimate_tokens(text: str) -> int:
    """Count tokens the way the fake server does: four characters each, at least one."""
    return max(1, len(text) // 4)


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1, run on its own event loop in a thread.

    ``latency`` and ``jitter`` set how long each answer takes (``latency`` plus or minus
    up to ``jitter`` seconds). ``rpm`` and ``tpm`` are per-minute limits enforced with
    token buckets holding ``burst_seconds`` worth of the limit; with ``per_second`` they are
    enforced per fixed one-second window instead (a sixtieth of the limit in each), as OpenAI
    may: a burst on top of the rate is then refused. ``rate_headers=False`` leaves out the
    ``x-ratelimit-*`` headers that state the limits, as servers that only answer 429 do.
    ``error_rate``,
    ``hang_rate`` and ``reset_rate`` are the shares of requests answered with a 5xx,
    left without an answer for ``hang_seconds`` (then answered as usual), or whose
    connection is reset.
    ``api_key`` and ``models``, when given, are the only key and models accepted.
    ``quota_exhausted`` answers every request 429 ``insufficient_quota``, as OpenAI does for an
    account out of credit.
    ``broken_answers`` maps a prompt (the last user message, or an embeddings call's first
    input) to how its answer goes wrong: ``"drip"`` (the body comes one byte a second),
    ``"endless"`` (a body that never ends), ``"invalid-utf8"`` (raw bytes that are not UTF-8)
    or ``"bad-usage"`` (a ``usage`` field whose counts are not numbers).
    ``retry_after``, when given, is the ``retry-after`` header of every 429 (and the only
    wait the 429 names), e.g. ``"100000"`` for a server that asks for a day.
    ``strict_params`` answers 400 to a body field that is not an OpenAI parameter, as OpenAI
    does ("Unrecognized request argument supplied").
    ``reply(body)`` returns the chat reply text, instead of the default echo or
    schema-valid JSON; it runs on the server's event loop, so it should be quick.
    Requests run concurrently on that loop; ``stats()``, ``reset_stats()`` and
    ``history`` may be called from any thread.
    Batches spend ``batch_seconds`` in progress on their clock (see ``advance_batches``); a
    ``batch_error_rate`` share of their lines is answered 500 and a ``batch_expire_rate`` share
    is left undone when the batch expires; lines whose prompt contains ``batch_refuse`` are
    answered 400; a batch of more than ``batch_max_lines`` lines fails validation.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        reply: Callable[[dict], str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        burst_seconds: float = 1.0,
        per_second: bool = False,
        rate_headers: bool = True,
        error_rate: float = 0.0,
        hang_rate: float = 0.0,
        reset_rate: float = 0.0,
        hang_seconds: float = 3600.0,
        api_key: str | None = None,
        models: Iterable[str] | None = None,
        quota_exhausted: bool = False,
        broken_answers: Mapping[str, str] | None = None,
        retry_after: str | None = None,
        strict_params: bool = True,
        embedding_dim: int = 8,
        batch_seconds: float = 1.0,
        batch_error_rate: float = 0.0,
        batch_expire_rate: float = 0.0,
        batch_refuse: str | None = None,
        batch_max_lines: int = 50_000,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        for name, rate in (
            ("error_rate", error_rate),
            ("hang_rate", hang_rate),
            ("reset_rate", reset_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        if error_rate + hang_rate + reset_rate > 1.0 + 1e-9:
            raise ValueError("error_rate + hang_rate + reset_rate must not exceed 1")
        for name, limit in (("rpm", rpm), ("tpm", tpm)):
            if limit is not None and limit <= 0:
                raise ValueError(f"{name} must be positive, got {limit}")
        if burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be positive, got {burst_seconds}")
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        self.latency = latency
        self.jitter = jitter
        self.reply = reply
        self.rpm = rpm
        self.tpm = tpm
        self.burst_seconds = burst_seconds
        self.per_second = per_second
        self.rate_headers = rate_headers
        self.error_rate = error_rate
        self.hang_rate = hang_rate
        self.reset_rate = reset_rate
        self.hang_seconds = hang_seconds
        self.api_key = api_key
        self.models = list(models) if models is not None else None
        self.quota_exhausted = quota_exhausted
        self.broken_answers = dict(broken_answers or {})
        for kind in self.broken_answers.values():
            if kind not in BROKEN_ANSWERS:
                raise ValueError(f"broken_answers: {kind!r} is none of {', '.join(BROKEN_ANSWERS)}")
        self.retry_after = retry_after
        self.strict_params = strict_params
        self.embedding_dim = embedding_dim
        self.seed = seed
        self.host = host
        self.port = port
        self.base_url = ""

        self._rng = random.Random(seed)
        limiter = _Window if per_second else _Bucket
        self._request_bucket: _Bucket | None = limiter(rpm, burst_seconds) if rpm else None
        self._token_bucket: _Bucket | None = limiter(tpm, burst_seconds) if tpm else None
        # Counters change on the server loop and are read from test threads: the lock
        # keeps a snapshot from seeing a dict in the middle of an update.
        self._lock = threading.Lock()
        self._stats = FakeStats()
        self._history: list[dict] = []
        # Doubles in arrays: 8 bytes a call, for servers that answer millions.
        self._arrived = array.array("d")
        self._answered = array.array("d")
        self._ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._batches = FakeBatches(
            self,
            batch_seconds=batch_seconds,
            error_rate=batch_error_rate,
            expire_rate=batch_expire_rate,
            refuse=batch_refuse,
            max_lines=batch_max_lines,
            seed=seed,
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeServer:
        """Start serving in a daemon thread; returns once the port is listening."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as exc:  # handed to start(), which re-raises it
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="polars-llm-fake-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._loop = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving, cutting short requests still in progress (hung ones too)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = None
        self._thread = None
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=_STOP_TIMEOUT)
        with contextlib.suppress(RuntimeError):  # the loop already ended on its own
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_STOP_TIMEOUT)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- observation -----------------------------------------------------------------

    def stats(self) -> FakeStats:
        """A consistent copy of the counters, safe to take from any thread."""
        with self._lock:
            snapshot = FakeStats(**asdict(self._stats))
        return snapshot

    def reset_stats(self) -> None:
        """Zero the counters and forget the history; requests in flight stay counted."""
        with self._lock:
            in_flight = self._stats.in_flight
            self._stats = FakeStats(in_flight=in_flight, max_in_flight=in_flight)
            self._history = []
            self._arrived = array.array("d")
            self._answered = array.array("d")

    def timeline(self) -> FakeTimeline:
        """When each call since the start or the last reset arrived and was answered."""
        with self._lock:
            return FakeTimeline(arrived=self._arrived.tolist(), answered=self._answered.tolist())

    def advance_batches(self, seconds: float) -> None:
        """Move the batches' clock ``seconds`` forward (safe from any thread)."""
        if self._loop is None:
            self._batches.advance(seconds)
            return
        asyncio.run_coroutine_threadsafe(_call(self._batches.advance, seconds), self._loop).result()

    @property
    def history(self) -> list[dict]:
        """Every JSON request body received (chat and embeddings), in arrival order."""
        with self._lock:
            return list(self._history)

    # -- aiohttp plumbing ------------------------------------------------------------

    async def _start_site(self) -> None:
        # Batch input files run up to 200 MB.
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model}", self._get_model)
        app.router.add_get("/_fake/stats", self._stats_endpoint)
        app.router.add_post("/_fake/reset", self._reset_endpoint)
        app.router.add_get("/_fake/timeline", self._timeline_endpoint)
        self._batches.add_routes(app)
        # handler_cancellation: a client that gives up (timeout) ends its request here
        # too, so in_flight counts what clients are still waiting for.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        # A deep backlog, because benchmarks open hundreds of connections at once.
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048)
        await site.start()
        # With port 0 the system picked the port: read it back from the listening socket.
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{self.port}/v1"

    async def _shutdown(self) -> None:
        # Cancel our own handlers first: aiohttp would otherwise wait for hung requests
        # up to its shutdown timeout (60 s by default).
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(self._runner.cleanup(), timeout=_STOP_TIMEOUT - 1)

    async def _stats_endpoint(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats()))

    async def _timeline_endpoint(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.timeline()))

    async def _reset_endpoint(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response({"ok": True})

    async def _list_models(self, request: web.Request) -> web.Response:
        if (refusal := self._check_key(request)) is not None:
            return refusal
        data = [_model_object(m) for m in (self.models or [DEFAULT_MODEL])]
        return web.json_response({"object": "list", "data": data})

    async def _get_model(self, request: web.Request) -> web.Response:
        if (refusal := self._check_key(request)) is not None:
            return refusal
        model = request.match_info["model"]
        if (refusal := self._check_model(model)) is not None:
            return refusal
        return web.json_response(_model_object(model))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    # -- the request path ------------------------------------------------------------

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        # Every request draws the same three numbers, whatever the settings, so the
        # faults depend only on the seed and the arrival order.
        fault_draw, kind_draw, jitter_draw = (
            self._rng.random(),
            self._rng.random(),
            self._rng.random(),
        )
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        with self._lock:
            self._arrived.append(time.monotonic())
            stats = self._stats
            stats.calls += 1
            if chat:
                stats.chat_calls += 1
            else:
                stats.embedding_calls += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        status: int | None = None
        try:
            response = await self._answer(request, chat, fault_draw, kind_draw, jitter_draw)
            status = 0 if response is None else response.status
            return response if response is not None else web.Response(status=500)
        finally:
            with self._lock:
                # reset_stats() may have replaced the counters while this request ran.
                stats = self._stats
                stats.in_flight = max(0, stats.in_flight - 1)
                if status is not None:
                    stats.status_counts[status] = stats.status_counts.get(status, 0) + 1
                    if status:  # 0: the connection was reset
                        self._answered.append(time.monotonic())
            if task is not None:
                self._tasks.discard(task)

    async def _answer(
        self,
        request: web.Request,
        chat: bool,
        fault_draw: float,
        kind_draw: float,
        jitter_draw: float,
    ) -> web.StreamResponse | None:
        """The response for one request, or None when its connection was reset."""
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")

        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                with self._lock:
                    self._history.append(body)
                return _error(400, "'messages' must be a non-empty array.", param="messages")
            prompt = _last_user_text(messages)
            texts = [prompt]
            with self._lock:
                self._history.append(body)
                self._stats.prompts[prompt] = self._stats.prompts.get(prompt, 0) + 1
            prompt_tokens = estimate_tokens("".join(_content_text(m) for m in messages))
        else:
            inputs = _embedding_inputs(body.get("input"))
            with self._lock:
                self._history.append(body)
                if inputs is not None:
                    self._stats.embedding_inputs += len(inputs)
            if inputs is None:
                return _error(
                    400, "'input' must be a string or a non-empty array of strings.", "input"
                )
            texts = inputs
            prompt_tokens = estimate_tokens("".join(texts))

        if (refusal := self._check_key(request)) is not None:
            return refusal
        model = body.get("model") or DEFAULT_MODEL
        if (refusal := self._check_model(model)) is not None:
            return refusal
        if body.get("stream"):
            return _error(400, "The fake server does not stream; call without stream=True.")
        if self.strict_params:
            known = _CHAT_FIELDS if chat else _EMBEDDING_FIELDS
            unknown = sorted(set(body) - known)
            if unknown:
                return _error(
                    400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
                )
        if self.quota_exhausted:
            return _error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                type_="insufficient_quota",
                code="insufficient_quota",
            )

        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            max_tokens = None
        cost = prompt_tokens + (max_tokens or 0)
        limited, headers = self._admit(model, cost)
        if limited is not None:
            return limited
        with self._lock:
            self._stats.tokens += cost
            if chat:
                self._stats.paid[prompt] = self._stats.paid.get(prompt, 0) + 1

        hang = fault_draw < self.error_rate + self.hang_rate and fault_draw >= self.error_rate
        if hang:
            await asyncio.sleep(self.hang_seconds)
        else:
            delay = self.latency + (2.0 * jitter_draw - 1.0) * self.jitter
            if delay > 0:
                await asyncio.sleep(delay)

        if fault_draw < self.error_rate:
            if kind_draw < 0.5:
                message = "The server had an error while processing your request. Sorry!"
                return _error(500, message, type_="server_error", headers=headers)
            message = "The engine is currently overloaded, please try again later."
            return _error(503, message, type_="server_error", headers=headers)
        resets_from = self.error_rate + self.hang_rate
        if resets_from <= fault_draw < resets_from + self.reset_rate:
            _reset_connection(request)
            return None

        if chat:
            response = self._chat_response(body, model, prompt, prompt_tokens, max_tokens, headers)
        else:
            response = self._embeddings_response(body, model, texts, prompt_tokens, headers)
        broken = self.broken_answers.get(texts[0]) if self.broken_answers else None
        if broken is not None and response.status == 200:
            return await _broken_answer(request, response, broken)
        return response

    def _check_key(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        given = request.headers.get("Authorization", "")
        token = given[len("Bearer ") :] if given.startswith("Bearer ") else ""
        if token == self.api_key:
            return None
        if not token:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            masked = token[:3] + "*" * max(0, len(token) - 7) + token[-4:]
            message = (
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
        return _error(401, message, code="invalid_api_key")

    def _check_model(self, model: str) -> web.Response | None:
        if self.models is None or model in self.models:
            return None
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error(404, message, code="model_not_found", param="model")

    def _admit(self, model: str, cost: int) -> tuple[web.Response | None, dict[str, str]]:
        """Charge the rate limits for a request, or the 429 that refuses it.

        Returns (None, the x-ratelimit-* headers) when the request fits.
        """
        now = time.monotonic()
        requests, tokens = self._request_bucket, self._token_bucket
        for bucket, amount, kind, unit in (
            (requests, 1, "requests", "RPM"),
            (tokens, cost, "tokens", "TPM"),
        ):
            if bucket is None:
                continue
            wait = bucket.wait(amount, now)
            if wait > 0:
                headers = self._limit_headers(now)
                wait_ms = max(1, math.ceil(wait * 1000))
                headers["retry-after-ms"] = str(wait_ms)
                headers["retry-after"] = str(max(1, math.ceil(wait_ms / 1000)))
                if self.retry_after is not None:
                    headers = {"retry-after": self.retry_after}
                message = (
                    f"Rate limit reached for {model} in organization org-fake on {kind} per "
                    f"min ({unit}): Limit {bucket.limit}, Used {bucket.used()}, Requested "
                    f"{amount}. Please try again in {_duration(wait)}."
                )
                response = _error(
                    429, message, type_=kind, code="rate_limit_exceeded", headers=headers
                )
                return response, headers
        if requests is not None:
            requests.take(1)
        if tokens is not None:
            tokens.take(cost)
        return None, self._limit_headers(now)

    def _limit_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not self.rate_headers:
            return headers
        for bucket, kind in ((self._request_bucket, "requests"), (self._token_bucket, "tokens")):
            if bucket is None:
                continue
            bucket.refill(now)
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining())
            headers[f"x-ratelimit-reset-{kind}"] = _duration(bucket.time_to_full())
        return headers

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-fake{self._ids:08x}"

    def _chat_response(
        self,
        body: dict,
        model: str,
        prompt: str,
        prompt_tokens: int,
        max_tokens: int | None,
        headers: dict[str, str],
    ) -> web.Response:
        try:
            text = self._reply_text(body, prompt)
            if not isinstance(text, str):
                raise TypeError(f"it returned {type(text).__name__}, not str")
        except Exception as exc:  # a test's reply callable failed: show it to the client
            message = f"The reply callable raised {type(exc).__name__}: {exc}"
            return _error(500, message, type_="server_error", headers=headers)
        finish_reason = "stop"
        if max_tokens is not None and estimate_tokens(text) > max_tokens:
            text = text[: max_tokens * 4]
            finish_reason = "length"
        completion_tokens = estimate_tokens(text)
        asked = body.get("n")
        n = asked if isinstance(asked, int) and asked > 0 else 1
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            for i in range(n)
        ]
        payload = {
            "id": self._next_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens * n,
                "total_tokens": prompt_tokens + completion_tokens * n,
            },
            "system_fingerprint": "fp_fake",
        }
        return web.json_response(payload, headers=headers)

    def _reply_text(self, body: dict, prompt: str) -> str:
        if self.reply is not None:
            return self.reply(body)
        response_format = body.get("response_format")
        if isinstance(response_format, dict):
            if response_format.get("type") == "json_schema":
                schema = (response_format.get("json_schema") or {}).get("schema") or {}
                return json.dumps(schema_example(schema, prompt), ensure_ascii=False)
            if response_format.get("type") == "json_object":
                return json.dumps({"echo": prompt}, ensure_ascii=False)
        return "echo: " + prompt

    def _embeddings_response(
        self,
        body: dict,
        model: str,
        texts: list[str],
        prompt_tokens: int,
        headers: dict[str, str],
    ) -> web.Response:
        dim = body.get("dimensions")
        if not isinstance(dim, int) or dim <= 0:
            dim = self.embedding_dim
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vector = embedding_vector(text, dim)
            if as_base64:
                # What the openai SDK asks for by default: little-endian float32 bytes.
                encoded: Any = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return web.json_response(payload, headers=headers)


_CHAT_FIELDS = CHAT_PARAMS | {"model", "messages", "stream"}
_EMBEDDING_FIELDS = EMBED_PARAMS | {"model", "input", "encoding_format"}


class _Bucket:
    """A token bucket: ``limit`` per minute, holding ``burst_seconds`` of it at most."""

    def __init__(self, limit: int, burst_seconds: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits; 0 when it fits now."""
        self.refill(now)
        # A request larger than the whole bucket is let through once the bucket is full
        # (leaving it in debt), as it could never fit otherwise.
        need = min(amount, self.capacity)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    def used(self) -> int:
        return math.ceil(self.capacity - max(0.0, self.level))

    def time_to_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


async def _call(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


class _Window(_Bucket):
    """``limit`` per minute as a sixtieth of it in each fixed one-second window."""

    def __init__(self, limit: int, burst_seconds: float) -> None:
        super().__init__(limit, burst_seconds)
        self.capacity = max(1.0, float(limit // 60))
        self.second = math.floor(time.monotonic())

    def refill(self, now: float) -> None:
        if math.floor(now) != self.second:
            self.second = math.floor(now)
            self.level = self.capacity
        self.stamp = now

    def wait(self, amount: float, now: float) -> float:
        self.refill(now)
        if self.level >= min(amount, self.capacity):
            return 0.0
        return self.second + 1.0 - now

    def time_to_full(self) -> float:
        if self.level >= self.capacity:
            return 0.0
        return max(0.0, self.second + 1.0 - self.stamp)


def _duration(seconds: float) -> str:
    """Format a wait like OpenAI's reset headers: "120ms", "1s", "1.5s", "6m0s"."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs_text}s"
    if minutes:
        return f"{minutes}m{secs_text}s"
    return f"{secs_text}s"


def _error(
    status: int,
    message: str,
    param: str | None = None,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


# The ways FakeServer(broken_answers=...) can spoil an answer.
BROKEN_ANSWERS = ("drip", "endless", "invalid-utf8", "bad-usage")
_DRIP_SECONDS = 1.0


async def _broken_answer(
    request: web.Request, response: web.Response, kind: str
) -> web.StreamResponse:
    """``response`` spoiled the way ``kind`` says (see ``BROKEN_ANSWERS``)."""
    body = response.body
    assert isinstance(body, bytes)
    if kind == "bad-usage":
        payload = json.loads(body)
        payload["usage"] = {"prompt_tokens": "many", "completion_tokens": [1], "total_tokens": {}}
        response.body = json.dumps(payload).encode()
        return response
    if kind == "invalid-utf8":
        # Inside the first string of the document, as a broken encoder would write it.
        response.body = body[:2] + b"\xff\xfe" + body[2:]
        return response
    stream = web.StreamResponse(headers={"Content-Type": "application/json"})
    if kind == "drip":
        stream.content_length = len(body)
        await stream.prepare(request)
        for i in range(len(body)):
            await stream.write(body[i : i + 1])
            await asyncio.sleep(_DRIP_SECONDS)
        await stream.write_eof()
        return stream
    # "endless": a valid start of a document, then whitespace for ever (until the client leaves).
    stream.enable_chunked_encoding()
    await stream.prepare(request)
    await stream.write(b'{"choices": [')
    filler = b" " * 65536
    while True:
        await stream.write(filler)
        await asyncio.sleep(0)  # write() need not yield; let the server's other requests run


def _reset_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns the close into a TCP reset, so the client sees its connection
        # torn down rather than an orderly end of stream.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "polars-llm"}


def _content_text(message: Any) -> str:
    """The text of a chat message, whether its content is a string or a list of parts."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: list) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message)
    return _content_text(messages[-1])


def _embedding_inputs(value: Any) -> list[str] | None:
    """The texts of an embeddings ``input``, or None when it is not a valid one."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        # A list of ints is one pre-tokenized input; a list of lists, several.
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) for v in value):
            return [" ".join(map(str, v)) for v in value]
    return None


def _seeded(text: str) -> random.Random:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def embedding_vector(text: str, dim: int) -> list[float]:
    """The fake embedding of ``text``: unit-norm, and the same for the same text."""
    rng = _seeded(text)
    values = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def schema_example(schema: dict[str, Any], prompt: str) -> Any:
    """A value that validates against a JSON schema, derived from a hash of ``prompt``.

    Supports what structured output uses: objects, strings, numbers, booleans, arrays,
    enums, consts, anyOf/oneOf/allOf, type lists and ``$ref`` into ``$defs``.
    """
    return _SchemaExample(schema, prompt).value(schema, 0)


class _SchemaExample:
    def __init__(self, root: dict[str, Any], prompt: str) -> None:
        self.root = root
        self.rng = _seeded(prompt)
        self.words = prompt.split()

    def value(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict) or not schema:
            return self.string({})
        if "$ref" in schema:
            target = self.resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return self.value({**target, **rest}, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                if depth >= _MAX_SCHEMA_DEPTH:
                    nulls = [o for o in options if isinstance(o, dict) and o.get("type") == "null"]
                    options = nulls or options
                return self.value(self.rng.choice(options), depth + 1)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            return self.value(self.merge(schema), depth + 1)

        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if isinstance(k, str)] or ["string"]
            if depth >= _MAX_SCHEMA_DEPTH and "null" in kinds:
                kind = "null"
            else:
                kind = self.rng.choice(kinds)
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        if kind == "null":
            return None
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "integer":
            return self.integer(schema)
        if kind == "number":
            return self.number(schema)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "object":
            return self.object(schema, depth)
        return self.string(schema)

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, got {ref!r}")
        node: Any = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def merge(self, schema: dict[str, Any]) -> dict[str, Any]:
        """allOf as one schema: the union of the parts' properties and requirements."""
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, dict) and "$ref" in part:
                part = {
                    **self.resolve(part["$ref"]),
                    **{k: v for k, v in part.items() if k != "$ref"},
                }
            if not isinstance(part, dict):
                continue
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        return merged

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        result: dict[str, Any] = {}
        for name, sub in properties.items():
            if depth >= _MAX_SCHEMA_DEPTH and name not in required:
                continue
            result[name] = self.value(sub, depth + 1)
        extra = schema.get("additionalProperties")
        if not properties and isinstance(extra, dict) and depth < _MAX_SCHEMA_DEPTH:
            result[self.string({"maxLength": 16}) or "key"] = self.value(extra, depth + 1)
        return result

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [self.value(sub, depth + 1) for sub in prefix]
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", max(3, low)))
        count = low if depth >= _MAX_SCHEMA_DEPTH else self.rng.randint(1, 3)
        count = min(max(count, low), high)
        items = schema.get("items", {})
        values = [self.value(items, depth + 1) for _ in range(count)]
        if schema.get("uniqueItems"):
            unique: list[Any] = []
            for value in values:
                if value not in unique:
                    unique.append(value)
            values = unique
        return values

    def integer(self, schema: dict[str, Any]) -> int:
        low, high = _bounds(schema, integer=True)
        value = self.rng.randint(int(low), int(high))
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            value = math.ceil(low / step) * step
        return value

    def number(self, schema: dict[str, Any]) -> float:
        low, high = _bounds(schema, integer=False)
        value = round(self.rng.uniform(low, high), 2)
        if not low <= value <= high:
            value = (low + high) / 2
        return value

    def string(self, schema: dict[str, Any]) -> str:
        rng = self.rng
        fmt = schema.get("format")
        number = rng.randrange(1_000_000)
        if fmt == "date":
            text = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        elif fmt == "date-time":
            text = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00Z"
        elif fmt == "time":
            text = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
        elif fmt == "email":
            text = f"user{number}@example.com"
        elif fmt == "uuid":
            text = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        elif fmt in ("uri", "url"):
            text = f"https://example.com/{number}"
        elif self.words:
            start = rng.randrange(len(self.words))
            text = " ".join(self.words[start : start + 3])[:32]
        else:
            text = f"text {number}"
        min_length = schema.get("minLength", 0)
        max_length = schema.get("maxLength")
        if len(text) < min_length:
            text += "x" * (min_length - len(text))
        if isinstance(max_length, int):
            text = text[:max_length]
        return text


def _bounds(schema: dict[str, Any], *, integer: bool) -> tuple[float, float]:
    """The closed range a number must fall in, with a default span of 100."""
    nudge = 1 if integer else 0.01
    low = schema.get("minimum")
    if "exclusiveMinimum" in schema and isinstance(schema["exclusiveMinimum"], (int, float)):
        low = schema["exclusiveMinimum"] + nudge
    high = schema.get("maximum")
    if "exclusiveMaximum" in schema and isinstance(schema["exclusiveMaximum"], (int, float)):
        high = schema["exclusiveMaximum"] - nudge
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        assert high is not None
        low = high - 100
    elif high is None:
        high = low + 100
    assert low is not None and high is not None
    if integer:
        low, high = math.ceil(low), math.floor(high)
    return low, max(low, high)


# -- a server in another process -------------------------------------------------------


class RemoteFakeServer:
    """A FakeServer running in another process, observed over HTTP."""

    def __init__(self, base_url: str, process: subprocess.Popen) -> None:
        self.base_url = base_url
        self.process = process
        self._root = base_url.removesuffix("/v1")

    def stats(self) -> FakeStats:
        """The server's counters, fetched from GET /_fake/stats."""
        with urllib.request.urlopen(f"{self._root}/_fake/stats", timeout=10) as response:
            return FakeStats.from_json(json.loads(response.read()))

    def reset_stats(self) -> None:
        """Zero the server's counters with POST /_fake/reset."""
        request = urllib.request.Request(f"{self._root}/_fake/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def timeline(self) -> FakeTimeline:
        """The server's timeline, fetched from GET /_fake/timeline."""
        with urllib.request.urlopen(f"{self._root}/_fake/timeline", timeout=30) as response:
            return FakeTimeline(**json.loads(response.read()))

    def advance_batches(self, seconds: float) -> None:
        """Move the server's batch clock forward with POST /_fake/batches/advance."""
        request = urllib.request.Request(
            f"{self._root}/_fake/batches/advance",
            data=json.dumps({"seconds": seconds}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


@contextlib.contextmanager
def spawn_server(**kwargs: Any) -> Iterator[RemoteFakeServer]:
    """Run a FakeServer in a separate process, so that it does not share the client's GIL.

    Takes FakeServer's arguments except ``reply`` (a function cannot cross processes),
    ``host`` and ``port``. Yields once the server listens; terminates it on exit.
    """
    for name in ("reply", "host", "port"):
        if name in kwargs:
            raise TypeError(f"spawn_server does not take {name!r}")
    args = [sys.executable, "-m", "polars_llm.testing", "--port", "0"]
    for name, value in kwargs.items():
        if name not in _CLI_OPTIONS:
            raise TypeError(f"spawn_server got an unexpected argument {name!r}")
        if value is None:
            continue
        if name == "models":
            value = ",".join(value)
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    # The child must import this same polars_llm, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env
        )
        try:
            base_url = _read_first_line(process, timeout=30.0)
            if not base_url.startswith("http"):
                stderr.seek(0)
                detail = stderr.read().decode(errors="replace").strip()
                raise RuntimeError(f"the fake server process did not start:\n{detail}")
            yield RemoteFakeServer(base_url, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _read_first_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line the process prints, or "" if it exits or stays silent too long."""
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.append(process.stdout.readline().decode().strip())

    # readline() cannot time out on a pipe, so it gets a thread of its own.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


# -- command line ----------------------------------------------------------------------

# FakeServer's arguments that the command line (and so spawn_server) can pass on.
_CLI_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "latency": (float, "seconds each answer takes (default 0)"),
    "jitter": (float, "up to this many seconds more or less than --latency"),
    "rpm": (int, "requests per minute before 429s"),
    "tpm": (int, "tokens per minute before 429s (prompt estimate + max_tokens)"),
    "burst_seconds": (float, "how many seconds of the limits a full bucket holds (default 1)"),
    "rate_headers": (
        lambda text: text.strip().lower() in ("1", "true", "yes"),
        "false: leave out the x-ratelimit-* headers that state the limits (default true)",
    ),
    "per_second": (
        lambda text: text.strip().lower() in ("1", "true", "yes"),
        "true: enforce the limits per fixed one-second window instead of with buckets",
    ),
    "error_rate": (float, "share of requests answered 500 or 503"),
    "hang_rate": (float, "share of requests left unanswered for --hang-seconds"),
    "reset_rate": (float, "share of requests whose connection is reset"),
    "hang_seconds": (float, "how long a hung request hangs (default 3600)"),
    "api_key": (str, "the only API key accepted (default: any)"),
    "models": (str, "comma-separated model names accepted (default: any)"),
    "retry_after": (str, "the retry-after header of every 429, e.g. 100000"),
    "embedding_dim": (int, "embedding length when the request gives no dimensions (default 8)"),
    "batch_seconds": (float, "seconds a batch stays in_progress on its clock (default 1)"),
    "batch_error_rate": (float, "share of batch lines answered 500"),
    "batch_expire_rate": (float, "share of batch lines left undone as the batch expires"),
    "batch_refuse": (str, "batch lines whose prompt contains this text are answered 400"),
    "batch_max_lines": (int, "lines a batch may hold before it fails validation (default 50000)"),
    "seed": (int, "seed of the fault and jitter draws (default 0)"),
}


def main(argv: list[str] | None = None) -> None:
    """Serve a FakeServer until SIGTERM or SIGINT; the first output line is its base URL."""
    parser = argparse.ArgumentParser(
        prog="python -m polars_llm.testing",
        description="Run a fake OpenAI-compatible server for tests and benchmarks.",
    )
    for name, (kind, help_text) in _CLI_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    options = vars(parser.parse_args(argv))
    kwargs = {k: v for k, v in options.items() if v is not None}
    if "models" in kwargs:
        kwargs["models"] = [m for m in kwargs["models"].split(",") if m]

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = FakeServer(**kwargs).start()
    except OSError as e:
        # Most often the port is taken: say so and stop, so that nobody goes on talking to
        # whatever holds it.
        reason = e.strerror or str(e)
        print(
            f"{parser.prog}: error: cannot listen on {options['host']}:{options['port']} "
            f"({reason}); pick another --port, or --port 0 for a free one",
            file=sys.stderr,
        )
        sys.exit(2)
    print(server.base_url, flush=True)
    try:
        # A timed wait, so that the main thread gets back to Python to run the handlers.
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
