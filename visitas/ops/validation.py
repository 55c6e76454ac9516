"""``visitas validate``: the report contract applied to local files, with no configuration and no
server — what a partner can run before sending, or an operator on a file the run rejected."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from visitas import handoff
from visitas.transform import contract, split, validate


@dataclasses.dataclass
class FileReport:
    file: str
    verdict: handoff.SplitSummary
    errors: list[dict]  # line, column, reason, message

    @property
    def clean(self) -> bool:
        return self.verdict.status == "valid" and self.verdict.rows_rejected == 0

    def as_dict(self) -> dict:
        v = self.verdict
        return {"file": self.file, "status": v.status, "encoding": v.encoding,
                "rows_read": v.rows_read, "rows_valid": v.rows_loaded, "rows_rejected": v.rows_rejected,
                "reason": v.reason, "message": v.message, "warnings": v.warnings, "errors": self.errors}


def check_file(path: Path) -> FileReport:
    """Validate and split one file in a scratch folder; its verdict and every error row."""
    with tempfile.TemporaryDirectory(prefix="visitas-validate-") as scratch:
        checked, split_dir = Path(scratch) / "checked", Path(scratch) / "split"
        validate.validate_report(path, path.name, checked)
        summary = split.split_report(checked, path.name, split_dir)
        if summary.status == "rejected":
            errors = [{"line": 1 if summary.first_line is not None else 0, "column": "(file)",
                       "reason": summary.reason, "message": summary.message}]
        else:
            errors = list(_errors(checked))
    return FileReport(path.name, summary, errors)


def _errors(checked: Path) -> Iterator[dict]:
    for part in sorted(checked.glob(split.CHECKED_GLOB)):
        rows = contract.error_rows(pl.scan_parquet(part), "").collect()
        for line_no, column, reason, message in rows.select(
                "line_no", "column_name", "reason", "message").iter_rows():
            yield {"line": line_no, "column": column, "reason": reason, "message": message}


def render_text(reports: list[FileReport], max_errors: int) -> str:
    out = []
    for report in reports:
        v = report.verdict
        if v.status == "rejected":
            out.append(f"{report.file}: REJECTED ({v.reason}): {v.message}")
            continue
        warned = ", ".join(f"{k} {n}" for k, n in v.warnings.items() if n)
        out.append(f"{report.file}: {'ok' if report.clean else 'rows rejected'} — {v.rows_read} rows read,"
                   f" {v.rows_loaded} valid, {v.rows_rejected} rejected ({v.encoding})"
                   + (f"; warnings: {warned}" if warned else ""))
        for error in report.errors[:max_errors]:
            out.append(f"  line {error['line']:>7}  {error['column']:<15} {error['reason']:<17}"
                       f" {error['message']}")
        if len(report.errors) > max_errors:
            out.append(f"  ... {len(report.errors) - max_errors} more (--max-errors, or --format json)")
    return "\n".join(out) + "\n"


def render_json(reports: list[FileReport]) -> str:
    return json.dumps([r.as_dict() for r in reports], indent=1, ensure_ascii=False) + "\n"
