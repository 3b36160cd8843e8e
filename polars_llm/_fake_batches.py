"""The Files and Batches endpoints of the fake server (see :mod:`polars_llm.testing`).

``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}`` and ``GET /v1/files/{id}/content``;
``POST /v1/batches``, ``GET /v1/batches`` (newest first, ``after``/``limit`` pagination),
``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``, as the official ``openai`` SDK
calls them.

A batch moves through OpenAI's statuses on a clock of its own: ``validating`` for
``validate_seconds``, ``in_progress`` for ``batch_seconds`` (``request_counts`` grow as lines are
done), ``finalizing`` for ``finalize_seconds``, then ``completed`` with an output file whose lines
are shuffled (match them by ``custom_id``) and an error file. The clock is real time plus what
:meth:`FakeBatches.advance` (or ``POST /_fake/batches/advance``) added, so a test can hold batches
pending with a long ``batch_seconds`` and then jump past it.

Faults: validation fails the batch (status ``failed`` with ``errors``) for a duplicate
``custom_id``, several models in one file, a line that is not a request to the batch's endpoint,
an empty file or more than ``max_lines`` lines. Each line draws, from a generator seeded with
``seed``, whether it is answered with a 500 (``error_rate``) or is left undone when the batch
expires (``expire_rate``: the batch then ends ``expired`` with those lines marked
``batch_expired``). A line whose prompt contains ``refuse`` is answered 400. A batch whose
24-hour window passes on the clock expires too; a cancelled batch keeps the lines done so far
and marks the others ``batch_cancelled``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .testing import FakeServer

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
WINDOW_SECONDS = 24 * 3600
MAX_LINES = 50_000
# OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA = (16, 64, 512)


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class _Line:
    """One request line of a batch and its fate, drawn when the batch was created."""

    custom_id: str
    body: dict[str, Any]
    fault: float
    kind: float


@dataclass
class _Batch:
    id: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: float
    status: str = "validating"
    lines: list[_Line] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # the order the lines are worked on
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    stamps: dict[str, float] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    done: int = 0  # lines of ``order`` done so far
    finished: dict[str, int] = field(default_factory=dict)  # completed/failed counts at the end

    def json(self) -> dict[str, Any]:
        if self.finished:
            counts = {"total": len(self.lines), **self.finished}
        else:
            counts = {"total": len(self.lines), "completed": self.done, "failed": 0}
        stamp = self.stamps.get
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": _int(stamp("in_progress")),
            "expires_at": int(self.created_at + WINDOW_SECONDS),
            "finalizing_at": _int(stamp("finalizing")),
            "completed_at": _int(stamp("completed")),
            "failed_at": _int(stamp("failed")),
            "expired_at": _int(stamp("expired")),
            "cancelling_at": _int(stamp("cancelling")),
            "cancelled_at": _int(stamp("cancelled")),
            "request_counts": counts,
            "metadata": self.metadata,
        }


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


class FakeBatches:
    """The Files and Batches API of one FakeServer; its state lives on the server's loop."""

    def __init__(
        self,
        server: FakeServer,
        *,
        batch_seconds: float = 1.0,
        validate_seconds: float = 0.0,
        finalize_seconds: float = 0.0,
        error_rate: float = 0.0,
        expire_rate: float = 0.0,
        refuse: str | None = None,
        max_lines: int = MAX_LINES,
        seed: int = 0,
    ) -> None:
        for name, rate in (("batch_error_rate", error_rate), ("batch_expire_rate", expire_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        self.server = server
        self.batch_seconds = batch_seconds
        self.validate_seconds = validate_seconds
        self.finalize_seconds = finalize_seconds
        self.error_rate = error_rate
        self.expire_rate = expire_rate
        self.refuse = refuse
        self.max_lines = max_lines
        self._rng = random.Random(seed)
        self._offset = 0.0
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}

    # -- the clock -------------------------------------------------------------------

    def now(self) -> float:
        """The batches' clock: wall time plus every ``advance``."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the batches' clock forward; statuses catch up on the next request."""
        if seconds < 0:
            raise ValueError(f"the clock only moves forward, got {seconds}")
        self._offset += seconds

    # -- routes ----------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._guarded(self._upload))
        app.router.add_get("/v1/files/{file_id}", self._guarded(self._get_file))
        app.router.add_get("/v1/files/{file_id}/content", self._guarded(self._file_content))
        app.router.add_post("/v1/batches", self._guarded(self._create))
        app.router.add_get("/v1/batches", self._guarded(self._list))
        app.router.add_get("/v1/batches/{batch_id}", self._guarded(self._retrieve))
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._guarded(self._cancel))
        app.router.add_post("/_fake/batches/advance", self._advance_endpoint)

    def _guarded(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            refusal = self.server._check_key(request)
            if refusal is not None:
                return refusal
            response: web.StreamResponse = await handler(request)
            return response

        return guarded

    async def _advance_endpoint(self, request: web.Request) -> web.Response:
        try:
            seconds = float((await request.json())["seconds"])
            self.advance(seconds)
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f'give {{"seconds": N}} with N >= 0 ({e})')
        return web.json_response({"now": self.now()})

    # -- files -----------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError:
            return _error(400, "Expected a multipart/form-data body with 'file' and 'purpose'.")
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
            return _error(400, "Both 'file' and 'purpose' are required.", "file")
        data = upload.file.read()
        file = _File(self.server._next_id("file"), upload.filename, purpose, data, int(self.now()))
        self._files[file.id] = file
        with self.server._lock:
            self.server._stats.files_uploaded += 1
        return web.json_response(file.json())

    def _file(self, request: web.Request) -> _File | web.Response:
        file_id = request.match_info["file_id"]
        file = self._files.get(file_id)
        if file is None:
            return _error(404, f"No such File object: {file_id}", "id", code="not_found")
        return file

    async def _get_file(self, request: web.Request) -> web.Response:
        file = self._file(request)
        return file if isinstance(file, web.Response) else web.json_response(file.json())

    async def _file_content(self, request: web.Request) -> web.Response:
        file = self._file(request)
        if isinstance(file, web.Response):
            return file
        return web.Response(body=file.data, content_type="application/octet-stream")

    # -- batches ---------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            return _error(400, f"Invalid endpoint {endpoint!r}: one of {ENDPOINTS}.", "endpoint")
        if body.get("completion_window") != "24h":
            return _error(400, "completion_window must be '24h'.", "completion_window")
        metadata = body.get("metadata")
        if (refusal := _check_metadata(metadata)) is not None:
            return refusal
        file = self._files.get(str(body.get("input_file_id")))
        if file is None:
            return _error(404, f"No such File object: {body.get('input_file_id')}", "input_file_id")
        if file.purpose != "batch":
            return _error(
                400, f"File {file.id} has purpose {file.purpose!r}, not 'batch'.", "input_file_id"
            )
        batch = _Batch(
            self.server._next_id("batch").replace("-", "_"),
            endpoint,
            file.id,
            metadata,
            self.now(),
        )
        self._batches[batch.id] = batch
        count = file.data.count(b"\n") + (not file.data.endswith(b"\n") and bool(file.data))
        with self.server._lock:
            self.server._stats.batches_created += 1
            self.server._stats.batch_lines += count
        return web.json_response(batch.json())

    def _batch(self, request: web.Request) -> _Batch | web.Response:
        batch_id = request.match_info["batch_id"]
        batch = self._batches.get(batch_id)
        if batch is None:
            return _error(
                404, f"No batch found with id '{batch_id}'.", "batch_id", code="not_found"
            )
        self._settle(batch)
        return batch

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        return batch if isinstance(batch, web.Response) else web.json_response(batch.json())

    async def _list(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return _error(400, "limit must be an integer.", "limit")
        if not 1 <= limit <= 100:
            return _error(400, "limit must be between 1 and 100.", "limit")
        newest_first = list(reversed(self._batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = newest_first[:limit]
        for batch in page:
            self._settle(batch)
        return web.json_response(
            {
                "object": "list",
                "data": [b.json() for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(newest_first) > limit,
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status not in ("validating", "in_progress", "finalizing"):
            return _error(
                409, f"Cannot cancel a batch with status '{batch.status}'.", code="conflict"
            )
        batch.status = "cancelling"
        batch.stamps["cancelling"] = self.now()
        return web.json_response(batch.json())

    # -- the batch's life ------------------------------------------------------------

    def _settle(self, batch: _Batch) -> None:
        """Bring ``batch`` up to the clock: validate, work, finalize, expire or cancel."""
        now = self.now()
        expires_at = batch.created_at + WINDOW_SECONDS
        if batch.status == "cancelling":
            self._finish(batch, "cancelled", now, "batch_cancelled")
            return
        if batch.status == "validating" and now >= batch.created_at + self.validate_seconds:
            self._validate(batch, batch.created_at + self.validate_seconds)
        if batch.status == "in_progress":
            started = batch.stamps["in_progress"]
            span = max(self.batch_seconds, 1e-9)
            share = min(1.0, (min(now, expires_at) - started) / span)
            batch.done = int(len(batch.order) * share)
            if share >= 1.0 and started + self.batch_seconds < expires_at:
                if any(line.fault >= 1.0 - self.expire_rate for line in batch.lines):
                    # Lines drawn to expire were never reached: the window "ran out".
                    batch.done = sum(line.fault < 1.0 - self.expire_rate for line in batch.lines)
                    batch.order.sort(key=lambda i: batch.lines[i].fault >= 1.0 - self.expire_rate)
                    self._finish(batch, "expired", started + self.batch_seconds, "batch_expired")
                    return
                batch.status = "finalizing"
                batch.stamps["finalizing"] = started + self.batch_seconds
        if batch.status == "finalizing":
            ends = batch.stamps["finalizing"] + self.finalize_seconds
            if now >= ends:
                self._finish(batch, "completed", ends, "batch_expired")
                return
        if batch.status in ("validating", "in_progress", "finalizing") and now >= expires_at:
            self._finish(batch, "expired", expires_at, "batch_expired")

    def _validate(self, batch: _Batch, at: float) -> None:
        data = self._files[batch.input_file_id].data
        errors: list[dict[str, Any]] = []
        lines: list[_Line] = []
        seen: set[str] = set()
        models: set[str] = set()
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                errors.append(_line_error("invalid_json_line", "This line is not JSON.", number))
                continue
            custom_id = line.get("custom_id") if isinstance(line, dict) else None
            body = line.get("body") if isinstance(line, dict) else None
            if not isinstance(custom_id, str) or not isinstance(body, dict):
                errors.append(
                    _line_error("invalid_request", "Each line needs custom_id and body.", number)
                )
                continue
            if line.get("method") != "POST" or line.get("url") != batch.endpoint:
                errors.append(
                    _line_error(
                        "mismatched_endpoint",
                        f"The line's url {line.get('url')!r} and method {line.get('method')!r} "
                        f"do not match the batch's endpoint POST {batch.endpoint}.",
                        number,
                    )
                )
                continue
            if custom_id in seen:
                errors.append(
                    _line_error(
                        "duplicate_custom_id",
                        f"The custom_id {custom_id!r} is a duplicate of another request; "
                        "custom_id must be unique for each request in a batch.",
                        number,
                    )
                )
                continue
            seen.add(custom_id)
            models.add(str(body.get("model")))
            lines.append(_Line(custom_id, body, self._rng.random(), self._rng.random()))
        if not lines and not errors:
            errors.append(_line_error("empty_file", "The input file has no requests.", None))
        if len(models) > 1:
            errors.append(
                _line_error(
                    "mixed_models",
                    f"A batch input file may use one model only; it uses {sorted(models)}.",
                    None,
                )
            )
        if len(lines) > self.max_lines:
            errors.append(
                _line_error(
                    "too_many_requests",
                    f"The input file has {len(lines)} requests; the limit is {self.max_lines}.",
                    None,
                )
            )
        if errors:
            batch.status = "failed"
            batch.errors = errors
            batch.stamps["failed"] = at
            return
        batch.lines = lines
        batch.model = models.pop()
        batch.order = list(range(len(lines)))
        self._rng.shuffle(batch.order)
        batch.status = "in_progress"
        batch.stamps["in_progress"] = at

    def _finish(self, batch: _Batch, status: str, at: float, leftover_code: str) -> None:
        """End ``batch`` with ``status``: lines done get answers, the rest ``leftover_code``."""
        if status == "completed":
            batch.done = len(batch.order)
        done = set(batch.order[: batch.done])
        outputs: list[str] = []
        errors: list[str] = []
        for i, line in enumerate(batch.lines):
            request_id = self.server._next_id("req")
            if i not in done:
                message = {
                    "batch_expired": "This request could not be executed before the "
                    "completion window expired.",
                    "batch_cancelled": "This request was not executed because the batch was "
                    "cancelled.",
                }[leftover_code]
                errors.append(_output_line(line, None, {"code": leftover_code, "message": message}))
                continue
            status_code, payload = self._answer(batch, line)
            response = {"status_code": status_code, "request_id": request_id, "body": payload}
            (outputs if status_code == 200 else errors).append(_output_line(line, response, None))
        self._rng.shuffle(outputs)
        self._rng.shuffle(errors)
        if outputs:
            batch.output_file_id = self._store(f"{batch.id}_output.jsonl", outputs)
        if errors:
            batch.error_file_id = self._store(f"{batch.id}_error.jsonl", errors)
        batch.finished = {"completed": len(outputs), "failed": len(errors)}
        batch.status = status
        batch.stamps[status] = at

    def _answer(self, batch: _Batch, line: _Line) -> tuple[int, dict[str, Any]]:
        """The status and body the endpoint gives one line, as for a synchronous request."""
        from .testing import _content_text, _last_user_text, estimate_tokens

        server = self.server
        body = line.body
        if line.fault < self.error_rate:
            return 500, _error_body(
                "The server had an error while processing your request. Sorry!", "server_error"
            )
        model = str(body.get("model"))
        refusal = server._check_model(model)
        if refusal is not None:
            return refusal.status, json.loads(refusal.text or "{}")
        if batch.endpoint == "/v1/embeddings":
            from .testing import _embedding_inputs

            texts = _embedding_inputs(body.get("input"))
            if texts is None:
                return 400, _error_body("'input' must be a string or a non-empty array of strings.")
            response = server._embeddings_response(
                body, model, texts, estimate_tokens("".join(texts)), {}
            )
            return 200, json.loads(response.text or "{}")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error_body("'messages' must be a non-empty array.")
        prompt = _last_user_text(messages)
        if self.refuse is not None and self.refuse in prompt:
            return 400, _error_body(
                "Your request was rejected as a result of our safety system.", code="content_filter"
            )
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            max_tokens = None
        prompt_tokens = estimate_tokens("".join(_content_text(m) for m in messages))
        response = server._chat_response(body, model, prompt, prompt_tokens, max_tokens, {})
        return response.status, json.loads(response.text or "{}")

    def _store(self, filename: str, lines: list[str]) -> str:
        data = "".join(line + "\n" for line in lines).encode()
        file = _File(self.server._next_id("file"), filename, "batch_output", data, int(self.now()))
        self._files[file.id] = file
        return file.id


def _output_line(line: _Line, response: dict[str, Any] | None, error: dict[str, Any] | None) -> str:
    return json.dumps(
        {
            "id": f"batch_req_{line.custom_id[:24]}",
            "custom_id": line.custom_id,
            "response": response,
            "error": error,
        },
        ensure_ascii=False,
    )


def _line_error(code: str, message: str, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _error(
    status: int, message: str, param: str | None = None, *, code: str | None = None
) -> web.Response:
    body = _error_body(message, code=code)
    body["error"]["param"] = param
    return web.json_response(body, status=status)


def _check_metadata(metadata: Any) -> web.Response | None:
    if metadata is None:
        return None
    pairs, key_len, value_len = MAX_METADATA
    if not isinstance(metadata, dict) or len(metadata) > pairs:
        return _error(400, f"metadata must be an object of at most {pairs} pairs.", "metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > key_len or len(value) > value_len:
            return _error(
                400,
                f"metadata {key!r}: keys up to {key_len} characters, string values up to "
                f"{value_len}.",
                "metadata",
            )
    return None
