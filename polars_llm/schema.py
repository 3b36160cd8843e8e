"""Structured output: map a Pydantic model or JSON schema to a Polars dtype and check answers.

``pl.col("text").llm.extract(Person)`` needs the dtype of its result before any call, so
that a LazyFrame's schema resolves without asking the model. :class:`OutputSchema` gives
that dtype, the strict-mode JSON schema sent as ``response_format``, and :meth:`parse`,
which turns the model's JSON answer into a dict that fits the dtype.

Supported subset, for Pydantic models and JSON-schema dicts alike::

    string -> String        integer -> Int64      number -> Float64     boolean -> Boolean
    format "date" -> Date   format "date-time" -> Datetime("us"), naive UTC
    enum / const / Literal / Enum of strings -> Enum(values)
    array with "items" -> List(item)          object with "properties" -> Struct
    anyOf [X, {"type": "null"}], "type": [X, "null"], Optional[X] -> the dtype of X
    local $ref / $defs, including nested models

Anything else (free-form dicts, unions of several types, tuples, recursive models, a
top level that is not an object) raises :class:`ConfigError` when the schema is built.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import Any

import polars as pl
import pydantic

from polars_llm.errors import ConfigError, SchemaMismatch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Pydantic parses date strings for the JSON-schema path too, so both paths accept the same text.
_DATE = pydantic.TypeAdapter(dt.date)
_DATETIME = pydantic.TypeAdapter(dt.datetime)
_SCALAR_DTYPES: dict[str, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "number": pl.Float64(),
    "boolean": pl.Boolean(),
    "date": pl.Date(),
    "datetime": pl.Datetime("us"),
}
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
# More problems than this make the message too long to read in a report.
_MAX_PROBLEMS = 5


@dataclass(frozen=True)
class _Field:
    """One property of an object: its name, its value's node, and whether it is required."""

    name: str
    node: _Node
    required: bool


@dataclass(frozen=True)
class _Node:
    """One value of the schema, reduced to what decides its Polars dtype and its checks.

    ``kind`` is one of the keys of ``_SCALAR_DTYPES``, or "enum", "array" or "object".
    """

    kind: str
    nullable: bool = False
    items: _Node | None = None
    fields: tuple[_Field, ...] = ()
    values: tuple[str, ...] = ()

    @property
    def item(self) -> _Node:
        """The node of an array's items."""
        assert self.items is not None, "an array node always has an item node"
        return self.items


class _Invalid(Exception):
    """A value of an answer that does not fit the schema; the message names where."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{_describe(path)} {problem}")


class OutputSchema:
    """A structured-output schema: the JSON schema to send, the result's Polars dtype, validation.

    Build one with :meth:`from_user`. Attributes:

    ``name``
        A name for ``response_format``: the model class name or the schema's "title"
        (characters outside ``[a-zA-Z0-9_-]`` become "_"), else "output".
    ``json_schema``
        The schema in the form OpenAI's strict mode requires: every object has
        ``"additionalProperties": false`` and lists all its properties in ``"required"``
        (optional ones become nullable), ``$defs`` and ``$ref`` are kept, ``"default"`` is
        dropped.
    ``dtype``
        The ``pl.Struct`` of the result column.
    ``fingerprint``
        SHA-256 hex of the canonical JSON of ``json_schema``, for cache keys.
    """

    def __init__(
        self,
        *,
        name: str,
        json_schema: dict[str, Any],
        root: _Node,
        model: type[pydantic.BaseModel] | None,
    ) -> None:
        self.name = name
        self.json_schema = json_schema
        self.dtype = _dtype(root)
        try:
            canonical = json.dumps(json_schema, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the schema is not plain JSON: {e}") from None
        self.fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
        self._root = root
        self._model = model

    @classmethod
    def from_user(cls, schema: type[pydantic.BaseModel] | dict[str, Any]) -> OutputSchema:
        """Build the output schema for a Pydantic model class or a JSON-schema dict.

        Raises ConfigError for anything else, and for schemas outside the supported subset
        (see the module docstring), naming where in the schema the problem is.
        """
        if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
            try:
                source = schema.model_json_schema()
            except pydantic.PydanticUserError as e:
                raise ConfigError(f"cannot build a JSON schema from {schema.__name__}: {e}") from e
            name, model = schema.__name__, schema
        elif isinstance(schema, dict):
            # A private copy: the caller may keep editing theirs after the fingerprint is taken.
            source = copy.deepcopy(schema)
            title = source.get("title")
            name, model = (title if isinstance(title, str) else ""), None
        elif isinstance(schema, pydantic.BaseModel):
            raise ConfigError(
                f"pass the model class {type(schema).__name__}, not an instance of it"
            )
        else:
            raise ConfigError(
                "a structured-output schema must be a Pydantic model class or a JSON-schema "
                f"dict, got {type(schema).__name__}"
            )
        root = _compile(source, source, "", ())
        if root.kind != "object" or root.nullable:
            raise ConfigError(
                "the top level of a structured-output schema must be an object, got "
                f"{'a nullable ' if root.nullable else ''}{root.kind}; wrap the value in a "
                "model with one field, e.g. `class Output(BaseModel): items: list[str]`"
            )
        return cls(
            name=_NAME_UNSAFE.sub("_", name)[:64] or "output",
            json_schema=_strict(source, source),
            root=root,
            model=model,
        )

    def parse(self, text: str) -> dict[str, Any]:
        """Check the model's JSON answer against the schema and return it as a dict of ``dtype``.

        The result builds ``pl.Series([...], dtype=self.dtype)``: enums are str, dates are
        ``datetime.date``/``datetime.datetime`` (naive UTC), missing optional values are
        None. Raises SchemaMismatch, carrying ``text`` as ``raw``, when the text is not JSON
        or does not fit; the message names the field and what was wrong.

        Pydantic models validate with the model itself, so their validators and defaults
        apply. For JSON-schema dicts only the supported subset is checked, extra keys are
        dropped, and "default" is not applied: an optional value left out or null is None.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaMismatch(f"the answer is not valid JSON: {e}", raw=text) from None
        if self._model is not None:
            try:
                validated = self._model.model_validate(_drop_nulls_for_defaults(self._root, data))
            except pydantic.ValidationError as e:
                raise SchemaMismatch(
                    f"the answer does not match {self.name}: {_pydantic_problems(e)}", raw=text
                ) from None
            data = validated.model_dump(mode="json", by_alias=True)
        try:
            return _convert(self._root, data, "")
        except _Invalid as e:
            raise SchemaMismatch(f"the answer does not match {self.name}: {e}", raw=text) from None

    def response_format(self) -> dict[str, Any]:
        """Return the ``response_format`` argument that asks the endpoint for this schema."""
        return {
            "type": "json_schema",
            "json_schema": {
                "name": self.name,
                # A copy, so that a caller editing the request cannot desync the fingerprint.
                "schema": copy.deepcopy(self.json_schema),
                "strict": True,
            },
        }


def _compile(schema: Any, root: dict[str, Any], path: str, refs: tuple[str, ...]) -> _Node:
    """Reduce the schema at ``path`` to a node; ``refs`` are the $refs being expanded."""
    where = f"at '{path}'" if path else "at the top level"
    if not isinstance(schema, dict):
        raise ConfigError(f"the schema {where} must be a JSON object, got {schema!r}")

    if "$ref" in schema:
        ref = schema["$ref"]
        if ref in refs:
            chain = " -> ".join((*refs[refs.index(ref) :], ref))
            raise ConfigError(
                f"the schema is recursive ({chain}) {where}: recursive models are not supported "
                "because a Polars column needs a fixed, finite type; nest a fixed number of "
                "levels with separate models instead"
            )
        return _compile(_resolve(root, ref), root, path, (*refs, ref))

    if "anyOf" in schema:
        branches = schema["anyOf"]
        others = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
        if len(others) != 1:
            raise ConfigError(
                f"the anyOf {where} has {len(others)} non-null alternatives; a Polars column "
                'has one type, so only anyOf [X, {"type": "null"}] is supported'
            )
        node = _compile(others[0], root, path, refs)
        return replace(node, nullable=node.nullable or len(others) < len(branches))

    type_ = schema.get("type")
    nullable = False
    if isinstance(type_, list):
        types = [t for t in type_ if t != "null"]
        if len(types) != 1:
            raise ConfigError(
                f"the type {type_!r} {where} is not supported: a Polars column has one type"
            )
        type_, nullable = types[0], len(types) < len(type_)

    if "enum" in schema or "const" in schema:
        listed = schema["enum"] if "enum" in schema else [schema["const"]]
        values = [v for v in listed if v is not None]
        if not values or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"the enum {where} must list strings, got {listed!r}")
        return _Node(
            "enum",
            nullable=nullable or len(values) < len(listed),
            values=tuple(dict.fromkeys(values)),
        )

    if type_ == "string":
        kind = {"date": "date", "date-time": "datetime"}.get(str(schema.get("format")), "string")
        return _Node(kind, nullable=nullable)
    if type_ in ("integer", "number", "boolean"):
        return _Node(type_, nullable=nullable)
    if type_ == "array":
        if not isinstance(schema.get("items"), dict):
            raise ConfigError(
                f'the array {where} needs one "items" schema (tuples are not supported)'
            )
        return _Node(
            "array", nullable=nullable, items=_compile(schema["items"], root, f"{path}[]", refs)
        )
    if type_ == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise ConfigError(
                f'the object {where} has no "properties": a free-form object (such as '
                "dict[str, ...]) has no fixed Polars type; declare its fields in a model"
            )
        required = schema.get("required", [])
        fields = tuple(
            _Field(name, _compile(sub, root, _join(path, name), refs), name in required)
            for name, sub in properties.items()
        )
        return _Node("object", nullable=nullable, fields=fields)
    if type_ is None:
        raise ConfigError(
            f'the schema {where} has no "type"; give each value a type (an untyped value such '
            "as Any has no fixed Polars type)"
        )
    raise ConfigError(f"the type {type_!r} {where} is not supported")


def _resolve(root: dict[str, Any], ref: Any) -> Any:
    """Return the schema a local ``$ref`` ("#/$defs/Name") points to."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise ConfigError(f"only local $refs such as '#/$defs/Name' are supported, got {ref!r}")
    target: Any = root
    for part in ref[1:].split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or key not in target:
            raise ConfigError(f"the $ref {ref!r} points to nothing in the schema")
        target = target[key]
    return target


def _dtype(node: _Node) -> pl.DataType:
    """Return the Polars dtype of values of ``node``."""
    if node.kind == "enum":
        return pl.Enum(list(node.values))
    if node.kind == "array":
        return pl.List(_dtype(node.item))
    if node.kind == "object":
        return pl.Struct({f.name: _dtype(f.node) for f in node.fields})
    return _SCALAR_DTYPES[node.kind]


def _strict(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``schema`` in the form OpenAI's strict mode accepts.

    Only called on schemas ``_compile`` accepted, so $refs resolve and do not loop.
    """
    out = {key: value for key, value in schema.items() if key != "default"}
    if "$ref" in out and len(out) > 1:
        # Strict mode rejects keywords beside a $ref (e.g. a field's description), so inline
        # the definition; the local keywords win, as they describe this use of it.
        local = {key: value for key, value in out.items() if key != "$ref"}
        return _strict({**_resolve(root, out["$ref"]), **local}, root)
    for defs in ("$defs", "definitions"):
        if isinstance(out.get(defs), dict):
            out[defs] = {name: _strict(sub, root) for name, sub in out[defs].items()}
    if isinstance(out.get("properties"), dict):
        required = set(out.get("required", []))
        out["properties"] = {
            name: _strict(sub, root) if name in required else _nullable(_strict(sub, root))
            for name, sub in out["properties"].items()
        }
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"], root)
    if isinstance(out.get("anyOf"), list):
        out["anyOf"] = [_strict(sub, root) for sub in out["anyOf"]]
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Return ``schema`` allowing null: how strict mode expresses an optional property."""
    type_ = schema.get("type")
    allows_null = (
        type_ == "null"
        or (isinstance(type_, list) and "null" in type_)
        or None in schema.get("enum", [])
        or any(isinstance(b, dict) and b.get("type") == "null" for b in schema.get("anyOf", []))
    )
    return schema if allows_null else {"anyOf": [schema, {"type": "null"}]}


def _drop_nulls_for_defaults(node: _Node, value: Any) -> Any:
    """Remove nulls that strict mode allowed only to mean "not given", so Pydantic applies defaults.

    Strict mode makes every optional property nullable; a field such as ``count: int = 0``
    would reject the null the model is allowed to send.
    """
    if node.kind == "array" and isinstance(value, list):
        return [_drop_nulls_for_defaults(node.item, item) for item in value]
    if node.kind != "object" or not isinstance(value, dict):
        return value
    fields = {f.name: f for f in node.fields}
    out = {}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            out[key] = item
        elif item is not None:
            out[key] = _drop_nulls_for_defaults(field.node, item)
        elif field.required or field.node.nullable:
            out[key] = None
    return out


def _convert(node: _Node, value: Any, path: str) -> Any:
    """Check ``value`` against ``node`` and return it as the Python value its dtype takes."""
    if value is None:
        if node.nullable:
            return None
        raise _Invalid(path, "should not be null")
    kind = node.kind
    if kind == "string":
        if isinstance(value, str):
            return value
        raise _Invalid(path, f"should be a string, got {_short(value)}")
    if kind == "integer":
        # JSON has one number type: 3.0 is a fine integer, but true is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(path, f"should be an integer, got {_short(value)}")
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise _Invalid(path, f"is out of the 64-bit integer range: {_short(value)}")
        return value
    if kind == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise _Invalid(path, f"is too large for a float: {_short(value)}") from None
        raise _Invalid(path, f"should be a number, got {_short(value)}")
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        raise _Invalid(path, f"should be true or false, got {_short(value)}")
    if kind == "enum":
        if isinstance(value, str) and value in node.values:
            return value
        allowed = ", ".join(repr(v) for v in node.values)
        raise _Invalid(path, f"should be one of {allowed}, got {_short(value)}")
    if kind == "date":
        return _parse_time(_DATE, value, path, "a date (YYYY-MM-DD)")
    if kind == "datetime":
        moment = _parse_time(_DATETIME, value, path, "a date-time (ISO 8601)")
        if moment.tzinfo is not None:
            # The column is naive UTC: one dtype for every row, whatever offset each answer used.
            moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
        return moment
    if kind == "array":
        if not isinstance(value, list):
            raise _Invalid(path, f"should be a list, got {_short(value)}")
        return [_convert(node.item, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, dict):
        raise _Invalid(path, f"should be a JSON object, got {_short(value)}")
    out: dict[str, Any] = {}
    for field in node.fields:
        sub = _join(path, field.name)
        if field.name not in value:
            if field.required:
                raise _Invalid(sub, "is required but missing")
            out[field.name] = None
        elif value[field.name] is None and not field.required:
            out[field.name] = None
        else:
            out[field.name] = _convert(field.node, value[field.name], sub)
    return out


def _parse_time(adapter: pydantic.TypeAdapter[Any], value: Any, path: str, expected: str) -> Any:
    """Parse a date or date-time string, or raise _Invalid saying what was expected."""
    if isinstance(value, str):
        try:
            return adapter.validate_strings(value)
        except pydantic.ValidationError:
            pass
    raise _Invalid(path, f"should be {expected}, got {_short(value)}")


def _pydantic_problems(error: pydantic.ValidationError) -> str:
    """Summarise a Pydantic validation error as "field 'x' problem; ..." lines."""
    problems = []
    for detail in error.errors(include_url=False)[:_MAX_PROBLEMS]:
        path = ""
        for part in detail["loc"]:
            path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
        got = "" if detail["type"] == "missing" else f" (got {_short(detail['input'])})"
        problems.append(f"{_describe(path)}: {detail['msg']}{got}")
    if error.error_count() > _MAX_PROBLEMS:
        problems.append(f"and {error.error_count() - _MAX_PROBLEMS} more")
    return "; ".join(problems)


def _join(path: str, name: str) -> str:
    """Return the path of property ``name`` inside ``path``."""
    return f"{path}.{name}" if path else name


def _describe(path: str) -> str:
    """Name a place in an answer for an error message."""
    return f"field '{path}'" if path else "the answer"


def _short(value: Any) -> str:
    """Return a repr of ``value`` short enough for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
