"""The monthly summary from the load log (bitácora): files and rows processed, per month, file and
host, with the open and click rates of the loaded rows."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re

import psycopg.rows

COUNTS = ("files_loaded", "files_rejected", "files_duplicate", "rows_read", "rows_loaded",
          "rows_rejected")
RATES = ("open_rate", "click_rate")
COLUMNS = ("month", "file_name", "host") + COUNTS + RATES
# Behind the rates: the loaded rows opened and clicked, among the loaded rows of files whose
# load recorded them (files loaded before release 0005 did not: their rate is unknown).
_RATE_PARTS = ("rows_opened", "rows_clicked", "rows_measured")

QUERY = """
SELECT to_char(run_date, 'YYYY-MM') AS month, file_name, coalesce(host, '') AS host,
       count(*) FILTER (WHERE status = 'loaded') AS files_loaded,
       count(*) FILTER (WHERE status = 'rejected') AS files_rejected,
       count(*) FILTER (WHERE status = 'duplicate') AS files_duplicate,
       sum(rows_read)::bigint AS rows_read,
       sum(rows_loaded)::bigint AS rows_loaded,
       sum(rows_rejected)::bigint AS rows_rejected,
       coalesce(sum(rows_opened), 0)::bigint AS rows_opened,
       coalesce(sum(rows_clicked), 0)::bigint AS rows_clicked,
       coalesce(sum(rows_loaded) FILTER (WHERE rows_opened IS NOT NULL), 0)::bigint AS rows_measured
FROM {schema}.load_log
WHERE run_date >= %s AND run_date < %s
GROUP BY 1, 2, 3
ORDER BY 1, min(id)
"""


def parse_month(text: str) -> dt.date:
    if not re.fullmatch(r"\d{4}-\d{2}", text):
        raise ValueError(f"month {text!r} is not YYYY-MM")
    return dt.date(int(text[:4]), int(text[5:]), 1)


def next_month(day: dt.date) -> dt.date:
    return dt.date(day.year + day.month // 12, day.month % 12 + 1, 1)


def monthly_rows(database, first: dt.date, last: dt.date) -> list[dict]:
    """Per month: one row per file, then a total row (``file_name`` = ``TOTAL``)."""
    rows = database.run("monthly report", lambda conn: conn.cursor(
        row_factory=psycopg.rows.dict_row).execute(database.q(QUERY), (first, next_month(last))).fetchall())
    result: list[dict] = []
    months = sorted({r["month"] for r in rows})
    for month in months:
        files = [r for r in rows if r["month"] == month]
        total = {"month": month, "file_name": "TOTAL", "host": "",
                 **{c: sum(r[c] for r in files) for c in COUNTS + _RATE_PARTS}}
        result.extend(_with_rates(r) for r in [*files, total])
    return result


def _with_rates(row: dict) -> dict:
    """The row with its open and click rates (fractions, 4 decimals; None: no measured rows)."""
    measured = row.pop("rows_measured")
    opened, clicked = row.pop("rows_opened"), row.pop("rows_clicked")
    row["open_rate"] = round(opened / measured, 4) if measured else None
    row["click_rate"] = round(clicked / measured, 4) if measured else None
    return row


def percent(part: int | None, whole: int | None) -> str:
    """``part`` of ``whole`` as a percentage for people ("-" when unknown or nothing)."""
    if part is None or not whole:
        return "-"
    return f"{100 * part / whole:.1f}%"


def render(rows: list[dict], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if not rows:
        return "no files in the load log for that period\n"
    cells = [[percent(r[c], 1) if c in RATES else str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    numeric = [c in COUNTS + RATES for c in COLUMNS]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    for row, raw in zip(cells, rows, strict=True):
        out.append(line(row))
        if raw["file_name"] == "TOTAL":
            out.append("")
    return "\n".join(out).rstrip() + "\n"
