"""visitas: daily ETL of website-visit reports (SFTP -> validation -> PostgreSQL).

``luigi --module visitas RunAll`` finds the tasks here.
"""

from visitas.tasks import (  # noqa: F401 - the names Luigi resolves on the command line
    ArchiveZip,
    DownloadReport,
    LoadPostgres,
    PrepareRun,
    RunAll,
    SplitVisitorStats,
    ValidateReport,
)
from visitas import logsetup as _logsetup

_logsetup.configure()
