"""What each step hands the next: one dataclass per step output, serialised to JSON here only.

    DownloadReport  -> the file, and a :class:`RemoteRecord` (its size and mtime at the source)
    ValidateReport  -> checked batches, and a :class:`Verdict`
    SplitVisitorStats -> errors.copy, visitors.parquet, and a :class:`SplitSummary`
    LoadPostgres    -> the load_log row (its marker), read back as a :class:`LoadResult`
    ArchiveZip      -> an :class:`Archived` record
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

WARNING_KINDS = ("open_before_send", "click_before_send", "click_without_open", "baja_with_activity",
                 "mixed_encoding")

T = TypeVar("T")
VERDICT_FILE = "verdict.json"   # in ValidateReport's output folder
SUMMARY_FILE = "summary.json"   # in SplitVisitorStats' output folder


def _no_warnings() -> dict[str, int]:
    return dict.fromkeys(WARNING_KINDS, 0)


@dataclasses.dataclass
class RemoteRecord:
    """The file at the source when it was downloaded: the delete compares both."""

    size: int
    mtime: int


@dataclasses.dataclass
class Verdict:
    """What validation found in one file: always ``rows_read == rows_loaded + rows_rejected``."""

    source_file: str
    status: str  # "valid" (rows may still be rejected) or "rejected" (the whole file)
    sha256: str
    size: int
    # utf-8, utf-8-sig (with a BOM), cp1252 (its non-ASCII lines are not UTF-8) or mixed
    encoding: str | None = None
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    error_count: int = 0
    reason: str | None = None
    message: str | None = None
    warnings: dict[str, int] = dataclasses.field(default_factory=_no_warnings)
    # Lines 1..lines_done are final: a longer version of this file (an extension) skips them.
    # Only a last line cut without a line end and rejected is not final.
    lines_done: int = 0
    head_sha256: str | None = None  # of the first HEAD_BYTES: the first test for a prefix
    first_line: str | None = None   # of a rejected file, for its error row


@dataclasses.dataclass
class SplitSummary(Verdict):
    """A verdict with the counts of the lines split (all, or those of an extension): distinct
    visitors, and the loaded rows opened and clicked (the file's open and click rates)."""

    visitors: int = 0
    rows_opened: int = 0
    rows_clicked: int = 0
    # Error rows by reason code (kept in load_log: errors is emptied every run date).
    error_reasons: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoadResult:
    """The load_log row LoadPostgres committed (or found), as the log and luigid show it."""

    id: int
    status: str
    rows_read: int
    rows_loaded: int
    rows_rejected: int

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> LoadResult:
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Archived:
    """Where ArchiveZip put the file, and whether it was removed at the source."""

    archive: str
    status: str
    sha256: str
    removed_at_source: bool


def write(path: Path, record: Any) -> None:
    """Write a hand-off record atomically."""
    write_text(path, json.dumps(dataclasses.asdict(record), indent=1, sort_keys=True))


def write_text(path: Path, text: str) -> None:
    """Write ``path`` under a temporary name, then rename it: it appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def read(path: Path, kind: type[T]) -> T:
    """Read a hand-off record written by :func:`write` (unknown keys are ignored)."""
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    return kind(**{k: v for k, v in data.items() if k in names})
