"""One file's load: one transaction for its statistics, errors, visitor merge and marker row.

Bulk paths only: COPY for statistics (batch by batch, a refused row set aside), errors and the
staged visitor summaries; visitors are merged set-wise with the rule of
:mod:`visitas.transform.visitors`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import psycopg
from psycopg import sql

from visitas.db.connection import Database, scalar
from visitas.db.copy_format import Prefetch, array_literals, copy_lines
from visitas.db.loadlog import HANDLED, LoadLog, LoadLogTarget
from visitas.db.locks import LOCK_FILE, LOCK_VISITORS, lock_key
from visitas.handoff import LoadResult, SplitSummary
from visitas.runtime import retrying
from visitas.transform import contract, visitors
from visitas.transform.split import LoadJob

log = logging.getLogger(__name__)

COPY_CHUNK = 1024 * 1024
# The COPY column lists, from the definitions of the rows they copy.
# load_id is sent with each row although the table has it as a default: a default evaluated per
# row (current_setting) cost 0.27-0.36 s of server time on 2M rows (stock PostgreSQL 15).
STATISTICS_COLUMNS = (*contract.STATISTICS_SCHEMA, "load_id")
ERROR_COLUMNS = tuple(contract.ERROR_SCHEMA)
VISITOR_COLUMNS = tuple(visitors.SUMMARY_SCHEMA)
_SQL_TYPES = {pl.String: "text", pl.Date: "date", pl.Int64: "bigint"}
STAGE_CHUNK = 200_000
# Below this many visitor summaries a merge looks each one up by the index; from it on, the stage
# is analysed and the planner chooses.
SMALL_STAGE = 10_000


# The merge rule of visitas.visitors, applied to the stored row (v) and the file's summary
# ({src}): the result is the summary of all visits whatever the order of loads.  One text, two
# statements: a stage table's summaries are merged by UPDATE ... FROM, a few summaries by
# INSERT ... ON CONFLICT DO UPDATE (where {src} is "excluded").
VISITOR_ASSIGNMENTS = """
    fecha_primera_visita = least(v.fecha_primera_visita, {src}.fecha_primera_visita),
    fecha_ultima_visita = greatest(v.fecha_ultima_visita, {src}.fecha_ultima_visita),
    visitas_totales = v.visitas_totales + {src}.visitas_totales,
    visitas_anio_actual = CASE
        WHEN date_trunc('year', v.fecha_ultima_visita) = date_trunc('year', {src}.fecha_ultima_visita)
            THEN v.visitas_anio_actual + {src}.visitas_anio_actual
        WHEN v.fecha_ultima_visita > {src}.fecha_ultima_visita THEN v.visitas_anio_actual
        ELSE {src}.visitas_anio_actual END,
    visitas_mes_actual = CASE
        WHEN date_trunc('month', v.fecha_ultima_visita) = date_trunc('month', {src}.fecha_ultima_visita)
            THEN v.visitas_mes_actual + {src}.visitas_mes_actual
        WHEN v.fecha_ultima_visita > {src}.fecha_ultima_visita THEN v.visitas_mes_actual
        ELSE {src}.visitas_mes_actual END,
    opens_totales = v.opens_totales + {src}.opens_totales,
    clicks_totales = v.clicks_totales + {src}.clicks_totales,
    visitas_abiertas = v.visitas_abiertas + {src}.visitas_abiertas,
    visitas_clicadas = v.visitas_clicadas + {src}.visitas_clicadas,
    -- greatest() skips nulls; a row from before the engagement counters (null: unknown, see
    -- migration 0005) stays unknown until it is rebuilt.
    fecha_ultimo_open = CASE WHEN v.visitas_abiertas IS NOT NULL
        THEN greatest(v.fecha_ultimo_open, {src}.fecha_ultimo_open) END,
    fecha_ultimo_click = CASE WHEN v.visitas_clicadas IS NOT NULL
        THEN greatest(v.fecha_ultimo_click, {src}.fecha_ultimo_click) END,
    updated_at = now()"""
# Staged summaries: merges are serialised (LOCK_VISITORS), so known visitors are updated and new
# ones inserted in two set-wise statements (a plain INSERT costs half an ON CONFLICT one: 300k new
# visitors).  Keys sorted: rows go in in index order.
VISITOR_UPDATE = """
UPDATE {schema}.visitor AS v SET {assignments}
FROM {stage} AS s
WHERE v.email = s.email
"""
VISITOR_INSERT = """
INSERT INTO {schema}.visitor ({columns})
SELECT {columns} FROM {stage} AS s
WHERE NOT EXISTS (SELECT 1 FROM {schema}.visitor AS v WHERE v.email = s.email)
ORDER BY email
"""
# A few summaries are sent as one array per column and merged by one statement, with no stage
# table, each looked up by visitor's primary key.  Measured with 1,000 summaries against 50k
# visitors (stock PostgreSQL 15): the COPY into a stage table cost 4.3 ms of server time, more
# than the merge without it.  ON CONFLICT instead of an UPDATE returning the visitors it found and
# an INSERT of the others (49k visitors, 990 summaries, 30 alternating runs each): 20.1 -> 18.3 ms
# per merge with 960 of them known, no difference with half, 15.1 -> 16.1 ms with none (a daily
# file's visitors are mostly known ones); and no join for the planner to choose (it hashed the
# whole table per file until the lookups were forced).  The arrays are array literals laid out by
# Polars (copy_format.array_literals): unnested, 990 summaries took the server 2.0 ms against
# 5.3 ms for the same rows as a JSON document through json_to_recordset, for 0.6 ms more of
# Polars; passed as Python lists, psycopg spent 6 ms adapting their values.
VISITOR_MERGE_FEW = """
INSERT INTO {schema}.visitor AS v ({columns})
SELECT {columns} FROM unnest({arrays}) AS s ({columns})
ORDER BY email
ON CONFLICT (email) DO UPDATE SET {assignments}
"""


# Files already loaded that may be the first bytes of a new one (its extension): smaller, and
# the same first HEAD_BYTES (or smaller than that).  Their whole prefix is then hashed.
PREFIX_CANDIDATES = (
    "SELECT id, file_name, sha256, size_bytes, lines_done FROM {schema}.load_log"
    " WHERE status = 'loaded' AND lines_done IS NOT NULL AND size_bytes < %(size)s"
    " AND (head_sha256 = %(head)s OR size_bytes < %(head_bytes)s) ORDER BY size_bytes DESC")

# Database refusals of one row (a value out of range, a constraint): that row is rejected.
ROW_REFUSALS = (psycopg.DataError, psycopg.IntegrityError)  # SQLSTATE classes 22 and 23
_COPY_LINE = re.compile(r"\bline (\d+)(?:, column (\w+))?")

@dataclasses.dataclass(frozen=True)
class Parent:
    """A loaded file whose bytes are the first bytes of the file being loaded."""

    id: int
    file_name: str
    lines_done: int


class ExtensionRace(retrying.RetryNow):
    """A file this one extends was committed while this one loaded: load it again, as an
    extension."""



def _counts(summary: SplitSummary) -> dict[str, object]:
    return {"rows_read": summary.rows_read, "rows_loaded": summary.rows_loaded,
            "rows_rejected": summary.rows_rejected, "error_count": summary.error_count,
            "warnings": json.dumps(summary.warnings), "visitors": summary.visitors,
            "rows_opened": summary.rows_opened, "rows_clicked": summary.rows_clicked,
            "error_reasons": json.dumps(summary.error_reasons, sort_keys=True)}


class Loader:
    """Loads a file's split into the database."""

    def __init__(self, database: Database):
        self.db = database
        self.log = LoadLog(database)

    def load_file(self, job: LoadJob, marker: LoadLogTarget, run_id: str,
                  started_at: dt.datetime) -> LoadResult:
        """Load one file in one transaction, its marker row included; returns that row.

        ``job`` gives the file's identity, its statistics batches, its split (errors, visitor
        summaries, counts) and the hashes of its prefixes.
        """
        with _Statistics(job) as statistics:
            return self.db.run(f"loading {job.name}", lambda conn: self._load(
                conn, job, statistics, marker, run_id, started_at))

    def _load(self, conn: psycopg.Connection, job: LoadJob, statistics: _Statistics,
              marker: LoadLogTarget, run_id: str, started_at: dt.datetime) -> LoadResult:
        name, sha, run_date = job.name, job.sha256, marker.run_date
        self._lock_file(conn, sha, name)
        same = conn.execute(self.db.q(HANDLED), (name, sha, run_date)).fetchone()
        if same:  # another worker or host finished it while we waited for the lock
            log.info("%s was already handled (load_log id %s): nothing to do", name, same[0])
            return self.log.result(conn, same[0])
        loaded = conn.execute(self.db.q(
            "SELECT id, file_name, run_date FROM {schema}.load_log"
            " WHERE sha256 = %s AND status = 'loaded'"), (sha,)).fetchone()
        common = dict(size_bytes=job.size, run_id=run_id, encoding=job.summary.encoding,
                      started_at=started_at)
        self.log.supersede_failures(conn, sha)
        if loaded:
            load_id = marker.touch(conn, self.log, status="duplicate", duplicate_of=loaded[0],
                                   reason="duplicate",
                                   message=f"same content as {loaded[1]} (run {loaded[2]},"
                                           f" load_log id {loaded[0]}); not loaded again",
                                   **common)
            log.warning("%s is a duplicate of %s (sha256 %s…): not loaded", name, loaded[1], sha[:12])
            return self.log.result(conn, load_id)
        rejected = job.summary.status == "rejected"
        parent = None if rejected else self._extension_parent(conn, job)
        after = parent.lines_done if parent else 0
        summary, split_dir = job.split(after)
        load_id = marker.touch(
            conn, self.log, status="rejected" if rejected else "loaded",
            extends=parent and parent.id, lines_done=summary.lines_done,
            head_sha256=summary.head_sha256, reason=summary.reason,
            message=summary.message or (parent and (
                f"extends {parent.file_name} (load_log id {parent.id}): its lines up to"
                f" {parent.lines_done} were loaded from it; lines after that from this file")),
            **_counts(summary), **common)
        if parent:
            log.warning("%s extends %s (the same first bytes, more of them): loading its lines"
                        " after line %d only", name, parent.file_name, parent.lines_done)
        conn.execute("SELECT set_config('visitas.load_id', %s, true)", (str(load_id),))
        clock = time.perf_counter()
        if not rejected:
            with statistics.formatted(after) as formatted:
                refused = self._copy_statistics(conn, formatted, load_id)
            if refused:  # split again without them: visitors, warnings and counts exclude them
                summary, split_dir = job.split(after, refused)
                conn.execute(self.db.q(
                    "UPDATE {schema}.load_log SET rows_loaded = %(rows_loaded)s,"
                    " rows_rejected = %(rows_rejected)s, error_count = %(error_count)s,"
                    " warnings = %(warnings)s, visitors = %(visitors)s,"
                    " rows_opened = %(rows_opened)s, rows_clicked = %(rows_clicked)s,"
                    " error_reasons = %(error_reasons)s WHERE id = %(id)s"),
                    {**_counts(summary), "id": load_id})
        copied = time.perf_counter()
        self._copy(conn, "errors", ERROR_COLUMNS, [_file_chunks(split_dir / "errors.copy")])
        self._lock_merge(conn)
        # Under the merge lock (held to the commit): a file this one extends may have been
        # committed since it was looked for; if so, this load is done again as an extension.
        if not rejected and self._extension_parent(conn, job) != parent:
            raise ExtensionRace(f"{name}: a file it extends was loaded meanwhile")
        self._merge_visitors(conn, split_dir / "visitors.parquet", summary.visitors)
        log.info("%s: statistics copied in %.2fs, errors and visitors in %.2fs", name,
                 copied - clock, time.perf_counter() - copied)
        conn.execute(self.db.q("UPDATE {schema}.load_log SET finished_at = clock_timestamp() WHERE id = %s"),
                     (load_id,))
        return self.log.result(conn, load_id)

    def _extension_parent(self, conn: psycopg.Connection, job: LoadJob) -> Parent | None:
        """The largest loaded file whose bytes are all the first bytes of this one, if any."""
        candidates = conn.execute(self.db.q(PREFIX_CANDIDATES), {
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
        got = scalar(conn, "SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_FILE, key))
        if got:
            return
        log.info("%s is being loaded by another worker or host: waiting up to %.0fs for it",
                 name, self.db.lock_wait)
        self._wait_for_lock(conn, LOCK_FILE, key)

    def _lock_merge(self, conn: psycopg.Connection) -> None:
        """The visitor merges of concurrent loads take turns (held until the commit)."""
        self._wait_for_lock(conn, LOCK_VISITORS, 0)

    def _wait_for_lock(self, conn: psycopg.Connection, namespace: int, key: int) -> None:
        """Wait at most ``lock_wait`` (then LockNotAvailable, which is retried)."""
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{int(self.db.lock_wait * 1000)}ms")))
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (namespace, key))
        conn.execute("SET LOCAL lock_timeout = 0")

    def _copy(self, conn: psycopg.Connection, table: str, columns: tuple[str, ...],
              chunks: Iterable[Iterable[bytes]]) -> None:
        query = sql.SQL("COPY {table} ({columns}) FROM STDIN").format(
            table=sql.Identifier(self.db.schema, table),
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)))
        with conn.cursor().copy(query) as copy:
            for part in chunks:
                for chunk in part:
                    copy.write(chunk)

    def _copy_statistics(self, conn: psycopg.Connection,
                         formatted: Iterable[tuple[pl.DataFrame, bytes]],
                         load_id: int) -> dict[int, tuple[str, str, str]]:
        """COPY the statistics batch by batch; a row the database refuses is left out.

        ``formatted`` gives each batch with its COPY text (without ``load_id``).  Each batch is
        one COPY in a savepoint.  When the database refuses a row (it names the line of the
        COPY), the rows before it are copied again, the row is set aside with the database's
        message, and the COPY goes on after it: a bad row costs one more pass over part of its
        batch, never the file.  Returns ``line_no -> (column, message, row text)``.
        """
        refused: dict[int, tuple[str, str, str]] = {}
        line_end = b"\t%d\n" % load_id  # load_id is the last column: at each line's end

        def with_load_id(text: bytes) -> bytes:
            return text.replace(b"\n", line_end)

        for batch, text in formatted:
            text = with_load_id(text)
            while batch.height:
                try:
                    with conn.transaction():
                        self._copy(conn, "statistics", STATISTICS_COLUMNS, [[text]])
                    break
                except ROW_REFUSALS as error:
                    found = _COPY_LINE.search(error.diag.context or "")
                    index = int(found.group(1)) - 1 if found else -1
                    if found is None or not 0 <= index < batch.height:
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
                                       [[with_load_id(copy_lines(batch.slice(0, index)))]])
                    batch = batch.slice(index + 1)
                    text = with_load_id(copy_lines(batch))
        return refused

    def _merge_visitors(self, conn: psycopg.Connection, visitors_path: Path, count: int) -> None:
        """Merge the file's ``count`` visitor summaries (call under the merge lock)."""
        if count == 0:
            return
        summaries = pl.scan_parquet(visitors_path)
        if count < SMALL_STAGE:
            self.merge_few(conn, summaries.collect())
        else:
            self.merge_staged(conn, summaries, count)

    def merge_staged(self, conn: psycopg.Connection, summaries: pl.LazyFrame, count: int) -> None:
        """Merge ``count`` summaries through a temporary stage table (call under the merge
        lock)."""
        conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS visitas_stage ({})"
                             " ON COMMIT DELETE ROWS").format(_typed_columns()))
        with conn.cursor().copy(sql.SQL("COPY visitas_stage ({}) FROM STDIN").format(
                sql.SQL(", ").join(map(sql.Identifier, VISITOR_COLUMNS)))) as copy:
            for start in range(0, count, STAGE_CHUNK):  # a slice at a time: memory stays flat
                copy.write(copy_lines(summaries.slice(start, STAGE_CHUNK).select(VISITOR_COLUMNS)
                                      .collect()))
        # A temporary table has no statistics otherwise.  The merge joins on email alone: its
        # statistics are the ones the plans need (0.065 s instead of 0.15 s for every column,
        # 300k visitors).
        conn.execute("ANALYZE visitas_stage (email)")
        # Merges are serialised (the COPYs above are not): between the UPDATE and the INSERT no
        # other load adds a visitor.  The merge rule makes the result independent of load order.
        stage = sql.Identifier("visitas_stage")
        conn.execute(self._merge_sql(VISITOR_UPDATE, stage))
        conn.execute(self._merge_sql(VISITOR_INSERT, stage))

    def merge_few(self, conn: psycopg.Connection, summaries: pl.DataFrame) -> None:
        """Merge a few summaries (fewer than SMALL_STAGE) in one statement (call under the
        merge lock)."""
        conn.execute(self._merge_sql(
            VISITOR_MERGE_FEW, summary=sql.SQL("excluded"), arrays=sql.SQL(", ").join(
                sql.SQL(f"%s::{_SQL_TYPES[dtype]}[]") for dtype in visitors.SUMMARY_SCHEMA.values())),
            array_literals(summaries.select(VISITOR_COLUMNS)))

    def _merge_sql(self, template: str, stage: sql.Composable | None = None,
                   summary: sql.Composable | None = None, **parts: sql.Composable
                   ) -> sql.Composed:
        """A merge statement; its ``{assignments}`` (the rule) read the summary as ``summary``
        (the stage's alias ``s`` unless told)."""
        return sql.SQL(template).format(
            schema=sql.Identifier(self.db.schema), stage=stage or sql.SQL(""),
            columns=sql.SQL(", ").join(map(sql.Identifier, VISITOR_COLUMNS)),
            assignments=sql.SQL(VISITOR_ASSIGNMENTS).format(src=summary or sql.Identifier("s")),
            **parts)

    # ------------------------------------------------------------------ archive bookkeeping


class _Statistics:
    """A file's statistics batches, each with its COPY text (``load_id`` is added at the COPY),
    formatted in a thread from the start of the load: the first batches are ready when the
    server has run the load's first statements (a small file's formatting, about 4.5 ms, had
    waited for them).  An extension's lines, or a load tried again, are formatted anew."""

    def __init__(self, job: LoadJob):
        self.job = job
        self._early = (None if job.summary.status == "rejected"
                       else Prefetch(self._format(0)))

    def _format(self, after_line: int) -> Iterator[tuple[pl.DataFrame, bytes]]:
        for batch in self.job.statistics(after_line):
            yield batch, copy_lines(batch)

    def formatted(self, after_line: int) -> Prefetch[tuple[pl.DataFrame, bytes]]:
        early, self._early = self._early, None
        if early is not None and after_line == 0:
            return early
        if early is not None:
            early.close()
        return Prefetch(self._format(after_line))

    def __enter__(self) -> _Statistics:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._early is not None:
            self._early.close()


def _typed_columns() -> sql.Composed:
    """The visitor summary's columns with their PostgreSQL types (``email text, ...``)."""
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(_SQL_TYPES[dtype]))
        for name, dtype in visitors.SUMMARY_SCHEMA.items())


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            yield chunk
