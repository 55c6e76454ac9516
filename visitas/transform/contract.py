"""The report contract: what one ``report_<n>.txt`` must look like and what it turns into.

Everything here is pure: functions take bytes, strings or Polars frames and return frames or
plain values.  Reading files and writing outputs is the tasks' business (``visitas.tasks``).

A report is a CSV file with a header and 15 columns, recognised by position.  Each data line
becomes either one *statistics* row (all checks passed) or one or more *error* rows (every check
that failed, each with the column, a reason code and a message naming the offending value).
"""

from __future__ import annotations

import codecs
import csv
import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import NamedTuple

import polars as pl
from email_validator import EmailNotValidError, validate_email

from visitas.handoff import WARNING_KINDS  # noqa: F401 - part of the contract

# A statistics row, column by column: (Polars type, PostgreSQL type).  The one definition: the
# report's 15 columns by position, the Polars schema and the COPY column list derive from it,
# and a test checks the migrated table against it (tests/integration/test_schema.py).
STATISTICS: dict[str, tuple[pl.DataType, str]] = {
    "email": (pl.String(), "text"), "jyv": (pl.String(), "text"), "badmail": (pl.String(), "text"),
    "baja": (pl.String(), "text"), "fecha_envio": (pl.Datetime("us"), "timestamp"),
    "fecha_open": (pl.Datetime("us"), "timestamp"), "opens": (pl.Int64(), "bigint"),
    "opens_virales": (pl.Int64(), "bigint"), "fecha_click": (pl.Datetime("us"), "timestamp"),
    "clicks": (pl.Int64(), "bigint"), "clicks_virales": (pl.Int64(), "bigint"),
    "links": (pl.List(pl.String), "text[]"), "ips": (pl.List(pl.String), "text[]"),
    "navegadores": (pl.List(pl.String), "text[]"), "plataformas": (pl.List(pl.String), "text[]"),
    "source_file": (pl.String(), "text"), "line_no": (pl.Int64(), "bigint"),
    # Calculated per row (:data:`ROW_METRICS`; formulas in the README's contract section).
    "abierto": (pl.Boolean(), "boolean"), "clicado": (pl.Boolean(), "boolean"),
    "minutos_a_open": (pl.Int64(), "bigint"), "minutos_a_click": (pl.Int64(), "bigint"),
    "opens_totales": (pl.Int64(), "bigint"), "clicks_totales": (pl.Int64(), "bigint"),
    "num_links": (pl.Int64(), "bigint"),
}
# Column names used inside visitas, by position in the file.
COLUMNS: tuple[str, ...] = tuple(STATISTICS)[:15]
# Header names as the partner writes them; ``None`` means any name is accepted (it varies).
HEADER_NAMES: tuple[str | None, ...] = (
    "email", None, "Badmail", "Baja", "Fecha envio", "Fecha open", "Opens", "Opens virales",
    "Fecha click", "Clicks", "Clicks virales", "Links", "IPs", "Navegadores", "Plataformas",
)
N_COLUMNS = len(COLUMNS)
TEXT_FLAGS = ("jyv", "badmail", "baja")
DATE_COLUMNS = ("fecha_envio", "fecha_open", "fecha_click")
COUNT_COLUMNS = ("opens", "opens_virales", "clicks", "clicks_virales")
LIST_COLUMNS = ("links", "ips", "navegadores", "plataformas")
DATE_FORMAT = "%d/%m/%Y %H:%M"
# ASCII digits only: ``\d`` would admit any Unicode digit (``３``), which no cast reads.
DATE_PATTERN = r"^[0-9]{2}/[0-9]{2}/[0-9]{4} [0-9]{2}:[0-9]{2}$"
# At most 18 digits: always within PostgreSQL's bigint (19 digits may overflow it).
COUNT_PATTERN = r"^[0-9]{1,18}$"
NULL_MARKERS = ("", "-")

# One CSV field: a quoted field (with "" escapes) or an unquoted one without quotes or commas.
_FIELD = r'("(?:[^"]|"")*"|[^,"]*)'
_ROW_PATTERN = "^" + ",".join([_FIELD] * N_COLUMNS) + "$"
_ANY_ROW_PATTERN = "^" + _FIELD + "(?:," + _FIELD + ")*$"
_QUOTED = r'"(?:[^"]|"")*"'

STATISTICS_SCHEMA: dict[str, pl.DataType] = {name: types[0] for name, types in STATISTICS.items()}
ERROR_SCHEMA: dict[str, pl.DataType] = {
    "source_file": pl.String(), "line_no": pl.Int64(), "column_name": pl.String(),
    "reason": pl.String(), "message": pl.String(), "raw_line": pl.String(),
}
_ERROR_STRUCT = pl.Struct({"column_name": pl.String, "reason": pl.String, "message": pl.String})
# A line longer than this is rejected (``line_too_long``) without being held whole.
MAX_LINE_BYTES = 1024 * 1024
# How much of an overlong line is kept for its error row.
EXCERPT_BYTES = 1024
# Bytes that never occur in a text header: a first line with one of them is a binary file.
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class FileRejected(Exception):
    """The whole file is unusable; ``reason`` is a stable code, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------- bytes and header

def decode_line(data: bytes) -> tuple[str, bool]:
    """One line's bytes as text: UTF-8, or Windows-1252 when they are not valid UTF-8.

    Returns ``(text, is_cp1252)``.  cp1252's five undefined bytes become U+FFFD.
    """
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), True


def check_text_header(line: bytes) -> None:
    """Reject a file whose first line holds bytes no text header has (NUL and other controls)."""
    found = _CONTROL_BYTES.search(line)
    if found:
        raise FileRejected("binary_file", f"not a CSV text file: control byte 0x{found.group()[0]:02x}"
                                          f" at offset {found.start()} of the first line")


def _fold(name: str) -> str:
    """Header names compare case-, accent- and surrounding-space-insensitively."""
    decomposed = unicodedata.normalize("NFKD", name.strip().strip('"').strip())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def split_line(line: str) -> list[str]:
    """Split one CSV line into unquoted fields (the header)."""
    return next(csv.reader([line], strict=False)) if line else [""]


def check_header(header_line: str) -> None:
    """Raise FileRejected unless the header has the 15 expected columns."""
    line = header_line.removeprefix("\ufeff").rstrip("\r\n")
    if not line.strip():
        raise FileRejected("no_header", "the first line is empty: no header")
    names = split_line(line)
    if len(names) != N_COLUMNS:
        raise FileRejected(
            "header_columns",
            f"header has {len(names)} columns, expected {N_COLUMNS}: {line[:200]!r}")
    wrong = [
        f"column {i + 1} is {name!r}, expected {expected!r}"
        for i, (name, expected) in enumerate(zip(names, HEADER_NAMES, strict=True))
        if expected is not None and _fold(name) != _fold(expected)
    ]
    if wrong:
        looks_like_data = "@" in names[0]
        reason = "no_header" if looks_like_data else "header_names"
        prefix = "no header: the first line looks like data; " if looks_like_data else "unknown header: "
        raise FileRejected(reason, prefix + "; ".join(wrong[:5]))


# --------------------------------------------------------------------------- lines

LINES_SCHEMA: dict[str, pl.DataType] = {
    "line_no": pl.Int64(), "line": pl.String(), "cp1252": pl.Boolean(), "too_long": pl.Boolean(),
}


def count_line_ends(data: bytes) -> int:
    """LF, CRLF and a lone CR each end a line."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def lines_frame(data: bytes, first_line_no: int,
                max_line_bytes: int = MAX_LINE_BYTES) -> tuple[pl.DataFrame, bool]:
    """Split whole lines (raw bytes) into ``line_no, line, cp1252, too_long``.

    Every line end (LF, CRLF, a lone CR) ends a line; each line is decoded on its own (UTF-8,
    else Windows-1252: ``cp1252`` is true); a line over ``max_line_bytes`` keeps only its first
    ``EXCERPT_BYTES`` (``too_long``).  Empty lines are dropped (they are not rows) but keep the
    numbering.  Also returns whether a non-ASCII line was valid UTF-8 (to tell a mixed file).

    The common cases stay native (measured: a Python decode and byte replaces of each batch
    doubled the splitting time and hold the GIL the other validation thread needs): Polars'
    reader splits LF and CRLF lines and checks UTF-8 itself; only a lone CR needs the bytes
    rewritten, and only a batch that is not all UTF-8 is split line by line in Python.
    ``data.count`` passes are avoided too: each costs 4-8 ms per 8 MiB batch, GIL held.
    """
    cp1252: list[bool] | None = None
    utf8_non_ascii = not data.isascii()
    lines = _read_lines(data)
    if lines is not None and lines.str.contains("\r", literal=True).any():
        # The reader ends lines at LF and drops the CR of a CRLF: a CR left in a line is a lone
        # CR, which ends a line too.  Rare: only then are the bytes rewritten.
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = _read_lines(data)
    if lines is None:  # not all UTF-8, or a byte the reader treats specially
        lines, cp1252, utf8_non_ascii = _split_in_python(data)
    frame = pl.DataFrame({"line": lines.fill_null("")}).with_row_index("line_no", offset=first_line_no)
    frame = frame.with_columns(
        pl.col("line_no").cast(pl.Int64),
        (pl.Series("cp1252", cp1252, dtype=pl.Boolean) if cp1252 is not None
         else pl.lit(False).alias("cp1252")),
        (pl.col("line").str.len_bytes() > max_line_bytes).alias("too_long"),
    ).filter(pl.col("line").str.len_bytes() > 0)
    if frame.select(pl.col("too_long").any()).item():
        frame = frame.with_columns(pl.when(pl.col("too_long")).then(_excerpt(pl.col("line")))
                                   .otherwise(pl.col("line")).alias("line"))
    return frame.select(list(LINES_SCHEMA)), utf8_non_ascii


def overlong_line_frame(line_no: int, excerpt: bytes) -> pl.DataFrame:
    """The one-row frame of a line too long to hold (the reader kept only its first bytes)."""
    text, is_cp1252 = decode_line(excerpt[:EXCERPT_BYTES])
    return pl.DataFrame({"line_no": [line_no], "line": [text], "cp1252": [is_cp1252],
                         "too_long": [True]}, schema=LINES_SCHEMA)


def _excerpt(line: pl.Expr) -> pl.Expr:
    return line.str.slice(0, EXCERPT_BYTES)


def _read_lines(data: bytes) -> pl.Series | None:
    """One string per LF or CRLF line (no separator, no quoting) by Polars' reader, or None if
    it cannot read them so: bytes that are not UTF-8, or a byte it treats specially."""
    if not data:
        return pl.Series("line", [], dtype=pl.String)
    if b"\x01" in data or data.startswith(codecs.BOM_UTF8):  # the separator would cut such a
        return None                                          # line in two; the reader drops a BOM
    try:
        frame = pl.read_csv(data, has_header=False, separator="\x01", quote_char=None,
                            schema={"line": pl.String}, raise_if_empty=False)
    except pl.exceptions.PolarsError:
        return None
    expected = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    return frame.get_column("line") if frame.height == expected else None


def _split_in_python(data: bytes) -> tuple[pl.Series, list[bool], bool]:
    """Line by line: each line UTF-8, else Windows-1252."""
    lines, cp1252, utf8_non_ascii = [], [], False
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for raw in data.removesuffix(b"\n").split(b"\n") if data else []:
        text, fallback = decode_line(raw)
        lines.append(text)
        cp1252.append(fallback)
        utf8_non_ascii = utf8_non_ascii or (not fallback and not raw.isascii())
    return pl.Series("line", lines, dtype=pl.String), cp1252, utf8_non_ascii


def _unquote(field: pl.Expr) -> pl.Expr:
    is_quoted = field.str.starts_with('"') & field.str.ends_with('"') & (field.str.len_chars() >= 2)
    inner = field.str.slice(1, field.str.len_chars() - 2).str.replace_all('""', '"', literal=True)
    return pl.when(is_quoted).then(inner).otherwise(field)


def _error(condition: pl.Expr, column: str, reason: str, message: pl.Expr) -> pl.Expr:
    return pl.when(condition).then(
        pl.struct(
            pl.lit(column).alias("column_name"),
            pl.lit(reason).alias("reason"),
            message.alias("message"),
        )
    ).otherwise(pl.lit(None, dtype=_ERROR_STRUCT))


def _quoted(value: pl.Expr) -> pl.Expr:
    """A value for a message, quoted and cut to 80 characters."""
    return pl.concat_str(pl.lit("'"), value.str.slice(0, 80), pl.lit("'"))


def _as_null(value: pl.Expr) -> pl.Expr:
    return pl.when(value.is_in(NULL_MARKERS)).then(None).otherwise(value)


# What a line the CSV parser must not see is replaced with there: 15 empty fields.
_PLACEHOLDER = "," * (N_COLUMNS - 1)


def split_columns(lines: pl.DataFrame) -> pl.DataFrame:
    """``line_no, line`` -> adds ``field_count``, ``is_well_quoted`` and the 15 raw text columns.

    Well-formed lines (15 well-quoted fields, no CR or NUL inside: one regular expression tells)
    go through Polars' CSV parser, which is fast and multi-threaded; the others through a
    regular expression, which also tells how many fields a malformed line has.  Rows stay in
    line order: the parser reads a placeholder in place of each malformed line, and that row's
    fields are then set from the regular expression (sorting the rows back instead cost about
    4 % of a batch's validation CPU).
    """
    plain = (pl.col("line").str.contains(_ROW_PATTERN) & ~pl.col("line").str.contains(r"[\r\x00]")
             & ~pl.col("too_long"))
    is_plain = lines.select(plain.alias("plain")).get_column("plain")
    parsed = None
    if lines.height and is_plain.any():
        text = lines.select(pl.when(is_plain).then(pl.col("line")).otherwise(pl.lit(_PLACEHOLDER))
                            .str.join("\n").cast(pl.Binary)).item() + b"\n"
        try:
            parsed = pl.read_csv(
                text, has_header=False, schema=dict.fromkeys(COLUMNS, pl.String),
                quote_char='"', raise_if_empty=False)
        except pl.exceptions.PolarsError:
            parsed = None
        if parsed is not None and parsed.height != lines.height:
            parsed = None  # never expected; the regular expression is always right
    if parsed is None:
        raw = _split_by_pattern(lines)
    else:
        raw = pl.concat([
            lines.with_columns(pl.lit(True).alias("is_well_quoted"),
                              pl.lit(N_COLUMNS, dtype=pl.Int64).alias("field_count")),
            parsed], how="horizontal")
        if not is_plain.all():
            where = (~is_plain).arg_true()
            slow = _split_by_pattern(lines.filter(~is_plain))
            raw = raw.with_columns(raw.get_column(name).scatter(where, slow.get_column(name))
                                   for name in ("is_well_quoted", "field_count", *COLUMNS))
    return raw.with_columns(_trimmed())


@functools.cache
def _trimmed() -> list[pl.Expr]:
    """Each raw column trimmed, a null marker as null (built once: building the 15 expressions
    cost about 0.5 ms a batch)."""
    return [_as_null(pl.col(name).str.strip_chars()).alias(name) for name in COLUMNS]


# Up to this many lines the slow path runs in Python's re: Polars spent about 3 ms on the
# regular-expression columns of a few lines whatever their number (plans of 17 columns), Python
# 10 us a line.  Both paths give the same columns (a property test compares them).
FEW_LINES = 64
_ROW_RE = re.compile(_ROW_PATTERN.removeprefix("^").removesuffix("$"))
_ANY_ROW_RE = re.compile(_ANY_ROW_PATTERN.removeprefix("^").removesuffix("$"))
_QUOTED_RE = re.compile(_QUOTED)


def _split_by_pattern(lines: pl.DataFrame) -> pl.DataFrame:
    """The slow path of :func:`split_columns`, right for any line."""
    if lines.height <= FEW_LINES:
        return _split_few_by_pattern(lines)
    groups = pl.col("line").str.extract_groups(_ROW_PATTERN)
    return lines.with_columns(
        pl.col("line").str.contains(_ANY_ROW_PATTERN).alias("is_well_quoted"),
        # fields = 1 + commas outside quoted fields (exact for well-quoted lines)
        (pl.col("line").str.replace_all(_QUOTED, "").str.count_matches(",", literal=True) + 1)
        .cast(pl.Int64).alias("field_count"),
        groups.alias("_groups"),
    ).with_columns(
        _unquote(pl.col("_groups").struct.field(str(i + 1))).alias(name)
        for i, name in enumerate(COLUMNS)
    ).drop("_groups")


def _split_few_by_pattern(lines: pl.DataFrame) -> pl.DataFrame:
    """:func:`_split_by_pattern` for a few lines, line by line in Python."""
    well_quoted, field_counts, fields = [], [], []
    for line in lines.get_column("line"):
        well_quoted.append(_ANY_ROW_RE.fullmatch(line) is not None)
        field_counts.append(_QUOTED_RE.sub("", line).count(",") + 1)
        row = _ROW_RE.fullmatch(line)
        fields.append([_unquote_one(f) for f in row.groups()] if row else [None] * N_COLUMNS)
    return lines.with_columns(
        pl.Series("is_well_quoted", well_quoted, dtype=pl.Boolean),
        pl.Series("field_count", field_counts, dtype=pl.Int64),
        *[pl.Series(name, [row[i] for row in fields], dtype=pl.String)
          for i, name in enumerate(COLUMNS)])


def _unquote_one(field: str) -> str:
    if len(field) >= 2 and field.startswith('"') and field.endswith('"'):
        return field[1:-1].replace('""', '"')
    return field


def type_columns(raw: pl.DataFrame, email_errors: pl.DataFrame,
                 max_line_bytes: int = MAX_LINE_BYTES) -> pl.DataFrame:
    """Raw text columns -> typed columns plus ``errors`` (a list of column/reason/message).

    ``email_errors`` has ``email_raw, email_error, email_key``: the email-validator verdict
    (null = valid) and normalized address of each distinct trimmed address outside the plain
    pattern, computed once per address by :func:`check_emails`; a plain address's key is its
    lower-cased self.
    """
    typing = _typing(max_line_bytes)
    # Each check is a column of its own first, and the messages are built from those columns
    # for the failing rows only: planned as one query, the messages' expressions (every check
    # written out again) cost a small file's batch 2.2 ms of planning, more than the checks.
    # The in-memory engine: on a batch already in memory it spends a fifth less CPU than the
    # streaming engine (Polars 2's default) on these plans.
    checked = (raw.lazy().join(email_errors.lazy(), left_on="email", right_on="email_raw",
                               how="left")
               .with_columns(typing.dates).with_columns(typing.checks)
               .with_columns(typing.has_errors.alias("_has_errors"))).collect(engine="in-memory")
    failing = checked.lazy().filter(pl.col("_has_errors")).select(
        "line_no", typing.errors.alias("errors"))
    return (checked.lazy().join(failing, on="line_no", how="left", maintain_order="left")
            .with_columns(pl.col("errors").fill_null(typing.no_errors))
            .with_columns(typing.typed)
            .drop("_has_errors", *typing.check_names,
                  *[f"_{name}" for name in DATE_COLUMNS], "email_error")
            ).collect(engine="in-memory")


class _Typing(NamedTuple):
    dates: list[pl.Expr]
    checks: list[pl.Expr]
    check_names: list[str]
    has_errors: pl.Expr
    errors: pl.Expr
    no_errors: pl.Expr
    typed: list[pl.Expr]


@functools.cache
def _typing(max_line_bytes: int) -> _Typing:
    """The expressions of :func:`type_columns`, built once (building them cost about 0.8 ms a
    batch, a twentieth of a small file's validation)."""
    dates = {
        name: pl.col(name).str.strptime(pl.Datetime("us"), DATE_FORMAT, strict=False)
        .alias(f"_{name}")
        for name in DATE_COLUMNS
    }
    checks: list[tuple] = []
    # A line too long to hold, or one of only spaces and control characters, is that and
    # nothing else; any other line is parsed and checked field by field.
    blank = pl.col("line").str.contains(r"^[\s\x00-\x1f\x7f]+$")
    is_line = ~pl.col("too_long") & ~blank
    has_fields = pl.col("field_count") == N_COLUMNS
    ok_row = is_line & has_fields & pl.col("is_well_quoted")
    checks.append((
        pl.col("too_long"), "(line)", "line_too_long",
        pl.format("the line is longer than {} bytes (only its start is kept here)",
                  pl.lit(max_line_bytes))))
    checks.append((
        ~pl.col("too_long") & blank, "(line)", "blank_line",
        pl.lit("the line holds only spaces or control characters")))
    checks.append((
        is_line & ~pl.col("is_well_quoted"), "(line)", "malformed_quotes",
        pl.lit("unbalanced or misplaced double quote in the line")))
    checks.append((
        is_line & pl.col("is_well_quoted") & ~has_fields, "(line)", "field_count",
        pl.format("expected {} fields, found {}", pl.lit(N_COLUMNS), pl.col("field_count"))))
    checks.append((
        is_line & pl.col("line").str.contains("\x00", literal=True), "(line)", "nul_byte",
        pl.lit("the line contains NUL bytes")))
    checks.append((
        ok_row & pl.col("email").is_null(), "email", "missing_email", pl.lit("email is empty")))
    checks.append((
        ok_row & pl.col("email_error").is_not_null(), "email", "invalid_email",
        pl.format("email {} is not valid: {}", _quoted(pl.col("email")), pl.col("email_error"))))
    checks.append((
        ok_row & pl.col("fecha_envio").is_null(), "Fecha envio", "missing_date",
        pl.lit("Fecha envio is empty (required)")))
    for name, header in zip(DATE_COLUMNS, ("Fecha envio", "Fecha open", "Fecha click"), strict=True):
        # Years 0001-9999 only: what PostgreSQL's timestamp stores (the parser admits year 0).
        bad = pl.col(name).is_not_null() & (
            ~pl.col(name).str.contains(DATE_PATTERN) | pl.col(f"_{name}").is_null()
            | (pl.col(f"_{name}").dt.year() < 1))
        checks.append((
            ok_row & bad, header, "invalid_date",
            pl.format("{} {} is not a real date-time in dd/mm/yyyy HH:mm",
                      pl.lit(header), _quoted(pl.col(name)))))
    count_headers = ("Opens", "Opens virales", "Clicks", "Clicks virales")
    for name, header in zip(COUNT_COLUMNS, count_headers, strict=True):
        bad = pl.col(name).is_not_null() & ~pl.col(name).str.contains(COUNT_PATTERN)
        checks.append((
            ok_row & bad, header, "invalid_count",
            pl.format("{} {} is not a non-negative integer", pl.lit(header), _quoted(pl.col(name)))))
    # Messages are built only for the (few) rows that fail a check.
    names = [f"_check{index}" for index in range(len(checks))]
    error_list = pl.concat_list([_error(pl.col(name), *check[1:])
                                 for name, check in zip(names, checks, strict=True)]).list.drop_nulls()
    no_errors = pl.lit([], dtype=pl.List(_ERROR_STRUCT))
    return _Typing(
        dates=list(dates.values()),
        checks=[check[0].alias(name) for name, check in zip(names, checks, strict=True)],
        check_names=names,
        has_errors=pl.any_horizontal(map(pl.col, names)).fill_null(True),
        errors=error_list,
        no_errors=no_errors,
        typed=[
            pl.coalesce(pl.col("email_key"), pl.col("email").str.to_lowercase()).alias("email_key"),
            *[pl.col(f"_{name}").alias(name) for name in DATE_COLUMNS],
            *[
                pl.when(pl.col(name).str.contains(COUNT_PATTERN)).then(pl.col(name))
                .cast(pl.Int64, strict=False).alias(name)
                for name in COUNT_COLUMNS
            ],
        ])


def _as_list(name: str) -> pl.Expr:
    """A multi-value field -> its values: split at commas, each trimmed, empty ones dropped."""
    return pl.col(name).str.split(",").list.eval(
        pl.element().str.strip_chars().filter(pl.element().str.len_bytes() > 0)).alias(name)


# A strict subset of what email-validator accepts (syntax only): plain ASCII dot-atoms at a
# dotted domain of letter-digit-hyphen labels with an alphabetic TLD that is not special-use, no
# "--" (IDNA rules), within the length limits.  Addresses it matches skip email-validator — the
# unit tests check, property-based, that email-validator accepts every one of them — and all
# others go to email-validator, so the verdicts are email-validator's.
PLAIN_EMAIL_PATTERN = (
    r"^[A-Za-z0-9_+-]{1,64}(?:\.[A-Za-z0-9_+-]+)*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
SPECIAL_USE_TLDS = ("arpa", "invalid", "local", "localhost", "onion", "test")


_NOT_PLAIN_DOMAIN = "(?i)@.*--|\\.(?:" + "|".join(SPECIAL_USE_TLDS) + ")$"


def is_plain_email(address: pl.Expr) -> pl.Expr:
    """True where email-validator certainly accepts the address (see PLAIN_EMAIL_PATTERN)."""
    at = address.str.find("@", literal=True)  # a byte offset: the pattern admits ASCII only
    length = address.str.len_bytes()
    return (
        address.str.contains(PLAIN_EMAIL_PATTERN)
        & (length <= 254)
        & (at <= 64)
        & (length - at - 1 <= 253)
        & ~address.str.contains(_NOT_PLAIN_DOMAIN)
    ).fill_null(False)


def email_key(normalized: str) -> str:
    """The visitor key of an address email-validator accepted: its normalized form (local part
    NFC, domain in Unicode form, so ``xn--`` and ``ü`` spellings agree), lower-cased, NFC."""
    return unicodedata.normalize("NFC", normalized.lower())


EMAIL_VERDICT_SCHEMA = {"email_raw": pl.String, "email_error": pl.String, "email_key": pl.String}


def check_emails(addresses: Iterable[str]) -> pl.DataFrame:
    """email-validator's verdict (syntax only, never DNS) and the visitor key of each distinct
    address: ``email_raw, email_error`` (null: valid)``, email_key`` (null: invalid)."""
    verdicts: list[str | None] = []
    keys: list[str | None] = []
    distinct = list(dict.fromkeys(a for a in addresses if a is not None))
    for address in distinct:
        try:
            keys.append(email_key(validate_email(address, check_deliverability=False).normalized))
            verdicts.append(None)
        except EmailNotValidError as error:
            verdicts.append(str(error))
            keys.append(None)
    return pl.DataFrame({"email_raw": distinct, "email_error": verdicts, "email_key": keys},
                        schema=EMAIL_VERDICT_SCHEMA)


def validate_lines(
    lines: pl.DataFrame,
    email_checker: Callable[[list[str]], pl.DataFrame] = check_emails,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> pl.DataFrame:
    """``line_no, line, cp1252, too_long`` -> one checked row per line: typed columns,
    ``email_key``, ``errors``, ``line`` and ``cp1252``."""
    raw = split_columns(lines)
    addresses = raw.select(pl.col("email").drop_nulls().unique())
    unusual = addresses.filter(~is_plain_email(pl.col("email"))).get_column("email").to_list()
    return type_columns(raw, email_checker(unusual), max_line_bytes)


# --------------------------------------------------------------------------- calculated metrics

def _total(own: str, viral: str) -> pl.Expr:
    """own + viral, a missing count read as 0; null only when both are missing."""
    both_missing = pl.col(own).is_null() & pl.col(viral).is_null()
    return pl.when(both_missing).then(None).otherwise(
        pl.col(own).fill_null(0) + pl.col(viral).fill_null(0))


def _minutes_after_send(moment: str) -> pl.Expr:
    """Whole minutes from Fecha envio (dates have minute precision); negative kept, null when
    there is no such moment."""
    return (pl.col(moment) - pl.col("fecha_envio")).dt.total_minutes()


# The row metrics, column-wise on typed rows.  A visit is opened when it has an open date or
# an open of its own (viral opens are opens of forwarded copies, by someone else); likewise
# clicked.  A click does not imply an open: ``click_without_open`` already flags such rows.
ROW_METRICS: dict[str, pl.Expr] = {
    "abierto": pl.col("fecha_open").is_not_null() | (pl.col("opens").fill_null(0) > 0),
    "clicado": pl.col("fecha_click").is_not_null() | (pl.col("clicks").fill_null(0) > 0),
    "minutos_a_open": _minutes_after_send("fecha_open"),
    "minutos_a_click": _minutes_after_send("fecha_click"),
    "opens_totales": _total("opens", "opens_virales"),
    "clicks_totales": _total("clicks", "clicks_virales"),
    "num_links": pl.col("links").list.len().fill_null(0),
}


def with_row_metrics(rows: pl.LazyFrame) -> pl.LazyFrame:
    """Typed rows -> the same rows with the calculated columns of :data:`ROW_METRICS`."""
    return rows.with_columns(expr.alias(name) for name, expr in ROW_METRICS.items())


# --------------------------------------------------------------------------- split

def statistics_rows(checked: pl.LazyFrame, source_file: str) -> pl.LazyFrame:
    """The valid rows, typed, with their source file and line number.

    The multi-value fields are split into their values here, not in validation: nothing else
    reads them, and validation is the busier step (measured: a tenth of its CPU time, which
    LoadPostgres spends while the server is busy with the previous batch).  Checked batches
    written with the values already split (before this change) are read as they are.
    """
    schema = checked.collect_schema()
    return (
        with_row_metrics(checked.filter(pl.col("errors").list.len() == 0).with_columns(
            _as_list(name) for name in LIST_COLUMNS if schema[name] == pl.String))
        .with_columns(pl.lit(source_file).alias("source_file"))
        .select([pl.col(name).cast(dtype) for name, dtype in STATISTICS_SCHEMA.items()])
    )


def error_rows(checked: pl.LazyFrame, source_file: str) -> pl.LazyFrame:
    """One row per failed check, with the raw line it came from."""
    return (
        checked.filter(pl.col("errors").list.len() > 0)
        .select("line_no", "errors", pl.col("line").alias("raw_line"))
        .explode("errors")
        .unnest("errors")
        .with_columns(pl.lit(source_file).alias("source_file"))
        .select([pl.col(name).cast(dtype) for name, dtype in ERROR_SCHEMA.items()])
    )


def file_error_row(source_file: str, error: FileRejected, raw_line: str | None) -> pl.DataFrame:
    """The single error row that records a rejected file."""
    return pl.DataFrame(
        [{"source_file": source_file, "line_no": 1 if raw_line is not None else 0,
          "column_name": "(file)", "reason": error.reason, "message": error.message,
          "raw_line": raw_line}],
        schema=ERROR_SCHEMA,
    )


def visits(checked: pl.LazyFrame) -> pl.LazyFrame:
    """A visit is a valid row dated by Fecha envio, with its engagement: ``email`` (the visitor
    key), ``sent_at``, ``opened``, ``clicked``, ``opens``, ``clicks`` (totals, viral included),
    ``opened_on`` and ``clicked_on`` (the dates of Fecha open and Fecha click)."""
    return (checked.filter(pl.col("errors").list.len() == 0)
            .select(pl.col("email_key").alias("email"), pl.col("fecha_envio").alias("sent_at"),
                    ROW_METRICS["abierto"].alias("opened"), ROW_METRICS["clicado"].alias("clicked"),
                    ROW_METRICS["opens_totales"].alias("opens"),
                    ROW_METRICS["clicks_totales"].alias("clicks"),
                    pl.col("fecha_open").dt.date().alias("opened_on"),
                    pl.col("fecha_click").dt.date().alias("clicked_on")))


def warning_counts(checked: pl.LazyFrame) -> pl.LazyFrame:
    """Data-quality warnings (not errors), counted by kind: valid rows that look odd, and lines
    decoded as Windows-1252 (``mixed_encoding``; it counts only in a file that is mixed)."""
    is_baja = pl.col("baja").str.to_uppercase() == "SI"
    has_activity = (
        (pl.col("opens").fill_null(0) > 0) | (pl.col("clicks").fill_null(0) > 0)
        | pl.col("fecha_open").is_not_null() | pl.col("fecha_click").is_not_null()
    )
    valid = pl.col("errors").list.len() == 0
    return checked.select(
        (valid & (pl.col("fecha_open") < pl.col("fecha_envio"))).sum().alias("open_before_send"),
        (valid & (pl.col("fecha_click") < pl.col("fecha_envio"))).sum().alias("click_before_send"),
        (valid & pl.col("fecha_click").is_not_null() & pl.col("fecha_open").is_null()).sum()
        .alias("click_without_open"),
        (valid & is_baja & has_activity).sum().alias("baja_with_activity"),
        pl.col("cp1252").sum().alias("mixed_encoding"),
    ).select(pl.all().cast(pl.Int64))
