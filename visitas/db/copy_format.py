"""Frames -> PostgreSQL text: COPY lines, or one array literal per column; built column-wise by
Polars (no per-row Python).

In COPY lines, escaping is only paid for where it is needed: a text column (or list column) in
which no value holds a character that COPY or array syntax treats specially is written as it is.
Array literals (a few hundred values each) always quote and escape their text.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import polars as pl

T = TypeVar("T")
NULL = r"\N"
_COPY_SPECIAL = r"[\\\t\n\r\x00]"
_ARRAY_SPECIAL = r'[\\"\t\n\r\x00]'


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


def _quoted_element(value: pl.Expr) -> pl.Expr:
    """A text value as an array element: in double quotes, backslash and double quote escaped."""
    escaped = (value.str.replace_all("\\", "\\\\", literal=True)
               .str.replace_all('"', '\\"', literal=True))
    return pl.concat_str(pl.lit('"'), escaped, pl.lit('"'))


def _array_literal(values: pl.Expr, plain: bool) -> pl.Expr:
    """A list of strings -> a text[] literal: {"a","b"} (``{}`` when empty)."""
    if plain:  # no element holds a quote, a backslash or a control character
        joined = pl.concat_str(pl.lit('{"'), values.list.join('","'), pl.lit('"}'))
    else:
        quoted = values.list.eval(_quoted_element(pl.element()))
        joined = _escape_copy(pl.concat_str(pl.lit("{"), quoted.list.join(","), pl.lit("}")))
    return pl.when(values.list.len() == 0).then(pl.lit("{}")).otherwise(joined)


def _special_columns(frame: pl.DataFrame) -> set[str]:
    """The text and list columns of ``frame`` with a value that needs escaping, found in one
    query (one per column cost about 0.1 ms each, on the per-file path of a small file)."""
    checks = [
        (pl.col(name).explode().str.contains(_ARRAY_SPECIAL) if isinstance(dtype, pl.List)
         else pl.col(name).str.contains(_COPY_SPECIAL)).any().alias(name)
        for name, dtype in frame.schema.items()
        if dtype == pl.String or isinstance(dtype, pl.List)]
    if not checks:
        return set()
    found = frame.select(checks).row(0, named=True)
    return {name for name, special in found.items() if special}


def _as_text(name: str, dtype: pl.DataType, special: set[str]) -> pl.Expr:
    """Text and list columns as COPY text; others are left to the CSV writer."""
    column = pl.col(name)
    if isinstance(dtype, pl.List):
        return _array_literal(column, plain=name not in special).fill_null(NULL)
    if name in special:
        return _escape_copy(column)
    return column


def copy_lines(frame: pl.DataFrame) -> bytes:
    """All rows of ``frame`` as COPY text-format lines (tab-separated, ``\\N`` for null).

    Polars' CSV writer (native, multi-threaded) lays the lines out, never quoting: text that
    COPY would misread is escaped beforehand, numbers and dates cannot hold a tab or a newline.
    """
    if frame.height == 0:
        return b""
    special = _special_columns(frame)
    text = frame.select(_as_text(name, dtype, special).alias(name)
                        for name, dtype in frame.schema.items())
    out = io.BytesIO()
    text.write_csv(out, include_header=False, separator="\t", quote_style="never", null_value=NULL,
                   datetime_format="%Y-%m-%d %H:%M:%S", date_format="%Y-%m-%d")
    return out.getvalue()


def array_literals(frame: pl.DataFrame) -> tuple[str, ...]:
    """Each column of ``frame`` as one array literal (``{"a","b"}``, ``{1,NULL}``), for a
    parameter cast to that column's array type and unnested: text elements are always quoted
    (backslash and double quote escaped), other values written as PostgreSQL reads them, a null
    as ``NULL``.  Columns of strings, integers and dates only."""
    def element(name: str, dtype: pl.DataType) -> pl.Expr:
        column = pl.col(name)
        if dtype == pl.String:
            column = _quoted_element(column)
        elif dtype.is_integer() or dtype == pl.Date:
            column = column.cast(pl.String)
        else:
            raise TypeError(f"no array literal for {name} ({dtype})")
        return column.fill_null("NULL")

    return frame.select(
        pl.concat_str(pl.lit("{"), element(name, dtype).str.join(","), pl.lit("}")).alias(name)
        for name, dtype in frame.schema.items()).row(0)


class Prefetch(Iterator[T]):
    """``items`` produced in a thread from the moment this is made, ``depth`` ahead of the
    consumer (Polars releases the GIL); a context manager that stops the thread on exit.

    The thread never blocks for good: every hand-over waits in short steps and gives up once the
    consumer has closed it (an error, a retry), so :meth:`close` returns and an outage mid-COPY
    becomes a retry instead of a hang.
    """

    def __init__(self, items: Iterable[T], depth: int = 2, poll: float = 0.2):
        self._ready: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._poll = poll
        self._done = object()
        self._worker = threading.Thread(target=self._produce, args=(items,),
                                        name="copy-formatter", daemon=True)
        self._worker.start()

    def _hand_over(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=self._poll)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                if not self._hand_over(item):
                    return
            self._hand_over(self._done)
        except BaseException as error:  # handed to the consumer
            self._hand_over(error)

    def __next__(self) -> T:
        while not self._stop.is_set():
            try:
                item = self._ready.get(timeout=self._poll)
            except queue.Empty:
                if not self._worker.is_alive() and self._ready.empty():
                    raise RuntimeError("the copy formatter stopped without a result") from None
                continue
            if item is self._done:
                break
            if isinstance(item, BaseException):
                self.close()
                raise item
            return item
        self.close()
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._worker.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
