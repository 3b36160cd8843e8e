"""Tests for polars_llm.schema: dtype mapping, strict-mode schemas and answer validation."""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from typing import Any, Literal

import polars as pl
import pydantic
import pytest

from polars_llm.errors import ConfigError, SchemaMismatch
from polars_llm.schema import OutputSchema


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class Address(pydantic.BaseModel):
    city: str
    postcode: str | None = None


class Pet(pydantic.BaseModel):
    name: str
    species: Literal["cat", "dog"]


class Person(pydantic.BaseModel):
    name: str
    age: int
    height_m: float
    employed: bool
    born: dt.date
    last_seen: dt.datetime
    nickname: str | None = None
    tags: list[str]
    address: Address = pydantic.Field(description="where they live")
    pets: list[Pet]
    mood: Mood


PERSON_DTYPE = pl.Struct(
    {
        "name": pl.String(),
        "age": pl.Int64(),
        "height_m": pl.Float64(),
        "employed": pl.Boolean(),
        "born": pl.Date(),
        "last_seen": pl.Datetime("us"),
        "nickname": pl.String(),
        "tags": pl.List(pl.String()),
        "address": pl.Struct({"city": pl.String(), "postcode": pl.String()}),
        "pets": pl.List(pl.Struct({"name": pl.String(), "species": pl.Enum(["cat", "dog"])})),
        "mood": pl.Enum(["happy", "sad"]),
    }
)

# Person written by hand as a plain JSON schema, in the styles a user might use.
PERSON_JSON_SCHEMA: dict[str, Any] = {
    "title": "Person",
    "type": "object",
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "postcode": {"type": ["string", "null"]},
            },
            "required": ["city"],
        },
        "Pet": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "species": {"enum": ["cat", "dog"]},
            },
            "required": ["name", "species"],
        },
    },
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height_m": {"type": "number"},
        "employed": {"type": "boolean"},
        "born": {"type": "string", "format": "date"},
        "last_seen": {"type": "string", "format": "date-time"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"$ref": "#/$defs/Address", "description": "where they live"},
        "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
        "mood": {"type": "string", "enum": ["happy", "sad"]},
    },
    "required": [
        "name",
        "age",
        "height_m",
        "employed",
        "born",
        "last_seen",
        "tags",
        "address",
        "pets",
        "mood",
    ],
}


def person_answer(**changes: Any) -> dict[str, Any]:
    """A valid answer for Person, with some top-level values replaced."""
    answer = {
        "name": "Ada",
        "age": 36,
        "height_m": 1.65,
        "employed": True,
        "born": "1815-12-10",
        "last_seen": "2024-05-01T12:30:00+02:00",
        "nickname": None,
        "tags": ["maths", "engines"],
        "address": {"city": "London", "postcode": None},
        "pets": [{"name": "Tom", "species": "cat"}, {"name": "Rex", "species": "dog"}],
        "mood": "happy",
    }
    answer.update(changes)
    return answer


@pytest.fixture(params=["pydantic", "json_schema"])
def person_schema(request: pytest.FixtureRequest) -> OutputSchema:
    """Person as an OutputSchema, built from the model and from the hand-written JSON schema."""
    source = Person if request.param == "pydantic" else PERSON_JSON_SCHEMA
    return OutputSchema.from_user(source)


def schema_objects(node: Any) -> list[dict[str, Any]]:
    """Every dict in a JSON schema that declares properties, however deeply nested."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict):
            found.append(node)
        for value in node.values():
            found.extend(schema_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(schema_objects(value))
    return found


def allows_null(schema: dict[str, Any]) -> bool:
    """Whether a property schema accepts null, in either of the forms JSON schema has for it."""
    return {"type": "null"} in schema.get("anyOf", []) or "null" in schema.get("type", [])


def test_pydantic_model_maps_to_exact_struct_dtype():
    """A model with nested models, Optional, lists, Enum, Literal and dates maps to PERSON_DTYPE."""
    assert OutputSchema.from_user(Person).dtype == PERSON_DTYPE


def test_equivalent_json_schema_gives_same_dtype():
    """The hand-written JSON schema for Person gives the same dtype as the model."""
    assert OutputSchema.from_user(PERSON_JSON_SCHEMA).dtype == PERSON_DTYPE


def test_dtype_field_order_follows_declaration():
    """Struct fields come in the order the model declares them."""
    assert [name for name, _ in OutputSchema.from_user(Person).dtype] == list(Person.model_fields)


def test_json_schema_is_strict_mode_compatible(person_schema: OutputSchema):
    """Every object, including those in $defs, forbids extra properties and requires all of them."""
    objects = schema_objects(person_schema.json_schema)
    in_defs = schema_objects(person_schema.json_schema["$defs"])
    assert len(in_defs) == 2
    assert len(objects) >= 3
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert obj["required"] == list(obj["properties"])
    assert '"default"' not in json.dumps(person_schema.json_schema)


def test_json_schema_keeps_refs_and_makes_optional_fields_nullable(person_schema: OutputSchema):
    """$defs and $ref survive, and a formerly optional field becomes required but nullable."""
    schema = person_schema.json_schema
    assert schema["properties"]["pets"]["items"] == {"$ref": "#/$defs/Pet"}
    assert allows_null(schema["properties"]["nickname"])
    assert allows_null(schema["$defs"]["Address"]["properties"]["postcode"])
    assert not allows_null(schema["properties"]["name"])


def test_ref_with_description_is_inlined(person_schema: OutputSchema):
    """A $ref with a sibling keyword, which strict mode rejects, is replaced by its definition."""
    address = person_schema.json_schema["properties"]["address"]
    assert "$ref" not in address
    assert address["description"] == "where they live"
    assert address["properties"]["city"]["type"] == "string"
    assert address["additionalProperties"] is False


def test_field_with_default_is_nullable_and_null_gives_the_default():
    """Null for a field with a default gives the default; null for a nullable field stays None."""

    class Counter(pydantic.BaseModel):
        label: str | None
        count: int = 7

    schema = OutputSchema.from_user(Counter)
    assert schema.json_schema["required"] == ["label", "count"]
    assert {"type": "null"} in schema.json_schema["properties"]["count"]["anyOf"]
    assert schema.parse('{"label": null, "count": null}') == {"label": None, "count": 7}


def test_response_format_wraps_strict_schema(person_schema: OutputSchema):
    """response_format asks for the named schema in strict mode."""
    assert person_schema.response_format() == {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": person_schema.json_schema, "strict": True},
    }


def test_name_is_made_safe_for_response_format():
    """A title with spaces becomes a valid name, and a schema without title is named "output"."""
    titled = OutputSchema.from_user({**PERSON_JSON_SCHEMA, "title": "A person (v2)"})
    untitled = OutputSchema.from_user({k: v for k, v in PERSON_JSON_SCHEMA.items() if k != "title"})
    assert titled.name == "A_person__v2_"
    assert untitled.name == "output"
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", titled.name)


def test_fingerprint_is_stable_and_changes_with_fields():
    """The fingerprint is the same across builds and differs once a field is added."""

    class PersonWithEmail(Person):
        email: str

    first = OutputSchema.from_user(Person).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert OutputSchema.from_user(Person).fingerprint == first
    assert OutputSchema.from_user(PersonWithEmail).fingerprint != first

    extended = {
        **PERSON_JSON_SCHEMA,
        "properties": {**PERSON_JSON_SCHEMA["properties"], "email": {"type": "string"}},
    }
    plain = OutputSchema.from_user(PERSON_JSON_SCHEMA).fingerprint
    assert OutputSchema.from_user(PERSON_JSON_SCHEMA).fingerprint == plain
    assert OutputSchema.from_user(extended).fingerprint != plain


def test_parsed_answers_build_a_series_of_the_dtype(person_schema: OutputSchema):
    """Parsed answers (enums, dates, lists of structs, nulls) build a Series of the dtype."""
    texts = [
        json.dumps(person_answer()),
        json.dumps(person_answer(nickname="Countess", pets=[], mood="sad", age=37.0)),
    ]
    series = pl.Series("x", [person_schema.parse(t) for t in texts], dtype=person_schema.dtype)

    assert series.dtype == PERSON_DTYPE
    assert series.struct.field("mood").to_list() == ["happy", "sad"]
    assert series.struct.field("age").to_list() == [36, 37]
    assert series.struct.field("born").to_list() == [dt.date(1815, 12, 10)] * 2
    assert series.struct.field("last_seen")[0] == dt.datetime(2024, 5, 1, 10, 30)
    assert series.struct.field("nickname").to_list() == [None, "Countess"]
    assert series.struct.field("address").struct.field("postcode").to_list() == [None, None]
    assert series[0]["pets"] == [
        {"name": "Tom", "species": "cat"},
        {"name": "Rex", "species": "dog"},
    ]
    assert series[1]["pets"] == []


def test_pydantic_and_json_schema_parse_to_the_same_values():
    """The model and the equivalent JSON schema turn the same answer into the same dict."""
    text = json.dumps(person_answer(nickname="Countess"))
    from_model = OutputSchema.from_user(Person).parse(text)
    assert from_model == OutputSchema.from_user(PERSON_JSON_SCHEMA).parse(text)
    assert from_model["mood"] == "happy"
    assert from_model["address"] == {"city": "London", "postcode": None}


def test_missing_optional_value_is_none(person_schema: OutputSchema):
    """An optional field left out of the answer parses to None."""
    answer = person_answer()
    del answer["nickname"]
    assert person_schema.parse(json.dumps(answer))["nickname"] is None


def test_invalid_json_raises_schema_mismatch(person_schema: OutputSchema):
    """Text that is not JSON raises SchemaMismatch carrying the raw text."""
    text = '{"name": "Ada", '
    with pytest.raises(SchemaMismatch, match="not valid JSON") as caught:
        person_schema.parse(text)
    assert caught.value.raw == text


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({**person_answer(), "address": {"postcode": "N1"}}, "address.city"),
        ({k: v for k, v in person_answer().items() if k != "age"}, "age"),
        (person_answer(age="thirty"), "age"),
        (person_answer(employed="yes please"), "employed"),
        (person_answer(tags=["maths", 3]), "tags[1]"),
        (person_answer(born="last tuesday"), "born"),
        (person_answer(mood="angry"), "mood"),
        (person_answer(pets=[{"name": "Tweety", "species": "bird"}]), "pets[0].species"),
    ],
    ids=[
        "missing-nested",
        "missing",
        "wrong-type",
        "wrong-bool",
        "wrong-item",
        "bad-date",
        "enum",
        "nested-literal",
    ],
)
def test_invalid_answer_names_the_field(
    person_schema: OutputSchema, answer: dict[str, Any], field: str
):
    """A missing, mistyped or out-of-set value raises SchemaMismatch naming the field."""
    text = json.dumps(answer)
    with pytest.raises(SchemaMismatch, match=re.escape(f"field '{field}'")) as caught:
        person_schema.parse(text)
    assert caught.value.raw == text


def test_json_schema_integers_accept_whole_floats_but_not_bools():
    """For a JSON schema, 3.0 is the integer 3 while true is rejected as an integer."""
    schema = OutputSchema.from_user(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    )
    assert schema.parse('{"n": 3.0}') == {"n": 3}
    assert type(schema.parse('{"n": 3.0}')["n"]) is int
    with pytest.raises(SchemaMismatch, match="field 'n' should be an integer"):
        schema.parse('{"n": true}')
    with pytest.raises(SchemaMismatch, match="field 'n' should be an integer"):
        schema.parse('{"n": 3.5}')


def test_recursive_model_is_a_config_error():
    """A model that contains itself cannot have a finite dtype and raises ConfigError."""

    class Node(pydantic.BaseModel):
        value: int
        children: list[Node]

    with pytest.raises(ConfigError, match="recursive"):
        OutputSchema.from_user(Node)


def test_recursive_json_schema_is_a_config_error():
    """Definitions that refer to each other in a loop raise ConfigError."""
    schema = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/A"}},
        "$defs": {
            "A": {"type": "object", "properties": {"b": {"$ref": "#/$defs/B"}}},
            "B": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}},
        },
    }
    with pytest.raises(ConfigError, match="recursive"):
        OutputSchema.from_user(schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "string"}},
        pydantic.RootModel[list[str]],
    ],
    ids=["json-schema", "root-model"],
)
def test_top_level_array_is_a_config_error(schema: Any):
    """A schema whose top level is a list raises ConfigError telling the user to wrap it."""
    with pytest.raises(ConfigError, match="wrap the value in a model with one field"):
        OutputSchema.from_user(schema)


class Untyped(pydantic.BaseModel):
    anything: Any


class Either(pydantic.BaseModel):
    value: int | str


class FreeForm(pydantic.BaseModel):
    scores: dict[str, int]


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (Untyped, "at 'anything' has no \"type\""),
        (Either, "at 'value' has 2 non-null alternatives"),
        (FreeForm, "at 'scores' has no \"properties\""),
        ({"type": "object", "properties": {"n": {"enum": [1, 2]}}}, "must list strings"),
        ({"type": "object", "properties": {"x": {"$ref": "other.json#/X"}}}, "only local"),
        (Person(**person_answer()), "not an instance"),
        ("Person", "got str"),
    ],
    ids=["any", "union", "dict", "int-enum", "remote-ref", "instance", "string"],
)
def test_unmappable_schema_is_a_config_error(schema: Any, message: str):
    """Schemas without a single fixed Polars type, and non-schemas, raise ConfigError saying why."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        OutputSchema.from_user(schema)


def test_user_dict_is_not_modified():
    """Building from a JSON-schema dict leaves the caller's dict unchanged."""
    before = json.dumps(PERSON_JSON_SCHEMA, sort_keys=True)
    OutputSchema.from_user(PERSON_JSON_SCHEMA)
    assert json.dumps(PERSON_JSON_SCHEMA, sort_keys=True) == before
