"""The engine: dedup, cache split, concurrent calls with retries, scatter back to row order.

All network work of the process runs on one event loop in one daemon thread (``EngineLoop``).
Callers, whatever thread Polars runs them on and whether or not their thread already runs an event
loop (Jupyter), hand their batch to that loop and wait. Because of that:

- clients, limiters and the in-flight table exist once per process and need no thread locks;
- two ``.llm`` expressions of one ``with_columns`` share one concurrency budget per endpoint;
- an identical request already in flight for another batch is awaited, not sent again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import random
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from .cache import ResultCache, open_cache
from .errors import (
    AuthError,
    BatchAborted,
    ConfigError,
    ConnectionFailed,
    ContentError,
    EmptyCompletion,
    FatalError,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    RetryableError,
    RowError,
    TooManyFailures,
    Truncated,
)
from .limiter import Limiter
from .outputs import PostProcess, TextPost
from .request import RequestTemplate
from .settings import Endpoint, Settings
from .transport import Completion, Embeddings, Transport, make_transport

# The embedded model's server decodes one request at a time; more in flight only queue there.
LOCAL_CONCURRENCY = 2
# Attempts against an endpoint that has never answered, before the batch stops.
NEVER_REACHED_ATTEMPTS = 3
# Requests failing in a row (5xx, timeouts, connection errors) across an endpoint before the
# batch stops: at least this, and at least twice the concurrency.
BREAKER_FAILURES = 50
# Requests refused (400-like) before an endpoint, key and model ever answered, before stopping.
REFUSALS_BEFORE_ABORT = 3
# Seconds a request waits for the first request to a new endpoint, key and model to answer.
PROBE_WAIT = 10.0


# --------------------------------------------------------------------------------------------
# What a call asks for, and what it got
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallSpec:
    """Everything an ``.llm`` expression fixes before it sees data."""

    model: str | None = None
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    post: PostProcess = field(default_factory=TextPost)
    settings: Settings | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    details: bool = False

    def resolve_settings(self) -> Settings:
        from .settings import get_settings

        base = self.settings if self.settings is not None else get_settings()
        return base.replace(**self.overrides)


@dataclass
class Outcome:
    """The result of one unique request: a value, or the error that says why there is none."""

    value: Any = None
    error: RowError | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Progress:
    """Counters of a batch, updated on the engine loop and read by the waiting caller."""

    done: int = 0
    cached: int = 0
    failed: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


# --------------------------------------------------------------------------------------------
# The process-wide loop
# --------------------------------------------------------------------------------------------
class EngineLoop:
    """One event loop in a daemon thread, shared by every batch of the process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="polars-llm-engine", daemon=True
        )
        self._thread.start()
        # Owned by the loop thread only.
        self.transports: dict[tuple[str, str, str, float, int], Transport] = {}
        # Per endpoint and model: providers set their limits per model.
        self.limiters: dict[tuple[str, str], Limiter] = {}
        self.inflight: dict[str, asyncio.Future[Outcome]] = {}
        self.reached: set[str] = set()  # endpoints that gave any HTTP answer
        # (endpoint, key, model) that answered a request successfully: see Batch._retrying.
        self.verified: set[tuple[str, str, str]] = set()
        self._probes: dict[tuple[str, str, str], asyncio.Lock] = {}

    def run(
        self,
        coro: Awaitable[Any],
        on_wait: Callable[[], None] | None = None,
        interval: float = 0.2,
    ) -> Any:
        """Run ``coro`` on the engine loop and wait for it; ``on_wait`` is called while waiting."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("polars-llm cannot wait for itself on its own engine thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            while True:
                try:
                    return future.result(timeout=interval if on_wait else None)
                except concurrent.futures.TimeoutError:
                    if on_wait is not None:
                        on_wait()
        except BaseException:
            future.cancel()  # Ctrl-C, or a failing progress callback: stop sending
            raise

    def transport(self, endpoint: Endpoint, base_url: str, settings: Settings) -> Transport:
        key = (
            settings.transport,
            base_url,
            endpoint.api_key,
            settings.timeout,
            settings.concurrency,
        )
        transport = self.transports.get(key)
        if transport is None:
            transport = self.transports[key] = make_transport(*key)
        return transport

    def probe_lock(self, ident: tuple[str, str, str]) -> asyncio.Lock:
        """The lock that lets one request at a time through until ``ident`` is verified."""
        lock = self._probes.get(ident)
        if lock is None:
            lock = self._probes[ident] = asyncio.Lock()
        return lock

    def limiter(self, base_url: str, model: str, settings: Settings, local: bool) -> Limiter:
        """The limiter of an endpoint and model, created on first use, updated to ``settings``."""
        concurrency = (
            min(settings.concurrency, LOCAL_CONCURRENCY) if local else settings.concurrency
        )
        limiter = self.limiters.get((base_url, model))
        if limiter is None:
            limiter = Limiter(concurrency, settings.rpm, settings.tpm)
            self.limiters[(base_url, model)] = limiter
        else:
            limiter.configure(concurrency, settings.rpm, settings.tpm)
        return limiter


_engine: EngineLoop | None = None
_engine_lock = threading.Lock()


def _forget_engine_in_child() -> None:
    # A forked child has the parent's engine object but not its thread: start afresh.
    global _engine, _engine_lock
    _engine = None
    _engine_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_engine_in_child)


def engine_loop() -> EngineLoop:
    """The process-wide engine loop, started on first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = EngineLoop()
    return _engine


# --------------------------------------------------------------------------------------------
# A batch: what one call of the expression's function has to do
# --------------------------------------------------------------------------------------------
class Batch:
    """The resolved context of a call: endpoint, template, cache, limiter and transport.

    Methods named ``*_async`` run on the engine loop; the others run on the caller's thread.
    """

    def __init__(self, spec: CallSpec, kind: str = "chat") -> None:
        """Resolve settings and endpoint; nothing is started until ``connect``."""
        self.spec = spec
        self.kind = kind
        self.settings = settings = spec.resolve_settings()
        self.endpoint = endpoint = settings.endpoint(spec.model)
        self.model = spec.model or settings.default_model(endpoint)
        if kind == "embed" and endpoint.local:
            raise ConfigError(
                "the embedded model serves chat completions, not embeddings; give an embeddings "
                "endpoint (base_url= or $OPENAI_BASE_URL) and model="
            )
        # For the embedded model the real URL is known once its server runs: see connect().
        self.base_url = endpoint.base_url
        key_endpoint = local_key_endpoint() if endpoint.local else endpoint.base_url
        params = {k: v for k, v in spec.params.items() if v is not None}
        params.update(spec.post.body_params())
        if endpoint.local:
            params = _for_llama_cpp(params)
        self.params = params
        self.template = RequestTemplate(
            endpoint=key_endpoint,
            model=self.model,
            kind=kind,
            system=spec.system,
            params=params,
            post=spec.post.fingerprint,
        )
        cache_dir = settings.cache_path()
        self.cache: ResultCache | None = open_cache(cache_dir) if cache_dir is not None else None
        self.progress = Progress()
        self._aborted: BatchAborted | None = None
        self._memo: dict[str, Outcome] = {}
        self._max_tokens = int(params.get("max_tokens") or params.get("max_completion_tokens") or 0)
        self._system_tokens = estimate_tokens(spec.system or "")
        self._transport: Transport | None = None
        self._limiter: Limiter | None = None
        self._ident = (self.base_url, endpoint.api_key, self.model)
        self._refusals = 0

    def connect(self) -> None:
        """Start the embedded model if this batch needs it (caller's thread: it may take seconds)."""
        if self.endpoint.local and self.base_url == self.endpoint.base_url:
            from .local import ensure_local_server

            self.base_url = ensure_local_server()
            self._ident = (self.base_url, self.endpoint.api_key, self.model)

    # -- the caller's side ---------------------------------------------------------------------
    def lookup(self, texts: Sequence[str]) -> tuple[list[str], list[Outcome | None]]:
        """Keys of the texts and what the cache holds for each."""
        keys = [self.template.key(t) for t in texts]
        if self.cache is None:
            return keys, [None] * len(keys)
        return keys, [self.decode(hit) for hit in self.cache.get_many(keys)]

    def decode(self, hit: dict[str, Any] | None) -> Outcome | None:
        """The outcome a cache entry stands for, or None for a miss or an unreadable entry."""
        if hit is None:
            return None
        if self.settings.truncated_is_error and hit.get("finish") == "length":
            return None  # cached when cut-off answers were accepted; now they are not
        try:
            value = self.spec.post.parse(hit["vector"] if self.kind == "embed" else hit["text"])
        except (ContentError, KeyError, TypeError):
            return None  # an entry this version cannot read: ask again
        usage = hit.get("usage") or (0, 0)
        return Outcome(value, None, True, int(usage[0]), int(usage[1]))

    def run(self, coro: Awaitable[Any], total: int) -> Any:
        """Run loop-side work with a progress bar, flush the cache, raise if the batch aborted."""
        self.connect()
        p = self.progress
        bar = progress_bar(self.settings, total, lambda: (p.done, p.cached, p.failed))
        try:
            result = engine_loop().run(coro, on_wait=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
            if self.cache is not None:
                self.cache.flush()
        if self._aborted is not None:
            raise self._aborted
        return result

    # -- the loop's side -----------------------------------------------------------------------
    def bind(self) -> None:
        """Attach this batch to the loop's transport and limiter (on the engine loop)."""
        if self._transport is None:
            loop = engine_loop()
            self._transport = loop.transport(self.endpoint, self.base_url, self.settings)
            self._limiter = loop.limiter(
                self.base_url, self.model, self.settings, self.endpoint.local
            )

    async def complete_many_async(self, texts: Sequence[str], keys: Sequence[str]) -> list[Outcome]:
        """Outcomes of many prompts, ``concurrency`` at a time."""
        self.bind()
        results: list[Outcome] = [Outcome()] * len(texts)
        indices = iter(range(len(texts)))

        async def worker() -> None:
            for i in indices:
                results[i] = await self.complete_async(keys[i], texts[i])

        await _all_or_none(worker() for _ in range(min(len(texts), self.width())))
        return results

    def width(self) -> int:
        """Workers per batch: enough to fill the concurrency; the limiter does the real gating."""
        return max(1, self.settings.concurrency)

    async def complete_async(self, key: str, text: str) -> Outcome:
        """One prompt's outcome: from this batch's memo, a request already in flight, or a call."""
        self.bind()
        outcome = self._memo.get(key)
        if outcome is None:
            if self._aborted is not None:
                return Outcome(error=self._aborted.cause)
            inflight = engine_loop().inflight
            pending = inflight.get(key)
            if pending is not None:
                outcome = await asyncio.shield(pending)
            else:
                fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
                inflight[key] = fut
                try:
                    outcome = await self._call(key, text)
                    fut.set_result(outcome)
                except BaseException as e:
                    fut.set_exception(e)
                    fut.exception()  # mark retrieved: waiters re-raise it themselves
                    raise
                finally:
                    inflight.pop(key, None)
            if outcome.error is None:
                self._memo[key] = outcome
        self._count(outcome)
        return outcome

    async def resolve_async(self, key: str, text: str) -> Outcome:
        """Like ``complete_async``, but first looks in the disk cache (for row-by-row callers)."""
        if key not in self._memo and self.cache is not None:
            outcome = self.decode(self.cache.get(key))
            if outcome is not None:
                self._memo[key] = outcome
                self._count(outcome)
                return outcome
        return await self.complete_async(key, text)

    def _count(self, outcome: Outcome) -> None:
        p = self.progress
        p.done += 1
        p.cached += outcome.cached
        p.failed += outcome.error is not None
        p.prompt_tokens += outcome.prompt_tokens
        p.completion_tokens += outcome.completion_tokens

    async def _call(self, key: str, text: str) -> Outcome:
        """One chat request with retries, content checks and repair; caches a success."""
        post = self.spec.post
        body = self.template.body(text)
        tokens = estimate_tokens(text) + self._system_tokens + self._max_tokens
        deadline = time.monotonic() + self.settings.retry_budget
        repairs = 0
        transport = self._transport
        assert transport is not None
        while True:
            try:
                completion: Completion = await self._retrying(
                    functools.partial(transport.chat, body), tokens, deadline
                )
            except RowError as e:
                return Outcome(error=e)
            try:
                value = self._check(completion)
            except ContentError as e:
                fix = post.repair(completion.text or "", e) if repairs < 2 else None
                if fix is None:
                    return Outcome(
                        error=e,
                        prompt_tokens=completion.prompt_tokens,
                        completion_tokens=completion.completion_tokens,
                    )
                repairs += 1
                body = {**body, "messages": [*body["messages"], *fix]}
                continue
            usage = [completion.prompt_tokens, completion.completion_tokens]
            if self.cache is not None:
                entry = {
                    "text": completion.text,
                    "usage": usage,
                    "finish": completion.finish_reason,
                }
                self.cache.put(key, entry)
            return Outcome(value, None, False, *usage)

    async def embed_many_async(
        self, texts: Sequence[str], keys: Sequence[str], batch_size: int
    ) -> list[Outcome]:
        """Embeddings of many inputs, ``batch_size`` inputs per request."""
        self.bind()
        transport = self._transport
        assert transport is not None
        results: list[Outcome] = [Outcome()] * len(texts)
        chunks = iter(range(0, len(texts), batch_size))
        params = self.params

        async def worker() -> None:
            for start in chunks:
                part = list(texts[start : start + batch_size])
                tokens = sum(estimate_tokens(t) for t in part)
                deadline = time.monotonic() + self.settings.retry_budget
                try:
                    answer: Embeddings = await self._retrying(
                        lambda part=part: transport.embed(self.model, part, params),  # type: ignore[misc]
                        tokens,
                        deadline,
                    )
                except RowError as e:
                    outcomes = [Outcome(error=e) for _ in part]
                else:
                    share = answer.prompt_tokens // max(1, len(part))
                    outcomes = []
                    for i, vector in enumerate(answer.vectors):
                        try:
                            value = self.spec.post.parse(vector)
                        except ContentError as e:
                            outcomes.append(Outcome(error=e))
                            continue
                        outcomes.append(Outcome(value, None, False, share, 0))
                        if self.cache is not None:
                            self.cache.put(keys[start + i], {"vector": vector, "usage": [share, 0]})
                for i, outcome in enumerate(outcomes):
                    results[start + i] = outcome
                    self._count(outcome)

        workers = min(self.width(), -(-len(texts) // batch_size))
        await _all_or_none(worker() for _ in range(workers))
        return results

    async def _retrying(
        self, send: Callable[[], Awaitable[Any]], tokens: int, deadline: float
    ) -> Any:
        """``send()`` under the limiter with the retry policy; raises the final RowError."""
        loop = engine_loop()
        if self._ident in loop.verified:
            return await self._retry_loop(send, tokens, deadline)
        # Until an endpoint, key and model have answered once, one request (with its retries)
        # goes at a time: a wrong key, a mistyped model or a dead endpoint then costs a few
        # calls, not a few per worker. A probe slower than PROBE_WAIT (a hung request) does not
        # hold the batch back.
        lock = loop.probe_lock(self._ident)
        try:
            await asyncio.wait_for(lock.acquire(), PROBE_WAIT)
        except asyncio.TimeoutError:
            return await self._retry_loop(send, tokens, deadline)
        if self._ident in loop.verified:
            # The probe we queued behind succeeded: everyone may go now, not one by one.
            lock.release()
            return await self._retry_loop(send, tokens, deadline)
        try:
            return await self._retry_loop(send, tokens, deadline)
        finally:
            lock.release()

    async def _retry_loop(
        self, send: Callable[[], Awaitable[Any]], tokens: int, deadline: float
    ) -> Any:
        settings = self.settings
        attempt = failures = 0
        while True:
            if self._aborted is not None:
                raise self._aborted.cause  # type: ignore[misc]
            attempt += 1
            try:
                return await self._attempt(send, tokens)
            except RetryableError as e:
                # A 429 says "later", not "broken": only the time budget bounds those retries,
                # while other failures also count against max_attempts.
                failures += not isinstance(e, RateLimited)
                self._check_breaker(e)
                delay = backoff(attempt, settings.backoff_base, settings.backoff_max)
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                limit = settings.max_attempts
                if isinstance(e, ConnectionFailed) and self.base_url not in engine_loop().reached:
                    # Nothing there has ever answered: a few tries tell a mistyped or dead
                    # endpoint from a blip, without minutes of backoff.
                    limit = min(limit, NEVER_REACHED_ATTEMPTS)
                if failures >= limit or time.monotonic() + delay > deadline:
                    self._maybe_unreachable(e)
                    raise _exhausted(e, attempt) from None
                await asyncio.sleep(delay)
            except FatalError as e:
                if isinstance(e, (AuthError, ModelNotFound, QuotaExceeded)):
                    self._abort(e)
                elif self._ident not in engine_loop().verified:
                    # Refused before anything ever succeeded here: the endpoint likely rejects
                    # the request's shape (e.g. response_format), not this one row.
                    self._refusals += 1
                    if self._refusals >= REFUSALS_BEFORE_ABORT:
                        self._abort(e)
                raise

    def _check_breaker(self, error: RetryableError) -> None:
        """Stop the batch when the endpoint keeps failing for everyone (it went down mid-run)."""
        if isinstance(error, RateLimited):
            return
        limiter = self._limiter
        assert limiter is not None
        if limiter.consecutive_failures >= max(BREAKER_FAILURES, 2 * limiter.max_concurrency):
            self._abort(
                type(error)(
                    f"{limiter.consecutive_failures} requests in a row failed with no success "
                    f"in between; last: {error.message}. The endpoint seems down; check it, "
                    "then rerun (answers so far are cached)."
                )
            )

    async def _attempt(self, send: Callable[[], Awaitable[Any]], tokens: int) -> Any:
        limiter = self._limiter
        assert limiter is not None
        await limiter.acquire(tokens)
        self.progress.calls += 1
        try:
            answer = await send()
        except RowError as e:
            if e.status is not None:
                engine_loop().reached.add(self.base_url)
            if isinstance(e, RateLimited):
                limiter.on_rate_limited(e.retry_after)
            elif isinstance(e, RetryableError):
                limiter.on_failure()
            raise
        finally:
            limiter.release()
        loop = engine_loop()
        loop.reached.add(self.base_url)
        loop.verified.add(self._ident)
        limiter.on_success()
        return answer

    def _check(self, completion: Completion) -> Any:
        text = completion.text
        if not text or not text.strip():
            raise EmptyCompletion(
                f"the model returned no text (finish_reason={completion.finish_reason!r})",
                raw=text,
            )
        if completion.finish_reason == "length" and self.settings.truncated_is_error:
            raise Truncated(
                "the answer was cut off at max_tokens; raise max_tokens or shorten the output",
                raw=text,
            )
        return self.spec.post.parse(text)

    def _abort(self, error: RowError) -> None:
        if self._aborted is None:
            self._aborted = BatchAborted(
                f"stopped the batch after {self.progress.calls} call(s): {error.message}", error
            )

    def _maybe_unreachable(self, error: RetryableError) -> None:
        # An endpoint that has never answered and still refuses after every retry is down or
        # mistyped: stop instead of failing every remaining row the same way.
        if isinstance(error, ConnectionFailed) and self.base_url not in engine_loop().reached:
            self._abort(
                ConnectionFailed(
                    f"{error.message}. Nothing at {self.base_url} has answered; check the "
                    "endpoint URL ($OPENAI_BASE_URL, base_url= or --base-url) and that the "
                    "server is up."
                )
            )


async def _all_or_none(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run workers together; if one fails unexpectedly, cancel the rest (no more paid calls)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@functools.lru_cache(maxsize=1)
def local_key_endpoint() -> str:
    """What cache keys of the embedded model name: its weights file, not this process's port."""
    from .local import local_model_path

    path = local_model_path()
    return f"local:{path.name}:{path.stat().st_size}"


def _for_llama_cpp(params: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's server takes a JSON schema as ``{"type": "json_object", "schema": ...}``
    (enforced with a grammar) and refuses OpenAI's ``json_schema`` form."""
    fmt = params.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema", {}).get("schema")
        return {**params, "response_format": {"type": "json_object", "schema": schema}}
    return params


def _exhausted(error: RetryableError, attempts: int) -> RowError:
    error.message = f"{error.message} (gave up after {attempts} attempt(s))"
    error.args = (error.message,)
    return error


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter before attempt ``attempt + 1``."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def estimate_tokens(text: str) -> int:
    """A provider-neutral token estimate: about four characters a token."""
    return len(text) // 4 + 1


def progress_bar(
    settings: Settings, total: int, counts: Callable[[], tuple[int, int, int]], unit: str = "req"
) -> ProgressBar | None:
    """A bar on a terminal (or as ``settings.progress`` says), fed by ``counts()`` =
    (done, cached, failed); None when it should not show."""
    show = settings.progress if settings.progress is not None else sys.stderr.isatty()
    if not show or total == 0:
        return None
    return ProgressBar(total, counts, unit)


class ProgressBar:
    """A tqdm bar redrawn from running counters while the caller waits."""

    def __init__(self, total: int, counts: Callable[[], tuple[int, int, int]], unit: str) -> None:
        from tqdm import tqdm

        self.counts = counts
        self.bar = tqdm(total=total, unit=unit, desc="polars-llm", leave=False)

    def update(self) -> None:
        done, cached, failed = self.counts()
        self.bar.n = done
        self.bar.set_postfix(cached=cached, failed=failed, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.update()
        self.bar.close()


# --------------------------------------------------------------------------------------------
# Series in, Series out
# --------------------------------------------------------------------------------------------
DETAIL_FIELDS = {
    "error": pl.String(),
    "cached": pl.Boolean(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
}


def output_dtype(spec: CallSpec) -> pl.DataType:
    """The dtype an expression returns, known before any call."""
    if not spec.details:
        return spec.post.dtype
    return pl.Struct({"value": spec.post.dtype, **DETAIL_FIELDS})


def complete_series(prompts: pl.Series, spec: CallSpec) -> pl.Series:
    """The answer to each prompt in row order; null prompts give null and are never sent."""
    return _map_unique(prompts, spec, "chat", lambda b, t, k: b.complete_many_async(t, k))


def embed_series(inputs: pl.Series, spec: CallSpec, batch_size: int) -> pl.Series:
    """The embedding of each input in row order; equal inputs are sent once."""
    return _map_unique(inputs, spec, "embed", lambda b, t, k: b.embed_many_async(t, k, batch_size))


def _map_unique(
    column: pl.Series,
    spec: CallSpec,
    kind: str,
    send: Callable[[Batch, list[str], list[str]], Awaitable[list[Outcome]]],
) -> pl.Series:
    """Dedup, split cache hits from misses, send the misses, scatter back to row order."""
    name = column.name
    unique = column.drop_nulls().unique()
    if unique.len() == 0:
        return pl.Series(name, [None] * column.len(), dtype=output_dtype(spec))
    texts: list[str] = unique.to_list()
    batch = Batch(spec, kind)
    keys, found = batch.lookup(texts)
    misses = [i for i, o in enumerate(found) if o is None]
    if misses:
        miss_texts = [texts[i] for i in misses]
        sent = batch.run(send(batch, miss_texts, [keys[i] for i in misses]), len(misses))
        for i, outcome in zip(misses, sent, strict=True):
            found[i] = outcome
    outcomes: list[Outcome] = found  # type: ignore[assignment]
    _report_failures(outcomes, batch.settings, spec.details)
    columns: dict[str, pl.Series] = {
        "__key": unique,
        "value": pl.Series([o.value for o in outcomes], dtype=spec.post.dtype),
    }
    if spec.details:
        columns["error"] = pl.Series([_error_text(o.error) for o in outcomes], dtype=pl.String)
        columns["cached"] = pl.Series([o.cached for o in outcomes], dtype=pl.Boolean)
        columns["prompt_tokens"] = pl.Series([o.prompt_tokens for o in outcomes], dtype=pl.Int64)
        columns["completion_tokens"] = pl.Series(
            [o.completion_tokens for o in outcomes], dtype=pl.Int64
        )
    joined = (
        column.rename("__key")
        .to_frame()
        .join(pl.DataFrame(columns), on="__key", how="left", maintain_order="left")
    )
    if spec.details:
        return joined.select(pl.struct(pl.exclude("__key")).alias(name)).to_series()
    return joined.get_column("value").alias(name)


def _error_text(error: RowError | None) -> str | None:
    if error is None:
        return None
    text = f"{error.reason}: {error.message}"
    if error.raw:
        text += f" (raw answer: {error.raw[:500]!r})"
    return text


def _report_failures(outcomes: list[Outcome], settings: Settings, details: bool) -> None:
    failed = [o.error for o in outcomes if o.error is not None]
    if not failed:
        return
    first = failed[0]
    summary = (
        f"{len(failed)} of {len(outcomes)} unique prompt(s) failed; first: "
        f"{first.reason}: {first.message}"
    )
    if settings.on_error == "raise":
        raise TooManyFailures(
            f"{summary}. The answers that succeeded are cached, so a rerun sends only the failed "
            "prompts. Pass on_error='null' (with details=True to keep each row's error) to "
            "get nulls instead.",
            failed=len(failed),
            total=len(outcomes),
        ) from first
    if not details:
        warnings.warn(
            f"{summary}. Those rows are null; details=True keeps each row's error.", stacklevel=2
        )
