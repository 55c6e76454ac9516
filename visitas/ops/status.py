"""``visitas status``: what is waiting, what is stuck, when things last went right.

It changes nothing (but brings the schema up to date, as every command that uses it does).  The
source is listed once (no retries); the database gives the rest.  A part that cannot be read is
a line saying so, and the command exits 1.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import psycopg.rows

from visitas.runtime import logsetup

UNFINISHED = """
SELECT file_name, status, run_date, host, started_at, archived_at, source_removed_at
FROM {schema}.load_log
WHERE status <> 'failed' AND (archived_at IS NULL OR source_removed_at IS NULL)
ORDER BY id
"""
# A failed load stays failed until a later load of the same content replaces its record.
FAILED = """
SELECT file_name, run_date, host, started_at, message FROM {schema}.load_log
WHERE status = 'failed' ORDER BY id
"""
OF_DATE = """
SELECT file_name, status, rows_loaded, rows_rejected, host FROM {schema}.load_log
WHERE run_date = %s ORDER BY id
"""
LAST_SUCCESS = """
SELECT run_id, host, run_date, finished_at FROM {schema}.run_history
WHERE exit_code = 0 ORDER BY finished_at DESC LIMIT 1
"""
LAST_RUN = """
SELECT run_id, host, run_date, finished_at, exit_code, outcome FROM {schema}.run_history
ORDER BY finished_at DESC LIMIT 1
"""
LAST_FILE = """
SELECT file_name, status, started_at FROM {schema}.load_log ORDER BY started_at DESC, id DESC LIMIT 1
"""
# Files at the source already handled under that name and size, not removed yet.
HANDLED_AT_SOURCE = """
SELECT file_name, size_bytes, status FROM {schema}.load_log
WHERE status <> 'failed' AND source_removed_at IS NULL
"""


@dataclasses.dataclass
class Status:
    run_date: dt.date
    source: list[str] = dataclasses.field(default_factory=list)
    source_error: str | None = None
    unfinished: list[dict] = dataclasses.field(default_factory=list)
    failed: list[dict] = dataclasses.field(default_factory=list)
    of_date: list[dict] = dataclasses.field(default_factory=list)
    last_success: dict | None = None
    last_run: dict | None = None
    last_file: dict | None = None
    database_error: str | None = None


def gather(run_date: dt.date) -> Status:
    from visitas import config, db, sftp

    status = Status(run_date)
    handled: dict[tuple[str, int], str] = {}
    try:
        database = db.database()

        def read(conn):
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            status.unfinished = cur.execute(database.q(UNFINISHED)).fetchall()
            status.failed = cur.execute(database.q(FAILED)).fetchall()
            status.of_date = cur.execute(database.q(OF_DATE), (run_date,)).fetchall()
            status.last_success = cur.execute(database.q(LAST_SUCCESS)).fetchone()
            status.last_run = cur.execute(database.q(LAST_RUN)).fetchone()
            status.last_file = cur.execute(database.q(LAST_FILE)).fetchone()
            for row in cur.execute(database.q(HANDLED_AT_SOURCE)).fetchall():
                handled[(row["file_name"], row["size_bytes"])] = row["status"]

        database.run("reading the status", read)
    except Exception as error:
        status.database_error = logsetup.one_line(error)
    try:
        reports = sftp.SftpSource.from_config().list_once()
        min_age = config.sftp().min_age
        for report in reports:
            age = time.time() - report.mtime
            notes = []
            if age < min_age:
                notes.append(f"too young: modified {max(age, 0):.0f}s ago, min_age {min_age:.0f}s")
            if (report.name, report.size) in handled:
                notes.append(f"already {handled[(report.name, report.size)]}, not removed yet")
            status.source.append(f"{report.name}  {report.size} bytes  modified"
                                 f" {dt.datetime.fromtimestamp(report.mtime):%Y-%m-%d %H:%M:%S}"
                                 + (f"  ({'; '.join(notes)})" if notes else "  (waiting for a run)"))
    except Exception as error:
        status.source_error = logsetup.one_line(error)
    return status


def _when(value: dt.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if value else "-"


def render(status: Status) -> tuple[str, bool]:
    """The text, and whether every part could be read."""
    out = []
    out.append("At the source:")
    if status.source_error:
        out.append(f"  cannot list the source: {status.source_error}")
    else:
        out += [f"  {line}" for line in status.source] or ["  nothing"]
    if status.database_error:
        out += ["", f"Database: cannot read: {status.database_error}"]
        return "\n".join(out) + "\n", False
    out += ["", f"Files of run date {status.run_date}:"]
    out += [f"  {r['file_name']}  {r['status']}  {r['rows_loaded']} loaded, {r['rows_rejected']}"
            f" rejected  (host {r['host']})" for r in status.of_date] or ["  none"]
    out += ["", "Handled, not finished (not archived, or not removed at the source):"]
    out += [f"  {r['file_name']}  {r['status']}  run date {r['run_date']}  host {r['host']}  "
            + ("not archived" if r["archived_at"] is None else "archived, not removed at the source")
            for r in status.unfinished] or ["  none"]
    out += ["", "Failed loads (the next run tries again):"]
    out += [f"  {r['file_name']}  run date {r['run_date']}  host {r['host']}  {_when(r['started_at'])}"
            f"  {(r['message'] or '')[:200]}" for r in status.failed] or ["  none"]
    out.append("")
    success, last = status.last_success, status.last_run
    out.append("Last successful run: " + (
        f"{_when(success['finished_at'])} (run date {success['run_date']}, host {success['host']},"
        f" run {success['run_id']})" if success else "none recorded (`visitas run` records runs)"))
    if last and (not success or last["run_id"] != success["run_id"]):
        out.append(f"Last run: {_when(last['finished_at'])} (run date {last['run_date']}, host"
                   f" {last['host']}): exit code {last['exit_code']} ({last['outcome']})")
    out.append("Last file received: " + (
        f"{status.last_file['file_name']} at {_when(status.last_file['started_at'])}"
        f" ({status.last_file['status']})" if status.last_file else "none"))
    return "\n".join(out) + "\n", status.source_error is None
