"""Which keyword of an ``.llm`` method or a ``Step`` is a setting, and which goes to the endpoint.

Every :class:`~polars_llm.settings.Settings` field is a keyword (``rpm=``, ``timeout=``, ...) and
changes how polars-llm calls the endpoint; a chat-completions parameter (``temperature=``,
``seed=``, ...) goes into the request body; provider-specific parameters go through
``extra_body=``, as in the openai SDK. Anything else is refused by name, so that nothing reaches
the request body that the caller did not mean as a request parameter.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .settings import Settings

SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))

# The chat-completions body parameters an OpenAI-compatible endpoint understands (besides
# ``model`` and ``messages``, which polars-llm builds itself).
CHAT_PARAMS = frozenset(
    {
        "audio",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
# Parameters of the embeddings endpoint (besides ``model`` and ``input``).
EMBED_PARAMS = frozenset({"dimensions", "user"})
# Set by polars-llm itself: a caller giving them would break the answer's parsing.
RESERVED = frozenset({"model", "messages", "input", "stream", "encoding_format"})


def split_options(
    options: Mapping[str, Any], *, kind: str = "chat", where: str = "this call"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keywords into (settings overrides, request parameters); refuse unknown ones.

    ``extra_body`` (a mapping) is merged into the request parameters as they are: that is how
    provider-specific parameters are sent. A request parameter given as ``None`` is left out.

    >>> split_options({"rpm": 600, "temperature": 0.2, "extra_body": {"top_k": 5}})
    ({'rpm': 600}, {'temperature': 0.2, 'top_k': 5})
    >>> split_options({"tempreature": 0.2})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    polars_llm.errors.ConfigError: this call: unknown keyword 'tempreature' (did you mean 'temperature'?); ...
    """
    allowed = CHAT_PARAMS if kind == "chat" else EMBED_PARAMS
    overrides: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for name, value in options.items():
        if name in SETTING_NAMES:
            overrides[name] = value
        elif name in allowed:
            if value is not None:
                params[name] = value
        elif name == "extra_body":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: extra_body must be a mapping, got {value!r}")
            clash = RESERVED.intersection(value)
            if clash:
                raise ConfigError(
                    f"{where}: extra_body may not set {', '.join(sorted(clash))}; "
                    "polars-llm builds those itself"
                )
            params.update(value)
        else:
            raise ConfigError(_unknown(name, allowed, where))
    return overrides, params


def _unknown(name: str, allowed: frozenset[str], where: str) -> str:
    close = difflib.get_close_matches(name, [*allowed, *SETTING_NAMES, "extra_body"], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"{where}: unknown keyword {name!r}{hint}; it is neither a setting "
        "(see help(polars_llm.Settings)) nor a request parameter. Send provider-specific "
        "parameters with extra_body={...}"
    )
