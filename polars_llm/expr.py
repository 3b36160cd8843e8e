"""The ``.llm`` expression namespace: one typed method per verb, each with its dtype known upfront."""

from __future__ import annotations

import functools
from typing import Any

import polars as pl

from .engine import CallSpec, PostProcess, TextPost, complete_series, output_dtype
from .prompt import render
from .settings import OnError, Settings


def _spec(
    *,
    model: str | None,
    system: str | None,
    params: dict[str, Any],
    post: PostProcess,
    settings: Settings | None,
    details: bool,
    base_url: str | None,
    api_key: str | None,
    concurrency: int | None,
    cache: bool | None,
    on_error: OnError | None,
) -> CallSpec:
    overrides = {
        "base_url": base_url,
        "api_key": api_key,
        "concurrency": concurrency,
        "cache": cache,
        "on_error": on_error,
    }
    return CallSpec(
        model=model,
        system=system,
        params=params,
        post=post,
        settings=settings,
        overrides={k: v for k, v in overrides.items() if v is not None},
        details=details,
    )


@pl.api.register_expr_namespace("llm")
class LLMNamespace:
    """LLM calls over a column: ``pl.col("review").llm.complete("Sentiment of {review}")``."""

    def __init__(self, expr: pl.Expr) -> None:
        self._expr = expr

    def _prompts(self, template: str | None) -> pl.Expr:
        if template is None:
            return self._expr
        return render(template, self_expr=self._expr)

    def _apply(self, template: str | None, spec: CallSpec) -> pl.Expr:
        name = self._expr.meta.output_name(raise_if_undetermined=False)
        prompts = self._prompts(template)
        out = prompts.map_batches(
            functools.partial(complete_series, spec=spec),
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
        on_error: OnError | None = None,
        settings: Settings | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int | None = None,
        cache: bool | None = None,
        **params: Any,
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
        temperature, max_tokens, **params
            Sent as they are in the chat-completions body (``top_p``, ``seed``, ``stop``, ...).
        details
            Return a struct ``{value, error, cached, prompt_tokens, completion_tokens}`` instead
            of the value alone, so failed rows keep their reason.
        on_error
            ``"raise"`` or ``"null"``; default from settings (``"raise"``).
        settings, base_url, api_key, concurrency, cache
            Endpoint and behaviour for this expression; default: ``polars_llm.configure()``
            settings, then the environment.

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
        ...             "Sentiment of: {review}", base_url=server.base_url, api_key="x", cache=False
        ...         )
        ...     )
        shape: (3, 2)
        ┌────────┬──────────────────────────────┐
        │ review ┆ answer                       │
        │ ---    ┆ ---                          │
        │ str    ┆ str                          │
        ╞════════╪══════════════════════════════╡
        │ Great! ┆ echo: Sentiment of: Great!   │
        │ null   ┆ null                         │
        │ Great! ┆ echo: Sentiment of: Great!   │
        └────────┴──────────────────────────────┘
        """
        spec = _spec(
            model=model,
            system=system,
            params={"temperature": temperature, "max_tokens": max_tokens, **params},
            post=TextPost(),
            settings=settings,
            details=details,
            base_url=base_url,
            api_key=api_key,
            concurrency=concurrency,
            cache=cache,
            on_error=on_error,
        )
        return self._apply(template, spec)
