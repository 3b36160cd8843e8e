"""The engine: keys -> cache split -> send -> scatter back to row order.

All network work of the process runs on one event loop in one daemon thread (``EngineLoop``).
Callers, whatever thread Polars runs them on and whether or not their thread already runs an event
loop (Jupyter), hand their batch to that loop and wait. On that loop live:

- one :class:`~polars_llm.endpoint.EndpointClient` per (base URL, key, model): transport,
  limiter, health and retry policy behind one ``send``, shared by every batch of the process;
- one :class:`~polars_llm.flight.SingleFlight` table: a request already in flight for any batch
  of any thread is joined, not sent again.

A :class:`Batch` is what one call of an expression's function does: compute the keys of its
unique prompts, split cache hits from misses, send the misses through the endpoint's client, and
hand back one :class:`Outcome` per prompt. :func:`complete_series` and :func:`embed_series` put
those back in row order.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import json
import os
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from . import interrupt
from .cache import ResultCache, open_cache, register_reader
from .endpoint import EndpointClient, RetryPolicy
from .errors import (
    BatchAborted,
    ConfigError,
    ContentError,
    EmptyCompletion,
    RowError,
    TooManyFailures,
    Truncated,
)
from .flight import SingleFlight
from .outputs import PostProcess, TextPost
from .progress import Display, Progress
from .request import RequestTemplate
from .settings import Settings
from .shared import (
    ClaimGate,
    InProcessState,
    SharedState,
    SharedStateError,
    claim_or_find,
    open_shared,
    report_broken,
)
from .transport import Completion, Embeddings

# Endpoint clients unused this long are closed (their connections too) when another is opened.
IDLE_CLOSE = 300.0
# Repair rounds for an answer that does not parse (a label outside the set, bad JSON).
MAX_REPAIRS = 2
# A chat answer as the cache holds it, and how every entry polars-llm writes begins.
_ENTRY = pl.Struct({"text": pl.String(), "usage": pl.List(pl.Int64()), "finish": pl.String()})
_ENTRY_START = '{"text":"'


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
    # Built on the main thread: Ctrl-C there stops this work (see interrupt.py).
    interruptible: bool = False

    def resolve_settings(self) -> Settings:
        from .settings import get_settings

        base = self.settings if self.settings is not None else get_settings()
        return base.replace(**self.overrides) if self.overrides else base


@dataclass(slots=True)
class Outcome:
    """The result of one unique request: a value, or the error that says why there is none."""

    value: Any = None
    error: RowError | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


# --------------------------------------------------------------------------------------------
# The process-wide loop
# --------------------------------------------------------------------------------------------
def new_engine_loop() -> asyncio.AbstractEventLoop:
    """The engine's event loop: uvloop's where it is installed (it is a dependency on Linux and
    macOS), else asyncio's; ``POLARS_LLM_EVENT_LOOP=asyncio`` asks for asyncio's.

    The loop is the engine's own, in its own thread: the program's loops and event loop policy
    are left alone. uvloop's loop spends 10-20 % less CPU per request (docs/benchmarks.md).
    """
    choice = os.environ.get("POLARS_LLM_EVENT_LOOP", "").strip().lower() or "uvloop"
    if choice not in ("uvloop", "asyncio"):
        raise ConfigError(
            f"POLARS_LLM_EVENT_LOOP={choice!r} is not a known event loop; "
            "use 'uvloop' (the default) or 'asyncio'"
        )
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass  # not installed (Windows): asyncio's loop
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class EngineLoop:
    """One event loop in a daemon thread, shared by every batch of the process."""

    def __init__(self) -> None:
        self.loop = new_engine_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="polars-llm-engine", daemon=True
        )
        self._thread.start()
        # Owned by the loop thread only.
        self.endpoints: dict[tuple[str, str, str, str], EndpointClient] = {}
        self.flights: SingleFlight[Outcome] = SingleFlight()
        # Cache reads from the loop go to their own thread: never onto the loop itself (a slow
        # disk would stall every request) nor into the loop's default executor (aiohttp
        # resolves host names there).
        self.cache_reads = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="polars-llm-cache-read"
        )
        register_reader(self.cache_reads)  # closes its connections to caches let go

    def run(
        self,
        coro: Coroutine[Any, Any, Any],
        on_wait: Callable[[], None] | None = None,
        *,
        interruptible: bool = False,
        interval: float = 0.2,
    ) -> Any:
        """Run ``coro`` on the engine loop and wait for it; ``on_wait`` is called while waiting.

        With ``interruptible``, a Ctrl-C seen by :mod:`polars_llm.interrupt` while waiting on a
        thread other than the main one stops the work and raises ``KeyboardInterrupt`` here.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("polars-llm cannot wait for itself on its own engine thread")
        seen = interrupt.generation()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            while True:
                try:
                    return future.result(timeout=interval)
                except concurrent.futures.TimeoutError:
                    if on_wait is not None:
                        on_wait()
                    if interruptible and interrupt.generation() != seen:
                        raise KeyboardInterrupt(
                            "polars-llm: interrupted; the answers received so far are cached"
                        ) from None
        except BaseException:
            future.cancel()  # Ctrl-C, or a failing progress callback: stop sending
            raise

    def endpoint(
        self, base_url: str, api_key: str, model: str, settings: Settings, local: bool
    ) -> EndpointClient:
        """The client of (base URL, key, model), opened on first use (on the loop thread)."""
        ident = (base_url, api_key, model, settings.transport)
        client = self.endpoints.get(ident)
        if client is None:
            self._close_idle()
            client = EndpointClient(base_url, api_key, model, settings, local=local)
            self.endpoints[ident] = client
        return client

    def _close_idle(self) -> None:
        # The map of clients must not grow for the life of the process: close the idle ones.
        old = time.monotonic() - IDLE_CLOSE
        for ident, client in list(self.endpoints.items()):
            if client.idle and client.last_used < old:
                del self.endpoints[ident]
                self.loop.create_task(client.aclose())

    async def aclose(self) -> None:
        """Close every endpoint's connections."""
        clients, self.endpoints = list(self.endpoints.values()), {}
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)

    def close(self, timeout: float = 2.0) -> None:
        """Close the connections and stop the loop (at interpreter exit)."""
        if not self.loop.is_running():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.aclose(), self.loop).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.cache_reads.shutdown(wait=False)


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


@atexit.register
def _close_engine() -> None:
    if _engine is not None:
        _engine.close()


# --------------------------------------------------------------------------------------------
# A batch: what one call of the expression's function has to do
# --------------------------------------------------------------------------------------------
class Batch:
    """The resolved context of a call: endpoint, template, cache and counters.

    Methods named ``async`` run on the engine loop; the others on the caller's thread.
    """

    def __init__(self, spec: CallSpec, kind: str = "chat") -> None:
        """Resolve settings and endpoint; nothing is started until ``run``."""
        self.spec = spec
        self.kind = kind
        self.settings = settings = spec.resolve_settings()
        self.target = target = settings.endpoint(spec.model)
        self.model = spec.model or settings.default_model(target)
        if kind == "embed" and target.local:
            raise ConfigError(
                "the embedded model serves chat completions, not embeddings; give an embeddings "
                "endpoint (base_url= or $OPENAI_BASE_URL) and model="
            )
        # For the embedded model the real URL is known once its server runs: see connect().
        self.base_url = target.base_url
        params = {k: v for k, v in spec.params.items() if v is not None}
        params.update(spec.post.body_params())
        if target.local:
            params = _for_llama_cpp(params)
        self.params = params
        self.template = RequestTemplate(
            endpoint=local_key_endpoint() if target.local else target.base_url,
            model=self.model,
            kind=kind,
            system=spec.system,
            params=params,
            post=spec.post.fingerprint,
        )
        cache_dir = settings.cache_path()
        self.cache: ResultCache | None = open_cache(cache_dir) if cache_dir is not None else None
        self.policy = RetryPolicy.of(settings)
        self.progress = Progress()
        self.aborted: BatchAborted | None = None
        self.max_tokens = int(params.get("max_tokens") or params.get("max_completion_tokens") or 0)
        self.system_tokens = estimate_tokens(spec.system or "")
        self._memo: dict[str, Outcome] = {}
        self._client: EndpointClient | None = None
        # Other processes that call this endpoint with this key share in-flight claims (and,
        # over Redis, answers) through this home; a process alone has nobody to share with.
        home = None if target.local else open_shared(settings)
        self.home: SharedState | None = None if isinstance(home, InProcessState) else home
        self._gate: ClaimGate[Outcome] | None = None

    def connect(self) -> None:
        """Start the embedded model if this batch needs it (caller's thread: it may take seconds)."""
        if self.target.local and self.base_url == self.target.base_url:
            from .local import ensure_local_server

            self.base_url = ensure_local_server()

    # -- the caller's side ---------------------------------------------------------------------
    def lookup(self, texts: Sequence[str]) -> tuple[list[str], list[Outcome | None]]:
        """Keys of the texts and what the cache holds for each."""
        keys, raws = self.lookup_raw(texts)
        return keys, self.decode_raws(raws)

    def lookup_raw(self, texts: Sequence[str]) -> tuple[list[str], list[str | None]]:
        """Keys of the texts and the cache's JSON text for each (None: not cached)."""
        keys = self.template.keys(texts)
        if self.cache is None:
            return keys, [None] * len(keys)
        return keys, self.cache.get_raw_many(keys)

    def decode_raws(self, raws: Sequence[str | None]) -> list[Outcome | None]:
        """The outcome of each cached JSON text, entry by entry."""
        cache = self.cache
        if cache is None:
            return [None] * len(raws)
        return [None if raw is None else self.decode(cache.decode(raw)) for raw in raws]

    def decode_columns(self, raws: Sequence[str | None]) -> pl.DataFrame | None:
        """The cached answers as columns, decoded by Polars rather than entry by entry.

        Columns: ``hit``, ``value``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason``.
        Only plain-text chat answers are read this way; entries not of the shape polars-llm
        writes (``{"text":"...``) are left to ``decode_raws`` (``hit`` is false for them, as for
        a miss). None when the other kinds of answers need the entry-by-entry way, or when an
        entry of that shape is not valid JSON after all.
        """
        if self.kind != "chat" or type(self.spec.post) is not TextPost:
            return None
        raw = pl.Series("raw", raws, dtype=pl.String)
        shaped = raw.str.starts_with(_ENTRY_START).fill_null(False)
        try:
            entry = (
                pl.select(pl.when(shaped).then(raw))
                .to_series()
                .str.json_decode(_ENTRY)
                .struct.unnest()
            )
        except pl.exceptions.PolarsError:
            return None
        text, usage, finish = entry["text"], entry["usage"], entry["finish"]
        hit = shaped & text.is_not_null()
        if self.settings.truncated_is_error:
            hit &= finish.ne_missing("length")

        def tokens(i: int) -> pl.Series:
            count = usage.list.get(i, null_on_oob=True)
            return count.fill_null(0).clip(lower_bound=0)

        return pl.DataFrame(
            {
                "hit": hit,
                "value": text,
                "prompt_tokens": tokens(0),
                "completion_tokens": tokens(1),
                "finish_reason": finish,
            }
        )

    def decode(self, hit: Any) -> Outcome | None:
        """The outcome a cache entry stands for, or None for a miss or an unusable entry."""
        if not isinstance(hit, dict):
            return None
        if self.settings.truncated_is_error and hit.get("finish") == "length":
            return None  # cached when cut-off answers were accepted; now they are not
        answer = hit.get("vector") if self.kind == "embed" else hit.get("text")
        if answer is None or (self.kind == "chat" and not isinstance(answer, str)):
            return None  # an entry this version cannot read: ask again, never a silent null
        try:
            value = self.spec.post.parse(answer)
        except (ContentError, KeyError, TypeError, ValueError):
            return None
        prompt, completion = _usage(hit.get("usage"))
        finish = hit.get("finish")
        return Outcome(
            value, None, True, prompt, completion, finish if isinstance(finish, str) else None
        )

    def run(self, coro: Coroutine[Any, Any, Any], total: int, unit: str = "req") -> Any:
        """Run loop-side work with progress shown, flush the cache, raise if the batch stopped."""
        self.connect()
        p = self.progress
        display = Display(
            total, lambda: (p.done, p.cached, p.failed), show=self.settings.progress, unit=unit
        )
        try:
            result = engine_loop().run(
                coro, on_wait=display.update, interruptible=self.spec.interruptible
            )
        finally:
            display.close()
            if self.cache is not None:
                self.cache.flush(self)
        if self.aborted is not None:
            raise self.aborted
        return result

    # -- the loop's side -----------------------------------------------------------------------
    @property
    def client(self) -> EndpointClient:
        """The endpoint's client, bound on first use (on the engine loop)."""
        if self._client is None:
            self._client = engine_loop().endpoint(
                self.base_url, self.target.api_key, self.model, self.settings, self.target.local
            )
            self._client.configure(self.settings)
        return self._client

    def width(self) -> int:
        """Workers per batch: enough to fill the concurrency; the limiter does the real gating."""
        return max(1, self.settings.concurrency)

    async def lookup_async(self, key: str) -> Outcome | None:
        """The cache's outcome for one key, read off the loop."""
        if self.cache is None:
            return None
        hit = await asyncio.get_running_loop().run_in_executor(
            engine_loop().cache_reads, self.cache.get, key
        )
        return self.decode(hit)

    async def complete_many_async(self, texts: Sequence[str], keys: Sequence[str]) -> list[Outcome]:
        """Outcomes of many prompts, ``concurrency`` at a time."""
        results: list[Outcome] = [Outcome()] * len(texts)
        indices = iter(range(len(texts)))

        async def worker() -> None:
            for i in indices:
                results[i] = await self.complete_async(keys[i], texts[i])

        gate = self._claims()
        if gate is not None:
            gate.plan(keys)
        self.client.limiter.look_around_soon()
        try:
            await gather_all(worker() for _ in range(min(len(texts), self.width())))
        finally:
            if gate is not None:
                gate.close()
        return results

    async def complete_async(self, key: str, text: str) -> Outcome:
        """One prompt's outcome: from this batch's memo, an answer the process just received, a
        call in flight anywhere, or a call."""
        outcome = self._memo.get(key)
        if outcome is None:
            engine = engine_loop()
            # Answered for another batch (another streaming morsel, say) after this one looked
            # in the cache: already paid for, and on its way to the disk. Not while its flight
            # runs: the answer is put before the flight ends (while it is shared over Redis,
            # say), and this batch's own paid answer would count as served from the cache.
            recent = (
                self.decode(self.cache.peek(key))
                if self.cache is not None and key not in engine.flights
                else None
            )
            if recent is not None:
                outcome = recent
            elif self.aborted is not None:
                outcome = Outcome(error=self.aborted.cause)
            else:
                try:
                    outcome = await engine.flights.run(
                        key, functools.partial(self._call, key, text)
                    )
                except BatchAborted as e:
                    self.aborted = self.aborted or e
                    outcome = Outcome(error=e.cause)
            if outcome.error is None:
                self._memo[key] = outcome
        self.count(outcome)
        return outcome

    async def resolve_async(self, key: str, text: str) -> Outcome:
        """Like ``complete_async``, but first looks in the disk cache (for row-by-row callers)."""
        if key not in self._memo and key not in engine_loop().flights:
            outcome = await self.lookup_async(key)
            if outcome is not None:
                self._memo[key] = outcome
                self.count(outcome)
                return outcome
        return await self.complete_async(key, text)

    def count(self, outcome: Outcome) -> None:
        """Count one finished request in this batch's progress."""
        p = self.progress
        p.done += 1
        if outcome.error is not None:
            p.failed += 1
        if outcome.cached:
            p.cached += 1
            p.cached_prompt_tokens += outcome.prompt_tokens
            p.cached_completion_tokens += outcome.completion_tokens
        else:
            p.prompt_tokens += outcome.prompt_tokens
            p.completion_tokens += outcome.completion_tokens

    async def _call(self, key: str, text: str) -> Outcome:
        """One chat request, paid for by one process of all those sharing this endpoint: an
        answer another process stored or is about to store is taken instead of paying again."""
        gate = self._claims()
        if gate is None:
            return await self._send(key, text)
        home = gate.home
        try:
            state, found = await gate.enter(key)
            if state == "held":  # another process is paying for it: wait for its answer
                found = await claim_or_find(home, key, functools.partial(self._find, key))
                if found is None:
                    gate.hold(key)
        except SharedStateError as e:
            self._go_alone(e)
            return await self._send(key, text)
        if found is not None:
            return found
        answered = False
        try:
            outcome = await self._send(key, text)
            # Stored where others look by now (see _send): the claim is left to expire.
            answered = outcome.error is None
        finally:
            gate.leave(key, answered)
        return outcome

    def _claims(self) -> ClaimGate[Outcome] | None:
        """The gate of this batch's claims in the shared home, or None when there is no home."""
        home = self.home
        if home is None:
            return None
        if self._gate is None or self._gate.home is not home:
            self._gate = ClaimGate(home, self._find_many, window=2 * self.width())
        return self._gate

    async def _find(self, key: str) -> Outcome | None:
        """An answer another process stored: in the local cache, then in the shared tier."""
        return (await self._find_many([key]))[0]

    async def _find_many(self, keys: list[str]) -> list[Outcome | None]:
        """``_find`` of many keys: one cache read and one look in the shared tier for them all."""
        found: list[Outcome | None] = [None] * len(keys)
        if self.cache is not None:
            hits = await asyncio.get_running_loop().run_in_executor(
                engine_loop().cache_reads, self.cache.get_many, keys
            )
            found = [self.decode(hit) for hit in hits]
        home = self.home
        missing = [i for i, outcome in enumerate(found) if outcome is None]
        if home is None or not home.holds_answers or not missing:
            return found
        texts = await home.get_answers([keys[i] for i in missing])
        for i, text in zip(missing, texts, strict=True):
            if text is None:
                continue
            try:
                entry = json.loads(text)
            except ValueError:
                continue  # a damaged shared entry is a miss
            outcome = found[i] = self.decode(entry)
            if outcome is not None and self.cache is not None:
                self.cache.put(keys[i], entry, self)
        return found

    async def _share(self, key: str, entry: dict[str, Any]) -> None:
        """Over Redis, put an answer in the tier every machine reads (before its claim ends)."""
        if self.home is not None and self.home.holds_answers:
            try:
                await self.home.put_answer(key, json.dumps(entry))
            except SharedStateError as e:
                self._go_alone(e)

    def _go_alone(self, error: SharedStateError) -> None:
        # A broken home must not stop the run: go on without claims, and say so once.
        if self.home is not None:
            report_broken(self.home, error)
            self.home = None

    async def _send(self, key: str, text: str) -> Outcome:
        """One chat request with retries, content checks and repair; caches a success."""
        post = self.spec.post
        client = self.client
        transport = client.transport
        body = self.template.body(text)
        chars = len(text) + len(self.spec.system or "")
        # Tokens as this endpoint counts them (calibrated from answers), plus the answer's cap.
        tokens = client.limiter.tokens_for(chars) + self.max_tokens
        # What a repair round may send back of a bad answer: no more than the request itself.
        echo_limit = len(text) + len(self.spec.system or "")
        repairs = 0
        while True:
            try:
                completion: Completion = await client.send(
                    functools.partial(transport.chat, body),
                    tokens=tokens,
                    policy=self.policy,
                    progress=self.progress,
                )
            except RowError as e:
                return Outcome(error=e)
            usage = (completion.prompt_tokens, completion.completion_tokens)
            if not repairs:
                client.limiter.observe({}, chars, completion.prompt_tokens)
            try:
                value = self._check(completion)
            except ContentError as e:
                runaway = completion.finish_reason == "length"
                fix = None
                if repairs < MAX_REPAIRS and not runaway:
                    fix = post.repair(_clip(completion.text or "", echo_limit), e)
                if fix is None:
                    if runaway and not isinstance(e, Truncated):
                        e.message += (
                            "; the answer ran away: it was cut off at max_tokens "
                            f"({self.max_tokens or 'the endpoint default'}) so it was not sent "
                            "back for repair; raise max_tokens or ask for a shorter answer"
                        )
                        e.args = (e.message,)
                    return Outcome(None, e, False, *usage, completion.finish_reason)
                repairs += 1
                body = {**body, "messages": [*body["messages"], *fix]}
                continue
            entry = {
                "text": completion.text,
                "usage": list(usage),
                "finish": completion.finish_reason,
            }
            if self.cache is not None:
                # Put before the flight ends: a batch that finds no flight finds the answer.
                self.cache.put(key, entry, self)
            await self._share(key, entry)
            return Outcome(value, None, False, *usage, completion.finish_reason)

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

    async def embed_many_async(
        self, texts: Sequence[str], keys: Sequence[str], batch_size: int
    ) -> list[Outcome]:
        """Embeddings of many inputs, ``batch_size`` inputs per request."""
        client = self.client
        transport = client.transport
        results: list[Outcome] = [Outcome()] * len(texts)
        chunks = iter(range(0, len(texts), batch_size))
        params = self.params

        async def worker() -> None:
            for start in chunks:
                part = list(texts[start : start + batch_size])
                outcomes: list[Outcome]
                if self.aborted is not None:
                    outcomes = [Outcome(error=self.aborted.cause) for _ in part]
                else:
                    outcomes = await self._embed_part(
                        client, transport.embed, part, keys[start:], params
                    )
                for i, outcome in enumerate(outcomes):
                    results[start + i] = outcome
                    self.count(outcome)

        workers = min(self.width(), -(-len(texts) // batch_size))
        await gather_all(worker() for _ in range(workers))
        return results

    async def _embed_part(
        self,
        client: EndpointClient,
        embed: Callable[..., Awaitable[Embeddings]],
        part: list[str],
        keys: Sequence[str],
        params: dict[str, Any],
    ) -> list[Outcome]:
        try:
            answer = await client.send(
                functools.partial(embed, self.model, part, params),
                tokens=sum(estimate_tokens(t) for t in part),
                policy=self.policy,
                progress=self.progress,
            )
        except BatchAborted as e:
            self.aborted = self.aborted or e
            return [Outcome(error=e.cause) for _ in part]
        except RowError as e:
            return [Outcome(error=e) for _ in part]
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
                self.cache.put(keys[i], {"vector": vector, "usage": [share, 0]}, self)
        return outcomes


# Workers start this many at a time, a loop turn apart (see gather_all).
START_STEP = 16


async def gather_all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run tasks together; if one fails or the caller is cancelled, cancel the rest (no more
    paid calls after the caller has gone).

    Tasks start ``START_STEP`` at a time, with a turn of the loop between: the first ones get
    their connections and send while the rest start. Started all at once, a thousand workers
    each took their first step before any connection was made, and the first request went out
    a third of a second late.
    """
    tasks: list[asyncio.Future[None]] = []
    try:
        for coro in coros:
            tasks.append(asyncio.ensure_future(coro))
            if len(tasks) % START_STEP == 0:
                await asyncio.sleep(0)
                for task in tasks:  # a worker failed already: start no more
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        await task  # raises it
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _usage(value: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of a cache entry's usage; zeros when it is unreadable."""
    try:
        prompt, completion = value
        return max(0, int(prompt)), max(0, int(completion))
    except (TypeError, ValueError):
        return 0, 0


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


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


def estimate_tokens(text: str) -> int:
    """A provider-neutral token estimate: about four characters a token."""
    return len(text) // 4 + 1


# --------------------------------------------------------------------------------------------
# Series in, Series out
# --------------------------------------------------------------------------------------------
DETAIL_FIELDS = {
    "error": pl.String(),
    "cached": pl.Boolean(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "finish_reason": pl.String(),
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
    send: Callable[[Batch, list[str], list[str]], Coroutine[Any, Any, list[Outcome]]],
) -> pl.Series:
    """Dedup, split cache hits from misses, send the misses, scatter back to row order."""
    name = column.name
    # One hash pass: each distinct prompt and the rows that hold it.
    groups = (
        column.rename("__key")
        .to_frame()
        .with_row_index("__row")
        .group_by("__key")
        .agg("__row")
        .filter(pl.col("__key").is_not_null())
    )
    if groups.height == 0:
        return pl.Series(name, [None] * column.len(), dtype=output_dtype(spec))
    texts: list[str] = groups.get_column("__key").to_list()
    batch = Batch(spec, kind)
    keys, raws = batch.lookup_raw(texts)
    # Cached plain-text answers are decoded as columns; anything else entry by entry. A first
    # run has nothing to decode: its first request goes out without a pass over the misses.
    table: pl.DataFrame | None = None
    in_table = [False] * len(raws)
    found: list[Outcome | None] = [None] * len(raws)
    if raws.count(None) < len(raws):
        table = batch.decode_columns(raws)
        if table is not None:
            in_table = table.get_column("hit").to_list()
        found = batch.decode_raws(
            [None if hit else raw for hit, raw in zip(in_table, raws, strict=True)]
        )
    # What is not in the table: cached entries of another shape, then the answers sent.
    known = {i: o for i, o in enumerate(found) if o is not None}
    misses = [i for i, o in enumerate(found) if o is None and not in_table[i]]
    sent: list[Outcome] = []
    if misses:
        miss_texts = [texts[i] for i in misses]
        miss_keys = [keys[i] for i in misses]
        if batch.settings.batch:
            from .batch import session_for

            sent = session_for(batch.settings.replace(model=batch.model)).complete(
                batch, miss_texts, miss_keys
            )
        else:
            sent = batch.run(send(batch, miss_texts, miss_keys), len(misses))
        known.update(zip(misses, sent, strict=True))
    _report_failures(
        [o.error for o in sent if o.error is not None], len(texts), batch.settings, spec.details
    )
    results = pl.DataFrame(_columns(table, known, len(texts), spec))
    result = (
        results.select(pl.struct(pl.all())).to_series()
        if spec.details
        else results.get_column("value")
    )
    # Back to row order: each row takes its prompt's result; a null prompt's row stays null.
    rows = groups.get_column("__row")
    prompt_of_row = pl.repeat(None, column.len(), dtype=pl.UInt32, eager=True).scatter(
        rows.explode(),
        pl.int_range(rows.len(), dtype=pl.UInt32, eager=True).repeat_by(rows.list.len()).explode(),
    )
    return result.gather(prompt_of_row).alias(name)


def _columns(
    table: pl.DataFrame | None, known: dict[int, Outcome], size: int, spec: CallSpec
) -> dict[str, pl.Series]:
    """The result columns of the unique prompts: the decoded table with ``known`` outcomes put
    in their places (or, without a table, the outcomes alone)."""
    fields: dict[str, tuple[pl.DataType, Callable[[Outcome], Any]]] = {
        "value": (spec.post.dtype, lambda o: o.value),
    }
    if spec.details:
        fields.update(
            {
                "error": (pl.String(), lambda o: _error_text(o.error)),
                "cached": (pl.Boolean(), lambda o: o.cached),
                "prompt_tokens": (pl.Int64(), lambda o: o.prompt_tokens),
                "completion_tokens": (pl.Int64(), lambda o: o.completion_tokens),
                "finish_reason": (pl.String(), lambda o: o.finish_reason),
            }
        )
    # Without a table every place is known; else the table's places are patched.
    places = list(range(size)) if table is None else list(known)
    columns: dict[str, pl.Series] = {}
    for field_name, (dtype, of) in fields.items():
        values = pl.Series([of(known[i]) for i in places], dtype=dtype)
        if table is None:
            columns[field_name] = values
            continue
        if field_name in ("error", "cached"):  # every answer in the table is a cached one
            base = pl.repeat(None if field_name == "error" else True, size, dtype=dtype, eager=True)
        else:
            base = table.get_column(field_name).cast(dtype)
        columns[field_name] = base.scatter(places, values) if places else base
    return columns


def _error_text(error: RowError | None) -> str | None:
    if error is None:
        return None
    text = f"{error.reason}: {error.message}"
    if error.raw:
        text += f" (raw answer: {error.raw[:500]!r})"
    return text


def _report_failures(failed: list[RowError], total: int, settings: Settings, details: bool) -> None:
    if not failed:
        return
    first = failed[0]
    summary = (
        f"{len(failed)} of {total} unique prompt(s) failed; first: {first.reason}: {first.message}"
    )
    if settings.on_error == "raise":
        raise TooManyFailures(
            f"{summary}. The answers that succeeded are cached, so a rerun sends only the failed "
            "prompts. Pass on_error='null' (with details=True to keep each row's error) to "
            "get nulls instead.",
            failed=len(failed),
            total=total,
        ) from first
    if not details:
        warnings.warn(
            f"{summary}. Those rows are null; details=True keeps each row's error.", stacklevel=2
        )
