"""The connection to PostgreSQL (psycopg 3): connect, retry, and classify the driver's errors.

Driver errors are classified here, where the client meets the database: connection failures
are transient (retried with backoff, :mod:`visitas.runtime.retrying`), a malformed DSN is a
configuration error, and no error text leaves with a secret in it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeGuard

import psycopg
from psycopg import sql
from psycopg.abc import Params

from visitas.db.schema import migrate
from visitas.runtime import logsetup, retrying

log = logging.getLogger(__name__)

# libpq keepalives: a server that vanishes without closing the connection (a host down, a
# network cut) is noticed within about a minute instead of never.
KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}


def _q(template: str, schema: str) -> sql.Composed:
    return sql.SQL(template).format(schema=sql.Identifier(schema))


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
        self._apart: psycopg.Connection | None = None
        self._schema_ready = False

    @classmethod
    def from_config(cls, schema: str | None = None) -> Database:
        """The configured database; ``schema`` instead of ``[postgres] schema`` if given."""
        from visitas.config import postgres

        cfg = postgres()
        return cls(cfg.resolved_dsn(), schema or cfg.schema, retrying.from_config(), cfg.lock_wait)

    def __repr__(self) -> str:  # never the DSN: it may hold a password
        return f"Database(schema={self.schema!r})"

    def q(self, template: str) -> sql.Composed:
        return _q(template, self.schema)

    def connection(self) -> psycopg.Connection:
        if _usable(self._conn):
            return self._conn
        self.close()
        self._conn = conn = self._connect()
        if not self._schema_ready:
            migrate(conn, self.schema)
            self._schema_ready = True
        return conn

    def probe(self) -> psycopg.Connection:
        """A connection of its own, without migrating anything (``visitas check``); the caller
        closes it (``with``)."""
        conn = self._connect()
        conn.autocommit = True
        return conn

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
            raise psycopg.OperationalError(logsetup.mask(str(error), self.secrets())) from None

    def secrets(self) -> list[str]:
        return logsetup.dsn_secrets(self._dsn)

    def close(self) -> None:
        _close(self._conn)
        self._conn = None

    def close_apart(self) -> None:
        _close(self._apart)
        self._apart = None

    def run(self, what: str, work: Callable[[psycopg.Connection], object]):
        """Run ``work(conn)`` in one transaction, retried whole on a connection failure."""
        return self._run(what, work, self.connection, self.close)

    def run_apart(self, what: str, work: Callable[[psycopg.Connection], object]):
        """:meth:`run` on a second connection of this handle's own, for work that must commit
        by itself while another thread may be inside a transaction on the first (a claim
        renewed during a load: on the load's connection it would be a savepoint of the load,
        seen by no other host until its commit, and its ``SET LOCAL`` would apply to that
        commit)."""
        return self._run(what, work, self._apart_connection, self.close_apart)

    def _apart_connection(self) -> psycopg.Connection:
        if _usable(self._apart):
            return self._apart
        self.close_apart()
        self._apart = conn = self._connect()
        return conn

    def _run(self, what: str, work: Callable[[psycopg.Connection], object],
             connection: Callable[[], psycopg.Connection], close: Callable[[], None],
             single: bool = False):
        """``work(conn)`` in a transaction, or (``single``: one statement) in autocommit, where
        the statement is its own transaction: one round trip instead of three (BEGIN and COMMIT
        are round trips of their own; measured 0.30 -> 0.11 ms per statement, and a small file
        has five such statements)."""
        def attempt():
            conn = connection()
            if not single:
                with conn.transaction():  # (a psycopg.Rollback in work ends here: None)
                    return work(conn)
                return None
            conn.autocommit = True
            try:
                return work(conn)
            finally:
                if _usable(conn):
                    conn.autocommit = False

        return retrying.retry_call(what, attempt, on_retry=close, **self.retry)

    def fetch_one(self, what: str, template: str, params: tuple) -> tuple | None:
        """The first row of one statement, run as a transaction of its own."""
        return self._run(what, lambda conn: conn.execute(self.q(template), params).fetchone(),
                         self.connection, self.close, single=True)

    def execute(self, what: str, template: str, params: tuple) -> None:
        """One statement, committed as a transaction of its own."""
        self._run(what, lambda conn: conn.execute(self.q(template), params), self.connection,
                  self.close, single=True)

    # ------------------------------------------------------------------ markers


def _usable(conn: psycopg.Connection | None) -> TypeGuard[psycopg.Connection]:
    return conn is not None and not conn.closed and not conn.broken


def _close(conn: psycopg.Connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass


def scalar(conn: psycopg.Connection, query: str | sql.SQL | sql.Composed, params: Params = ()) -> Any:
    """The first column of the one row ``query`` returns (a LookupError if none)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError("the query returned no row")
    return row[0]
