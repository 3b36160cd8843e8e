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
import random
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl

from .cache import ResultCache, open_cache
from .errors import (
    AuthError,
    BatchAborted,
    ConnectionFailed,
    ContentError,
    EmptyCompletion,
    FatalError,
    ModelNotFound,
    RateLimited,
    RetryableError,
    RowError,
    TooManyFailures,
    Truncated,
)
from .limiter import Limiter
from .request import RequestTemplate
from .settings import Endpoint, Settings
from .transport import Completion, OpenAITransport, Transport

# The embedded model's server decodes one request at a time; more in flight only queue there.
LOCAL_CONCURRENCY = 2
# Cache keys of the embedded model name the weights, not the random port of this process's server.
LOCAL_KEY_ENDPOINT = "local:SmolLM2-135M-Instruct.Q4_1"


# --------------------------------------------------------------------------------------------
# What a call asks for, and what it got
# --------------------------------------------------------------------------------------------
class PostProcess(Protocol):
    """Turns an answer's text into the column's value; part of the cache key."""

    fingerprint: str | None
    dtype: pl.DataType

    def body_params(self) -> dict[str, Any]:
        """Extra request-body fields (e.g. ``response_format``)."""
        ...

    def parse(self, text: str) -> Any:
        """The value for the column; raises ``ContentError`` when the text is not usable."""
        ...

    def repair(self, text: str, error: ContentError) -> list[dict[str, str]] | None:
        """Messages to append for another try after ``error``, or None to give up."""
        ...


class TextPost:
    """Plain text answers."""

    fingerprint: str | None = None
    dtype: pl.DataType = pl.String()

    def body_params(self) -> dict[str, Any]:
        return {}

    def parse(self, text: str) -> Any:
        return text

    def repair(self, text: str, error: ContentError) -> list[dict[str, str]] | None:
        return None


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

    total: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def merge(self, other: Progress) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


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
        self.transports: dict[tuple[str, str, float], Transport] = {}
        self.limiters: dict[str, Limiter] = {}
        self.inflight: dict[str, asyncio.Future[Outcome]] = {}
        self.reached: set[str] = set()  # endpoints that answered at least once
        self._probes: dict[str, asyncio.Lock] = {}

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
        except KeyboardInterrupt:
            future.cancel()
            raise

    def transport(self, endpoint: Endpoint, base_url: str, timeout: float) -> Transport:
        key = (base_url, endpoint.api_key, timeout)
        transport = self.transports.get(key)
        if transport is None:
            transport = self.transports[key] = OpenAITransport(
                base_url, endpoint.api_key, timeout, max_connections=1024
            )
        return transport

    def probe_lock(self, base_url: str) -> asyncio.Lock:
        """The lock that lets one request at a time reach an endpoint not yet reached."""
        lock = self._probes.get(base_url)
        if lock is None:
            lock = self._probes[base_url] = asyncio.Lock()
        return lock

    def limiter(self, base_url: str, settings: Settings, local: bool) -> Limiter:
        concurrency = (
            min(settings.concurrency, LOCAL_CONCURRENCY) if local else settings.concurrency
        )
        limiter = self.limiters.get(base_url)
        if limiter is None:
            limiter = self.limiters[base_url] = Limiter(concurrency, settings.rpm, settings.tpm)
        else:
            limiter.configure(concurrency, settings.rpm, settings.tpm)
        return limiter


_engine: EngineLoop | None = None
_engine_lock = threading.Lock()


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
    """The resolved context of a call: endpoint, template, cache, limiter and transport."""

    def __init__(self, spec: CallSpec, kind: str = "chat") -> None:
        self.spec = spec
        self.settings = settings = spec.resolve_settings()
        self.endpoint = endpoint = settings.endpoint(spec.model)
        self.model = spec.model or settings.default_model(endpoint)
        if endpoint.local:
            from .local import ensure_local_server

            self.base_url = ensure_local_server()
            key_endpoint = LOCAL_KEY_ENDPOINT
        else:
            self.base_url = endpoint.base_url
            key_endpoint = endpoint.base_url
        params = {k: v for k, v in spec.params.items() if v is not None}
        params.update(spec.post.body_params())
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
        self._max_tokens = int(params.get("max_tokens") or params.get("max_completion_tokens") or 0)
        self._system_tokens = estimate_tokens(spec.system or "")

    # -- the caller's side ---------------------------------------------------------------------
    def lookup(self, texts: Sequence[str]) -> tuple[list[str], list[Outcome | None]]:
        """Keys of the texts and what the cache holds for each."""
        keys = [self.template.key(t) for t in texts]
        if self.cache is None:
            return keys, [None] * len(keys)
        outcomes: list[Outcome | None] = []
        parse = self.spec.post.parse
        for hit in self.cache.get_many(keys):
            if hit is None:
                outcomes.append(None)
                continue
            try:
                value = parse(hit["text"])
            except (ContentError, KeyError, TypeError):
                outcomes.append(None)  # an entry this version cannot read: ask again
                continue
            usage = hit.get("usage") or (0, 0)
            outcomes.append(Outcome(value, None, True, int(usage[0]), int(usage[1])))
        return keys, outcomes

    def run(self, texts: Sequence[str], keys: Sequence[str]) -> list[Outcome]:
        """Send the texts (cache misses, deduplicated) and wait for every outcome."""
        loop = engine_loop()
        bar = _progress_bar(self.settings, len(texts))
        if bar:
            bar.batch = self
        results = loop.run(self._run_all(texts, keys), on_wait=bar.update if bar else None)
        if bar:
            bar.update()
            bar.close()
        if self.cache is not None:
            self.cache.flush()
        if self._aborted is not None:
            raise self._aborted
        return results

    # -- the loop's side -----------------------------------------------------------------------
    async def _run_all(self, texts: Sequence[str], keys: Sequence[str]) -> list[Outcome]:
        loop = engine_loop()
        local = self.endpoint.local
        self._transport = loop.transport(self.endpoint, self.base_url, self.settings.timeout)
        self._limiter = loop.limiter(self.base_url, self.settings, local)
        self.progress.total = len(texts)
        results: list[Outcome | None] = [None] * len(texts)
        indices = iter(range(len(texts)))

        async def worker() -> None:
            for i in indices:
                if self._aborted is not None:
                    results[i] = Outcome(error=self._aborted.cause)
                    continue
                results[i] = await self._single_flight(keys[i], texts[i])

        workers = min(len(texts), self._limiter_width())
        await asyncio.gather(*(worker() for _ in range(workers)))
        return [r if r is not None else Outcome(error=RowError("not run")) for r in results]

    def _limiter_width(self) -> int:
        # Enough workers to fill the endpoint's concurrency; the limiter does the real gating.
        return max(1, self.settings.concurrency)

    async def _single_flight(self, key: str, text: str) -> Outcome:
        inflight = engine_loop().inflight
        pending = inflight.get(key)
        if pending is not None:
            outcome = await asyncio.shield(pending)
            self._count(outcome)
            return outcome
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
        self._count(outcome)
        return outcome

    def _count(self, outcome: Outcome) -> None:
        p = self.progress
        p.done += 1
        p.failed += outcome.error is not None
        p.prompt_tokens += outcome.prompt_tokens
        p.completion_tokens += outcome.completion_tokens

    async def _call(self, key: str, text: str) -> Outcome:
        """One request with the retry policy, content checks and repair; caches a success."""
        settings = self.settings
        post = self.spec.post
        body = self.template.body(text)
        tokens = estimate_tokens(text) + self._system_tokens + self._max_tokens
        deadline = time.monotonic() + settings.retry_budget
        repairs = 0
        attempt = 0
        while True:
            if self._aborted is not None:
                return Outcome(error=self._aborted.cause)
            attempt += 1
            try:
                completion = await self._send(body, tokens)
            except RetryableError as e:
                delay = backoff(attempt, settings.backoff_base, settings.backoff_max)
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                if attempt >= settings.max_attempts or time.monotonic() + delay > deadline:
                    self._maybe_unreachable(e)
                    return Outcome(error=_exhausted(e, attempt))
                self.progress.retries += 1
                await asyncio.sleep(delay)
                continue
            except FatalError as e:
                if isinstance(e, (AuthError, ModelNotFound)):
                    self._abort(e)
                return Outcome(error=e)
            try:
                value = self._check(completion)
            except ContentError as e:
                fix = post.repair(completion.text or "", e) if repairs < 2 else None
                if fix is None or attempt >= settings.max_attempts:
                    return Outcome(
                        error=e,
                        prompt_tokens=completion.prompt_tokens,
                        completion_tokens=completion.completion_tokens,
                    )
                repairs += 1
                body = {**body, "messages": [*body["messages"], *fix]}
                continue
            if self.cache is not None:
                self.cache.put(
                    key,
                    {
                        "text": completion.text,
                        "usage": [completion.prompt_tokens, completion.completion_tokens],
                    },
                )
            return Outcome(
                value, None, False, completion.prompt_tokens, completion.completion_tokens
            )

    async def _send(self, body: dict[str, Any], tokens: int) -> Completion:
        loop = engine_loop()
        if self.base_url in loop.reached:
            return await self._attempt(body, tokens)
        # First contact with an endpoint goes alone: a wrong key or model then costs one call,
        # not one per worker. Any HTTP answer counts as contact.
        async with loop.probe_lock(self.base_url):
            if self._aborted is not None:
                raise self._aborted.cause  # type: ignore[misc]
            return await self._attempt(body, tokens)

    async def _attempt(self, body: dict[str, Any], tokens: int) -> Completion:
        limiter = self._limiter
        await limiter.acquire(tokens)
        self.progress.calls += 1
        try:
            completion = await self._transport.chat(body)
        except RowError as e:
            if e.status is not None:
                engine_loop().reached.add(self.base_url)
            if isinstance(e, RateLimited):
                limiter.on_rate_limited(e.retry_after)
            raise
        finally:
            limiter.release()
        engine_loop().reached.add(self.base_url)
        limiter.on_success()
        return completion

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
                    "endpoint URL (base_url= or $OPENAI_BASE_URL) and that the server is up."
                )
            )


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


def _progress_bar(settings: Settings, total: int) -> Any:
    show = settings.progress if settings.progress is not None else sys.stderr.isatty()
    if not show or total == 0:
        return None
    from tqdm import tqdm

    return _Bar(tqdm(total=total, unit="req", desc="polars-llm", leave=False))


class _Bar:
    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.batch: Batch | None = None

    def update(self) -> None:
        if self.batch is not None:
            self.bar.n = self.batch.progress.done
            self.bar.refresh()

    def close(self) -> None:
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
    dtype = spec.post.dtype
    name = prompts.name
    unique = prompts.drop_nulls().unique()
    if unique.len() == 0:
        return pl.Series(name, [None] * prompts.len(), dtype=output_dtype(spec))
    texts: list[str] = unique.to_list()
    batch = Batch(spec)
    keys, outcomes = batch.lookup(texts)
    misses = [i for i, o in enumerate(outcomes) if o is None]
    if misses:
        sent = batch.run([texts[i] for i in misses], [keys[i] for i in misses])
        for i, outcome in zip(misses, sent, strict=True):
            outcomes[i] = outcome
    done: list[Outcome] = outcomes  # type: ignore[assignment]
    settings = batch.settings
    _report_failures(done, settings, spec.details, prompts.len())
    table = pl.DataFrame(
        {
            "__prompt": unique,
            "value": pl.Series([o.value for o in done], dtype=dtype),
            **(
                {
                    "error": pl.Series([_error_text(o.error) for o in done], dtype=pl.String),
                    "cached": pl.Series([o.cached for o in done], dtype=pl.Boolean),
                    "prompt_tokens": pl.Series([o.prompt_tokens for o in done], dtype=pl.Int64),
                    "completion_tokens": pl.Series(
                        [o.completion_tokens for o in done], dtype=pl.Int64
                    ),
                }
                if spec.details
                else {}
            ),
        }
    )
    joined = (
        prompts.rename("__prompt")
        .to_frame()
        .join(table, on="__prompt", how="left", maintain_order="left")
    )
    if spec.details:
        return joined.select(pl.struct(pl.exclude("__prompt")).alias(name)).to_series()
    return joined.get_column("value").alias(name)


def _error_text(error: RowError | None) -> str | None:
    return None if error is None else f"{error.reason}: {error.message}"


def _report_failures(outcomes: list[Outcome], settings: Settings, details: bool, rows: int) -> None:
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
