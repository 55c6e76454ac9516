"""Frames -> PostgreSQL COPY text format, built column-wise by Polars (no per-row Python)."""

from __future__ import annotations

import polars as pl

NULL = r"\N"


def _escape_copy(value: pl.Expr) -> pl.Expr:
    """Escape a text value for COPY's text format (backslash first)."""
    return (
        value.str.replace_all("\\", "\\\\", literal=True)
        .str.replace_all("\t", "\\t", literal=True)
        .str.replace_all("\n", "\\n", literal=True)
        .str.replace_all("\r", "\\r", literal=True)
        # PostgreSQL text cannot hold NUL: keep it visible instead of failing the load.
        .str.replace_all("\x00", "\\\\x00", literal=True)
    )


def _array_literal(values: pl.Expr) -> pl.Expr:
    """A list of strings -> a text[] literal: {"a","b"} with quotes and backslashes escaped."""
    element = (
        pl.element().str.replace_all("\\", "\\\\", literal=True)
        .str.replace_all('"', '\\"', literal=True)
    )
    quoted = values.list.eval(pl.concat_str(pl.lit('"'), element, pl.lit('"')))
    return pl.concat_str(pl.lit("{"), quoted.list.join(","), pl.lit("}"))


def _as_text(name: str, dtype: pl.DataType) -> pl.Expr:
    column = pl.col(name)
    if isinstance(dtype, pl.List):
        text = _array_literal(column)
    elif isinstance(dtype, pl.Datetime):
        text = column.dt.strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(dtype, pl.Date):
        text = column.dt.strftime("%Y-%m-%d")
    elif dtype == pl.String:
        text = column
    else:
        text = column.cast(pl.String)
    return _escape_copy(text).fill_null(NULL)


def copy_lines(frame: pl.DataFrame) -> bytes:
    """All rows of ``frame`` as COPY text-format lines (tab-separated, ``\\N`` for null)."""
    if frame.height == 0:
        return b""
    line = pl.concat_str(
        [_as_text(name, dtype) for name, dtype in frame.schema.items()], separator="\t"
    )
    text = frame.select(line.alias("line")).get_column("line").str.join("\n").item()
    return (text + "\n").encode("utf-8")
