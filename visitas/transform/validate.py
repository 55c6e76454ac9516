"""ValidateReport's work: every line of a file checked against the contract, in batches.

Checked rows go to Parquet batches (``checked-NNNNN.parquet``) and the file's verdict beside them.
Email addresses are validated once per distinct address per file.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import polars as pl

from visitas import handoff
from visitas.transform import contract
from visitas.transform.reading import (
    BATCH_BYTES,
    PARALLEL_BATCHES,
    RawLines,
    inspect_file,
    iter_raw_lines,
    read_header,
    sha256_of,
)

log = logging.getLogger(__name__)

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
                    max_line_bytes: int = contract.MAX_LINE_BYTES) -> handoff.Verdict:
    """Check a downloaded report; write checked batches and ``verdict.json`` into ``out_dir``.

    ``parallel`` batches are validated at once (each holds about ``batch_bytes`` of lines).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # The file is hashed in a thread while its lines are checked (hashlib releases the GIL): done
    # first, hashing held up the first batch (0.2 s of a 244 MiB file's 4.9 s).
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hashing:
        digests = hashing.submit(inspect_file, path)
        return _validate(path, source_file, out_dir, digests, batch_bytes, parallel, progress,
                         max_line_bytes)


def _validate(path: Path, source_file: str, out_dir: Path, digests: Future,
              batch_bytes: int, parallel: int, progress: Callable[[int, int], None] | None,
              max_line_bytes: int) -> handoff.Verdict:
    size = path.stat().st_size
    try:
        if size == 0:
            digests.result()  # raises FileRejected (empty_file)
        header = read_header(path)
        contract.check_header(header.text)
        if not _has_data(path, header.data_start):
            raise contract.FileRejected("no_rows", "the file has a header but no data rows")
    except contract.FileRejected as rejection:
        sha256, head_sha256 = (None, None) if size == 0 else digests.result()[:2]
        verdict = handoff.Verdict(
            source_file, "rejected", sha256 or sha256_of(path), size,
            reason=rejection.reason, message=rejection.message, head_sha256=head_sha256,
            first_line=_first_line(path))
        handoff.write(out_dir / handoff.VERDICT_FILE, verdict)
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

    verdict = handoff.Verdict(source_file, "valid", "", size)
    cp1252_lines = int(header.cp1252)
    utf8_seen = header.utf8_non_ascii or header.has_bom
    last: tuple[int, bool] = (1, True)
    batches = iter_raw_lines(path, header.data_start, 2, batch_bytes, max_line_bytes)
    if size - header.data_start <= batch_bytes:
        parallel = 1  # one batch: no thread pool to start
    for done in ordered_map(check, enumerate(batches), parallel):
        verdict.rows_read += done.rows
        verdict.rows_rejected += done.rejected
        verdict.rows_loaded += done.rows - done.rejected
        cp1252_lines += done.cp1252_lines
        utf8_seen = utf8_seen or done.utf8_non_ascii
        last = done.last_line or last
        if progress:
            progress(done.end_offset, size)
    verdict.sha256, verdict.head_sha256, _ = digests.result()
    verdict.encoding = _encoding(header.has_bom, cp1252_lines > 0, utf8_seen)
    # A last line without a line end may be a cut one: unless it loaded, a longer version of
    # the file (an extension) reads it again.
    verdict.lines_done = last[0] if last[1] or _ends_with_line_end(path) else last[0] - 1
    handoff.write(out_dir / handoff.VERDICT_FILE, verdict)
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


