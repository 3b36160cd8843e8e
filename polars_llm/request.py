"""Requests and their cache keys.

A key is the sha256 of the canonical JSON (sorted keys, no spaces) of everything that shapes the
answer: endpoint, model, messages, every parameter, the output schema and any post-processing.
The API key is never part of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

# Bump when the meaning of cached values changes, so old entries are never misread.
KEY_VERSION = 1


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Request:
    """One call to an endpoint: a chat completion or an embedding."""

    endpoint: str
    model: str
    kind: str = "chat"
    messages: tuple[Mapping[str, str], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    # Fingerprint of the output schema, label set or other post-processing of the answer.
    post: str | None = None
    input: str | None = None

    def payload(self) -> dict[str, Any]:
        """Everything that shapes the answer, as plain JSON-able data."""
        return {
            "v": KEY_VERSION,
            "endpoint": self.endpoint,
            "model": self.model,
            "kind": self.kind,
            "messages": [dict(m) for m in self.messages],
            "params": dict(self.params),
            "post": self.post,
            "input": self.input,
        }

    def key(self) -> str:
        """The cache key: sha256 hex of the canonical JSON payload."""
        return hashlib.sha256(canonical_json(self.payload()).encode()).hexdigest()


class RequestTemplate:
    """Every part of a request but the one varying text, so a million keys cost a million hashes.

    ``key(text)`` equals ``request(text).key()``: the canonical JSON is split around the varying
    text once, and each key hashes prefix + the text's JSON + suffix.
    """

    _HOLE = "\x00polars-llm-hole\x00"

    def __init__(
        self,
        *,
        endpoint: str,
        model: str,
        kind: str = "chat",
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        post: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.kind = kind
        self.system = system
        self.params = dict(params or {})
        self.post = post
        text = canonical_json(self.request(self._HOLE).payload())
        prefix, suffix = text.split(json.dumps(self._HOLE, ensure_ascii=False))
        # The prefix is hashed once; each key continues from a copy of that state.
        self._prefix_hash = hashlib.sha256(prefix.encode())
        self._suffix = suffix.encode()

    def messages(self, text: str) -> tuple[dict[str, str], ...]:
        """The chat messages for one prompt."""
        user = {"role": "user", "content": text}
        if self.system is None:
            return (user,)
        return ({"role": "system", "content": self.system}, user)

    def request(self, text: str) -> Request:
        """The full request for one prompt (chat) or one input (embedding)."""
        if self.kind == "chat":
            return Request(
                endpoint=self.endpoint,
                model=self.model,
                kind=self.kind,
                messages=self.messages(text),
                params=self.params,
                post=self.post,
            )
        return Request(
            endpoint=self.endpoint,
            model=self.model,
            kind=self.kind,
            params=self.params,
            post=self.post,
            input=text,
        )

    def key(self, text: str) -> str:
        """The cache key of ``request(text)``, computed without building it."""
        # orjson writes a string exactly as json.dumps(ensure_ascii=False) does, in a third of
        # the time (checked for every code point in tests/test_request.py).
        h = self._prefix_hash.copy()
        h.update(orjson.dumps(text))
        h.update(self._suffix)
        return h.hexdigest()

    def keys(self, texts: Sequence[str]) -> list[str]:
        """``key(text)`` of each text, in order: the loop of a million cache lookups."""
        start, suffix, dumps = self._prefix_hash, self._suffix, orjson.dumps
        keys = []
        for text in texts:
            h = start.copy()
            h.update(dumps(text))
            h.update(suffix)
            keys.append(h.hexdigest())
        return keys

    def body(self, text: str) -> dict[str, Any]:
        """The JSON body sent to the endpoint for one chat prompt."""
        return {"model": self.model, "messages": list(self.messages(text)), **self.params}
