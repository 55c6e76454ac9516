"""The load report from the load log (bitácora): files, rows, visitors, warnings, bytes, time and
open/click rates, per file, day or month, as a table, CSV, JSON or one self-contained HTML page.

Every figure comes from ``load_log`` (never emptied); the grouping is done here, over the rows of
the period (a month has hundreds of files, not millions).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import html
import io
import json
import re
from collections.abc import Iterable

import psycopg.rows

COUNTS = ("files_loaded", "files_rejected", "files_duplicate", "files_failed", "rows_read",
          "rows_loaded", "rows_rejected", "visitors", "warnings", "bytes", "duration_s")
RATES = ("open_rate", "click_rate")
KEYS = {"file": ("month", "file_name", "host"), "day": ("day",), "month": ("month",)}
# Behind the rates: the loaded rows opened and clicked, among the loaded rows of files whose
# load recorded them (files loaded before migration 5 did not: their rate is unknown).
_RATE_PARTS = ("rows_opened", "rows_clicked", "rows_measured")

RECORDS = """
SELECT run_date, file_name, coalesce(host, '') AS host, status, rows_read, rows_loaded,
       rows_rejected, visitors, warnings, error_reasons, size_bytes,
       extract(epoch FROM finished_at - started_at)::float8 AS duration_s, rows_opened, rows_clicked
FROM {schema}.load_log
WHERE run_date >= %s AND run_date < %s
ORDER BY id
"""


def parse_month(text: str) -> dt.date:
    if not re.fullmatch(r"\d{4}-\d{2}", text):
        raise ValueError(f"month {text!r} is not YYYY-MM")
    return dt.date(int(text[:4]), int(text[5:]), 1)


def next_month(day: dt.date) -> dt.date:
    return dt.date(day.year + day.month // 12, day.month % 12 + 1, 1)


@dataclasses.dataclass
class Report:
    """The grouped rows (``total`` marks the TOTAL rows) and the series the HTML page draws."""

    first: dt.date
    last: dt.date
    by: str
    rows: list[dict]
    per_day: list[tuple[str, int, int]]   # (day, rows loaded, rows rejected)
    reasons: list[tuple[str, int]]        # (reason, error rows), most first

    @property
    def columns(self) -> tuple[str, ...]:
        return KEYS[self.by] + COUNTS + RATES


def _key(record: dict, by: str) -> tuple:
    month = f"{record['run_date']:%Y-%m}"
    if by == "file":
        return (month, record["file_name"], record["host"])
    return (record["run_date"].isoformat(),) if by == "day" else (month,)


def _empty(keys: tuple[str, ...], values: tuple) -> dict:
    return {**dict(zip(keys, values, strict=True)), **dict.fromkeys(COUNTS + _RATE_PARTS, 0),
            "error_reasons": {}}


def _add(row: dict, record: dict) -> None:
    status = record["status"]
    if f"files_{status}" in row:
        row[f"files_{status}"] += 1
    for name in ("rows_read", "rows_loaded", "rows_rejected", "visitors"):
        row[name] += record[name]
    row["warnings"] += sum(int(v) for v in (record["warnings"] or {}).values())
    row["bytes"] += record["size_bytes"]
    row["duration_s"] += max(record["duration_s"] or 0.0, 0.0)
    if record["rows_opened"] is not None:
        row["rows_opened"] += record["rows_opened"]
        row["rows_clicked"] += record["rows_clicked"] or 0
        row["rows_measured"] += record["rows_loaded"]
    for reason, count in (record["error_reasons"] or {}).items():
        row["error_reasons"][reason] = row["error_reasons"].get(reason, 0) + int(count)


def _finish(row: dict) -> dict:
    """Rates from their parts (fractions, 4 decimals; None: no measured rows)."""
    measured = row.pop("rows_measured")
    opened, clicked = row.pop("rows_opened"), row.pop("rows_clicked")
    row["open_rate"] = round(opened / measured, 4) if measured else None
    row["click_rate"] = round(clicked / measured, 4) if measured else None
    row["duration_s"] = round(row["duration_s"], 1)
    return row


def summarise(records: Iterable[dict], first: dt.date, last: dt.date, by: str = "file") -> Report:
    """load_log rows of the period -> the report (pure: the unit tests feed it rows).

    One pass: each record goes into its group, its total (per month by file, else one) and the
    per-day and per-reason series."""
    keys = KEYS[by]
    groups: dict[tuple, dict] = {}
    totals: dict[str, dict] = {}
    days: dict[str, list[int]] = {}
    reasons: dict[str, int] = {}
    for record in records:
        key = _key(record, by)
        _add(groups.setdefault(key, _empty(keys, key)), record)
        scope = key[0] if by == "file" else ""
        total_key = (scope, "TOTAL", "") if by == "file" else ("TOTAL",)
        _add(totals.setdefault(scope, _empty(keys, total_key)), record)
        day = days.setdefault(record["run_date"].isoformat(), [0, 0])
        day[0] += record["rows_loaded"]
        day[1] += record["rows_rejected"]
        for reason, count in (record["error_reasons"] or {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(count)
    rows: list[dict] = []
    if by == "file":  # files in load order, a total after each month's
        for month in sorted(totals):
            rows += [_finish({**row, "total": False}) for k, row in groups.items() if k[0] == month]
            rows.append(_finish({**totals[month], "total": True}))
    else:
        rows = [_finish({**groups[k], "total": False}) for k in sorted(groups)]
        rows += [_finish({**total, "total": True}) for total in totals.values()]
    return Report(first, last, by, rows, [(d, *days[d]) for d in sorted(days)],  # type: ignore[misc]
                  sorted(reasons.items(), key=lambda item: (-item[1], item[0])))


def load_report(database, first: dt.date, last: dt.date, by: str = "file") -> Report:
    records = database.run("load report", lambda conn: conn.cursor(
        row_factory=psycopg.rows.dict_row).execute(
        database.q(RECORDS), (first, next_month(last))).fetchall())
    return summarise(records, first, last, by)


def percent(part: int | float | None, whole: int | float | None) -> str:
    """``part`` of ``whole`` as a percentage for people ("-" when unknown or nothing)."""
    if part is None or not whole:
        return "-"
    return f"{100 * part / whole:.1f}%"


def _cell(row: dict, column: str) -> str:
    value = row[column]
    if column in RATES:
        return percent(value, 1)
    return "" if value is None else str(value)


def render(report: Report, fmt: str = "table") -> str:
    """table and html show TOTAL rows; csv and json leave them out (sum the rows instead)."""
    columns = report.columns
    data = [r for r in report.rows if not r["total"]]
    if fmt == "json":
        return json.dumps([{c: r[c] for c in (*columns, "error_reasons")} for r in data],
                          indent=1) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(data)
        return buffer.getvalue()
    if fmt == "html":
        return render_html(report)
    if not report.rows:
        return "no files in the load log for that period\n"
    cells = [[_cell(r, c) for c in columns] for r in report.rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [c in COUNTS + RATES for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    for row, raw in zip(cells, report.rows, strict=True):
        out.append(line(row))
        if raw["total"] and report.by == "file":
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- the HTML page

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #1d2433; }
table { border-collapse: collapse; margin: 8px 0 24px; font-size: 13px; }
th, td { border: 1px solid #c5cad3; padding: 3px 8px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; background: #eef1f5; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; }
"""
LOADED_COLOR, REJECTED_COLOR, REASON_COLOR = "#2e8540", "#d83933", "#205493"


def _svg_per_day(per_day: list[tuple[str, int, int]]) -> str:
    """Grouped bars: rows loaded and rejected per run date, with a labelled axis."""
    if not per_day:
        return "<p>No run date in this period.</p>"
    width, height, left, bottom, top = max(320, 60 + 34 * len(per_day)), 260, 60, 60, 16
    peak = max(max(loaded, rejected) for _, loaded, rejected in per_day) or 1
    scale = (height - bottom - top) / peak
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
             f' role="img" aria-label="rows loaded and rejected per day">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 8}" y2="{height - bottom}"'
             ' stroke="#1d2433"/>',
             f'<text x="{left - 6}" y="{top + 4}" font-size="11" text-anchor="end">{peak}</text>',
             f'<text x="{left - 6}" y="{height - bottom}" font-size="11" text-anchor="end">0</text>']
    for i, (day, loaded, rejected) in enumerate(per_day):
        x = left + 8 + 34 * i
        for offset, value, color, what in ((0, loaded, LOADED_COLOR, "loaded"),
                                           (13, rejected, REJECTED_COLOR, "rejected")):
            bar = max(value * scale, 1 if value else 0)
            parts.append(f'<rect x="{x + offset}" y="{height - bottom - bar:.1f}" width="12"'
                         f' height="{bar:.1f}" fill="{color}"><title>{day}: {value} rows {what}'
                         "</title></rect>")
        parts.append(f'<text x="{x + 12}" y="{height - bottom + 12}" font-size="10"'
                     f' transform="rotate(45 {x + 12} {height - bottom + 12})">{day[5:]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_reasons(reasons: list[tuple[str, int]], limit: int = 10) -> str:
    """Horizontal bars: the most frequent error reasons."""
    if not reasons:
        return "<p>No rejected row or file in this period.</p>"
    top = reasons[:limit]
    peak = top[0][1] or 1
    width, row_height, label = 560, 22, 170
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}"'
             f' height="{row_height * len(top) + 8}" role="img" aria-label="top error reasons">']
    for i, (reason, count) in enumerate(top):
        y = 4 + row_height * i
        bar = max((width - label - 70) * count / peak, 1)
        parts.append(f'<text x="{label - 6}" y="{y + 14}" font-size="12" text-anchor="end">'
                     f"{html.escape(reason)}</text>"
                     f'<rect x="{label}" y="{y + 2}" width="{bar:.1f}" height="{row_height - 6}"'
                     f' fill="{REASON_COLOR}"><title>{html.escape(reason)}: {count}</title></rect>'
                     f'<text x="{label + bar + 6:.1f}" y="{y + 14}" font-size="12">{count}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Report) -> str:
    """One self-contained page (no script, no external resource): the table and two charts."""
    period = (f"{report.first:%Y-%m}" if report.first == report.last
              else f"{report.first:%Y-%m} to {report.last:%Y-%m}")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in report.columns)
    body = []
    for row in report.rows:
        cells = "".join(
            f'<td class="{"n" if c in COUNTS + RATES else "k"}" data-column="{c}">'
            f"{html.escape(_cell(row, c))}</td>" for c in report.columns)
        body.append(f'<tr class="{"total" if row["total"] else "row"}">{cells}</tr>')
    table = (f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
             if report.rows else "<p>No file in the load log for this period.</p>")
    reasons = "".join(f'<tr><td class="k" data-column="reason">{html.escape(r)}</td>'
                      f'<td class="n" data-column="count">{n}</td></tr>' for r, n in report.reasons)
    legend = (f'<p class="legend"><span style="background:{LOADED_COLOR}"></span>rows loaded'
              f'<span style="background:{REJECTED_COLOR}"></span>rows rejected</p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>visitas load report {period}</title><style>{_STYLE}</style></head><body>"
        f"<h1>visitas load report, {period}</h1>"
        f"<p>By {report.by}, from load_log. visitors: distinct visitors of each file, summed;"
        " open_rate, click_rate: loaded rows opened or clicked.</p>"
        f"{table}<h2>Rows per run date</h2>{legend}{_svg_per_day(report.per_day)}"
        f"<h2>Top error reasons</h2>{_svg_reasons(report.reasons)}"
        + (f'<table id="reasons"><thead><tr><th>reason</th><th>error rows</th></tr></thead>'
           f"<tbody>{reasons}</tbody></table>" if report.reasons else "")
        + "</body></html>\n")
