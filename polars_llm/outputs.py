"""What an answer's text becomes in the column: text, a label of a set, or a typed struct.

Each post-processor has a ``fingerprint`` that goes into the cache key, so changing the labels or
the schema never serves an answer that was checked against the old ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

import polars as pl

from .errors import ConfigError, ContentError, LabelMismatch
from .request import canonical_json
from .schema import OutputSchema


class PostProcess(Protocol):
    """Turns an answer's text into the column's value; part of the cache key."""

    @property
    def fingerprint(self) -> str | None:
        """What of the post-processing goes into the cache key (None: nothing)."""
        ...

    @property
    def dtype(self) -> pl.DataType:
        """The column's dtype, known before any call."""
        ...

    def body_params(self) -> dict[str, Any]:
        """Extra request-body fields (e.g. ``response_format``)."""
        ...

    def parse(self, answer: Any) -> Any:
        """The value for the column from the answer's text (chat) or vector (embeddings);
        raises ``ContentError`` when it is not usable."""
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


def _follow_up(text: str, instruction: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}, {"role": "user", "content": instruction}]


class LabelPost:
    """One label of a fixed set per row, as a ``pl.Enum``; any other answer is that row's error.

    The request asks for ``{"label": ...}`` through a JSON schema whose enum is the label set, so
    endpoints with structured output (OpenAI, vLLM, llama.cpp's grammar) can only answer a
    label. A plain-text answer is still accepted when it names exactly one label.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        if isinstance(labels, str):
            # list("pos") would be the labels "p", "o", "s".
            raise ConfigError(
                f"classify needs a list of labels, got the string {labels!r}; "
                f"write [{labels!r}, ...]"
            )
        labels = list(labels)
        if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
            raise ConfigError("classify needs a non-empty list of non-empty string labels")
        if len({x.casefold() for x in labels}) != len(labels):
            raise ConfigError(f"classify labels must differ ignoring case, got {labels}")
        self.labels = labels
        self.dtype = pl.Enum(labels)
        self.fingerprint = "labels:v2:" + canonical_json(labels)
        self._by_folded = {x.casefold(): x for x in labels}
        self.instruction = (
            "Answer with exactly one of these labels and nothing else: " + ", ".join(labels) + "."
        )

    def system(self, system: str | None) -> str:
        """The system message: the caller's, then the instruction naming the labels."""
        return f"{system}\n\n{self.instruction}" if system else self.instruction

    def body_params(self) -> dict[str, Any]:
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": self.labels}},
            "required": ["label"],
            "additionalProperties": False,
        }
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "label", "schema": schema, "strict": True},
            }
        }

    def parse(self, text: str) -> str:
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("label"), str):
            text = answer["label"]
        # Small models decorate their answers: quotes, a full stop, "Label: x", extra words.
        cleaned = text.strip().strip("\"'`*.!").strip()
        found = self._by_folded.get(cleaned.casefold())
        if found is not None:
            return found
        folded = cleaned.casefold()
        mentioned = {
            x for f, x in self._by_folded.items() if re.search(rf"\b{re.escape(f)}\b", folded)
        }
        if len(mentioned) == 1:
            return mentioned.pop()
        raise LabelMismatch(
            f"the answer {text.strip()[:80]!r} is not one of the labels {self.labels}", raw=text
        )

    def repair(self, text: str, error: ContentError) -> list[dict[str, str]] | None:
        return _follow_up(text, self.instruction)


class SchemaPost:
    """A JSON object per row, validated against a Pydantic model or JSON schema, as a ``pl.Struct``."""

    def __init__(self, schema: Any) -> None:
        self.schema = OutputSchema.from_user(schema)
        self.dtype = self.schema.dtype
        self.fingerprint = "schema:" + self.schema.fingerprint

    def body_params(self) -> dict[str, Any]:
        return {"response_format": self.schema.response_format()}

    def parse(self, text: str) -> dict[str, Any]:
        return self.schema.parse(text)

    def repair(self, text: str, error: ContentError) -> list[dict[str, str]] | None:
        return _follow_up(
            text,
            f"That answer does not match the JSON schema: {error.message}. "
            "Reply with only a JSON object that matches the schema.",
        )


# Output sizes of well-known embedding models, so the column's dtype is known before any call.
KNOWN_EMBEDDING_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


class EmbedPost:
    """A fixed-size float vector per row, as ``pl.Array(pl.Float32, dim)``."""

    def __init__(self, model: str | None, dimensions: int | None) -> None:
        dim = dimensions or KNOWN_EMBEDDING_DIMS.get(model or "")
        if not dim or dim < 1:
            which = f"model {model!r}" if model else "the default embedding model"
            raise ConfigError(
                f"the size of the embeddings of {which} is not known before calling it; "
                "pass dimensions=N (its output size), or a known model such as "
                "model='text-embedding-3-small'"
            )
        self.dim = dim
        self.dtype = pl.Array(pl.Float32, dim)
        self.fingerprint = f"embedding:{dim}"

    def body_params(self) -> dict[str, Any]:
        return {}

    def parse(self, vector: Any) -> list[float]:
        if not isinstance(vector, list) or len(vector) != self.dim:
            size = len(vector) if isinstance(vector, list) else type(vector).__name__
            raise ContentError(
                f"expected an embedding of {self.dim} numbers, got {size}; "
                "pass dimensions= equal to the model's output size"
            )
        return vector

    def repair(self, text: str, error: ContentError) -> list[dict[str, str]] | None:
        return None
