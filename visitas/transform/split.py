"""SplitVisitorStats' work: checked batches -> error rows, one summary per visitor, counts.

The statistics rows stay in the checked batches; LoadPostgres formats them for COPY while the
server loads the previous batch.  A split can be made again for part of a file: the lines of an
extension, or without the rows the database refused (:class:`LoadJob`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl

from visitas import handoff
from visitas.db.copy_format import copy_lines
from visitas.transform import contract, visitors
from visitas.transform.reading import HEAD_BYTES, prefix_sha256
from visitas.transform.validate import ordered_map

log = logging.getLogger(__name__)
CHECKED_GLOB = "checked-*.parquet"

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


# Visits are summarised in memory up to this many; past it they are spilled to disk in
# PARTITIONS parts by a hash of the visitor key and each part is summarised on its own, so
# memory stays bounded by a part, not the file (measured: 10M rows of 1.5M visitors peaked at
# 1,498 MiB summarising in memory).
VISITS_IN_MEMORY = 1_000_000
PARTITIONS = 16


def split_report(checked_dir: Path, source_file: str, out_dir: Path, after_line: int = 0,
                 refused: Refusals | None = None) -> handoff.SplitSummary:
    """Checked batches -> ``errors.copy``, ``visitors.parquet`` (one summary per visitor) and
    ``summary.json`` (the verdict, warnings and counts).

    The statistics rows stay in the checked batches; LoadPostgres formats them for COPY while
    the server loads the previous batch.  LoadPostgres splits again, into a folder of its own,
    for the lines of an extension (``after_line``) or without the rows the database refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    verdict = handoff.read(checked_dir / handoff.VERDICT_FILE, handoff.SplitSummary)
    warnings = dict.fromkeys(handoff.WARNING_KINDS, 0)
    visits_of = _Visits(out_dir / ".visits")

    with open(out_dir / "errors.copy", "wb") as errors_out:
        if verdict.status == "rejected":
            rejection = contract.FileRejected(verdict.reason or "", verdict.message or "")
            errors = contract.file_error_row(source_file, rejection, verdict.first_line)
            errors_out.write(copy_lines(errors))
            verdict.error_count = 1
            verdict.error_reasons = {rejection.reason: 1}
        else:
            verdict.rows_read = verdict.rows_loaded = verdict.rows_rejected = 0
            verdict.error_reasons = {}
        # Two batches at a time, as in validation (measured on 2M rows: 1.37-1.48 s -> 1.19-1.34 s);
        # a file of one batch, the usual small file, starts no thread pool, and its visitors are
        # summarised in the query that reads it (three queries fewer: a 1,000-row file's split
        # 9.6 -> 8.3 ms).
        parts = sorted(checked_dir.glob(CHECKED_GLOB))
        whole = len(parts) == 1

        def read(part: Path) -> tuple[bytes, pl.DataFrame, pl.DataFrame, dict, tuple]:
            # Read once, then queried five times: scanned, the five queries each read the file
            # (a 1,000-row file's split 9.6-10.1 -> 8.2-9.2 ms; 2M rows 2.07-2.25 -> 1.91-2.10 s).
            batch = pl.read_parquet(part).lazy()
            checked = _with_refusals(_lines_after(batch, after_line), refused or {})
            visits = contract.visits(checked)
            errors = contract.error_rows(checked, source_file)
            found = pl.collect_all([  # the batch's five queries, planned together
                errors, errors.group_by("reason").len(),
                visitors.visitor_rule(visits) if whole else visits,
                contract.warning_counts(checked),
                checked.select(pl.len().alias("read"),
                               (pl.col("errors").list.len() > 0).sum().alias("rejected"))
                .join(visits.select(pl.col("opened").sum(), pl.col("clicked").sum()),
                      how="cross")], engine="in-memory")
            return (copy_lines(found[0]), found[1], found[2], found[3].row(0, named=True),
                    found[4].row(0))

        # Each batch's visits, or the one batch's visitor summary.
        for text, reasons, visits, counts, rows in ordered_map(read, ((p,) for p in parts),
                                                                min(len(parts), 2)):
            errors_out.write(text)
            for reason, count in reasons.iter_rows():
                verdict.error_reasons[reason] = verdict.error_reasons.get(reason, 0) + count
                verdict.error_count += count
            read_rows, rejected, opened, clicked = rows
            verdict.rows_read += read_rows
            verdict.rows_rejected += rejected
            verdict.rows_loaded += read_rows - rejected
            verdict.rows_opened += opened
            verdict.rows_clicked += clicked
            if whole:
                visits.write_parquet(out_dir / "visitors.parquet")
                verdict.visitors = visits.height
            else:
                visits_of.add(visits)
            for kind, count in counts.items():
                warnings[kind] += count
    if verdict.encoding != "mixed":  # a file wholly in Windows-1252 is not a warning
        warnings["mixed_encoding"] = 0
    if not whole:
        verdict.visitors = visits_of.summarise(out_dir / "visitors.parquet")
    verdict.warnings = warnings
    handoff.write(out_dir / handoff.SUMMARY_FILE, verdict)
    log.info("%s split: %d statistics rows, %d error rows, %d visitors, warnings %s",
             source_file, verdict.rows_loaded, verdict.error_count, verdict.visitors, warnings)
    return verdict


class _Visits:
    """A file's visits, summarised into one row per visitor: in memory while they are few,
    else spilled in hash partitions of the visitor key (a visitor's visits all fall in one
    part, so the parts' summaries are the file's, with no merge)."""

    def __init__(self, spill_dir: Path):
        self.spill_dir = spill_dir
        self.pending: list[pl.DataFrame] = []
        self.in_memory = 0
        self.spilled = 0

    def add(self, visits: pl.DataFrame) -> None:
        self.pending.append(visits)
        self.in_memory += visits.height
        if self.in_memory > VISITS_IN_MEMORY:
            self._spill()

    def _spill(self) -> None:
        frame = pl.concat(self.pending).with_columns(
            (pl.col("email").hash(seed=0) % PARTITIONS).alias("_part"))
        for (part,), rows in frame.partition_by("_part", as_dict=True, include_key=False).items():
            folder = self.spill_dir / f"p{part:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            rows.write_parquet(folder / f"b{self.spilled:05d}.parquet", compression="uncompressed",
                               statistics=False)
        self.spilled += 1
        self.pending.clear()
        self.in_memory = 0

    def summarise(self, target: Path) -> int:
        """Write the summary of every visit to ``target``; returns the number of visitors."""
        if not self.spilled:
            rows = (visitors.visitor_rule(pl.concat(self.pending).lazy()).collect() if self.pending
                    else pl.DataFrame(schema=visitors.SUMMARY_SCHEMA))
            rows.write_parquet(target)
            return rows.height
        if self.pending:
            self._spill()
        parts, total = [], 0
        for folder in sorted(self.spill_dir.iterdir()):
            summary = visitors.visitor_rule(pl.scan_parquet(folder / "*.parquet")).collect()
            part = self.spill_dir / f"{folder.name}.parquet"
            summary.write_parquet(part)
            parts.append(part)
            total += summary.height
            shutil.rmtree(folder)
        pl.scan_parquet(parts).sink_parquet(target)
        shutil.rmtree(self.spill_dir)
        return total


@dataclasses.dataclass
class LoadJob:
    """One validated and split file, as LoadPostgres hands it to the database."""

    source: Path        # the downloaded file
    checked_dir: Path   # ValidateReport's output
    split_dir: Path     # SplitVisitorStats' output
    work_dir: Path      # where a split of part of the file goes (an extension, refused rows)
    head_bytes: int = HEAD_BYTES

    def __post_init__(self) -> None:
        self.summary = handoff.read(self.split_dir / handoff.SUMMARY_FILE, handoff.SplitSummary)
        self._prefixes: dict[int, str] = {}

    @property
    def name(self) -> str:
        return self.summary.source_file

    @property
    def sha256(self) -> str:
        return self.summary.sha256

    @property
    def head_sha256(self) -> str | None:
        return self.summary.head_sha256

    @property
    def size(self) -> int:
        return self.summary.size

    def statistics(self, after_line: int = 0) -> Iterator[pl.DataFrame]:
        return statistics_batches(self.checked_dir, self.name, after_line)

    def split(self, after_line: int = 0,
              refused: Refusals | None = None) -> tuple[handoff.SplitSummary, Path]:
        """The split of the lines after ``after_line`` without the ``refused`` rows: the one
        SplitVisitorStats wrote when that is the whole file, else made again here."""
        if not after_line and not refused:
            return self.summary, self.split_dir
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return split_report(self.checked_dir, self.name, self.work_dir, after_line, refused), \
            self.work_dir

    def prefix_sha256(self, sizes: Iterable[int]) -> dict[int, str]:
        """sha256 of the file's first ``n`` bytes for each ``n``; each is read once per job (the
        loader looks for a first part again under the merge lock)."""
        wanted = set(sizes)
        missing = wanted - set(self._prefixes)
        if missing:
            self._prefixes.update(prefix_sha256(self.source, missing))
        return {n: self._prefixes[n] for n in wanted if n in self._prefixes}


