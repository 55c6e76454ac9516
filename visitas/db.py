"""PostgreSQL through psycopg 3: schema, exactly-once loads, the load log, the visitor merge.

One file = one transaction: its statistics, errors, visitor updates and its ``load_log`` row (the
completion marker of LoadPostgres) commit together or not at all.  Bulk paths only: COPY for
statistics, errors and the staged visitor summaries; visitors are merged set-wise.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import luigi
import polars as pl
import psycopg
from psycopg import sql

from visitas import logsetup, retrying
from visitas.copy_format import copy_lines
from visitas.runinfo import per_process

log = logging.getLogger(__name__)
T = TypeVar("T")

COPY_CHUNK = 1024 * 1024
STATISTICS_COLUMNS = (
    "email", "jyv", "badmail", "baja", "fecha_envio", "fecha_open", "opens", "opens_virales",
    "fecha_click", "clicks", "clicks_virales", "links", "ips", "navegadores", "plataformas",
    "source_file", "line_no",
)
ERROR_COLUMNS = ("source_file", "line_no", "column_name", "reason", "message", "raw_line")
VISITOR_COLUMNS = ("email", "fecha_primera_visita", "fecha_ultima_visita", "visitas_totales",
                   "visitas_anio_actual", "visitas_mes_actual")

# Advisory lock keys (first int of the two-int form): one namespace per purpose.
LOCK_SCHEMA, LOCK_FILE, LOCK_VISITORS, LOCK_RUN = 7301, 7302, 7303, 7304

# Bump when SCHEMA_DDL changes: connections skip the DDL when the schema records this version.
SCHEMA_VERSION = 3
SCHEMA_DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.visitas_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS {schema}.load_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file_name       text        NOT NULL,
    sha256          text        NOT NULL,
    size_bytes      bigint      NOT NULL,
    run_date        date        NOT NULL,
    run_id          text,
    host            text,
    status          text        NOT NULL
                    CHECK (status IN ('loaded', 'rejected', 'duplicate', 'failed')),
    duplicate_of    bigint REFERENCES {schema}.load_log (id),
    extends         bigint REFERENCES {schema}.load_log (id),
    lines_done      bigint,
    head_sha256     text,
    rows_read       bigint      NOT NULL DEFAULT 0,
    rows_loaded     bigint      NOT NULL DEFAULT 0,
    rows_rejected   bigint      NOT NULL DEFAULT 0,
    error_count     bigint      NOT NULL DEFAULT 0,
    encoding        text,
    reason          text,
    message         text,
    warnings        jsonb       NOT NULL DEFAULT '{{}}',
    visitors        bigint      NOT NULL DEFAULT 0,
    backup_archive  text,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    archived_at     timestamptz,
    source_removed_at timestamptz,
    CHECK (rows_read = rows_loaded + rows_rejected)
);
CREATE UNIQUE INDEX IF NOT EXISTS load_log_loaded_once ON {schema}.load_log (sha256)
    WHERE status = 'loaded';
-- Version 3: extensions (a completed stalled upload) and failed loads.
ALTER TABLE {schema}.load_log ADD COLUMN IF NOT EXISTS extends bigint
    REFERENCES {schema}.load_log (id);
ALTER TABLE {schema}.load_log ADD COLUMN IF NOT EXISTS lines_done bigint;
ALTER TABLE {schema}.load_log ADD COLUMN IF NOT EXISTS head_sha256 text;
ALTER TABLE {schema}.load_log DROP CONSTRAINT IF EXISTS load_log_status_check;
ALTER TABLE {schema}.load_log ADD CONSTRAINT load_log_status_check
    CHECK (status IN ('loaded', 'rejected', 'duplicate', 'failed'));
CREATE INDEX IF NOT EXISTS load_log_prefix ON {schema}.load_log (head_sha256, size_bytes)
    WHERE status = 'loaded';
CREATE INDEX IF NOT EXISTS load_log_file ON {schema}.load_log (file_name, sha256);
CREATE INDEX IF NOT EXISTS load_log_run_date ON {schema}.load_log (run_date);
CREATE TABLE IF NOT EXISTS {schema}.run_log (
    run_date    date PRIMARY KEY,
    prepared_at timestamptz NOT NULL DEFAULT now(),
    truncated   boolean     NOT NULL
);
-- No surrogate key: a row is identified by (load_id, line_no), unique by construction (a file is
-- loaded once, its line numbers are distinct).  A per-row identity and its index cost a third of
-- the COPY; statistics is the bulk table, emptied every run date.
CREATE TABLE IF NOT EXISTS {schema}.statistics (
    email          text NOT NULL,
    jyv            text,
    badmail        text,
    baja           text,
    fecha_envio    timestamp NOT NULL,
    fecha_open     timestamp,
    fecha_click    timestamp,
    opens          bigint,
    opens_virales  bigint,
    clicks         bigint,
    clicks_virales bigint,
    links          text[],
    ips            text[],
    navegadores    text[],
    plataformas    text[],
    source_file    text   NOT NULL,
    line_no        bigint NOT NULL,
    load_id        bigint NOT NULL DEFAULT current_setting('visitas.load_id')::bigint
);
CREATE TABLE IF NOT EXISTS {schema}.errors (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_file text   NOT NULL,
    line_no     bigint NOT NULL,
    column_name text   NOT NULL,
    reason      text   NOT NULL,
    message     text   NOT NULL,
    raw_line    text,
    load_id     bigint NOT NULL DEFAULT current_setting('visitas.load_id')::bigint,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.visitor (
    email                text PRIMARY KEY,
    fecha_primera_visita date   NOT NULL,
    fecha_ultima_visita  date   NOT NULL,
    visitas_totales      bigint NOT NULL,
    visitas_anio_actual  bigint NOT NULL,
    visitas_mes_actual   bigint NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
-- The counters relative to a day instead of the latest visit.  Exact from the visitor row
-- alone for any day on or after the latest visit: every visit in that day's year (month) is
-- then in the year (month) of the latest visit, if that is the day's.
CREATE OR REPLACE FUNCTION {schema}.visitor_as_of(day date)
RETURNS TABLE (email text, fecha_primera_visita date, fecha_ultima_visita date,
               visitas_totales bigint, visitas_anio_actual bigint, visitas_mes_actual bigint)
LANGUAGE sql STABLE AS $$
SELECT v.email, v.fecha_primera_visita, v.fecha_ultima_visita, v.visitas_totales,
       CASE WHEN date_trunc('year', v.fecha_ultima_visita) = date_trunc('year', day)
            THEN v.visitas_anio_actual ELSE 0 END,
       CASE WHEN date_trunc('month', v.fecha_ultima_visita) = date_trunc('month', day)
            THEN v.visitas_mes_actual ELSE 0 END
FROM {schema}.visitor AS v
$$;
CREATE OR REPLACE VIEW {schema}.visitor_today AS
SELECT * FROM {schema}.visitor_as_of(current_date);
"""

# The merge rule of visitas.visitors, applied to the stored row (v) and the file's summary (s):
# the result is the summary of all visits whatever the order of loads.  Merges are serialised
# (LOCK_VISITORS), so known visitors are updated and new ones inserted in two set-wise statements
# (a plain INSERT costs half an ON CONFLICT one).  Keys sorted: rows go in in index order.
VISITOR_UPDATE = """
UPDATE {schema}.visitor AS v SET
    fecha_primera_visita = least(v.fecha_primera_visita, s.fecha_primera_visita),
    fecha_ultima_visita = greatest(v.fecha_ultima_visita, s.fecha_ultima_visita),
    visitas_totales = v.visitas_totales + s.visitas_totales,
    visitas_anio_actual = CASE
        WHEN date_trunc('year', v.fecha_ultima_visita) = date_trunc('year', s.fecha_ultima_visita)
            THEN v.visitas_anio_actual + s.visitas_anio_actual
        WHEN v.fecha_ultima_visita > s.fecha_ultima_visita THEN v.visitas_anio_actual
        ELSE s.visitas_anio_actual END,
    visitas_mes_actual = CASE
        WHEN date_trunc('month', v.fecha_ultima_visita) = date_trunc('month', s.fecha_ultima_visita)
            THEN v.visitas_mes_actual + s.visitas_mes_actual
        WHEN v.fecha_ultima_visita > s.fecha_ultima_visita THEN v.visitas_mes_actual
        ELSE s.visitas_mes_actual END,
    updated_at = now()
FROM visitas_stage AS s
WHERE v.email = s.email
"""
VISITOR_INSERT = """
INSERT INTO {schema}.visitor (email, fecha_primera_visita, fecha_ultima_visita,
    visitas_totales, visitas_anio_actual, visitas_mes_actual)
SELECT email, fecha_primera_visita, fecha_ultima_visita, visitas_totales, visitas_anio_actual,
       visitas_mes_actual
FROM visitas_stage AS s
WHERE NOT EXISTS (SELECT 1 FROM {schema}.visitor AS v WHERE v.email = s.email)
ORDER BY email
"""


# LoadPostgres's completion marker: this content under this name was handled, by this run date
# or not yet archived (a crash between commit and archive is finished by a later run).  A failed
# load is a record, not a completion.
HANDLED = ("SELECT id FROM {schema}.load_log WHERE file_name = %s AND sha256 = %s"
           " AND status <> 'failed' AND (run_date = %s OR archived_at IS NULL) LIMIT 1")

# Files already loaded that may be the first bytes of a new one (its extension): smaller, and
# the same first HEAD_BYTES (or smaller than that).  Their whole prefix is then hashed.
PREFIX_CANDIDATES = (
    "SELECT id, file_name, sha256, size_bytes, lines_done FROM {schema}.load_log"
    " WHERE status = 'loaded' AND lines_done IS NOT NULL AND size_bytes < %(size)s"
    " AND (head_sha256 = %(head)s OR size_bytes < %(head_bytes)s) ORDER BY size_bytes DESC")

# Database refusals of one row (a value out of range, a constraint): that row is rejected.
ROW_REFUSALS = (psycopg.DataError, psycopg.IntegrityError)  # SQLSTATE classes 22 and 23
_COPY_LINE = re.compile(r"\bline (\d+)(?:, column (\w+))?")

# libpq keepalives: a server that vanishes without closing the connection (a host down, a
# network cut) is noticed within about a minute instead of never.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}


def _q(template: str, schema: str) -> sql.Composed:
    return sql.SQL(template).format(schema=sql.Identifier(schema))


def lock_key(text: str) -> int:
    """A stable signed 32-bit key for the two-int advisory lock form."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big", signed=True)


@dataclasses.dataclass(frozen=True)
class Parent:
    """A loaded file whose bytes are the first bytes of the file being loaded."""

    id: int
    file_name: str
    lines_done: int


class ExtensionRace(retrying.RetryNow):
    """A file this one extends was committed while this one loaded: load it again, as an
    extension."""


class Database:
    """A connection to the visitas schema, reconnecting (with backoff) after an outage."""

    def __init__(self, dsn: str, schema: str = "public", retry: dict | None = None,
                 lock_wait: float = 600.0):
        if not dsn:
            raise retrying.ConfigError("no PostgreSQL DSN: set [postgres] dsn or VISITAS_DSN")
        self._dsn = dsn
        self.schema = schema
        self.retry = retry or {}
        self.lock_wait = lock_wait
        self._conn: psycopg.Connection | None = None
        self._schema_ready = False

    @classmethod
    def from_config(cls) -> "Database":
        from visitas.config import postgres

        cfg = postgres()
        return cls(cfg.resolved_dsn(), cfg.schema, retrying.from_config(), cfg.lock_wait)

    def __repr__(self) -> str:  # never the DSN: it may hold a password
        return f"Database(schema={self.schema!r})"

    def q(self, template: str) -> sql.Composed:
        return _q(template, self.schema)

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            self._conn = self._connect()
            if not self._schema_ready:
                self._ensure_schema(self._conn)
        return self._conn

    def _connect(self) -> psycopg.Connection:
        """Connect; errors are raised again with no secret in them (masked at the source, so
        tracebacks, Luigi's mails and luigid's error view stay clean too)."""
        try:
            return psycopg.connect(self._dsn, connect_timeout=10, application_name="visitas",
                                   **KEEPALIVES)
        except psycopg.ProgrammingError:
            # libpq quotes the piece of the DSN it could not parse, which may be the password.
            raise retrying.ConfigError(
                "the PostgreSQL DSN ([postgres] dsn or VISITAS_DSN) cannot be parsed; its text is"
                " not shown since it may hold a password (percent-encode % @ : / in a URI, or"
                " quote the value in key=value form)") from None
        except psycopg.OperationalError as error:
            raise psycopg.OperationalError(logsetup.mask(str(error), self._secrets())) from None

    def _secrets(self) -> list[str]:
        return logsetup.dsn_secrets(self._dsn)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = None

    def _ensure_schema(self, conn: psycopg.Connection) -> None:
        """Create or complete the schema, unless this version's DDL already ran on it.

        Every Luigi worker process connects on its own (one per task with ``--workers N``):
        the version check spares each of them the DDL's locks and commit.
        """
        with conn.transaction():
            if self._schema_version(conn) != SCHEMA_VERSION:
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SCHEMA,))
                if self._schema_version(conn) != SCHEMA_VERSION:  # not done meanwhile
                    conn.execute(self.q(SCHEMA_DDL))
                    conn.execute(self.q("DELETE FROM {schema}.visitas_schema"))
                    conn.execute(self.q(
                        "INSERT INTO {schema}.visitas_schema (version) VALUES (%s)"), (SCHEMA_VERSION,))
        self._schema_ready = True

    def _schema_version(self, conn: psycopg.Connection) -> int | None:
        name = sql.SQL("{}.visitas_schema").format(sql.Identifier(self.schema)).as_string(conn)
        table = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0]
        if table is None:
            return None
        row = conn.execute(self.q("SELECT max(version) FROM {schema}.visitas_schema")).fetchone()
        return row[0]

    def run(self, what: str, work: Callable[[psycopg.Connection], object]):
        """Run ``work(conn)`` in one transaction, retried whole on a connection failure."""

        def attempt():
            conn = self.connection()
            with conn.transaction():
                return work(conn)

        return retrying.retry_call(what, attempt, on_retry=self.close, **self.retry)

    def _fetch_one(self, what: str, template: str, params: tuple) -> tuple | None:
        return self.run(what, lambda conn: conn.execute(self.q(template), params).fetchone())

    # ------------------------------------------------------------------ markers

    def load_recorded(self, file_name: str, sha256: str, run_date: dt.date) -> bool:
        """LoadPostgres's marker (``HANDLED``)."""
        return self._fetch_one("checking load_log", HANDLED, (file_name, sha256, run_date)) is not None

    def run_prepared(self, run_date: dt.date) -> bool:
        return self._fetch_one("checking run_log", "SELECT 1 FROM {schema}.run_log WHERE run_date = %s",
                               (run_date,)) is not None

    def prepare_run(self, run_date: dt.date, truncate: bool) -> bool:
        """Once per run date: empty statistics and errors (if configured). True if done now."""

        def prepare(conn: psycopg.Connection) -> bool:
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_RUN,))
            inserted = conn.execute(self.q(
                "INSERT INTO {schema}.run_log (run_date, truncated) VALUES (%s, %s)"
                " ON CONFLICT (run_date) DO NOTHING RETURNING run_date"), (run_date, truncate)).fetchone()
            if inserted and truncate:
                conn.execute(self.q("TRUNCATE {schema}.statistics, {schema}.errors"))
            return inserted is not None

        done = self.run(f"preparing run {run_date}", prepare)
        if done:
            log.info("run %s prepared%s", run_date, ": statistics and errors emptied" if truncate else "")
        return done

    # ------------------------------------------------------------------ the load

    def load_file(self, job, run_date: dt.date, run_id: str, started_at: dt.datetime) -> dict:
        """Load one file in one transaction; returns its load_log row.

        ``job`` (:class:`visitas.processing.LoadJob`) gives the file's identity, its statistics
        batches, its split (errors, visitor summaries, counts) and the hashes of its prefixes.
        """
        return self.run(f"loading {job.name}", lambda conn: self._load(
            conn, job, run_date, run_id, started_at))

    def _load(self, conn: psycopg.Connection, job, run_date: dt.date, run_id: str,
              started_at: dt.datetime) -> dict:
        name, sha = job.name, job.sha256
        self._lock_file(conn, sha, name)
        same = conn.execute(self.q(HANDLED), (name, sha, run_date)).fetchone()
        if same:  # another worker or host finished it while we waited for the lock
            log.info("%s was already handled (load_log id %s): nothing to do", name, same[0])
            return self._log_row(conn, same[0])
        loaded = conn.execute(self.q(
            "SELECT id, file_name, run_date FROM {schema}.load_log"
            " WHERE sha256 = %s AND status = 'loaded'"), (sha,)).fetchone()
        common = dict(file_name=name, sha256=sha, size_bytes=job.size, run_date=run_date,
                      run_id=run_id, host=socket.gethostname(), encoding=job.summary.get("encoding"),
                      started_at=started_at)
        self._supersede_failures(conn, sha)
        if loaded:
            load_id = self._insert_log(conn, status="duplicate", duplicate_of=loaded[0],
                                       reason="duplicate",
                                       message=f"same content as {loaded[1]} (run {loaded[2]},"
                                               f" load_log id {loaded[0]}); not loaded again",
                                       **common)
            log.warning("%s is a duplicate of %s (sha256 %s…): not loaded", name, loaded[1], sha[:12])
            return self._log_row(conn, load_id)
        rejected = job.summary["status"] == "rejected"
        parent = None if rejected else self._extension_parent(conn, job)
        after = parent.lines_done if parent else 0
        summary, split_dir = job.split(after)
        load_id = self._insert_log(
            conn, status="rejected" if rejected else "loaded",
            extends=parent and parent.id, lines_done=summary.get("lines_done"),
            head_sha256=summary.get("head_sha256"), reason=summary.get("reason"),
            message=summary.get("message") or (parent and (
                f"extends {parent.file_name} (load_log id {parent.id}): its lines up to"
                f" {parent.lines_done} were loaded from it; lines after that from this file")),
            **self._counts(summary), **common)
        if parent:
            log.warning("%s extends %s (the same first bytes, more of them): loading its lines"
                        " after line %d only", name, parent.file_name, parent.lines_done)
        conn.execute("SELECT set_config('visitas.load_id', %s, true)", (str(load_id),))
        clock = time.perf_counter()
        if not rejected:
            refused = self._copy_statistics(conn, job.statistics(after))
            if refused:  # split again without them: visitors, warnings and counts exclude them
                summary, split_dir = job.split(after, refused)
                conn.execute(self.q(
                    "UPDATE {schema}.load_log SET rows_loaded = %(rows_loaded)s,"
                    " rows_rejected = %(rows_rejected)s, error_count = %(error_count)s,"
                    " warnings = %(warnings)s, visitors = %(visitors)s WHERE id = %(id)s"),
                    {**self._counts(summary), "id": load_id})
        copied = time.perf_counter()
        self._copy(conn, "errors", ERROR_COLUMNS, [_file_chunks(split_dir / "errors.copy")])
        self._lock_merge(conn)
        # Under the merge lock (held to the commit): a file this one extends may have been
        # committed since it was looked for; if so, this load is done again as an extension.
        if not rejected and self._extension_parent(conn, job) != parent:
            raise ExtensionRace(f"{name}: a file it extends was loaded meanwhile")
        self._merge_visitors(conn, split_dir / "visitors.parquet")
        log.info("%s: statistics copied in %.2fs, errors and visitors in %.2fs", name,
                 copied - clock, time.perf_counter() - copied)
        conn.execute(self.q("UPDATE {schema}.load_log SET finished_at = clock_timestamp() WHERE id = %s"),
                     (load_id,))
        return self._log_row(conn, load_id)

    @staticmethod
    def _counts(summary: dict) -> dict:
        return {"rows_read": summary["rows_read"], "rows_loaded": summary["rows_loaded"],
                "rows_rejected": summary["rows_rejected"], "error_count": summary["error_count"],
                "warnings": json.dumps(summary.get("warnings", {})),
                "visitors": summary.get("visitors", 0)}

    def _extension_parent(self, conn: psycopg.Connection, job) -> Parent | None:
        """The largest loaded file whose bytes are all the first bytes of this one, if any."""
        candidates = conn.execute(self.q(PREFIX_CANDIDATES), {
            "size": job.size, "head": job.head_sha256, "head_bytes": job.head_bytes}).fetchall()
        if not candidates:
            return None
        hashes = job.prefix_sha256([c[3] for c in candidates])
        for load_id, file_name, sha, size, lines_done in candidates:  # largest first
            if hashes.get(size) == sha:
                return Parent(load_id, file_name, lines_done)
        return None

    def _lock_file(self, conn: psycopg.Connection, sha: str, name: str) -> None:
        """Per-file advisory lock (transaction-scoped): other files load in parallel."""
        key = lock_key(sha)
        got = conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_FILE, key)).fetchone()[0]
        if got:
            return
        log.info("%s is being loaded by another worker or host: waiting up to %.0fs for it",
                 name, self.lock_wait)
        self._wait_for_lock(conn, LOCK_FILE, key)

    def _lock_merge(self, conn: psycopg.Connection) -> None:
        """The visitor merges of concurrent loads take turns (held until the commit)."""
        self._wait_for_lock(conn, LOCK_VISITORS, 0)

    def _wait_for_lock(self, conn: psycopg.Connection, namespace: int, key: int) -> None:
        """Wait at most ``lock_wait`` (then LockNotAvailable, which is retried)."""
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{int(self.lock_wait * 1000)}ms")))
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (namespace, key))
        conn.execute("SET LOCAL lock_timeout = 0")

    def _supersede_failures(self, conn: psycopg.Connection, sha: str) -> None:
        """A file handled now replaces the records of its failed loads (counted once)."""
        conn.execute(self.q(
            "DELETE FROM {schema}.errors WHERE load_id IN (SELECT id FROM {schema}.load_log"
            " WHERE sha256 = %s AND status = 'failed')"), (sha,))
        conn.execute(self.q("DELETE FROM {schema}.load_log WHERE sha256 = %s AND status = 'failed'"),
                     (sha,))

    def record_failed_load(self, file_name: str, sha256: str, size: int, run_date: dt.date,
                           run_id: str, started_at: dt.datetime, message: str) -> int | None:
        """Write a ``failed`` load_log row and a ``load_error`` errors row in a transaction of
        their own (nothing of the failed load commits).  One try, no retries: the failure may
        be the database's own; then the run report and the log still have it."""
        message = logsetup.mask(message, self._secrets())[:2000]

        def record(conn: psycopg.Connection) -> int:
            load_id = self._insert_log(
                conn, file_name=file_name, sha256=sha256, size_bytes=size, run_date=run_date,
                run_id=run_id, host=socket.gethostname(), status="failed", reason="load_error",
                message=message, started_at=started_at)
            conn.execute(self.q(
                "INSERT INTO {schema}.errors (source_file, line_no, column_name, reason, message,"
                " load_id) VALUES (%s, 0, '(file)', 'load_error', %s, %s)"),
                (file_name, message, load_id))
            return load_id

        try:
            conn = self.connection()
            with conn.transaction():
                return record(conn)
        except (psycopg.Error, OSError, retrying.PermanentError) as error:
            self.close()
            log.error("could not record the failed load of %s: %s", file_name,
                      logsetup.mask(str(error), self._secrets()))
            return None

    def _insert_log(self, conn: psycopg.Connection, **values) -> int:
        columns = list(values)
        query = sql.SQL("INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING id").format(
            table=sql.Identifier(self.schema, "load_log"),
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            values=sql.SQL(", ").join(sql.Placeholder() * len(columns)))
        return conn.execute(query, list(values.values())).fetchone()[0]

    def _log_row(self, conn: psycopg.Connection, load_id: int) -> dict:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute(self.q("SELECT * FROM {schema}.load_log WHERE id = %s"), (load_id,)).fetchone()

    def _copy(self, conn: psycopg.Connection, table: str, columns: tuple[str, ...],
              chunks: Iterable[Iterable[bytes]]) -> None:
        query = sql.SQL("COPY {table} ({columns}) FROM STDIN").format(
            table=sql.Identifier(self.schema, table),
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)))
        with conn.cursor().copy(query) as copy:
            for part in chunks:
                for chunk in part:
                    copy.write(chunk)

    def _copy_statistics(self, conn: psycopg.Connection,
                         batches: Iterable[pl.DataFrame]) -> dict[int, tuple[str, str, str]]:
        """COPY the statistics batch by batch; a row the database refuses is left out.

        Each batch is one COPY in a savepoint.  When the database refuses a row (it names the
        line of the COPY), the rows before it are copied again, the row is set aside with the
        database's message, and the COPY goes on after it: a bad row costs one more pass over
        part of its batch, never the file.  Returns ``line_no -> (column, message, row text)``.
        """
        refused: dict[int, tuple[str, str, str]] = {}
        # The next batch is formatted in a thread while the server parses this one.
        formatted = prefetch((batch, copy_lines(batch)) for batch in batches)
        for batch, text in formatted:
            while batch.height:
                try:
                    with conn.transaction():
                        self._copy(conn, "statistics", STATISTICS_COLUMNS, [[text]])
                    break
                except ROW_REFUSALS as error:
                    found = _COPY_LINE.search(error.diag.context or "")
                    index = int(found.group(1)) - 1 if found else -1
                    if not 0 <= index < batch.height:
                        raise  # not a refusal of one row
                    bad = batch.slice(index, 1)
                    line_no = bad["line_no"].item()
                    refused[line_no] = (found.group(2) or "(row)",
                                        f"the database refused the row: {error.diag.message_primary}",
                                        copy_lines(bad).decode().rstrip("\n"))
                    log.warning("%s line %d refused by the database: %s", bad["source_file"].item(),
                                line_no, error.diag.message_primary)
                    if index:
                        with conn.transaction():
                            self._copy(conn, "statistics", STATISTICS_COLUMNS,
                                       [[copy_lines(batch.slice(0, index))]])
                    batch = batch.slice(index + 1)
                    text = copy_lines(batch)
        return refused

    def _merge_visitors(self, conn: psycopg.Connection, visitors_path: Path) -> None:
        """Merge the file's visitor summaries (call under the merge lock)."""
        summaries = pl.read_parquet(visitors_path)
        if summaries.height == 0:
            return
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS visitas_stage (email text, fecha_primera_visita date,"
            " fecha_ultima_visita date, visitas_totales bigint, visitas_anio_actual bigint,"
            " visitas_mes_actual bigint) ON COMMIT DELETE ROWS")
        with conn.cursor().copy(sql.SQL("COPY visitas_stage ({}) FROM STDIN").format(
                sql.SQL(", ").join(map(sql.Identifier, VISITOR_COLUMNS)))) as copy:
            for start in range(0, summaries.height, 200_000):
                copy.write(copy_lines(summaries.slice(start, 200_000).select(VISITOR_COLUMNS)))
        conn.execute("ANALYZE visitas_stage")  # a temporary table has no statistics otherwise
        # Merges are serialised (the COPYs above are not): between the UPDATE and the INSERT no
        # other load adds a visitor.  The merge rule makes the result independent of load order.
        conn.execute(self.q(VISITOR_UPDATE))
        conn.execute(self.q(VISITOR_INSERT))

    # ------------------------------------------------------------------ archive bookkeeping

    def file_status(self, file_name: str, sha256: str) -> str:
        """The status of the newest load_log row of this file (loaded, rejected, duplicate)."""
        row = self._fetch_one(
            "reading load_log", "SELECT status FROM {schema}.load_log WHERE file_name = %s"
            " AND sha256 = %s AND status <> 'failed' ORDER BY id DESC LIMIT 1", (file_name, sha256))
        if row is None:
            raise LookupError(f"{file_name} has no load_log row: it was not loaded")
        return row[0]

    def removed_at_source(self, file_name: str, run_date: dt.date) -> bool:
        """A file of that name was handled and deleted at the source on this run date."""
        return self._fetch_one(
            "reading load_log", "SELECT 1 FROM {schema}.load_log WHERE file_name = %s"
            " AND run_date = %s AND source_removed_at IS NOT NULL LIMIT 1",
            (file_name, run_date)) is not None

    def mark_archived(self, file_name: str, sha256: str, archive: str) -> None:
        self.run("recording the archive", lambda conn: conn.execute(self.q(
            "UPDATE {schema}.load_log SET backup_archive = %s, archived_at = coalesce(archived_at, now())"
            " WHERE file_name = %s AND sha256 = %s AND status <> 'failed'"
            " AND source_removed_at IS NULL"), (archive, file_name, sha256)))

    def mark_removed(self, file_name: str, sha256: str) -> None:
        self.run("recording the removal", lambda conn: conn.execute(self.q(
            "UPDATE {schema}.load_log SET source_removed_at = now()"
            " WHERE file_name = %s AND sha256 = %s AND status <> 'failed'"
            " AND source_removed_at IS NULL"), (file_name, sha256)))


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            yield chunk


def prefetch(items: Iterable[T], depth: int = 2, poll: float = 0.2) -> Iterator[T]:
    """Produce ``items`` in a thread, ``depth`` ahead of the consumer (Polars releases the GIL).

    The thread never blocks for good: every hand-over waits in short steps and gives up once the
    consumer has stopped (an error, a closed generator), so the consumer's ``join`` returns and
    an outage mid-COPY becomes a retry instead of a hang.
    """
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=poll)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(done)
        except BaseException as error:  # handed to the consumer
            hand_over(error)

    worker = threading.Thread(target=produce, name="copy-formatter", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = ready.get(timeout=poll)
            except queue.Empty:
                if not worker.is_alive() and ready.empty():
                    raise RuntimeError("the copy formatter stopped without a result") from None
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


@per_process
def database() -> Database:
    """This process's database handle."""
    return Database.from_config()


class LoadLogTarget(luigi.Target):
    """Exists when load_log records this file's content (LoadPostgres's completion marker)."""

    def __init__(self, file_name: str, sha256: str | None, run_date: dt.date):
        self.file_name, self.sha256, self.run_date = file_name, sha256, run_date

    def exists(self) -> bool:
        return self.sha256 is not None and database().load_recorded(
            self.file_name, self.sha256, self.run_date)


class RunLogTarget(luigi.Target):
    """Exists when the run date was prepared (statistics and errors emptied once)."""

    def __init__(self, run_date: dt.date):
        self.run_date = run_date

    def exists(self) -> bool:
        return database().run_prepared(self.run_date)
