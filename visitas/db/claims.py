"""Claims on the files at the source: each file wholly on one host.

A host claims a file before it downloads it (``file_claims``, one row per file name) and holds
the claim, renewing its lease, until the file is archived and removed; then it deletes the row.
A live claim of another host means: not this host's file, this run.  A claim whose lease ran out
(its host died or hung) is taken over by whoever asks next; so is one of this host's own earlier
runs (a host runs one `visitas` at a time: Luigi's process lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator

from visitas.db.connection import Database

log = logging.getLogger(__name__)

CLAIM = """
INSERT INTO {schema}.file_claims AS c (file_name, host, run_id, lease_until)
VALUES (%(file)s, %(host)s, %(run_id)s, now() + %(lease)s * interval '1 second')
ON CONFLICT (file_name) DO UPDATE SET host = excluded.host, run_id = excluded.run_id,
    claimed_at = now(), lease_until = excluded.lease_until
WHERE c.lease_until < now() OR c.run_id = excluded.run_id OR c.host = excluded.host
RETURNING c.host
"""


# A claim is a lease, not data: exactly once rests on the load's own transaction.  Its writes
# need not wait for the WAL to reach the disk (a crash may lose a renewal, which at worst lets
# another host take the file over sooner).  Measured: with fsync on, waiting cost about 30 ms
# per file of 1,000 rows (five steps, a claim each), a quarter of its time.
_NO_WAIT = "SET LOCAL synchronous_commit = off"


# (schema, file, run id) -> when this process last took or renewed that claim (monotonic).  A
# claim held for less than half its lease cannot have expired, so nobody can have taken it: the
# next step in the same process skips the database (with one worker, every step of a file).
_held: dict[tuple[str, str, str], float] = {}


class ClaimLost(RuntimeError):
    """This host's claim on a file expired and another host took the file over."""


@dataclasses.dataclass(frozen=True)
class Claim:
    mine: bool
    holder: str


class Claims:
    def __init__(self, database: Database, host: str, run_id: str, lease: float):
        self.db, self.host, self.run_id, self.lease = database, host, run_id, lease

    def _key(self, file_name: str) -> tuple[str, str, str]:
        return (self.db.schema, file_name, self.run_id)

    def claim(self, file_name: str) -> Claim:
        """Claim ``file_name`` for this host, unless another host holds a live claim on it."""
        held = _held.get(self._key(file_name))
        if held is not None and time.monotonic() - held < self.lease / 2:
            return Claim(True, self.host)
        params = {"file": file_name, "host": self.host, "run_id": self.run_id, "lease": self.lease}
        asked = time.monotonic()

        def attempt(conn) -> Claim:
            conn.execute(_NO_WAIT)
            if conn.execute(self.db.q(CLAIM), params).fetchone():
                return Claim(True, self.host)
            row = conn.execute(self.db.q("SELECT host FROM {schema}.file_claims WHERE file_name = %s"),
                               (file_name,)).fetchone()
            return Claim(False, row[0] if row else "?")

        claim = self.db.run(f"claiming {file_name}", attempt)
        if claim.mine:
            _held[self._key(file_name)] = asked
        return claim

    def renew(self, file_name: str) -> None:
        """Extend this host's lease; ClaimLost if the file is no longer this host's."""
        def renew(conn) -> int:
            conn.execute(_NO_WAIT)
            return conn.execute(self.db.q(
                "UPDATE {schema}.file_claims SET lease_until = now() + %s * interval '1 second'"
                " WHERE file_name = %s AND run_id = %s"), (self.lease, file_name, self.run_id)).rowcount

        asked = time.monotonic()
        # Apart: a renewal comes while the step works, perhaps inside its load's transaction.
        renewed = self.db.run_apart(f"renewing the claim on {file_name}", renew)
        if not renewed:
            _held.pop(self._key(file_name), None)
            raise ClaimLost(f"{file_name}: this host's claim expired and another host took the file"
                            " over (raise [cluster] claim_lease if steps take longer than it)")
        _held[self._key(file_name)] = asked

    def release(self, file_name: str) -> None:
        def release(conn) -> None:
            conn.execute(_NO_WAIT)
            conn.execute(self.db.q("DELETE FROM {schema}.file_claims WHERE file_name = %s AND run_id = %s"),
                         (file_name, self.run_id))

        _held.pop(self._key(file_name), None)
        self.db.run(f"releasing {file_name}", release)


class Renewals:
    """Keeps the claims of the steps running in this process alive: one thread renews each of
    them every third of its lease until its step ends.

    (A thread of its own per step cost about 0.4 ms to start and join, five times per file.)
    A renewal runs under the lock, so a step that ends waits for one in flight, and none starts
    for it afterwards.
    """

    def __init__(self) -> None:
        self._forget()
        os.register_at_fork(after_in_child=self._forget)  # the thread does not cross a fork

    def _forget(self) -> None:
        self._lock = threading.Condition()
        self._active: dict[str, tuple[Claims, float]] = {}  # file -> claims, next renewal
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def holding(self, claims: Claims, file_name: str) -> Iterator[None]:
        """Renew the claim on ``file_name`` every third of its lease while the block runs."""
        with self._lock:
            self._active[file_name] = (claims, time.monotonic() + claims.lease / 3)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="claim-renewals",
                                                daemon=True)
                self._thread.start()
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._active.pop(file_name, None)

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                due = [(name, claims) for name, (claims, at) in self._active.items() if at <= now]
                for file_name, claims in due:
                    try:
                        claims.renew(file_name)
                    except Exception as error:  # the next step's claim says if the file is ours
                        log.warning("could not renew the claim on %s: %s", file_name, error)
                    self._active[file_name] = (claims, time.monotonic() + claims.lease / 3)
                upcoming = [at for _, at in self._active.values()]
                self._lock.wait(max(min(upcoming) - time.monotonic(), 0) if upcoming else None)
