"""The visitor merge against a real PostgreSQL: a few summaries are merged by one statement, many
through a stage table; both give what the merge rule gives."""

import datetime as dt
import random

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal
from psycopg import sql

from visitas.db import Database, Loader
from visitas.transform import visitors


def _summaries(emails: list[str], seed: int) -> pl.DataFrame:
    """One summary per address, dated over two years (so that merges cross years and months),
    with engagement dates sometimes missing."""
    pick = random.Random(seed)
    rows = []
    for email in emails:
        first = dt.date(2025, 1, 1) + dt.timedelta(days=pick.randrange(700))
        last = first + dt.timedelta(days=pick.randrange(60))
        total = pick.randint(1, 9)
        year = pick.randint(1, total)
        opened = pick.randint(0, total)
        rows.append({
            "email": email, "fecha_primera_visita": first, "fecha_ultima_visita": last,
            "visitas_totales": total, "visitas_anio_actual": year,
            "visitas_mes_actual": pick.randint(1, year), "opens_totales": pick.randint(0, 20),
            "clicks_totales": pick.randint(0, 5), "visitas_abiertas": opened,
            "visitas_clicadas": pick.randint(0, opened),
            "fecha_ultimo_open": last if opened and pick.random() < 0.8 else None,
            "fecha_ultimo_click": last if pick.random() < 0.3 else None})
    return pl.DataFrame(rows, schema=visitors.SUMMARY_SCHEMA)


@pytest.fixture
def databases(pg_dsn, schema):
    """Two fresh visitas schemas on the test server."""
    other = f"{schema}_b"
    made = [Database(pg_dsn, schema), Database(pg_dsn, other)]
    yield made
    for database in made:
        database.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other)))


def _visitors(database: Database) -> pl.DataFrame:
    columns = sql.SQL(", ").join(map(sql.Identifier, visitors.SUMMARY_SCHEMA))
    rows = database.connection().execute(
        sql.SQL("SELECT {} FROM {}.visitor").format(
            columns, sql.Identifier(database.schema))).fetchall()
    # Sorted here, as merge_rule sorts (by code point; the server's collation may differ).
    return pl.DataFrame(rows, schema=visitors.SUMMARY_SCHEMA, orient="row").sort("email")


def test_a_few_summaries_merge_as_staged_ones_do_and_as_the_rule_says(databases):
    # Keys with what array literals quote or escape (the few are sent as arrays), among plain ones.
    odd = ['a"b@example.com', "back\\slash@example.com", "{braces}@example.com",
           "com,ma@example.com", "sp ace@example.com", "NULL", "ñandú@correo.mx", "", "'quote'@x.com"]
    emails = sorted([f"visitor{i}@example.com" for i in range(300 - len(odd))] + odd)
    # Two files: 100 visitors only in the first, 100 in both, 100 new in the second.
    loads = [_summaries(emails[:200], seed=1), _summaries(emails[100:], seed=2)]
    few, staged = databases
    for summaries in loads:
        few.run("merging", lambda conn, s=summaries: Loader(few).merge_few(conn, s))
        staged.run("merging", lambda conn, s=summaries: Loader(staged).merge_staged(
            conn, s.lazy(), s.height))

    expected = visitors.merge_rule(pl.concat(loads).lazy()).collect()
    assert expected.height == 300
    assert_frame_equal(_visitors(few), expected)
    assert_frame_equal(_visitors(staged), expected)
