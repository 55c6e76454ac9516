"""The load log (bitácora) and the run log: LoadPostgres's marker rows and the archive's records.

``load_log`` is both the monthly report's history and LoadPostgres's completion marker: its row
is written by :meth:`LoadLogTarget.touch` inside the load's own transaction (the pattern of
``luigi.contrib.postgres``), so data and marker commit together.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import luigi
import psycopg
import psycopg.rows
from psycopg import sql

from visitas.db.connection import Database, scalar
from visitas.db.locks import LOCK_RUN
from visitas.handoff import LoadResult
from visitas.runtime import logsetup, retrying

log = logging.getLogger(__name__)

# LoadPostgres's completion marker: this content under this name was handled, by this run date
# or not yet archived (a crash between commit and archive is finished by a later run).  A failed
# load is a record, not a completion.
HANDLED = ("SELECT id FROM {schema}.load_log WHERE file_name = %s AND sha256 = %s"
           " AND status <> 'failed' AND (run_date = %s OR archived_at IS NULL) LIMIT 1")


class LoadLog:
    """Reads and writes of ``load_log`` and ``run_log``."""

    def __init__(self, database: Database):
        self.db = database

    def load_recorded(self, file_name: str, sha256: str, run_date: dt.date) -> bool:
        """LoadPostgres's marker (``HANDLED``)."""
        return self.db.fetch_one("checking load_log", HANDLED, (file_name, sha256, run_date)) is not None

    def run_prepared(self, run_date: dt.date) -> bool:
        return self.db.fetch_one("checking run_log", "SELECT 1 FROM {schema}.run_log WHERE run_date = %s",
                               (run_date,)) is not None

    def prepare_run(self, run_date: dt.date, truncate: bool) -> bool:
        """Once per run date: empty statistics and errors (if configured). True if done now."""

        def prepare(conn: psycopg.Connection) -> bool:
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_RUN,))
            inserted = conn.execute(self.db.q(
                "INSERT INTO {schema}.run_log (run_date, truncated) VALUES (%s, %s)"
                " ON CONFLICT (run_date) DO NOTHING RETURNING run_date"), (run_date, truncate)).fetchone()
            if inserted and truncate:
                conn.execute(self.db.q("TRUNCATE {schema}.statistics, {schema}.errors"))
            return inserted is not None

        done = self.db.run(f"preparing run {run_date}", prepare)
        if done:
            log.info("run %s prepared%s", run_date, ": statistics and errors emptied" if truncate else "")
        return done

    # ------------------------------------------------------------------ the load

    def supersede_failures(self, conn: psycopg.Connection, sha: str) -> None:
        """A file handled now replaces the records of its failed loads (counted once)."""
        conn.execute(self.db.q(
            "DELETE FROM {schema}.errors WHERE load_id IN (SELECT id FROM {schema}.load_log"
            " WHERE sha256 = %s AND status = 'failed')"), (sha,))
        conn.execute(self.db.q("DELETE FROM {schema}.load_log WHERE sha256 = %s AND status = 'failed'"),
                     (sha,))

    def record_failed_load(self, file_name: str, sha256: str, size: int, run_date: dt.date,
                           run_id: str, started_at: dt.datetime, message: str) -> int | None:
        """Write a ``failed`` load_log row and a ``load_error`` errors row in a transaction of
        their own (nothing of the failed load commits).  One try, no retries: the failure may
        be the database's own; then the run mail and the log still have it."""
        message = logsetup.mask(message, self.db.secrets())[:2000]

        def record(conn: psycopg.Connection) -> int:
            load_id = self.insert(
                conn, file_name=file_name, sha256=sha256, size_bytes=size, run_date=run_date,
                run_id=run_id, status="failed", reason="load_error",
                message=message, started_at=started_at, error_count=1,
                error_reasons='{"load_error": 1}')
            conn.execute(self.db.q(
                "INSERT INTO {schema}.errors (source_file, line_no, column_name, reason, message,"
                " load_id) VALUES (%s, 0, '(file)', 'load_error', %s, %s)"),
                (file_name, message, load_id))
            return load_id

        try:
            conn = self.db.connection()
            with conn.transaction():
                return record(conn)
        except (psycopg.Error, OSError, retrying.PermanentError) as error:
            self.db.close()
            log.error("could not record the failed load of %s: %s", file_name,
                      logsetup.mask(str(error), self.db.secrets()))
            return None

    def insert(self, conn: psycopg.Connection, **values) -> int:
        """Insert a load_log row (written by this host, ``[cluster] host``); returns its id."""
        values.setdefault("host", _host())
        columns = list(values)
        query = sql.SQL("INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING id").format(
            table=sql.Identifier(self.db.schema, "load_log"),
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            values=sql.SQL(", ").join(sql.Placeholder() * len(columns)))
        return int(scalar(conn, query, list(values.values())))

    def result(self, conn: psycopg.Connection, load_id: int) -> LoadResult:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        row = cur.execute(self.db.q("SELECT * FROM {schema}.load_log WHERE id = %s"),
                          (load_id,)).fetchone()
        if row is None:
            raise LookupError(f"load_log has no row {load_id}")
        return LoadResult.of_row(row)

    def last_received(self) -> tuple[str, dt.datetime] | None:
        """The newest file handled (any status) and when its handling started."""
        row = self.db.fetch_one("reading load_log", "SELECT file_name, started_at FROM"
                                " {schema}.load_log ORDER BY started_at DESC, id DESC LIMIT 1", ())
        return (row[0], row[1]) if row else None

    # ------------------------------------------------------------------ archive bookkeeping

    def file_status(self, file_name: str, sha256: str) -> str:
        """The status of the newest load_log row of this file (loaded, rejected, duplicate)."""
        row = self.db.fetch_one(
            "reading load_log", "SELECT status FROM {schema}.load_log WHERE file_name = %s"
            " AND sha256 = %s AND status <> 'failed' ORDER BY id DESC LIMIT 1", (file_name, sha256))
        if row is None:
            raise LookupError(f"{file_name} has no load_log row: it was not loaded")
        return row[0]

    def removed_at_source(self, file_name: str, run_date: dt.date) -> bool:
        """A file of that name was handled and deleted at the source on this run date."""
        return self.db.fetch_one(
            "reading load_log", "SELECT 1 FROM {schema}.load_log WHERE file_name = %s"
            " AND run_date = %s AND source_removed_at IS NOT NULL LIMIT 1",
            (file_name, run_date)) is not None

    def archived(self, sha256: str) -> bool:
        """Content of this hash was loaded (or recorded as rejected or a duplicate) and archived."""
        return self.db.fetch_one(
            "reading load_log", "SELECT 1 FROM {schema}.load_log WHERE sha256 = %s"
            " AND status <> 'failed' AND archived_at IS NOT NULL LIMIT 1", (sha256,)) is not None

    def mark_archived(self, file_name: str, sha256: str, archive: str) -> None:
        self.db.execute(
            "recording the archive",
            "UPDATE {schema}.load_log SET backup_archive = %s, archived_at = coalesce(archived_at, now())"
            " WHERE file_name = %s AND sha256 = %s AND status <> 'failed'"
            " AND source_removed_at IS NULL", (archive, file_name, sha256))

    def mark_removed(self, file_name: str, sha256: str) -> None:
        self.db.execute(
            "recording the removal",
            "UPDATE {schema}.load_log SET source_removed_at = now()"
            " WHERE file_name = %s AND sha256 = %s AND status <> 'failed'"
            " AND source_removed_at IS NULL", (file_name, sha256))


class LoadLogTarget(luigi.Target):
    """LoadPostgres's completion marker: a load_log row of this content under this name, for
    this run date or not yet archived (``HANDLED``).  :meth:`touch` writes it in the caller's
    transaction, so the marker commits with the data."""

    def __init__(self, file_name: str, sha256: str | None, run_date: dt.date):
        self.file_name, self.sha256, self.run_date = file_name, sha256, run_date

    def exists(self) -> bool:
        from visitas.db import load_log

        return self.sha256 is not None and load_log().load_recorded(
            self.file_name, self.sha256, self.run_date)

    def touch(self, conn: psycopg.Connection, log: LoadLog, **values: Any) -> int:
        """Insert the marker row (with the load's figures) in ``conn``'s transaction."""
        if self.sha256 is None:
            raise ValueError(f"{self.file_name}: no checked content to mark")
        return log.insert(conn, file_name=self.file_name, sha256=self.sha256,
                          run_date=self.run_date, **values)


class RunLogTarget(luigi.Target):
    """Exists when the run date was prepared (statistics and errors emptied once)."""

    def __init__(self, run_date: dt.date):
        self.run_date = run_date

    def exists(self) -> bool:
        from visitas.db import load_log

        return load_log().run_prepared(self.run_date)


def _host() -> str:
    """This host's name in load_log ([cluster] host)."""
    from visitas import config

    return config.cluster().resolved_host()
