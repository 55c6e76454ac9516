"""The identity of this run (one `luigi` invocation), shared with forked worker processes."""

import os
import uuid

# Set once in the process that starts the run; forked workers inherit the environment.
RUN_ID = os.environ.setdefault("VISITAS_RUN_ID", uuid.uuid4().hex[:12])


def per_process(factory):
    """Memoise ``factory()`` for this process only: a connection made before Luigi forks a
    worker must not be used by the child (sockets and paramiko's thread do not cross a fork)."""
    made: dict[int, object] = {}

    def get():
        pid = os.getpid()
        if pid not in made:
            made.clear()
            made[pid] = factory()
        return made[pid]

    get.__doc__ = factory.__doc__
    return get
