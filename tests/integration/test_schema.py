"""Schema migrations against a real PostgreSQL: an old database upgrades with its data, the
statistics table matches the contract, and migrations run once per version."""

import datetime as dt

import psycopg
import pytest
from psycopg import sql

from visitas.db import Database
from visitas.db import schema as migrations
from visitas.transform import contract


def _connect(dsn: str, name: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(name)))
    return conn


def _columns(conn: psycopg.Connection, name: str, table: str) -> dict[str, str]:
    return dict(conn.execute(
        "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns"
        " JOIN pg_attribute ON attrelid = (quote_ident(table_schema) || '.' || table_name)::regclass"
        " AND attname = column_name WHERE table_schema = %s AND table_name = %s",
        (name, table)).fetchall())


def _first_released_schema_with_data(conn: psycopg.Connection) -> None:
    """What the first release made (migration 0001 only, no version table) and loaded."""
    [(number, _, first)] = [m for m in migrations.migrations() if m[0] == 1]
    conn.execute(first.encode())
    conn.execute("""
        INSERT INTO load_log (file_name, sha256, size_bytes, run_date, status, rows_read,
                              rows_loaded, rows_rejected, started_at)
        VALUES ('report_1.txt', repeat('a', 64), 500, '2026-11-01', 'loaded', 3, 2, 1, now());
        SELECT set_config('visitas.load_id', '1', false);
        INSERT INTO statistics (email, fecha_envio, source_file, line_no, links)
        VALUES ('ana@example.com', '2026-10-31 10:00', 'report_1.txt', 2, '{http://x.mx}'),
               ('luis@example.com', '2026-11-01 09:00', 'report_1.txt', 4, NULL);
        INSERT INTO visitor (email, fecha_primera_visita, fecha_ultima_visita, visitas_totales,
                             visitas_anio_actual, visitas_mes_actual)
        VALUES ('ana@example.com', '2026-10-31', '2026-10-31', 1, 1, 1),
               ('luis@example.com', '2026-11-01', '2026-11-01', 1, 1, 1),
               (E'jose\\u0301@example.com', '2026-11-01', '2026-11-01', 1, 1, 1),
               ('eva@xn--mnchen-3ya.de', '2026-11-01', '2026-11-01', 1, 1, 1);
        INSERT INTO run_log (run_date, truncated) VALUES ('2026-11-01', true);""")


def test_a_database_of_the_first_released_schema_upgrades_with_its_data(env):
    with _connect(env.dsn, env.schema) as conn:
        _first_released_schema_with_data(conn)
        assert "id" in _columns(conn, env.schema, "statistics")
        assert migrations.version(conn, env.schema) == 1  # recognised without a version table

    Database(env.dsn, env.schema).connection().close()  # what any run does first

    with _connect(env.dsn, env.schema) as conn:
        assert conn.execute("SELECT version FROM visitas_schema").fetchall() == [(migrations.LATEST,)]
        assert "id" not in _columns(conn, env.schema, "statistics")
        assert {"extends", "lines_done", "head_sha256"} <= set(_columns(conn, env.schema, "load_log"))
        assert conn.execute("SELECT email, line_no, links FROM statistics ORDER BY line_no").fetchall() == [
            ("ana@example.com", 2, ["http://x.mx"]), ("luis@example.com", 4, None)]
        assert conn.execute("SELECT file_name, status, rows_read FROM load_log").fetchall() == [
            ("report_1.txt", "loaded", 3)]
        assert conn.execute("SELECT email, visitas_mes_actual FROM visitor_as_of(%s)"
                            " WHERE email LIKE '%%example.com' AND email NOT LIKE 'jose%%' ORDER BY email",
                            (dt.date(2026, 11, 30),)).fetchall() == [
            ("ana@example.com", 0), ("luis@example.com", 1)]
        # The README's query for visitor rows keyed by an old spelling (NFD, xn--).
        assert sorted(r[0] for r in conn.execute(
            "SELECT email FROM visitor WHERE email <> normalize(email, NFC) OR email LIKE '%xn--%'")) == [
            "eva@xn--mnchen-3ya.de", "jose\u0301@example.com"]
        conn.execute("INSERT INTO load_log (file_name, sha256, size_bytes, run_date, status,"
                     " started_at) VALUES ('report_2.txt', repeat('b', 64), 9, '2026-11-02',"
                     " 'failed', now())")  # the new status is allowed

    # And the pipeline loads into it: new rows beside the old ones, counters merged.
    manifest = env.generate(files=1, rows=100, defects=0.0)
    result = env.luigi("--date", "2026-11-03")
    assert result.returncode == 0, result.stderr[-3000:]
    assert env.query("SELECT count(*) FROM load_log WHERE status = 'loaded'") == [(2,)]
    # (statistics is emptied once per run date: the new date's rows only)
    assert env.query("SELECT count(*) FROM statistics") == [
        (manifest["files"]["report_1.txt"]["valid_rows"],)]
    assert env.query("SELECT count(*) FROM visitor WHERE email IN ('ana@example.com',"
                     " 'luis@example.com')") == [(2,)]
    # Engagement of visitors loaded before the counters existed is unknown (null), not zero;
    # visitors loaded since have it.
    assert env.query("SELECT count(*) FILTER (WHERE tasa_apertura IS NULL AND opens_totales IS NULL"
                     " AND fecha_ultimo_open IS NULL), count(*) FILTER (WHERE tasa_apertura"
                     " IS NOT NULL AND opens_totales IS NOT NULL) FROM visitor_engagement") == [
        (4, env.query("SELECT count(*) FROM visitor")[0][0] - 4)]


def test_the_statistics_table_is_the_contracts(pg_dsn, schema):
    """Migrations are SQL, written once; the contract's one definition of a statistics row is
    what they must have built (plus the load id every row carries)."""
    Database(pg_dsn, schema).connection().close()
    with _connect(pg_dsn, schema) as conn:
        columns = _columns(conn, schema, "statistics")
    expected = {name: sql_type for name, (_, sql_type) in contract.STATISTICS.items()}
    timestamp = "timestamp without time zone"
    assert columns == {**{k: timestamp if v == "timestamp" else v for k, v in expected.items()},
                       "load_id": "bigint"}


def test_migrations_run_once_per_version(pg_dsn, schema):
    Database(pg_dsn, schema).connection().close()
    with _connect(pg_dsn, schema) as conn:
        assert conn.execute("SELECT version FROM visitas_schema").fetchall() == [(migrations.LATEST,)]
        conn.execute("DROP VIEW visitor_today")

    # The newest version recorded: a new connection trusts it and leaves the schema alone.
    Database(pg_dsn, schema).connection().close()
    with _connect(pg_dsn, schema) as conn:
        assert conn.execute("SELECT to_regclass('visitor_today')").fetchone() == (None,)
        view_made_by = max(n for n, _, text in migrations.migrations() if "VIEW visitor_today" in text)
        conn.execute("UPDATE visitas_schema SET version = %s", (view_made_by - 1,))

    # Recorded as before the migration that makes the view: the migrations from there on run
    # again (they are re-runnable) and complete the schema.
    Database(pg_dsn, schema).connection().close()
    with _connect(pg_dsn, schema) as conn:
        assert conn.execute("SELECT to_regclass('visitor_today')").fetchone() != (None,)
        assert conn.execute("SELECT version FROM visitas_schema").fetchall() == [(migrations.LATEST,)]


def test_a_schema_newer_than_the_program_is_refused(pg_dsn, schema):
    Database(pg_dsn, schema).connection().close()
    with _connect(pg_dsn, schema) as conn:
        conn.execute("UPDATE visitas_schema SET version = %s", (migrations.LATEST + 1,))
    with pytest.raises(RuntimeError, match="newer than this program"):
        Database(pg_dsn, schema).connection()
