"""The run mail: one email after a run that rejected, duplicated, deferred or failed anything.

Failures are recorded by Luigi event handlers (in whichever process the task ran) into
``state_dir/runs/<run_id>.jsonl``; when the process that scheduled ``RunAll`` exits, it reads them
and this run's ``load_log`` rows and sends one mail to ``[notify] recipients`` (none configured:
no mail).  Task crashes also go through Luigi's own ``[email]`` mails.
"""

from __future__ import annotations

import atexit
import csv
import datetime as dt
import html
import io
import json
import logging
import os
import smtplib
import traceback
from email.message import EmailMessage
from pathlib import Path

import luigi
import psycopg.rows

from visitas import config
from visitas.ops.monthly import percent
from visitas.paths import RunPaths
from visitas.runtime import logsetup, runinfo

log = logging.getLogger(__name__)

_registered_pid: int | None = None


def failures_file() -> Path:
    return RunPaths.events(Path(config.paths().resolved_state_dir()), runinfo.run_id())


def record_failure(task: luigi.Task, error: object) -> None:
    """Append a failure of this run (any process) to the run's failure file."""
    if isinstance(error, BaseException):
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
    else:
        text = str(error)
    entry = {"task": str(task), "file": getattr(task, "file_name", None),
             "error": logsetup.mask(text, logsetup.configured_secrets())[:2000],
             "at": dt.datetime.now().isoformat(timespec="seconds")}
    _append(entry)


def record_deferred(file_name: str, why: str) -> None:
    """A file left at the source this run (still being written): the run mail says so."""
    _append({"kind": "deferred", "file": file_name, "why": why,
             "at": dt.datetime.now().isoformat(timespec="seconds")})


def record_unarchived(path: Path, run_date: dt.date) -> None:
    """A download of a past run date whose content was never archived: its folders are kept
    (:mod:`visitas.housekeeping`), and the run mail says so until it is loaded or removed."""
    _append({"kind": "unarchived", "file": str(path), "run_date": run_date.isoformat(),
             "at": dt.datetime.now().isoformat(timespec="seconds")})


def record_silence(last_file: str | None, last_at: dt.datetime | None, hours: float) -> None:
    """No file at the source and none received for longer than ``[notify] stale_after_hours``:
    the run mail goes out and says since when (``visitas run`` exits with missing_data)."""
    _append({"kind": "silence", "last_file": last_file,
             "last_at": last_at.isoformat(timespec="seconds") if last_at else None,
             "stale_after_hours": hours, "at": dt.datetime.now().isoformat(timespec="seconds")})


def silence_of(events: list[dict]) -> dict | None:
    """This run's silence record, if any."""
    return next((e for e in events if e.get("kind") == "silence"), None)


def _append(entry: dict) -> None:
    path = failures_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a", encoding="utf-8") as handle:  # one write per line: O_APPEND is atomic
        handle.write(json.dumps(entry) + "\n")


def register_handlers() -> None:
    """Record every failure of this run (called once per process by runtime.setup)."""
    for event in (luigi.Event.FAILURE, luigi.Event.BROKEN_TASK, luigi.Event.PROCESS_FAILURE,
                  luigi.Event.TIMEOUT):
        luigi.Task.event_handler(event)(record_failure)


def send_at_exit(run_date: dt.date) -> None:
    """Called by RunAll while scheduling: the mail goes out when this process exits."""
    global _registered_pid
    if _registered_pid == os.getpid():
        return
    _registered_pid = os.getpid()
    atexit.register(_at_exit, os.getpid(), run_date)


def _at_exit(pid: int, run_date: dt.date) -> None:
    if os.getpid() != pid:  # a forked worker inherited the handler
        return
    try:
        send_run_mail(run_date)
    except Exception as error:  # the report must never hide the run's own exit code
        log.error("could not send the run mail: %s", logsetup.mask(str(error)))
    prune_failure_files()


def prune_failure_files(keep_days: int = 30) -> None:
    """Failure records older than ``keep_days`` are no longer needed by any report."""
    folder = failures_file().parent
    limit = dt.datetime.now().timestamp() - keep_days * 86400
    for path in folder.glob("*.jsonl") if folder.exists() else []:
        if path.stat().st_mtime < limit:
            path.unlink(missing_ok=True)


def read_events() -> list[dict]:
    path = failures_file()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def gather(run_date: dt.date) -> dict:
    """What this run did: its load_log rows, error reasons with examples, failures."""
    from visitas import db

    events = read_events()
    deferred = {e["file"]: e for e in events if e.get("kind") == "deferred"}
    report = {"run_id": runinfo.run_id(), "run_date": run_date.isoformat(), "files": [], "reasons": [],
              "errors": [], "failures": [e for e in events if e.get("kind", "failure") == "failure"],
              "deferred": list(deferred.values()), "silence": silence_of(events),
              "unarchived": [e for e in events if e.get("kind") == "unarchived"],
              "database_error": None}
    limit = config.notify().max_attachment_rows
    try:
        database = db.database()

        def read(conn):
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            files = cur.execute(database.q(
                "SELECT id, file_name, status, rows_read, rows_loaded, rows_rejected, reason,"
                " message, encoding, warnings, rows_opened, rows_clicked, error_reasons"
                " FROM {schema}.load_log"
                " WHERE run_id = %s ORDER BY id"),
                (runinfo.run_id(),)).fetchall()
            ids = [f["id"] for f in files]
            reasons = cur.execute(database.q(
                "SELECT reason, count(*) AS n, min(source_file || ':' || line_no || ' ' || message)"
                " AS example FROM {schema}.errors WHERE load_id = ANY(%s)"
                " GROUP BY reason ORDER BY n DESC, reason LIMIT 10"), (ids,)).fetchall()
            errors = cur.execute(database.q(
                "SELECT source_file, line_no, column_name, reason, message, raw_line"
                " FROM {schema}.errors WHERE load_id = ANY(%s) ORDER BY source_file, line_no, id"
                " LIMIT %s"), (ids, limit)).fetchall()
            return files, reasons, errors

        report["files"], report["reasons"], report["errors"] = database.run("run mail", read)
    except Exception as error:
        report["database_error"] = logsetup.mask(str(error), logsetup.configured_secrets())
    return report


def needs_mail(report: dict) -> bool:
    bad_file = any(f["status"] != "loaded" or f["rows_rejected"] for f in report["files"])
    return bool(bad_file or report["failures"] or report.get("deferred") or report.get("silence")
                or report.get("unarchived") or report["database_error"])


def compose(report: dict, sender: str, recipients: list[str], limit: int) -> EmailMessage:
    files = report["files"]
    counts = {s: sum(1 for f in files if f["status"] == s) for s in ("loaded", "rejected", "duplicate")}
    failed = len({f["file"] or f["task"] for f in report["failures"]})
    rows_rejected = sum(f["rows_rejected"] for f in files)
    subject = (f"[visitas] run {report['run_date']}: {counts['loaded']} loaded, "
               f"{counts['rejected']} rejected, {counts['duplicate']} duplicate, {failed} failed, "
               f"{rows_rejected} rows rejected")
    deferred = report.get("deferred", [])
    if deferred:
        subject += f", {len(deferred)} left at the source"
    unarchived = report.get("unarchived", [])
    if unarchived:
        subject += f", {len(unarchived)} past download(s) never archived"
    silence = report.get("silence")
    if silence:
        subject = (f"[visitas] run {report['run_date']}: NO FILE received for more than"
                   f" {silence['stale_after_hours']:g} h")
    lines = [f"visitas run {report['run_id']} for {report['run_date']}", ""]
    if silence:
        lines += [_silence_text(silence), ""]
    table = _file_table(files)
    if files:
        widths = (28, 10, 9, 9, 9, 7, 7)
        for row in table:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                     *(cell.rjust(width) for cell, width in zip(row[2:7], widths[2:], strict=True))]
            lines.append(" ".join(cells) + "  " + row[7])
        lines.append("(opened, clicked: the loaded rows opened or clicked by their visitor)")
    else:
        lines.append("No file was loaded, rejected or recorded as duplicate in this run.")
    if report["reasons"]:
        lines += ["", "Most common error reasons (count, first example):"]
        lines += [f"  {r['reason']:<18} {r['n']:>7}  {r['example']}" for r in report["reasons"]]
    if deferred:
        lines += ["", "Left at the source for a later run (still being written):"]
        lines += [f"  {d['file']}: {d['why']}" for d in deferred]
    if report["failures"]:
        lines += ["", "Failures (the next run resumes them; nothing was lost):"]
        lines += [f"  {f['at']} {f['task']}: {f['error']}" for f in report["failures"]]
    if unarchived:
        lines += ["", UNARCHIVED_TITLE + ":"]
        lines += [f"  {_unarchived_text(u)}" for u in unarchived]
    if report["database_error"]:
        lines += ["", f"The database could not be read for this report: {report['database_error']}"]
    message = EmailMessage()
    message["Subject"], message["From"], message["To"] = subject, sender, ", ".join(recipients)
    message.set_content("\n".join(lines) + "\n")
    message.add_alternative(_html(report, subject, table), subtype="html")
    if report["errors"]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(report["errors"][0]))
        writer.writeheader()
        writer.writerows(report["errors"])
        if len(report["errors"]) >= limit:
            buffer.write(f"# capped at {limit} rows; all errors are in the errors table\n")
        message.add_attachment(buffer.getvalue().encode("utf-8"), maintype="text", subtype="csv",
                               filename=f"visitas_errors_{report['run_date']}.csv")
    return message


FILE_COLUMNS = ("file", "status", "read", "loaded", "rejected", "opened", "clicked", "note")


def _file_table(files: list[dict]) -> list[list[str]]:
    """The per-file table of both parts of the mail, header first (cells as text)."""
    rows = [list(FILE_COLUMNS)]
    for f in files:
        rows.append([f["file_name"], f["status"], str(f["rows_read"]), str(f["rows_loaded"]),
                     str(f["rows_rejected"]), percent(f.get("rows_opened"), f["rows_loaded"]),
                     percent(f.get("rows_clicked"), f["rows_loaded"]),
                     (f["message"] if f["status"] != "loaded" else "") or ""])
    return rows


UNARCHIVED_TITLE = ("Downloads of past run dates whose content was never archived (kept, with"
                    " their date's folders: perhaps the only copy left)")


def _unarchived_text(entry: dict) -> str:
    return (f"{entry['file']}: load it with `visitas run --date {entry['run_date']}`, or remove it"
            " once it is safe elsewhere")


def _silence_text(silence: dict) -> str:
    since = (f"the last file, {silence['last_file']}, was received at {silence['last_at']}"
             if silence.get("last_at") else "no file has ever been received")
    return (f"NO FILE: none at the source and none received for more than"
            f" {silence['stale_after_hours']:g} hours ([notify] stale_after_hours): {since}.")


def _html(report: dict, subject: str, table: list[list[str]]) -> str:
    """The HTML part: the same tables as the text part."""
    def cells(row: list[str], tag: str) -> str:
        return "".join(f'<{tag} style="padding:2px 8px;text-align:{"left" if i in (0, 1, 7) else "right"}">'
                       f"{html.escape(c)}</{tag}>" for i, c in enumerate(row))

    parts = [f"<h3>{html.escape(subject)}</h3>",
             f"<p>visitas run {html.escape(report['run_id'])} for {html.escape(report['run_date'])}</p>"]
    if report.get("silence"):
        parts.append(f"<p><b>{html.escape(_silence_text(report['silence']))}</b></p>")
    if report["files"]:
        body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in table[1:])
        parts.append(f'<table border="1" cellspacing="0"><thead><tr>{cells(table[0], "th")}</tr>'
                     f"</thead><tbody>{body}</tbody></table>"
                     "<p>opened, clicked: the loaded rows opened or clicked by their visitor</p>")
    else:
        parts.append("<p>No file was loaded, rejected or recorded as duplicate in this run.</p>")
    if report["reasons"]:
        rows = "".join(f"<tr><td>{html.escape(r['reason'])}</td><td style=\"text-align:right\">{r['n']}"
                       f"</td><td>{html.escape(r['example'] or '')}</td></tr>" for r in report["reasons"])
        parts.append("<h4>Most common error reasons</h4><table border=\"1\" cellspacing=\"0\">"
                     f"<tr><th>reason</th><th>count</th><th>first example</th></tr>{rows}</table>")
    lists = [("Left at the source for a later run (still being written)",
              [f"{d['file']}: {d['why']}" for d in report.get("deferred", [])]),
             ("Failures (the next run resumes them; nothing was lost)",
              [f"{f['at']} {f['task']}: {f['error']}" for f in report["failures"]]),
             (UNARCHIVED_TITLE, [_unarchived_text(u) for u in report.get("unarchived", [])])]
    for title, items in lists:
        if items:
            parts.append(f"<h4>{title}</h4><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items)
                         + "</ul>")
    if report["database_error"]:
        parts.append(f"<p>The database could not be read for this report:"
                     f" {html.escape(report['database_error'])}</p>")
    return "<!DOCTYPE html><html><body>" + "".join(parts) + "</body></html>\n"


def send_run_mail(run_date: dt.date) -> bool:
    """Send this run's report if there is something to report (or always, if configured)."""
    settings = config.notify()
    recipients = [r.strip() for r in settings.recipients.split(",") if r.strip()]
    if not recipients or not settings.smtp_host:
        log.info("run mail: no recipients or no smtp_host configured, no mail")
        return False
    report = gather(run_date)
    if not (needs_mail(report) or settings.send_always):
        log.info("run mail: nothing rejected, duplicated, deferred or failed, no mail")
        return False
    message = compose(report, settings.sender, recipients, settings.max_attachment_rows)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(message)
    log.info("run mail sent to %s: %s", ", ".join(recipients), message["Subject"])
    return True
