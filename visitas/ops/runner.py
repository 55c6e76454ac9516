"""``visitas run``: the pipeline for one run date, with exit codes that do not depend on the
configuration file, a row in ``run_history``, and the Prometheus textfile.

Luigi's own command exits 0 unless ``[retcode]`` says otherwise, so a config file without that
section would tell cron a refused host key was a success.  Here the codes are fixed (the same
numbers as the shipped ``luigi.cfg``), worked out from the worker's summary as Luigi does, and a
silence (``[notify] stale_after_hours``) exits with ``missing_data``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import time
from pathlib import Path

import luigi
import luigi.execution_summary
import luigi.interface
import luigi.scheduler

log = logging.getLogger(__name__)

# The exit codes of a run, whatever the configuration holds (the larger wins, as in Luigi).
RETCODES = {"already_running": 10, "missing_data": 20, "not_run": 25, "task_failed": 30,
            "scheduling_error": 35, "unhandled_exception": 40}
_SUMMARY_CODES = (("still_pending_ext", "missing_data"), ("failed", "task_failed"),
                  ("run_by_other_worker", "already_running"),
                  ("scheduling_error", "scheduling_error"), ("not_run", "not_run"))


@dataclasses.dataclass
class RunOutcome:
    """What one ``visitas run`` did, as run_history and the metrics file record it."""

    run_id: str
    host: str
    run_date: dt.date
    started_at: dt.datetime
    finished_at: dt.datetime
    exit_code: int
    silent: bool = False
    last_file_at: dt.datetime | None = None
    files: dict[str, int] = dataclasses.field(default_factory=dict)
    rows: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def outcome(self) -> str:
        if self.exit_code == 0:
            return "ok"
        return "silent" if self.silent and self.exit_code == RETCODES["missing_data"] else "failed"


def luigi_args(run_date: dt.date, workers: int, scheduler_host: str | None,
               scheduler_port: int | None) -> list[str]:
    args = ["--module", "visitas", "RunAll", "--date", run_date.isoformat(), "--workers", str(workers)]
    if scheduler_host:
        args += ["--scheduler-host", scheduler_host]
        if scheduler_port:
            args += ["--scheduler-port", str(scheduler_port)]
    else:
        args.append("--local-scheduler")
    return args


def exit_code_of(worker: luigi.worker.Worker) -> int:
    """The worker's summary -> an exit code (Luigi's rules, visitas' numbers)."""
    tasks = luigi.execution_summary._summary_dict(worker)
    root = luigi.execution_summary._root_task(worker)
    code = max([RETCODES[name] for status, name in _SUMMARY_CODES if tasks.get(status)] + [0])
    if code == 0 and root not in tasks["completed"] and root not in tasks["already_done"]:
        return RETCODES["not_run"]
    return code


class LocalScheduler(luigi.scheduler.Scheduler):
    """Luigi's local scheduler, without two walks over the whole task graph per task run.

    Each walk costs O(tasks) on every request for work, so a run's scheduling grew with the
    square of its files (measured on a graph of 200 files with steps that do nothing: 12.5 ms
    per file, 6.0 without the walks):

    - Luigi makes its local scheduler prune the graph on every request (luigid prunes on a
      timer).  Here it prunes at most once a second: pruning is what turns a failed task back
      to pending after ``retry_delay``, and a second later is soon enough for that.
    - Counting the pending tasks, it walks up from each one to see whether a task it depends on
      is disabled.  While no task is disabled, none is: the walk is skipped.
    """

    PRUNE_EVERY = 1.0
    _pruned = float("-inf")
    _walk_upstream = True

    def count_pending(self, worker):
        if self._state.get_active_task_count_for_status(luigi.scheduler.DISABLED):
            return super().count_pending(worker)
        self._walk_upstream = False
        try:
            return super().count_pending(worker)
        finally:
            self._walk_upstream = True

    def _upstream_status(self, task_id, upstream_status_table):
        if not self._walk_upstream:
            return ""  # not disabled: the one status count_pending asks about
        return super()._upstream_status(task_id, upstream_status_table)

    def get_work(self, *args, **kwargs):
        now = time.monotonic()
        if now - self._pruned >= self.PRUNE_EVERY:
            self._pruned = now
            self.prune()
        return super().get_work(*args, **kwargs)


class _SchedulerFactory(luigi.interface._WorkerSchedulerFactory):
    def create_local_scheduler(self):
        return LocalScheduler(prune_on_get_work=False, record_task_history=False)


def run_pipeline(args: list[str]) -> int:
    """Run the Luigi graph in this process; the exit code."""
    try:
        result = luigi.interface.run(args, worker_scheduler_factory=_SchedulerFactory(),
                                     detailed_summary=True)
    except luigi.interface.PidLockAlreadyTakenExit:
        log.error("a run with the same arguments is already going: this one exits")
        return RETCODES["already_running"]
    except Exception:
        log.exception("the run could not be scheduled")
        return RETCODES["unhandled_exception"]
    return exit_code_of(result.worker)


def run(run_date: dt.date, workers: int = 1, scheduler_host: str | None = None,
        scheduler_port: int | None = None) -> int:
    """The whole run: the graph, then the silence verdict, run_history and the metrics file."""
    from visitas import config
    from visitas.ops import runmail
    from visitas.runtime import logsetup, runinfo

    logsetup.configure()
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    code = run_pipeline(luigi_args(run_date, workers, scheduler_host, scheduler_port))
    silence = runmail.silence_of(runmail.read_events())
    if silence:
        code = max(code, RETCODES["missing_data"])
    outcome = RunOutcome(runinfo.run_id(), config.cluster().resolved_host(), run_date, started,
                         started + dt.timedelta(seconds=time.monotonic() - clock), code,
                         silent=bool(silence))
    try:
        record(outcome)
    except Exception as error:  # the run's own exit code says what went wrong
        log.error("could not record the run in run_history: %s", logsetup.mask(str(error)))
    metrics_file = config.paths().metrics_file
    if metrics_file:
        try:
            write_metrics(Path(metrics_file).expanduser(), outcome)
        except OSError as error:
            log.error("could not write the metrics file %s: %s", metrics_file, error)
    log.info("run %s for %s ended: exit code %d (%s)", outcome.run_id, run_date, code, outcome.outcome)
    return code


RUN_COUNTS = """
SELECT count(*) FILTER (WHERE status = 'loaded'), count(*) FILTER (WHERE status = 'rejected'),
       count(*) FILTER (WHERE status = 'duplicate'), count(*) FILTER (WHERE status = 'failed'),
       coalesce(sum(rows_loaded), 0), coalesce(sum(rows_rejected), 0)
FROM {schema}.load_log WHERE run_id = %s
"""


def record(outcome: RunOutcome) -> None:
    """This run's counts from load_log, written to run_history (and kept in ``outcome``)."""
    from visitas import db

    database = db.database()

    def write(conn):
        row = conn.execute(database.q(RUN_COUNTS), (outcome.run_id,)).fetchone()
        outcome.files = dict(zip(("loaded", "rejected", "duplicate", "failed"), row[:4], strict=True))
        outcome.rows = {"loaded": row[4], "rejected": row[5]}
        last = conn.execute(database.q("SELECT max(started_at) FROM {schema}.load_log")).fetchone()
        outcome.last_file_at = last[0] if last else None
        conn.execute(database.q(
            "INSERT INTO {schema}.run_history (run_id, host, run_date, started_at, finished_at,"
            " exit_code, outcome, files_loaded, files_rejected, files_duplicate, files_failed,"
            " rows_loaded, rows_rejected, silent, last_file_at) VALUES (%s, %s, %s, %s, %s, %s,"
            " %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_id) DO UPDATE SET"
            " finished_at = excluded.finished_at, exit_code = excluded.exit_code,"
            " outcome = excluded.outcome"),
            (outcome.run_id, outcome.host, outcome.run_date, outcome.started_at,
             outcome.finished_at, outcome.exit_code, outcome.outcome, *row, outcome.silent,
             outcome.last_file_at))

    database.run("recording the run", write)


def last_success(host: str) -> dt.datetime | None:
    from visitas import db

    database = db.database()
    row = database.fetch_one("reading run_history", "SELECT max(finished_at) FROM"
                             " {schema}.run_history WHERE host = %s AND exit_code = 0", (host,))
    return row[0] if row else None


_PREVIOUS_SUCCESS = re.compile(r"^visitas_last_success_timestamp_seconds\{[^}]*\} (\S+)$", re.M)


def write_metrics(path: Path, outcome: RunOutcome) -> None:
    """The Prometheus textfile (node_exporter's textfile collector): written whole, then renamed."""
    try:
        success = last_success(outcome.host)
        success_ts = success.timestamp() if success else None
    except Exception:  # the database is down: keep the last known value
        previous = _PREVIOUS_SUCCESS.search(path.read_text()) if path.exists() else None
        success_ts = float(previous.group(1)) if previous else None
    host = outcome.host.replace("\\", "\\\\").replace('"', '\\"')
    label = f'host="{host}"'
    lines: list[str] = []

    def gauge(name: str, help_text: str, values: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge"])
        lines.extend(f"{name}{{{label}{extra}}} {value:g}" if isinstance(value, int)
                     else f"{name}{{{label}{extra}}} {value:.3f}" for extra, value in values)

    gauge("visitas_last_run_timestamp_seconds", "End of the last visitas run (Unix time).",
          [("", outcome.finished_at.timestamp())])
    if success_ts is not None:
        gauge("visitas_last_success_timestamp_seconds", "End of the last run that exited 0.",
              [("", success_ts)])
    gauge("visitas_last_run_exit_code", "Exit code of the last run (0: success).",
          [("", outcome.exit_code)])
    gauge("visitas_last_run_duration_seconds", "Duration of the last run.",
          [("", (outcome.finished_at - outcome.started_at).total_seconds())])
    gauge("visitas_last_run_files", "Files handled by the last run, by status.",
          [(f',status="{s}"', int(n)) for s, n in outcome.files.items()])
    gauge("visitas_last_run_rows", "Rows of the last run, by status.",
          [(f',status="{s}"', int(n)) for s, n in outcome.rows.items()])
    gauge("visitas_last_run_silent", "1 when the last run found no file for longer than"
          " [notify] stale_after_hours.", [("", int(outcome.silent))])
    if outcome.last_file_at is not None:
        gauge("visitas_last_file_received_timestamp_seconds", "When the newest file was received.",
              [("", outcome.last_file_at.timestamp())])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text("\n".join(lines) + "\n")
    os.chmod(partial, 0o644)  # read by node_exporter, which runs as another user
    os.replace(partial, path)
