"""Claims against a real PostgreSQL: a renewal made while a load's transaction is open commits by
itself, and leaves that transaction's settings alone."""

import psycopg
from psycopg import sql

from visitas.db import Claims, Database


def _lease_until(dsn: str, schema: str, file_name: str):
    with psycopg.connect(dsn) as other:  # another host's view
        return other.execute(sql.SQL("SELECT lease_until FROM {}.file_claims WHERE file_name = %s")
                             .format(sql.Identifier(schema)), (file_name,)).fetchone()[0]


def test_a_renewal_during_a_load_is_seen_at_once_and_the_load_still_commits_durably(pg_dsn, schema):
    database = Database(pg_dsn, schema)
    claims = Claims(database, "host-a", "run-1", lease=900)
    try:
        assert claims.claim("report_1.txt").mine
        claimed = _lease_until(pg_dsn, schema, "report_1.txt")
        conn = database.connection()
        with conn.transaction():  # a load of the file, under way on the process's connection
            conn.execute("SELECT pg_sleep(0.01)")
            claims.renew("report_1.txt")  # as the renewal thread does while the step runs
            assert _lease_until(pg_dsn, schema, "report_1.txt") > claimed
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    finally:
        database.close()
        database.close_apart()
