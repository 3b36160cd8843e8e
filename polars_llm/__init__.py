"""polars-llm: enrich Polars dataframes and Parquet files with LLM calls.

``import polars_llm`` registers the ``.llm`` expression namespace::

    df.with_columns(sentiment=pl.col("review").llm.complete("Sentiment of {review}"))
"""

from . import expr as _expr  # noqa: F401  (registers the .llm namespace)
from .errors import (
    BatchAborted,
    ConfigError,
    InputError,
    PolarsLLMError,
    RowError,
    TemplateError,
    TooManyFailures,
)
from .pipeline import Step, load_pipeline, pipeline, plan
from .prompt import prompt
from .settings import Settings, configure, get_settings

__all__ = [
    "BatchAborted",
    "ConfigError",
    "InputError",
    "PolarsLLMError",
    "RowError",
    "Settings",
    "Step",
    "TemplateError",
    "TooManyFailures",
    "configure",
    "get_settings",
    "load_pipeline",
    "pipeline",
    "plan",
    "prompt",
]
