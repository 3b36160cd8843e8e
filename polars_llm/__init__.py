"""polars-llm: enrich Polars dataframes and Parquet files with LLM calls."""
