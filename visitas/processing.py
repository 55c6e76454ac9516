"""Per-file work of ValidateReport and SplitVisitorStats, in bounded batches.

A file is read in batches of whole lines (``batch_bytes`` at a time), so memory does not grow
with the size of the file.  Email addresses are validated once per distinct address per file.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import polars as pl

from visitas import contract, visitors
from visitas.copy_format import copy_lines

log = logging.getLogger(__name__)

BATCH_BYTES = 8 * 1024 * 1024
PARALLEL_BATCHES = 2
_MAX_HEADER_BYTES = 1024 * 1024
# A loaded file's first bytes are hashed apart: the cheap first test of "is it a prefix of this
# new file?" (an extension), before the whole prefix is hashed.
HEAD_BYTES = 4096
CHECKED_GLOB = "checked-*.parquet"
VERDICT_FILE = "verdict.json"
BOM = codecs.BOM_UTF8


def inspect_file(path: Path) -> tuple[str, str, int]:
    """One pass over the file: ``(sha256, sha256 of the first HEAD_BYTES, size)``.

    Raises :class:`contract.FileRejected` for an empty file.
    """
    size = path.stat().st_size
    if size == 0:
        raise contract.FileRejected("empty_file", "the file is empty (0 bytes)")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
        chunk = head
        while chunk:
            digest.update(chunk)
            chunk = handle.read(BATCH_BYTES)
    return digest.hexdigest(), hashlib.sha256(head).hexdigest(), size


def prefix_sha256(path: Path, sizes: Iterable[int]) -> dict[int, str]:
    """sha256 of the first ``n`` bytes of the file for each ``n`` in ``sizes``, in one pass."""
    wanted = sorted(set(sizes))
    digest, done, found = hashlib.sha256(), 0, {}
    with open(path, "rb") as handle:
        for size in wanted:
            while done < size:
                chunk = handle.read(min(BATCH_BYTES, size - done))
                if not chunk:
                    return found
                digest.update(chunk)
                done += len(chunk)
            found[size] = digest.copy().hexdigest()
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(BATCH_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Header:
    text: str
    data_start: int  # byte offset of the first data line
    has_bom: bool
    cp1252: bool  # the header line was not UTF-8
    utf8_non_ascii: bool


def read_header(path: Path) -> Header:
    """The first line, after a BOM: decoded on its own, checked to be text, and where the data
    lines start.  Raises FileRejected (binary_file, no_header)."""
    with open(path, "rb") as handle:
        head = handle.read(_MAX_HEADER_BYTES + len(BOM) + 1)
    has_bom = head.startswith(BOM)
    offset = len(BOM) if has_bom else 0
    ends = [i for i in (head.find(b"\n", offset), head.find(b"\r", offset)) if i >= 0]
    end = min(ends) if ends else len(head)
    line = head[offset:end]
    contract.check_text_header(line[:_MAX_HEADER_BYTES])
    if not ends and len(head) > _MAX_HEADER_BYTES:
        raise contract.FileRejected("no_header", "no line end in the first 1 MiB: no header line")
    if len(line) > _MAX_HEADER_BYTES:
        raise contract.FileRejected("no_header", "the first line is longer than 1 MiB: no header")
    text, cp1252 = contract.decode_line(line)
    width = 2 if head[end:end + 2] == b"\r\n" else 1
    return Header(text, end + width, has_bom, cp1252, not cp1252 and not line.isascii())


@dataclasses.dataclass(frozen=True)
class RawLines:
    """Whole lines of a file as bytes, or (``overlong``) the start of one line too long to hold."""

    data: bytes
    first_line_no: int
    end_offset: int
    overlong: bool = False


def iter_raw_lines(path: Path, start: int, first_line_no: int, batch_bytes: int = BATCH_BYTES,
                   max_line_bytes: int = contract.MAX_LINE_BYTES) -> Iterator[RawLines]:
    """The file from byte ``start`` on in pieces of whole lines (LF, CRLF and a lone CR end a
    line), about ``batch_bytes`` each.  A line longer than ``max_line_bytes`` is never held
    whole: its first bytes are kept and the rest is read past, so time and memory stay linear."""
    line_no = first_line_no
    with open(path, "rb") as handle:
        handle.seek(start)
        carry = b""  # the start of a line, never more than max_line_bytes
        while True:
            chunk = handle.read(batch_bytes)
            if not chunk:
                if carry:
                    yield RawLines(carry, line_no, handle.tell())
                return
            data = carry + chunk
            cut = _after_last_line_end(data)
            whole, carry = data[:cut], data[cut:]
            if whole:
                yield RawLines(whole, line_no, handle.tell() - len(carry))
                line_no += contract.count_line_ends(whole)
            if len(carry) > max_line_bytes:
                excerpt = carry[:contract.EXCERPT_BYTES]
                carry = _read_past_line_end(handle, carry, batch_bytes)
                yield RawLines(excerpt, line_no, handle.tell() - len(carry), overlong=True)
                line_no += 1


def _after_last_line_end(data: bytes) -> int:
    """Where the last certain line end of ``data`` stops (0: none).  A CR as the very last
    byte is not certain: it may be the first half of a CRLF."""
    return max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1


def _read_past_line_end(handle, data: bytes, batch_bytes: int) -> bytes:
    """Skip the rest of the current line (``data`` is its start); return what follows it."""
    while True:
        ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
        if ends:
            end = min(ends)
            rest = data[end + 1:]
            if data[end:end + 1] == b"\r":
                if not rest:
                    rest = handle.read(batch_bytes)
                rest = rest.removeprefix(b"\n")
            return rest
        data = handle.read(batch_bytes)
        if not data:
            return b""


class EmailCache:
    """Validates each distinct address once per file (email-validator is the slow part).

    Thread-safe: batches of one file are validated in parallel.
    """

    def __init__(self, checker: Callable = contract.check_emails):
        self._checker = checker
        self._known: dict[str, tuple[str | None, str | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, addresses: list[str]) -> pl.DataFrame:
        with self._lock:
            new = [a for a in addresses if a not in self._known]
            if new:
                for raw, error, key in self._checker(new).iter_rows():
                    self._known[raw] = (error, key)
        known = [self._known[a] for a in addresses]
        return pl.DataFrame(
            {"email_raw": addresses, "email_error": [k[0] for k in known],
             "email_key": [k[1] for k in known]},
            schema=contract.EMAIL_VERDICT_SCHEMA,
        )


@dataclasses.dataclass(frozen=True)
class _Checked:
    """What validating one batch found (besides the checked rows it wrote)."""

    rows: int
    rejected: int
    cp1252_lines: int
    utf8_non_ascii: bool
    last_line: tuple[int, bool] | None  # (line_no, valid) of the batch's last row
    end_offset: int


def validate_report(path: Path, source_file: str, out_dir: Path,
                    batch_bytes: int = BATCH_BYTES, parallel: int = PARALLEL_BATCHES,
                    progress: Callable[[int, int], None] | None = None,
                    max_line_bytes: int = contract.MAX_LINE_BYTES) -> contract.FileVerdict:
    """Check a downloaded report; write checked batches and ``verdict.json`` into ``out_dir``.

    ``parallel`` batches are validated at once (each holds about ``batch_bytes`` of lines).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sha256: str | None = None
    head_sha256: str | None = None
    try:
        sha256, head_sha256, size = inspect_file(path)
        header = read_header(path)
        contract.check_header(header.text)
        if not _has_data(path, header.data_start):
            raise contract.FileRejected("no_rows", "the file has a header but no data rows")
    except contract.FileRejected as rejection:
        verdict = contract.FileVerdict(
            source_file, "rejected", None, reason=rejection.reason, message=rejection.message)
        _write_json(out_dir / VERDICT_FILE, {
            **verdict.to_dict(), "sha256": sha256 or sha256_of(path), "head_sha256": head_sha256,
            "size": path.stat().st_size, "first_line": _first_line(path)})
        log.warning("%s rejected: %s", source_file, rejection.message)
        return verdict

    emails = EmailCache()

    def check(index: int, raw: RawLines) -> _Checked:
        if raw.overlong:
            lines, utf8 = contract.overlong_line_frame(raw.first_line_no, raw.data), False
        else:
            lines, utf8 = contract.lines_frame(raw.data, raw.first_line_no, max_line_bytes)
        checked = contract.validate_lines(lines, emails, max_line_bytes)
        has_errors = pl.col("errors").list.len() > 0
        checked = checked.with_columns(pl.when(has_errors).then(pl.col("line")).alias("line"))
        # Uncompressed, no column statistics: written once, read twice, deleted the same day.
        checked.drop("is_well_quoted", "field_count", "too_long").write_parquet(
            out_dir / f"checked-{index:05d}.parquet", compression="uncompressed", statistics=False)
        rejected, cp1252 = checked.select(has_errors.sum(), pl.col("cp1252").sum()).row(0)
        last = (checked.row(-1, named=True) if checked.height else None)
        return _Checked(checked.height, rejected, cp1252, utf8,
                        (last["line_no"], not last["errors"]) if last else None, raw.end_offset)

    verdict = contract.FileVerdict(source_file, "valid", None)
    cp1252_lines = int(header.cp1252)
    utf8_seen = header.utf8_non_ascii or header.has_bom
    last: tuple[int, bool] = (1, True)
    batches = iter_raw_lines(path, header.data_start, 2, batch_bytes, max_line_bytes)
    for done in ordered_map(check, enumerate(batches), parallel):
        verdict.rows_read += done.rows
        verdict.rows_rejected += done.rejected
        verdict.rows_loaded += done.rows - done.rejected
        cp1252_lines += done.cp1252_lines
        utf8_seen = utf8_seen or done.utf8_non_ascii
        last = done.last_line or last
        if progress:
            progress(done.end_offset, size)
    verdict.encoding = _encoding(header.has_bom, cp1252_lines > 0, utf8_seen)
    # A last line without a line end may be a cut one: unless it loaded, a longer version of
    # the file (an extension) reads it again.
    verdict.lines_done = last[0] if last[1] or _ends_with_line_end(path) else last[0] - 1
    _write_json(out_dir / VERDICT_FILE, {**verdict.to_dict(), "sha256": sha256,
                                        "head_sha256": head_sha256, "size": size})
    log.info("%s validated (%s): %d rows read, %d valid, %d rejected", source_file,
             verdict.encoding, verdict.rows_read, verdict.rows_loaded, verdict.rows_rejected)
    return verdict


def _encoding(has_bom: bool, cp1252_seen: bool, utf8_seen: bool) -> str:
    """The file's encoding as recorded: a BOM counts as UTF-8."""
    if cp1252_seen:
        return "mixed" if utf8_seen else "cp1252"
    return "utf-8-sig" if has_bom else "utf-8"


def ordered_map(work: Callable, items: Iterable[tuple], parallel: int) -> Iterator:
    """``work(*item)`` for each item, ``parallel`` at a time in threads, results in item order.

    At most ``parallel`` items are in flight, so memory stays bounded; the next item is produced
    (read from the file) while they run.  Polars releases the GIL, so batches truly overlap.
    """
    if parallel <= 1:
        for item in items:
            yield work(*item)
        return
    with ThreadPoolExecutor(parallel, thread_name_prefix="validate") as pool:
        running: collections.deque[Future] = collections.deque()
        try:
            for item in items:
                if len(running) >= parallel:
                    yield running.popleft().result()
                running.append(pool.submit(work, *item))
            while running:
                yield running.popleft().result()
        finally:
            for future in running:
                future.cancel()


def _has_data(path: Path, start: int) -> bool:
    """Anything but line ends after the header."""
    with open(path, "rb") as handle:
        handle.seek(start)
        while chunk := handle.read(BATCH_BYTES):
            if chunk.strip(b"\r\n"):
                return True
    return False


def _ends_with_line_end(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) in (b"\n", b"\r")


def _first_line(path: Path) -> str | None:
    """The first line of a rejected file, for the error row (cut, decoded leniently)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return None
    line = head.split(b"\n", 1)[0].split(b"\r", 1)[0]
    return line.decode("utf-8", errors="replace")[:1000]


def statistics_batches(checked_dir: Path, source_file: str,
                       after_line: int = 0) -> Iterator[pl.DataFrame]:
    """The valid rows of each checked batch, typed (what goes into ``statistics``); with
    ``after_line``, only the lines after it (an extension)."""
    for part in sorted(checked_dir.glob(CHECKED_GLOB)):
        checked = _lines_after(pl.scan_parquet(part), after_line)
        yield contract.statistics_rows(checked, source_file).collect(engine="in-memory")


def _lines_after(checked: pl.LazyFrame, after_line: int) -> pl.LazyFrame:
    return checked.filter(pl.col("line_no") > after_line) if after_line else checked


# Rows the database refused (line_no -> column, message, the row as sent): rejected as db_refused.
Refusals = dict[int, tuple[str, str, str]]


def _with_refusals(checked: pl.LazyFrame, refused: Refusals) -> pl.LazyFrame:
    """Refused rows become rejected rows: a ``db_refused`` error, the row as sent as raw line."""
    if not refused:
        return checked
    found = pl.LazyFrame(
        [(n, c, m, t) for n, (c, m, t) in refused.items()], orient="row",
        schema={"line_no": pl.Int64, "_column": pl.String, "_message": pl.String, "_text": pl.String})
    refusal = pl.struct(pl.col("_column").alias("column_name"),
                        pl.lit("db_refused").alias("reason"), pl.col("_message").alias("message"))
    return (checked.join(found, on="line_no", how="left", maintain_order="left")
            .with_columns(
                pl.when(pl.col("_message").is_not_null())
                .then(pl.concat_list(pl.col("errors"), refusal)).otherwise(pl.col("errors"))
                .alias("errors"),
                pl.coalesce(pl.col("line"), pl.col("_text")).alias("line"))
            .drop("_column", "_message", "_text"))


VISITS_PER_MERGE = 4_000_000


def split_report(checked_dir: Path, source_file: str, out_dir: Path, after_line: int = 0,
                 refused: Refusals | None = None) -> dict:
    """Checked batches -> ``errors.copy``, ``visitors.parquet`` (one summary per visitor) and
    ``summary.json`` (the verdict, warnings and counts).

    The statistics rows stay in the checked batches; LoadPostgres formats them for COPY while
    the server loads the previous batch.  LoadPostgres splits again, into a folder of its own,
    for the lines of an extension (``after_line``) or without the rows the database refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((checked_dir / VERDICT_FILE).read_text())
    verdict = contract.FileVerdict.from_dict(
        {k: v for k, v in meta.items() if k in contract.FileVerdict.__dataclass_fields__})
    warnings = dict.fromkeys(contract.WARNING_KINDS, 0)
    merged: pl.DataFrame | None = None
    pending: list[pl.DataFrame] = []

    def summarise() -> pl.DataFrame | None:
        # Memory stays bounded: visits are summarised every few million rows and merged.
        summary = visitors.visitor_rule(pl.concat(pending).lazy()).collect()
        pending.clear()
        if merged is None:
            return summary
        return visitors.merge_rule(pl.concat([merged, summary]).lazy()).collect()

    with open(out_dir / "errors.copy", "wb") as errors_out:
        if verdict.status == "rejected":
            rejection = contract.FileRejected(verdict.reason, verdict.message)
            errors = contract.file_error_row(source_file, rejection, meta.get("first_line"))
            errors_out.write(copy_lines(errors))
            verdict.error_count = 1
        else:
            verdict.rows_read = verdict.rows_loaded = verdict.rows_rejected = 0
        for part in sorted(checked_dir.glob(CHECKED_GLOB)):
            checked = _with_refusals(_lines_after(pl.scan_parquet(part), after_line), refused or {})
            errors, visits, counts, rows = pl.collect_all([  # one read of the batch for all
                contract.error_rows(checked, source_file), contract.visits(checked),
                contract.warning_counts(checked),
                checked.select(pl.len().alias("read"),
                               (pl.col("errors").list.len() > 0).sum().alias("rejected"))])
            errors_out.write(copy_lines(errors))
            verdict.error_count += errors.height
            read, rejected = rows.row(0)
            verdict.rows_read += read
            verdict.rows_rejected += rejected
            verdict.rows_loaded += read - rejected
            pending.append(visits)
            for kind, count in counts.row(0, named=True).items():
                warnings[kind] += count
            if sum(p.height for p in pending) >= VISITS_PER_MERGE:
                merged = summarise()
    if pending:
        merged = summarise()
    if verdict.encoding != "mixed":  # a file wholly in Windows-1252 is not a warning
        warnings["mixed_encoding"] = 0
    visitor_rows = merged if merged is not None else pl.DataFrame(schema=visitors.SUMMARY_SCHEMA)
    visitor_rows.write_parquet(out_dir / "visitors.parquet")
    verdict.warnings = warnings
    summary = {**meta, **verdict.to_dict(), "visitors": visitor_rows.height}
    _write_json(out_dir / "summary.json", summary)
    log.info("%s split: %d statistics rows, %d error rows, %d visitors, warnings %s",
             source_file, verdict.rows_loaded, verdict.error_count, summary["visitors"], warnings)
    return summary


@dataclasses.dataclass
class LoadJob:
    """One validated and split file, as LoadPostgres hands it to the database."""

    source: Path        # the downloaded file
    checked_dir: Path   # ValidateReport's output
    split_dir: Path     # SplitVisitorStats' output
    work_dir: Path      # where a split of part of the file goes (an extension, refused rows)
    head_bytes: int = HEAD_BYTES

    def __post_init__(self) -> None:
        self.summary = json.loads((self.split_dir / "summary.json").read_text())

    @property
    def name(self) -> str:
        return self.summary["source_file"]

    @property
    def sha256(self) -> str:
        return self.summary["sha256"]

    @property
    def head_sha256(self) -> str | None:
        return self.summary.get("head_sha256")

    @property
    def size(self) -> int:
        return self.summary["size"]

    def statistics(self, after_line: int = 0) -> Iterator[pl.DataFrame]:
        return statistics_batches(self.checked_dir, self.name, after_line)

    def split(self, after_line: int = 0, refused: Refusals | None = None) -> tuple[dict, Path]:
        """The split of the lines after ``after_line`` without the ``refused`` rows: the one
        SplitVisitorStats wrote when that is the whole file, else made again here."""
        if not after_line and not refused:
            return self.summary, self.split_dir
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return split_report(self.checked_dir, self.name, self.work_dir, after_line, refused), \
            self.work_dir

    def prefix_sha256(self, sizes: Iterable[int]) -> dict[int, str]:
        return prefix_sha256(self.source, sizes)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
