"""Rebuild the ``visitor`` table from the backup zips, and prove it right or repair it.

``statistics`` and ``errors`` are emptied every run date, so the backups are the only raw
history.  A rebuild replays exactly what ``load_log`` says was loaded, in the order it was
loaded (an extension after the file it extends), through the pipeline's own steps
(:func:`visitas.transform.validate.validate_report`, :func:`visitas.transform.split.split_report`,
:class:`visitas.db.loader.Loader`) into a scratch schema of the same database; then it compares
the rebuilt ``visitor`` table with the live one, row by row.  ``--apply`` replaces the live
table with the rebuilt one in one transaction, under the visitor merge lock, and only if no
file was loaded meanwhile.

Nothing of the live schema changes without ``--apply``.  The scratch schema is made by the
rebuild (and dropped by the next one); a schema the rebuild did not make is never dropped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from visitas.db.connection import Database, scalar
from visitas.db.loader import VISITOR_COLUMNS, Loader
from visitas.db.loadlog import LoadLogTarget
from visitas.db.locks import LOCK_VISITORS
from visitas.transform import split, validate

log = logging.getLogger(__name__)

SCRATCH_MARK = "visitas rebuild: scratch schema, dropped by the next rebuild"
DEFAULT_SCHEMA = "visitas_rebuild"
SHOWN_DIFFERENCES = 20
# The columns compared: every counter (updated_at says when, not what).
COMPARED = VISITOR_COLUMNS


class CannotRebuild(Exception):
    """The backups cannot give an exact rebuild (a file missing, changed or not archived yet),
    or the live table changed before it could be replaced."""


@dataclasses.dataclass(frozen=True)
class LoadedFile:
    """A ``loaded`` row of the live load_log: what to replay."""

    id: int
    file_name: str
    sha256: str
    run_date: dt.date
    backup_archive: str | None
    extends: str | None  # the file name of the file it extends
    rows_loaded: int


@dataclasses.dataclass
class Outcome:
    """What a rebuild found."""

    files: int = 0
    visitors: int = 0
    file_differences: list[str] = dataclasses.field(default_factory=list)
    visitor_differences: int = 0
    shown: list[str] = dataclasses.field(default_factory=list)
    applied: bool = False

    @property
    def identical(self) -> bool:
        return not self.file_differences and not self.visitor_differences


@dataclasses.dataclass
class Settings:
    """How files are validated (the pipeline's ``[load]`` settings)."""

    batch_bytes: int
    parallel_batches: int
    max_line_bytes: int


LOADED = """
SELECT f.id, f.file_name, f.sha256, f.run_date, f.backup_archive, p.file_name, f.rows_loaded
FROM {schema}.load_log AS f LEFT JOIN {schema}.load_log AS p ON p.id = f.extends
WHERE f.status = 'loaded' ORDER BY f.id
"""

DIFFERENCES = """
SELECT coalesce(l.email, r.email), l.counters, r.counters
FROM (SELECT email, jsonb_build_array({columns}) AS counters FROM {live}.visitor) AS l
FULL JOIN (SELECT email, jsonb_build_array({columns}) AS counters FROM {scratch}.visitor) AS r
    ON l.email = r.email
WHERE l.counters IS DISTINCT FROM r.counters
ORDER BY 1
"""


class Rebuild:
    """One rebuild of ``live``'s visitor table into ``scratch`` from the zips in ``backups``."""

    def __init__(self, live: Database, scratch: Database, backups: Path, work_dir: Path,
                 settings: Settings, progress: Callable[[str], None] = log.info):
        if scratch.schema == live.schema:
            raise ValueError(f"the rebuild schema must not be the live one ({live.schema})")
        self.live, self.scratch = live, scratch
        self.backups, self.work_dir, self.settings = backups, work_dir, settings
        self.progress = progress
        self.run_id = f"rebuild-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"
        self.replayed: list[int] = []

    # ------------------------------------------------------------------ replay

    def run(self) -> Outcome:
        files = self.loaded_files()
        self.replayed = [entry.id for entry in files]
        self.check_backups(files)
        self.fresh_scratch()
        outcome = Outcome(files=len(files))
        for number, entry in enumerate(files, 1):
            self.progress(f"[{number}/{len(files)}] {entry.file_name} ({entry.run_date},"
                          f" {entry.backup_archive})")
            difference = self.replay(entry)
            if difference:
                outcome.file_differences.append(difference)
        self.compare(outcome)
        return outcome

    def loaded_files(self) -> list[LoadedFile]:
        rows = self.live.run("reading load_log", lambda conn: conn.execute(
            self.live.q(LOADED)).fetchall())
        return [LoadedFile(*row) for row in rows]

    def check_backups(self, files: list[LoadedFile]) -> None:
        """Every loaded file must be archived, its zip present: else no exact rebuild exists."""
        unarchived = [f"{e.file_name} (load_log id {e.id})" for e in files if not e.backup_archive]
        missing: dict[str, list[str]] = {}
        for entry in files:
            zip_name = (entry.backup_archive or "").split(":", 1)[0]
            if zip_name and not (self.backups / zip_name).is_file():
                missing.setdefault(zip_name, []).append(entry.file_name)
        problems = [f"no {zip_name} in {self.backups} (it holds {_some(names)})"
                    for zip_name, names in sorted(missing.items())]
        if unarchived:
            problems.append(f"not archived yet: {_some(unarchived)} (let a run finish them)")
        if problems:
            raise CannotRebuild("cannot rebuild exactly: " + "; ".join(problems))

    def fresh_scratch(self) -> None:
        """Drop the scratch schema of an earlier rebuild and make it again (migrated)."""
        schema = self.scratch.schema

        def reset(conn: psycopg.Connection) -> None:
            found = conn.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace"
                                 " WHERE nspname = %s", (schema,)).fetchone()
            if found is not None and found[0] != SCRATCH_MARK:
                empty = not scalar(conn, "SELECT count(*) FROM pg_class c JOIN pg_namespace n"
                                         " ON n.oid = c.relnamespace WHERE n.nspname = %s", (schema,))
                if not empty:
                    raise CannotRebuild(f"schema {schema} exists and was not made by a rebuild:"
                                        " choose another with --schema")
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(schema), sql.Literal(SCRATCH_MARK)))

        # On the live connection: the scratch one migrates its schema when it first connects.
        self.live.run(f"preparing schema {schema}", reset)

    def replay(self, entry: LoadedFile) -> str | None:
        """Load one archived file into the scratch schema as the pipeline did; returns how its
        load differs from the live one (None: the same)."""
        work = self.work_dir / f"{entry.id}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            source = self.extract(entry, work / "file")
            checked, split_dir = work / "checked", work / "split"
            verdict = validate.validate_report(
                source, entry.file_name, checked, self.settings.batch_bytes,
                self.settings.parallel_batches, max_line_bytes=self.settings.max_line_bytes)
            split.split_report(checked, entry.file_name, split_dir)
            job = split.LoadJob(source=source, checked_dir=checked, split_dir=split_dir,
                                work_dir=work / "reload")
            result = Loader(self.scratch).load_file(
                job, LoadLogTarget(entry.file_name, verdict.sha256, entry.run_date), self.run_id,
                dt.datetime.now(dt.UTC))
            extended = self.scratch.fetch_one(
                "reading the replayed load", "SELECT p.file_name FROM {schema}.load_log AS f"
                " JOIN {schema}.load_log AS p ON p.id = f.extends WHERE f.id = %s", (result.id,))
            # Only the visitors count: the rows are not kept (as after a run date).
            self.scratch.run("emptying statistics", lambda conn: conn.execute(
                self.scratch.q("TRUNCATE {schema}.statistics, {schema}.errors")))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        replayed = (result.status, result.rows_loaded, extended[0] if extended else None)
        live = ("loaded", entry.rows_loaded, entry.extends)
        if replayed == live:
            return None
        return (f"{entry.file_name} (load_log id {entry.id}, {entry.run_date}): live"
                f" {_describe(*live)}, replayed {_describe(*replayed)}")

    def extract(self, entry: LoadedFile, target: Path) -> Path:
        """The file's bytes from its zip, checked against the sha256 load_log recorded."""
        assert entry.backup_archive is not None  # check_backups made sure
        zip_name, member = entry.backup_archive.split(":", 1)
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(self.backups / zip_name) as archive, \
                    archive.open(member) as packed, open(target, "wb") as out:
                while chunk := packed.read(1024 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile, OSError) as error:
            raise CannotRebuild(f"{entry.file_name}: cannot read {member} from {zip_name}:"
                                f" {error}") from error
        if digest.hexdigest() != entry.sha256:
            raise CannotRebuild(f"{entry.file_name}: {member} in {zip_name} is not the content"
                                f" load_log recorded (sha256 {digest.hexdigest()[:12]}…, expected"
                                f" {entry.sha256[:12]}…)")
        return target

    # ------------------------------------------------------------------ compare and apply

    def compare(self, outcome: Outcome) -> None:
        query = sql.SQL(DIFFERENCES).format(
            columns=sql.SQL(", ").join(map(sql.Identifier, COMPARED[1:])),
            live=sql.Identifier(self.live.schema), scratch=sql.Identifier(self.scratch.schema))

        def differences(conn: psycopg.Connection) -> tuple[int, list[tuple], int]:
            found = conn.execute(query).fetchall()
            rebuilt = scalar(conn, sql.SQL("SELECT count(*) FROM {}.visitor").format(
                sql.Identifier(self.scratch.schema)))
            return len(found), found[:SHOWN_DIFFERENCES], rebuilt

        count, shown, outcome.visitors = self.live.run("comparing the visitor tables", differences)
        outcome.visitor_differences = count
        outcome.shown = [_difference(email, live, rebuilt) for email, live, rebuilt in shown]

    def apply(self, outcome: Outcome) -> None:
        """Replace the live visitor table with the rebuilt one: one transaction, under the merge
        lock, and only if load_log's loaded files are still those replayed."""
        if outcome.file_differences:
            raise CannotRebuild(f"{len(outcome.file_differences)} file(s) replayed differently from"
                                " what load_log recorded: the rebuild is not exact; nothing replaced")
        columns = sql.SQL(", ").join(map(sql.Identifier, COMPARED))

        def replace(conn: psycopg.Connection) -> None:
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(f"{int(self.live.lock_wait * 1000)}ms")))
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_VISITORS,))
            now = [row[0] for row in conn.execute(self.live.q(
                "SELECT id FROM {schema}.load_log WHERE status = 'loaded' ORDER BY id"))]
            if now != self.replayed:
                raise CannotRebuild("files were loaded while the rebuild ran: nothing replaced;"
                                    " run the rebuild again")
            conn.execute(self.live.q("DELETE FROM {schema}.visitor"))
            conn.execute(sql.SQL("INSERT INTO {live}.visitor ({columns}) SELECT {columns}"
                                 " FROM {scratch}.visitor ORDER BY email").format(
                live=sql.Identifier(self.live.schema), scratch=sql.Identifier(self.scratch.schema),
                columns=columns))

        self.live.run("replacing the visitor table", replace)
        outcome.applied = True


def _some(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _describe(status: str, rows: int, parent: str | None) -> str:
    return f"{status}, {rows} rows" + (f", extending {parent}" if parent else "")


def _difference(email: str, live: list | None, rebuilt: list | None) -> str:
    if live is None:
        return f"{email}: missing from the live table (rebuilt: {_counters(rebuilt)})"
    if rebuilt is None:
        return f"{email}: in the live table only ({_counters(live)})"
    changed = [f"{name} {_text(a)} -> {_text(b)}"
               for name, a, b in zip(COMPARED[1:], live, rebuilt, strict=True) if a != b]
    return f"{email}: " + ", ".join(changed) + " (live -> rebuilt)"


def _counters(values: list | None) -> str:
    return ", ".join(f"{name} {_text(value)}" for name, value in zip(COMPARED[1:], values or [], strict=True))


def _text(value: object) -> str:
    return "null" if value is None else str(value)


def render(outcome: Outcome, scratch_schema: str) -> str:
    lines = [f"replayed {outcome.files} loaded file(s) from the backups into schema"
             f" {scratch_schema}: {outcome.visitors} visitor(s)"]
    if outcome.file_differences:
        lines.append(f"{len(outcome.file_differences)} file(s) replayed differently:")
        lines.extend(f"  {d}" for d in outcome.file_differences)
    if outcome.visitor_differences:
        lines.append(f"{outcome.visitor_differences} visitor row(s) differ"
                     + (f" (first {len(outcome.shown)}):" if outcome.visitor_differences > len(outcome.shown)
                        else ":"))
        lines.extend(f"  {d}" for d in outcome.shown)
    if outcome.identical:
        lines.append("identical")
    elif outcome.applied:
        lines.append("applied: the live visitor table is now the rebuilt one")
    else:
        lines.append("not applied (--apply replaces the live visitor table with the rebuilt one)")
    return "\n".join(lines) + "\n"
