"""Settings: where requests go, how fast, how patiently, and where results are cached."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from .errors import ConfigError

OnError = Literal["raise", "null"]
OPENAI_URL = "https://api.openai.com/v1"


def default_cache_dir() -> Path:
    """The cache folder used unless told otherwise: $POLARS_LLM_CACHE_DIR, else the user cache dir."""
    env = os.environ.get("POLARS_LLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "polars-llm"


def _cache_enabled_by_env() -> bool:
    return os.environ.get("POLARS_LLM_CACHE", "1").strip().lower() not in {
        "0",
        "off",
        "false",
        "no",
    }


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How polars-llm calls an endpoint. Frozen; build a new one with ``replace``.

    Parameters
    ----------
    base_url
        OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1``. Default: ``$OPENAI_BASE_URL``;
        else OpenAI when ``$OPENAI_API_KEY`` is set; else the embedded local model.
    api_key
        Default: ``$OPENAI_API_KEY``. Never part of a cache key.
    model
        Default model for calls that do not name one: ``gpt-4o-mini`` on a remote endpoint,
        ``local`` on the embedded model.
    concurrency
        Requests in flight at once, per endpoint, across the whole process.
    rpm, tpm
        Client-side budgets of requests and tokens per minute (``None``: unlimited). Tokens are
        charged as the prompt estimate plus ``max_tokens``, as providers do.
    timeout
        Seconds one request may take before it is abandoned and retried.
    max_attempts
        Attempts per request for 5xx, timeouts and connection errors. 429s do not count: they
        are retried, after the wait the endpoint asks for, until ``retry_budget`` runs out.
    retry_budget
        Seconds a row may spend across all its attempts, waits included.
    backoff_base, backoff_max
        Exponential backoff between attempts: ``base * 2**n`` seconds with full jitter, at most ``max``.
    cache, cache_dir
        Whether results are cached on disk, and where. Default: on, unless ``$POLARS_LLM_CACHE=0``;
        folder ``$POLARS_LLM_CACHE_DIR`` or ``~/.cache/polars-llm``. Both are read at call time.
    on_error
        ``"raise"`` (default): a failed row raises after the batch, naming the count and first reason;
        the rows that succeeded are already cached, so a rerun retries only the failures.
        ``"null"``: a failed row gives null (with a warning); ask for ``details=True`` to keep the reason.
    truncated_is_error
        Treat ``finish_reason == "length"`` (the answer hit ``max_tokens``) as a row error.
    progress
        Show a progress bar on a terminal: ``None`` decides by whether stderr is a terminal.
    shared_url
        Where processes on several machines share one rate budget, cooldown, in-flight claims
        and answers: a ``redis://host:port/db`` URL. Default: ``$POLARS_LLM_SHARED_URL``; else
        processes of one machine share them beside the cache folder.
    batch
        Send the misses as OpenAI Batch API jobs (half the price, answers within 24 hours)
        instead of synchronous calls.
    transport
        How requests are sent: ``"aiohttp"`` (default, a lean client) or ``"openai"`` (the
        official SDK, for providers with quirks such as Azure).
    """

    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    concurrency: int = 32
    rpm: int | None = None
    tpm: int | None = None
    timeout: float = 180.0
    max_attempts: int = 8
    retry_budget: float = 900.0
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    cache: bool | None = None
    cache_dir: Path | str | None = None
    on_error: OnError = "raise"
    truncated_is_error: bool = False
    progress: bool | None = None
    shared_url: str | None = None
    batch: bool = False
    transport: Literal["aiohttp", "openai"] = "aiohttp"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wanted = type_problem(f.name, value)
            if wanted is not None:
                raise ConfigError(f"setting {f.name} must be {wanted}, got {value!r}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive number or None, got {value}")
        for name in ("timeout", "retry_budget"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive seconds, got {getattr(self, name)}")
        for name in ("backoff_base", "backoff_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be zero or more seconds, got {getattr(self, name)}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_url is not None:
            _check_url(self.base_url)
        if self.shared_url is not None:
            from .shared import check_shared_url

            check_shared_url(self.shared_url)

    def __repr__(self) -> str:
        # The API key never shows: not in logs, task names or a dashboard.
        shown = ", ".join(
            f"{f.name}={'***' if f.name == 'api_key' and self.api_key else repr(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        )
        return f"Settings({shown})"

    def cache_path(self) -> Path | None:
        """The cache folder to use for a call, or None when caching is off."""
        enabled = self.cache if self.cache is not None else _cache_enabled_by_env()
        if not enabled:
            return None
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def replace(self, **changes: object) -> Settings:
        """A copy with the given fields changed; ``None`` is a value too (``rpm=None`` unsets)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes) if changes else self  # type: ignore[arg-type]

    def endpoint(self, model: str | None = None) -> Endpoint:
        """Where a call goes: explicit base_url, then the environment, then the embedded model."""
        model = model or self.model
        if model == "local":
            return Endpoint.embedded()
        base_url = self.base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = self.api_key or os.environ.get("OPENAI_API_KEY") or None
        if base_url is None and api_key is None:
            if model is not None:
                # The embedded model answers only for itself: silently answering a named
                # remote model with it would pass off a tiny model's text as that model's.
                raise ConfigError(
                    f"model {model!r} needs an endpoint and none is configured: give base_url= "
                    "(or $OPENAI_BASE_URL), or $OPENAI_API_KEY for OpenAI; or use model='local' "
                    "for the embedded model"
                )
            return Endpoint.embedded()
        base_url = base_url or OPENAI_URL
        _check_url(base_url)
        return Endpoint(base_url=base_url.rstrip("/"), api_key=api_key or "unused", local=False)

    def default_model(self, endpoint: Endpoint) -> str:
        """The model to use when a call does not name one."""
        if endpoint.local:
            return "local"
        return self.model or "gpt-4o-mini"


@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint. ``local`` endpoints start the embedded model on first use."""

    base_url: str
    api_key: str = field(repr=False)
    local: bool = False

    @classmethod
    def embedded(cls) -> Endpoint:
        return cls(base_url="local:", api_key="local", local=True)


def type_problem(name: str, value: object) -> str | None:
    """What setting ``name`` must be, when ``value`` is not that (from a TOML file, say); None
    when it fits, or when ``name`` is no setting."""
    hint = _field_types().get(name)
    if hint is None or _fits(value, hint):
        return None
    return _describe(hint)


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _fits(value: object, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float))
    if hint is Path:
        return isinstance(value, (str, Path))
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(dict.fromkeys(kinds))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    return names.get(hint, "a string" if hint is Path else str(hint))


def _check_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"endpoint {url!r} is not an http(s) URL; "
            "give one like 'http://localhost:8000/v1' (base_url= or $OPENAI_BASE_URL)"
        )


_defaults = Settings()


def configure(settings: Settings | None = None, **changes: object) -> Settings:
    """Set the process-wide default settings used by every call that does not pass its own.

    ``configure(concurrency=64, rpm=500)`` changes some fields (``configure(rpm=None)`` removes
    the limit); ``configure(Settings(...))`` replaces them all. Returns the new defaults.
    """
    global _defaults
    base = settings if settings is not None else _defaults
    _defaults = base.replace(**changes)
    return _defaults


def get_settings() -> Settings:
    """The current process-wide default settings."""
    return _defaults
