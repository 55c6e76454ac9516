"""The one initialisation of a visitas process, called when its first task is created.

Importing any visitas module changes nothing; this sets up, once per process: the run id (in
the environment, so that Luigi's forked workers share it), logging (stderr and the rotating
file, secrets masked), and the Luigi event handlers (failures for the run mail, task times).
"""

from __future__ import annotations

import logging

import luigi

from visitas.runtime import logsetup, runinfo

log = logging.getLogger(__name__)
_configured = False


def configure() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    runinfo.run_id()
    logsetup.configure()
    from visitas.ops import runmail

    runmail.register_handlers()
    luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)(_log_processing_time)


def _log_processing_time(task: luigi.Task, seconds: float) -> None:
    log.info("task %s took %.3fs", task, seconds)  # ms: a small file's steps take a few
