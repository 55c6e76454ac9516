"""The identity of this run (one `luigi` invocation), shared with forked worker processes, and
handles kept per thread."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_ENV = "VISITAS_RUN_ID"


def run_id() -> str:
    """This run's id: made by the first call in the process that starts the run, and kept in
    the environment, which Luigi's forked workers inherit."""
    return os.environ.setdefault(_ENV, uuid.uuid4().hex[:12])


def per_thread(factory: Callable[[], T]) -> Callable[[], T]:
    """Memoise ``factory()`` per thread of this process.  Each execution slot of a worker (a thread,
    ``visitas run --workers N``) has its own connection, as a connection serves one step at a
    time; and a connection made before Luigi forks a step's process (a step with a timeout) is
    not used by the child (sockets and paramiko's thread do not cross a fork)."""
    made: dict[int, dict[int, T]] = {}  # process -> thread -> handle

    def get() -> T:
        pid = os.getpid()
        mine = made.get(pid)
        if mine is None:  # the first call in this process: a forked child drops its parent's
            mine = made.setdefault(pid, {})  # (single operations on a dict: safe in threads)
            for other in [p for p in list(made) if p != pid]:
                made.pop(other, None)
        thread = threading.get_ident()
        handle = mine.get(thread)
        if handle is None:
            handle = mine[thread] = factory()
        return handle

    get.__doc__ = factory.__doc__
    return get
