"""Prompt templates: ``{column}`` placeholders over one or many columns, rendered by Polars itself.

A template becomes a ``pl.concat_str`` expression, so rendering a million prompts is one vectorised
Polars operation, and a null in any column gives a null prompt (which is never sent).
``{{`` and ``}}`` stand for literal braces; ``{}`` stands for the expression the namespace is on.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

import polars as pl

from .errors import TemplateError


def placeholders(template: str) -> list[str]:
    """The column names a template refers to, in order of first appearance."""
    names: list[str] = []
    for _, name, _, _ in _parse(template):
        if name is not None and name not in names:
            names.append(name)
    return names


def _parse(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    if not isinstance(template, str):
        raise TemplateError(f"a prompt template must be a string, got {type(template).__name__}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(
            f"malformed prompt template {template!r}: {e}. Placeholders look like {{column}}; "
            "write {{ and }} for literal braces."
        ) from e
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if spec or conversion:
            raise TemplateError(
                f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} in {template!r}: format specs and conversions "
                "are not supported; format the column with a Polars expression first."
            )
        if name != "" and not name.replace(" ", "").isprintable():
            raise TemplateError(f"placeholder {{{name}}} in {template!r} is not a column name")
    return parts


def render(
    template: str, self_expr: pl.Expr | None = None, columns: Mapping[str, pl.Expr] | None = None
) -> pl.Expr:
    """An expression that renders ``template`` for every row.

    ``{name}`` reads column ``name`` (or ``columns[name]`` when given); ``{}`` and a placeholder
    equal to ``self_expr``'s output name read ``self_expr``.
    """
    self_name = None
    if self_expr is not None:
        self_name = self_expr.meta.output_name(raise_if_undetermined=False)
    pieces: list[pl.Expr] = []
    for literal, name, _, _ in _parse(template):
        if literal:
            pieces.append(pl.lit(literal, dtype=pl.String))
        if name is None:
            continue
        if name == "" or name == self_name:
            if self_expr is None:
                raise TemplateError(
                    f"{{}} in {template!r} needs an expression to stand for; "
                    "name a column instead, e.g. {review}"
                )
            source = self_expr
        elif columns is not None and name in columns:
            source = columns[name]
        else:
            source = pl.col(name)
        pieces.append(source.cast(pl.String))
    if not pieces:
        raise TemplateError("a prompt template must not be empty")
    return pl.concat_str(pieces, ignore_nulls=False)


def prompt(template: str, **columns: pl.Expr) -> pl.Expr:
    """An expression rendering ``template`` per row, ready for ``.llm.complete()``.

    Examples
    --------
    >>> import polars as pl
    >>> import polars_llm
    >>> df = pl.DataFrame({"title": ["Dune"], "body": ["Spice and sand."]})
    >>> df.select(polars_llm.prompt("Tagline for '{title}': {body}").alias("p"))["p"][0]
    "Tagline for 'Dune': Spice and sand."
    """
    expr = render(template, columns=columns)
    names = placeholders(template)
    return expr.alias(names[0]) if names else expr.alias("prompt")
