"""Per-file work of ValidateReport and SplitVisitorStats, in bounded batches.

A file is read in batches of whole lines (``batch_bytes`` at a time), so memory does not grow
with the size of the file.  Email addresses are validated once per distinct address per file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
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
_HEAD_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 1024 * 1024
CHECKED_GLOB = "checked-*.parquet"
VERDICT_FILE = "verdict.json"


def inspect_file(path: Path) -> tuple[str, str, int]:
    """One pass over the file: sha256, encoding and size; file-level checks of the first bytes.

    Returns ``(sha256, encoding, size)``.  Raises :class:`contract.FileRejected` for an empty or
    binary file, before the whole file is read (its sha256 is then :func:`sha256_of`'s).
    """
    size = path.stat().st_size
    if size == 0:
        raise contract.FileRejected("empty_file", "the file is empty (0 bytes)")
    digest = hashlib.sha256()
    sniffer = contract.EncodingSniffer()
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
        contract.sniff_binary(head)
        chunk = head
        while chunk:
            digest.update(chunk)
            sniffer.feed(chunk)
            chunk = handle.read(BATCH_BYTES)
        sniffer.feed(b"", final=True)
    return digest.hexdigest(), sniffer.encoding, size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(BATCH_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_header(path: Path, encoding: str) -> tuple[str, int]:
    """The first line, decoded, and the byte offset where the data lines start."""
    with open(path, "rb") as handle:
        head = handle.read(_MAX_HEADER_BYTES)
    end = head.find(b"\n")
    if end < 0:
        if len(head) >= _MAX_HEADER_BYTES:
            raise contract.FileRejected("no_header", "no line end in the first 1 MiB: no header line")
        end = len(head)
    return contract.decode(head[:end], encoding).removeprefix("\ufeff"), end + 1


def iter_line_batches(path: Path, encoding: str, start: int, first_line_no: int,
                      batch_bytes: int = BATCH_BYTES) -> Iterator[pl.DataFrame]:
    """``line_no, line`` frames of whole lines from byte ``start`` on."""
    line_no = first_line_no
    with open(path, "rb") as handle:
        handle.seek(start)
        carry = b""
        while True:
            chunk = handle.read(batch_bytes)
            data = carry + chunk
            if not chunk:
                if data:
                    yield contract.lines_frame(data, encoding, line_no)
                return
            cut = data.rfind(b"\n")
            if cut < 0:  # one very long line: keep reading until it ends
                carry = data
                continue
            whole, carry = data[: cut + 1], data[cut + 1:]
            yield contract.lines_frame(whole, encoding, line_no)
            line_no += whole.count(b"\n")


class EmailCache:
    """Validates each distinct address once per file (email-validator is the slow part).

    Thread-safe: batches of one file are validated in parallel.
    """

    def __init__(self, checker: Callable = contract.check_emails):
        self._checker = checker
        self._known: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def __call__(self, addresses: list[str]) -> pl.DataFrame:
        with self._lock:
            new = [a for a in addresses if a not in self._known]
            if new:
                verdicts = self._checker(new)
                self._known.update(zip(verdicts["email_raw"].to_list(),
                                       verdicts["email_error"].to_list()))
        return pl.DataFrame(
            {"email_raw": addresses, "email_error": [self._known[a] for a in addresses]},
            schema={"email_raw": pl.String, "email_error": pl.String},
        )


def validate_report(path: Path, source_file: str, out_dir: Path,
                    batch_bytes: int = BATCH_BYTES, parallel: int = PARALLEL_BATCHES,
                    progress: Callable[[int, int], None] | None = None) -> contract.FileVerdict:
    """Check a downloaded report; write checked batches and ``verdict.json`` into ``out_dir``.

    ``parallel`` batches are validated at once (each holds about ``batch_bytes`` of lines).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    encoding: str | None = None
    sha256: str | None = None
    try:
        sha256, encoding, size = inspect_file(path)
        header, data_start = read_header(path, encoding)
        contract.check_header(header)
        if data_start >= size or not _has_data(path, data_start):
            raise contract.FileRejected("no_rows", "the file has a header but no data rows")
    except contract.FileRejected as rejection:
        verdict = contract.FileVerdict(
            source_file, "rejected", encoding, reason=rejection.reason, message=rejection.message)
        _write_json(out_dir / VERDICT_FILE, {**verdict.to_dict(), "sha256": sha256 or sha256_of(path),
                                            "size": path.stat().st_size,
                                            "first_line": _first_line(path)})
        log.warning("%s rejected: %s", source_file, rejection.message)
        return verdict

    verdict = contract.FileVerdict(source_file, "valid", encoding)
    emails = EmailCache()
    done = data_start

    def check(index: int, lines: pl.DataFrame) -> tuple[int, int]:
        checked = contract.validate_lines(lines, emails)
        has_errors = pl.col("errors").list.len() > 0
        checked = checked.with_columns(pl.when(has_errors).then(pl.col("line")).alias("line"))
        # Uncompressed, no column statistics: written once, read twice, deleted the same day.
        checked.drop("is_well_quoted", "field_count").write_parquet(
            out_dir / f"checked-{index:05d}.parquet", compression="uncompressed", statistics=False)
        return checked.height, checked.select(has_errors.sum()).item()

    batches = iter_line_batches(path, encoding, data_start, 2, batch_bytes)
    for rows, rejected in ordered_map(check, enumerate(batches), parallel):
        verdict.rows_read += rows
        verdict.rows_rejected += rejected
        verdict.rows_loaded += rows - rejected
        done = min(size, done + batch_bytes)
        if progress:
            progress(done, size)
    _write_json(out_dir / VERDICT_FILE, {**verdict.to_dict(), "sha256": sha256, "size": size})
    log.info("%s validated (%s): %d rows read, %d valid, %d rejected", source_file, encoding,
             verdict.rows_read, verdict.rows_loaded, verdict.rows_rejected)
    return verdict


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
    with open(path, "rb") as handle:
        handle.seek(start)
        while chunk := handle.read(_HEAD_BYTES):
            if chunk.strip():
                return True
    return False


def _first_line(path: Path) -> str | None:
    """The first line of a rejected file, for the error row (cut, decoded leniently)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return None
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    return line.decode("utf-8", errors="replace")[:1000]


def statistics_batches(checked_dir: Path, source_file: str) -> Iterator[pl.DataFrame]:
    """The valid rows of each checked batch, typed (what goes into ``statistics``)."""
    for part in sorted(checked_dir.glob(CHECKED_GLOB)):
        yield contract.statistics_rows(pl.scan_parquet(part), source_file).collect(engine="in-memory")


def statistics_copy_chunks(checked_dir: Path, source_file: str) -> Iterator[bytes]:
    """The statistics rows as COPY text, one chunk per batch (formatted on demand)."""
    for statistics in statistics_batches(checked_dir, source_file):
        yield copy_lines(statistics)


VISITS_PER_MERGE = 4_000_000


def split_report(checked_dir: Path, source_file: str, out_dir: Path) -> dict:
    """Checked batches -> ``errors.copy``, ``visitors.parquet`` (one summary per visitor) and
    ``summary.json`` (the verdict, warnings and counts).

    The statistics rows stay in the checked batches; LoadPostgres formats them for COPY while
    the server loads the previous batch (:func:`statistics_copy_chunks`).
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
        for part in sorted(checked_dir.glob(CHECKED_GLOB)):
            checked = pl.scan_parquet(part)
            statistics = contract.statistics_rows(checked, source_file)
            errors, visits, counts = pl.collect_all([  # one read of the batch for all three
                contract.error_rows(checked, source_file), contract.visits(statistics),
                contract.warning_counts(statistics)])
            errors_out.write(copy_lines(errors))
            verdict.error_count += errors.height
            pending.append(visits)
            for kind, count in counts.row(0, named=True).items():
                warnings[kind] += count
            if sum(p.height for p in pending) >= VISITS_PER_MERGE:
                merged = summarise()
    if pending:
        merged = summarise()
    visitor_rows = merged if merged is not None else pl.DataFrame(schema=visitors.SUMMARY_SCHEMA)
    visitor_rows.write_parquet(out_dir / "visitors.parquet")
    verdict.warnings = warnings
    summary = {**meta, **verdict.to_dict(), "visitors": visitor_rows.height}
    _write_json(out_dir / "summary.json", summary)
    log.info("%s split: %d statistics rows, %d error rows, %d visitors, warnings %s",
             source_file, verdict.rows_loaded, verdict.error_count, summary["visitors"], warnings)
    return summary


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
