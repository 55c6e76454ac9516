"""visitas: daily ETL of website-visit reports (SFTP -> validation -> PostgreSQL).

``luigi --module visitas RunAll`` finds the tasks here.  Importing the package reads no
configuration; logging is set up when the first task is created (``visitas.logsetup``).
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
