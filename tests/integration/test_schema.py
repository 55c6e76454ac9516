"""The schema DDL runs once per version, not once per connection."""

import psycopg

from visitas import db


def _view_exists(dsn, schema) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass(%s)", (f"{schema}.visitor_today",)).fetchone()[0] is not None


def test_ddl_runs_when_the_recorded_version_is_not_this_one(pg_dsn, schema):
    first = db.Database(pg_dsn, schema)
    first.connection()
    first.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f"SELECT version FROM {schema}.visitas_schema").fetchall() == [
            (db.SCHEMA_VERSION,)]
        conn.execute(f"DROP VIEW {schema}.visitor_today")

    # Same version recorded: a new connection trusts it and leaves the schema alone.
    second = db.Database(pg_dsn, schema)
    second.connection()
    second.close()
    assert not _view_exists(pg_dsn, schema)

    # Another version recorded (an older program made the schema): the DDL completes it.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f"UPDATE {schema}.visitas_schema SET version = version - 1")
    third = db.Database(pg_dsn, schema)
    third.connection()
    third.close()
    assert _view_exists(pg_dsn, schema)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f"SELECT version FROM {schema}.visitas_schema").fetchall() == [
            (db.SCHEMA_VERSION,)]
