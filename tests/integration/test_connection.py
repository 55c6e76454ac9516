"""The database handle against a real PostgreSQL: one statement is a transaction of its own."""

import psycopg
from psycopg import sql

from visitas.db import Database


def test_a_single_statement_commits_alone_and_transactions_go_on_after_it(pg_dsn, schema):
    database = Database(pg_dsn, schema)
    try:
        database.run("a table", lambda conn: conn.execute(
            sql.SQL("CREATE TABLE {}.marks (n int)").format(sql.Identifier(schema))))
        database.execute("marking", "INSERT INTO {schema}.marks VALUES (%s)", (1,))
        with psycopg.connect(pg_dsn) as other:  # committed: another session sees it
            assert other.execute(sql.SQL("SELECT n FROM {}.marks").format(
                sql.Identifier(schema))).fetchall() == [(1,)]
        assert database.fetch_one("reading", "SELECT count(*) FROM {schema}.marks", ()) == (1,)

        def undone(conn: psycopg.Connection) -> None:
            conn.execute(sql.SQL("INSERT INTO {}.marks VALUES (2)").format(sql.Identifier(schema)))
            raise psycopg.Rollback  # the connection is back to transactions: this is undone
        database.run("a transaction", undone)
        assert database.fetch_one("reading", "SELECT count(*) FROM {schema}.marks", ()) == (1,)
        assert not database.connection().autocommit
    finally:
        database.close()
