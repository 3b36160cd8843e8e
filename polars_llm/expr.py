"""The ``.llm`` expression namespace: one typed method per verb, each with its dtype known upfront."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import polars as pl

from . import interrupt
from .engine import CallSpec, complete_series, embed_series, output_dtype
from .errors import ConfigError
from .options import split_options
from .outputs import EmbedPost, LabelPost, PostProcess, SchemaPost, TextPost
from .prompt import render
from .settings import Settings


def _spec(
    post: PostProcess,
    model: str | None,
    system: str | None,
    settings: Settings | None,
    details: bool,
    options: dict[str, Any],
    kind: str = "chat",
) -> CallSpec:
    """The CallSpec of one method call: ``options`` are settings and request parameters."""
    overrides, params = split_options(options, kind=kind, where=f".llm call ({kind})")
    # Built on the main thread, the expression's work stops on Ctrl-C there (see interrupt.py).
    interrupt.install()
    return CallSpec(
        model=model,
        system=system,
        params=params,
        post=post,
        settings=settings,
        overrides=overrides,
        details=details,
        interruptible=threading.current_thread() is threading.main_thread(),
    )


@pl.api.register_expr_namespace("llm")
class LLMNamespace:
    """LLM calls over a column: ``pl.col("review").llm.complete("Sentiment of {review}")``."""

    def __init__(self, expr: pl.Expr) -> None:
        self._expr = expr

    def _prompts(self, template: str | None) -> pl.Expr:
        if template is None:
            # Numbers must reach the endpoint as text (an int list is token ids to OpenAI).
            return self._expr.cast(pl.String)
        return render(template, self_expr=self._expr)

    def _apply(
        self, template: str | None, spec: CallSpec, function: Any = complete_series
    ) -> pl.Expr:
        name = self._expr.meta.output_name(raise_if_undetermined=False)
        prompts = self._prompts(template)
        out = prompts.map_batches(
            functools.partial(function, spec=spec),
            # Always given: without it Polars would call the function on dummy data to find out,
            # which here would be a real, paid call.
            return_dtype=output_dtype(spec),
            is_elementwise=True,
        )
        return out.alias(name) if name else out

    def complete(
        self,
        template: str | None = None,
        *,
        model: str | None = None,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        details: bool = False,
        settings: Settings | None = None,
        **options: Any,
    ) -> pl.Expr:
        """The model's answer to a prompt per row, as a String column.

        Parameters
        ----------
        template
            Prompt with ``{column}`` placeholders; ``{}`` or the expression's own name stands for
            the expression. Without a template the expression's values are the prompts.
        model
            Model name; default from settings (``gpt-4o-mini`` remote, ``local`` embedded).
        system
            System message sent before every prompt.
        temperature, max_tokens
            Sent in the chat-completions body, like any other of its parameters given as a
            keyword (``top_p=``, ``seed=``, ``stop=``, ...); provider-specific ones go in
            ``extra_body={...}``. A keyword that is neither a parameter nor a setting is refused.
        details
            Return a struct ``{value, error, cached, prompt_tokens, completion_tokens}`` instead
            of the value alone, so failed rows keep their reason.
        settings
            Endpoint and behaviour for this expression; default: ``polars_llm.configure()``
            settings, then the environment.
        **options
            Any :class:`~polars_llm.Settings` field overrides it for this expression:
            ``base_url=``, ``api_key=``, ``concurrency=``, ``rpm=``, ``tpm=``, ``timeout=``,
            ``max_attempts=``, ``retry_budget=``, ``on_error=`` (``"raise"`` or ``"null"``),
            ``cache=``, ... Chat-completions parameters go in the request body.

        Identical prompts are sent once, answers are cached on disk, and null prompts give null.

        Examples
        --------
        >>> import polars as pl
        >>> import polars_llm
        >>> from polars_llm.testing import FakeServer
        >>> with FakeServer() as server:
        ...     df = pl.DataFrame({"review": ["Great!", None, "Great!"]})
        ...     df.with_columns(
        ...         answer=pl.col("review").llm.complete(
        ...             "Sentiment of: {review}", base_url=server.base_url, api_key="x"
        ...         )
        ...     )
        shape: (3, 2)
        ┌────────┬────────────────────────────┐
        │ review ┆ answer                     │
        │ ---    ┆ ---                        │
        │ str    ┆ str                        │
        ╞════════╪════════════════════════════╡
        │ Great! ┆ echo: Sentiment of: Great! │
        │ null   ┆ null                       │
        │ Great! ┆ echo: Sentiment of: Great! │
        └────────┴────────────────────────────┘
        """
        spec = _spec(
            TextPost(),
            model,
            system,
            settings,
            details,
            {"temperature": temperature, "max_tokens": max_tokens, **options},
        )
        return self._apply(template, spec)

    def extract(
        self,
        schema: Any,
        template: str | None = None,
        *,
        model: str | None = None,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        details: bool = False,
        settings: Settings | None = None,
        **options: Any,
    ) -> pl.Expr:
        """Structured output: a ``pl.Struct`` column shaped by a Pydantic model or JSON schema.

        The dtype is known before any call. The endpoint is asked for JSON through its
        ``response_format`` json_schema; an answer that does not validate is sent back once or
        twice with the problem, then becomes that row's error (with the raw text kept).
        Other parameters are as in :meth:`complete`.

        Examples
        --------
        >>> import polars as pl
        >>> import polars_llm
        >>> from pydantic import BaseModel
        >>> from polars_llm.testing import FakeServer
        >>> class Person(BaseModel):
        ...     name: str
        ...     age: int | None
        >>> with FakeServer() as server:
        ...     out = pl.DataFrame({"bio": ["Ada, 36"]}).with_columns(
        ...         p=pl.col("bio").llm.extract(Person, base_url=server.base_url, api_key="x")
        ...     )
        >>> out.schema["p"]
        Struct({'name': String, 'age': Int64})
        """
        spec = _spec(
            SchemaPost(schema),
            model,
            system,
            settings,
            details,
            {"temperature": temperature, "max_tokens": max_tokens, **options},
        )
        return self._apply(template, spec)

    def classify(
        self,
        labels: Sequence[str],
        template: str | None = None,
        *,
        model: str | None = None,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        details: bool = False,
        settings: Settings | None = None,
        **options: Any,
    ) -> pl.Expr:
        """One label per row from ``labels``, as a ``pl.Enum`` column.

        The model is told the labels in the system message. Answers are matched ignoring case,
        quotes and trailing punctuation; an answer naming no label (or several) is asked again
        up to twice, then becomes that row's error rather than a new label. Other parameters are as in
        :meth:`complete`.

        Examples
        --------
        >>> import polars as pl
        >>> import polars_llm
        >>> from polars_llm.testing import FakeServer
        >>> def judge(body):
        ...     return "Positive." if "love" in body["messages"][-1]["content"] else "negative"
        >>> with FakeServer(reply=judge) as server:
        ...     out = pl.DataFrame({"r": ["I love it", "Broken"]}).with_columns(
        ...         s=pl.col("r").llm.classify(
        ...             ["positive", "negative"], base_url=server.base_url, api_key="x"
        ...         )
        ...     )
        >>> out["s"].to_list()
        ['positive', 'negative']
        """
        post = LabelPost(labels)
        system = post.system(system)
        spec = _spec(
            post,
            model,
            system,
            settings,
            details,
            {"temperature": temperature, "max_tokens": max_tokens, **options},
        )
        return self._apply(template, spec)

    def embed(
        self,
        *,
        model: str | None = None,
        dimensions: int | None = None,
        batch_size: int = 256,
        details: bool = False,
        settings: Settings | None = None,
        **options: Any,
    ) -> pl.Expr:
        """Embeddings as an ``pl.Array(pl.Float32, dim)`` column.

        ``dimensions`` gives the vector size (required unless the model is a known OpenAI one);
        it is also sent to the endpoint. Equal inputs are sent once, ``batch_size`` inputs per
        request, and cached like completions.

        Examples
        --------
        >>> import polars as pl
        >>> import polars_llm
        >>> from polars_llm.testing import FakeServer
        >>> with FakeServer() as server:
        ...     out = pl.DataFrame({"t": ["cat", "dog"]}).with_columns(
        ...         v=pl.col("t").llm.embed(
        ...             model="emb", dimensions=4, base_url=server.base_url, api_key="x"
        ...         )
        ...     )
        >>> out.schema["v"]
        Array(Float32, shape=(4,))
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        spec = _spec(
            EmbedPost(model, dimensions),
            model,
            None,
            settings,
            details,
            {"dimensions": dimensions, **options},
            kind="embed",
        )
        function = functools.partial(embed_series, batch_size=batch_size)
        return self._apply(None, spec, function)
