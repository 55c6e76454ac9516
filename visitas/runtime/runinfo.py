"""The identity of this run (one `luigi` invocation), shared with forked worker processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_ENV = "VISITAS_RUN_ID"


def run_id() -> str:
    """This run's id: made by the first call in the process that starts the run, and kept in
    the environment, which Luigi's forked workers inherit."""
    return os.environ.setdefault(_ENV, uuid.uuid4().hex[:12])


def per_process(factory: Callable[[], T]) -> Callable[[], T]:
    """Memoise ``factory()`` for this process only: a connection made before Luigi forks a
    worker must not be used by the child (sockets and paramiko's thread do not cross a fork)."""
    made: dict[int, T] = {}

    def get() -> T:
        pid = os.getpid()
        if pid not in made:
            made.clear()
            made[pid] = factory()
        return made[pid]

    get.__doc__ = factory.__doc__
    return get
