"""Schema migrations: numbered SQL files (``migrations/NNNN_*.sql``) applied in order.

The version table ``visitas_schema`` records the number of the last migration applied.  A
connection whose schema already records the newest number skips everything (no lock, no DDL);
otherwise the pending files run in one transaction under an advisory lock, so two workers or
hosts never migrate at once and a failed migration leaves the schema as it was.  Files run with
``search_path`` set to the target schema, so they name tables without a schema.

A database made before the version table existed is recognised by its tables: ``load_log``
without ``visitas_schema`` is the first released schema (version 1).
"""

from __future__ import annotations

import importlib.resources
import logging
import re

import psycopg
from psycopg import sql

from visitas.db.locks import LOCK_SCHEMA

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """``(number, file name, SQL)`` of every migration, in order."""
    folder = importlib.resources.files("visitas.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [number for number, _, _ in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1, 2, 3... without gaps: {numbers}")
    return found


LATEST = len(migrations())


def version(conn: psycopg.Connection, schema: str) -> int:
    """The schema's recorded version (0: nothing there yet)."""
    def exists(table: str) -> bool:
        name = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table)).as_string(conn)
        row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        return row is not None and row[0] is not None

    if exists("visitas_schema"):
        row = conn.execute(sql.SQL("SELECT max(version) FROM {}.visitas_schema").format(
            sql.Identifier(schema))).fetchone()
        if row is not None and row[0] is not None:
            return int(row[0])
    return 1 if exists("load_log") else 0


def migrate(conn: psycopg.Connection, schema: str) -> int:
    """Bring ``schema`` to the newest version; returns the version it was at."""
    with conn.transaction():
        before = version(conn, schema)
        if before == LATEST:
            return before
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SCHEMA,))
        before = version(conn, schema)  # another worker may have migrated meanwhile
        if before > LATEST:
            raise RuntimeError(f"schema {schema} is at version {before}, newer than this"
                               f" program's {LATEST}: upgrade visitas")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("CREATE TABLE IF NOT EXISTS visitas_schema (version integer NOT NULL)")
        for number, name, text in migrations():
            if number > before:
                log.info("schema %s: applying migration %s", schema, name)
                conn.execute(text.encode())  # bytes: the text's % signs are not placeholders
        conn.execute("DELETE FROM visitas_schema")
        conn.execute("INSERT INTO visitas_schema (version) VALUES (%s)", (LATEST,))
    return before
