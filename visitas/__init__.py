"""visitas: daily ETL of website-visit reports (SFTP -> validation -> PostgreSQL).

``luigi --module visitas RunAll`` finds the tasks here.  Importing the package reads no
configuration and changes nothing: the first task created calls ``visitas.runtime.setup``.
docs/architecture.md maps the package.
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
