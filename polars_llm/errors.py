"""Errors raised by polars-llm.

Every error says what went wrong and what to do about it. The tree::

    PolarsLLMError
    ├── ConfigError            bad settings or arguments (fix the call or the config)
    │   └── TemplateError      a prompt template is malformed or names a missing column
    │       └── ColumnMismatch a placeholder or step name does not fit the input's columns
    ├── InputError             the input data or file cannot be used
    │   └── EmptyInput         the input file has no rows
    ├── CacheWriteError        answers could not be written to the cache folder
    ├── BatchAborted           a fatal error (bad key, unknown model) stopped the whole batch
    ├── TooManyFailures        more rows failed than the caller allowed
    └── RowError               why one row has no value (kept per row with on_error="null")
        ├── RetryableError     worth another attempt
        │   ├── RateLimited    HTTP 429
        │   ├── ServerError    HTTP 5xx
        │   ├── RequestTimeout the request took longer than the timeout
        │   └── ConnectionFailed  the connection failed or was reset
        ├── FatalError         the endpoint refused the request; retrying will not help
        │   ├── AuthError      HTTP 401/403: the API key is missing or wrong
        │   ├── QuotaExceeded  HTTP 429 insufficient_quota: the account is out of credit
        │   ├── ModelNotFound  HTTP 404: no such model or endpoint path
        │   └── BadRequest     HTTP 400/413/422: this request is malformed or too long
        └── ContentError       the endpoint answered, but the answer is not usable
            ├── EmptyCompletion
            ├── Truncated       finish_reason "length" while that is treated as an error
            ├── SchemaMismatch  structured output that does not validate
            └── LabelMismatch   a classification answer outside the label set
"""

from __future__ import annotations

import re


class PolarsLLMError(Exception):
    """Base class of every error polars-llm raises."""


class ConfigError(PolarsLLMError, ValueError):
    """Settings or arguments that cannot work; the message says which and how to fix them."""


class TemplateError(ConfigError):
    """A prompt template is malformed or names a column that does not exist."""


class ColumnMismatch(TemplateError):
    """A placeholder names no column of the input, or a step is named like one of its columns."""


class InputError(PolarsLLMError):
    """The input data or file cannot be used."""


class EmptyInput(InputError):
    """The input file has no rows: nothing to enrich (a scheduler may skip the task)."""


class CacheWriteError(PolarsLLMError):
    """Answers could not be written to the cache folder (full disk, permissions)."""


_abort_causes: dict[str, RowError] = {}


class BatchAborted(PolarsLLMError):
    """A fatal error stopped the whole batch, so that it does not fail row by row."""

    def __init__(self, message: str, cause: RowError | None = None) -> None:
        super().__init__(message)
        # Polars re-raises an expression's error by calling its class with the message, to
        # which it adds the expression after a blank line: find the cause it was raised with.
        said = message.split("\n\n", 1)[0]
        if cause is None:
            cause = _abort_causes.get(said)
        else:
            _abort_causes[said] = cause
            while len(_abort_causes) > 64:
                del _abort_causes[next(iter(_abort_causes))]
        self.cause = cause


class TooManyFailures(PolarsLLMError):
    """More rows failed than the caller allowed."""

    # Every argument but the message has a default: Polars re-raises an exception from inside an
    # expression by calling its class with the message alone.
    def __init__(self, message: str, failed: int = 0, total: int = 0) -> None:
        super().__init__(message)
        if not failed and not total:
            # Rebuilt by Polars from the message alone: the counts are in its first words.
            match = re.search(r"(\d+) of (\d+) ", message)
            if match:
                failed, total = int(match.group(1)), int(match.group(2))
        self.failed = failed
        self.total = total


class RowError(PolarsLLMError):
    """Why one row has no value.

    ``status`` is the HTTP status when there was one; ``raw`` keeps the text the model
    returned when the problem is with its content.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        raw: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.raw = raw

    @property
    def reason(self) -> str:
        """A short stable name for reports: the class name."""
        return type(self).__name__


class RetryableError(RowError):
    """An error worth another attempt after a pause."""


class RateLimited(RetryableError):
    """HTTP 429: the endpoint asks us to slow down."""


class ServerError(RetryableError):
    """HTTP 5xx: the endpoint failed."""


class RequestTimeout(RetryableError):
    """The request took longer than the timeout."""


class ConnectionFailed(RetryableError):
    """The connection could not be made or was reset."""


class FatalError(RowError):
    """The endpoint refused the request; the same request will be refused again."""


class AuthError(FatalError):
    """HTTP 401/403: the API key is missing, wrong or not allowed."""


class QuotaExceeded(FatalError):
    """HTTP 429 with code insufficient_quota: no retry helps until the account has credit."""


class ModelNotFound(FatalError):
    """HTTP 404: the model or endpoint path does not exist."""


class BadRequest(FatalError):
    """HTTP 400/413/422: the endpoint rejected this particular request."""


class ContentError(RowError):
    """The endpoint answered, but the answer cannot be used."""


class EmptyCompletion(ContentError):
    """The model returned no text."""


class Truncated(ContentError):
    """The model stopped at max_tokens (finish_reason "length") and that was asked to be an error."""


class SchemaMismatch(ContentError):
    """Structured output that is not valid JSON for the schema."""


class LabelMismatch(ContentError):
    """A classification answer that is not one of the labels."""
