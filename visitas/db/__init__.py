"""PostgreSQL: the connection (:mod:`.connection`), schema migrations (:mod:`.schema`), the load
log and its Luigi targets (:mod:`.loadlog`), one file's load (:mod:`.loader`) and the COPY text
format (:mod:`.copy_format`).

Each thread has its own handles: an execution slot's steps use one connection, and a
connection does not survive Luigi's fork of a step's process.
"""

from visitas.db.claims import Claims, Renewals
from visitas.db.connection import Database
from visitas.db.loader import Loader
from visitas.db.loadlog import LoadLog, LoadLogTarget, RunLogTarget
from visitas.db.locks import LOCK_FILE, LOCK_RUN, LOCK_SCHEMA, LOCK_VISITORS
from visitas.runtime.runinfo import per_thread

__all__ = ["Claims", "LOCK_FILE", "LOCK_RUN", "LOCK_SCHEMA", "LOCK_VISITORS", "Database", "LoadLog",
           "LoadLogTarget", "Loader", "Renewals", "RunLogTarget", "database", "load_log", "loader"]


@per_thread
def database() -> Database:
    """This thread's database handle."""
    return Database.from_config()


def load_log() -> LoadLog:
    return LoadLog(database())


def loader() -> Loader:
    return Loader(database())


def claims() -> Claims:
    """Claims of this host and run on the files at the source."""
    from visitas import config
    from visitas.runtime import runinfo

    settings = config.cluster()
    return Claims(database(), settings.resolved_host(), runinfo.run_id(), settings.claim_lease)
