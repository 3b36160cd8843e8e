"""Cache keys: a template's fast keys equal the keys of the full requests they stand for."""

from __future__ import annotations

from polars_llm.request import RequestTemplate


def template(**changes: object) -> RequestTemplate:
    base: dict = {"endpoint": "http://x/v1", "model": "m", "params": {"temperature": 0}}
    return RequestTemplate(**{**base, **changes})  # type: ignore[arg-type]


# Quotes, backslashes, every control character, DEL, accents, CJK, emoji (outside the BMP),
# the line and paragraph separators and a byte order mark: everything JSON escapes or might.
TRICKY = [
    "",
    "plain",
    'say "hi" \\ there',
    "".join(chr(c) for c in range(0x20)),
    "\x7f del",
    "café, naïve",
    "漢字と かな",
    "emoji 😀🚀 and a flag 🇫🇷",
    "\u2028 line \u2029 paragraph \ufeff bom",
]


def test_template_key_is_the_full_requests_key() -> None:
    """key(text) is the sha256 of the request's canonical JSON, for every kind of text."""
    for kind in ("chat", "embed"):
        for system in (None, "Be brief."):
            t = template(kind=kind, system=system)
            for text in TRICKY:
                assert t.key(text) == t.request(text).key()


def test_every_code_point_keys_like_the_full_request() -> None:
    """Texts holding every Unicode scalar value key like their full requests, one by one and
    through keys()."""
    t = template()
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = ["".join(points[i : i + 4096]) for i in range(0, len(points), 4096)]
    assert t.keys(texts) == [t.request(text).key() for text in texts]
    assert [t.key(text) for text in texts] == t.keys(texts)


def test_keys_differ_with_what_shapes_the_answer() -> None:
    """A different text, model, system prompt or parameter gives a different key."""
    base = template().key("q")
    assert template().key("q2") != base
    assert template(model="other").key("q") != base
    assert template(system="s").key("q") != base
    assert template(params={"temperature": 1}).key("q") != base
