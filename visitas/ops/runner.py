"""``visitas run``: the pipeline for one run date, with exit codes that do not depend on the
configuration file, a row in ``run_history``, and the Prometheus textfile.

Luigi's own command exits 0 unless ``[retcode]`` says otherwise, so a config file without that
section would tell cron a refused host key was a success.  Here the codes are fixed (the same
numbers as the shipped ``luigi.cfg``), worked out from the worker's summary as Luigi does, and a
silence (``[notify] stale_after_hours``) exits with ``missing_data``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import logging
import multiprocessing
import os
import queue
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import luigi
import luigi.execution_summary
import luigi.interface
import luigi.scheduler
import luigi.worker

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
    """Luigi's local scheduler, without its walks over the whole task graph per task run.

    Luigi's scheduler serves many workers sharing resources: on each request for work it prunes
    the graph, sorts every pending task by priority, checks them for resources, then counts
    them, walking up from each one to see whether a task it depends on is disabled.  That is
    several passes over every task per task run: a run's scheduling grew with the square of its
    files, and each pass is slow in a real run, where the task that just ran has pushed the
    scheduler's objects out of the processor's caches (measured, 200 files of 1,000 rows: 8.4 ms
    per file in ``get_work``; 0.3 ms a call for the same 1,000 tasks in a loop).

    ``visitas run`` has one worker, no resources and no batches.  For it:

    - the graph is pruned at most once a second (pruning is what turns a failed task back to
      pending after ``retry_delay``; a second later is soon enough);
    - the tasks are kept sorted by priority (then age), as Luigi sorts them, and sorted again
      only when one is added or removed or its priority rises; the next task is the first
      pending one whose dependencies are done — Luigi's choice — found from the first task
      not yet done;
    - while no task is disabled and every task is this worker's alone, the pending tasks are
      counted by status, without a walk (no task waits on a disabled one).

    Anything else (an assistant, a paused scheduler, a task with resources, a batcher, a task
    of another worker, a running task this worker no longer reports) gets Luigi's own answer.
    """

    PRUNE_EVERY = 1.0
    _pruned = float("-inf")
    _order: list | None = None  # every task, highest rank first; None: to be sorted again
    _done_before = 0  # tasks of _order before this index are done
    _solo: str | None = None  # the worker whose tasks are all the tasks
    _plain = True  # no worker ever added a task with resources

    def add_task(self, *args, **kwargs):
        worker_id = kwargs.get("worker")
        known = self._state.get_task(kwargs.get("task_id"))
        was_done = known is not None and known.status == luigi.scheduler.DONE
        tasks = self._state.get_active_task_count_for_status(None)
        result = super().add_task(*args, **kwargs)
        if self._state.get_active_task_count_for_status(None) != tasks:
            self._order = None  # a task was added
        task = self._state.get_task(kwargs.get("task_id"))
        if was_done and task is not None and task.status != luigi.scheduler.DONE:
            self._done_before = 0
        if kwargs.get("resources"):
            self._plain = False
        if self._solo is None:
            self._solo = worker_id
        if worker_id != self._solo or (task is not None and task.status in _PENDING_STATES
                                       and list(task.workers) != [worker_id]):
            self._solo = ""  # for good: counts take Luigi's way
        return result

    def _update_priority(self, task, prio, worker):
        before = task.priority
        super()._update_priority(task, prio, worker)
        if task.priority != before:
            self._order = None

    def prune(self):
        super().prune()
        self._order = None  # tasks removed, failed ones pending again
        self._done_before = 0
        if self._solo and self._solo not in self._state.get_worker_ids():
            self._solo = ""

    def count_pending(self, worker):
        state = self._state
        if (worker != self._solo
                or state.get_active_task_count_for_status(luigi.scheduler.DISABLED)):
            return super().count_pending(worker)
        running_tasks = []
        for task in state.get_active_tasks_by_status(luigi.scheduler.RUNNING):
            other = state.get_worker(task.worker_running)
            if other is not None:
                running_tasks.append({"task_id": task.id, "worker": str(other), **other.info})
        pending = sum(state.get_active_task_count_for_status(status) for status in _PENDING_STATES)
        return {"n_pending_tasks": pending, "n_unique_pending": pending,
                "n_pending_last_scheduled": pending,
                "worker_state": state.get_worker(worker).state, "running_tasks": running_tasks}

    def get_work(self, host=None, assistant=False, current_tasks=None, worker=None, **kwargs):
        now = time.monotonic()
        if now - self._pruned >= self.PRUNE_EVERY:
            self._pruned = now
            self.prune()
        best = None if assistant or self._paused else self._next_task(worker, current_tasks)
        if best is None:
            return super().get_work(host=host, assistant=assistant, current_tasks=current_tasks,
                                    worker=worker, **kwargs)
        self._update_worker(worker, worker_reference={"host": host}, get_work=True)
        reply = self.count_pending(worker)
        reply["task_id"] = None
        if best is not _NOTHING:  # start it, as Luigi does
            self.update_metrics_task_started(best)
            self._state.set_status(best, luigi.scheduler.RUNNING, self._config)
            best.worker_running = worker
            best.resources_running = {}
            best.time_running = time.time()
            self._update_task_history(best, luigi.scheduler.RUNNING, host=host)
            reply.update(task_id=best.id, task_family=best.family,
                         task_module=getattr(best, "module", None), task_params=best.params)
        return reply

    def _next_task(self, worker_id, current_tasks):
        """The task Luigi would hand out next, ``_NOTHING`` if none, or None where the answer
        needs Luigi's own scheduling."""
        state = self._state
        if not (self._plain and state.get_worker(worker_id).enabled) or state._task_batchers:
            return None
        if current_tasks is not None and any(
                task.worker_running == worker_id and task.id not in current_tasks
                for task in state.get_active_tasks_by_status(luigi.scheduler.RUNNING)):
            return None
        if self._order is None:
            self._order = sorted(state.get_active_tasks(), key=self._rank, reverse=True)
            self._done_before = 0
        order, first = self._order, self._done_before
        while first < len(order) and order[first].status == luigi.scheduler.DONE:
            first += 1
        self._done_before = first
        for task in itertools.islice(order, first, None):
            if (task.status == luigi.scheduler.PENDING and worker_id in task.workers
                    and self._schedulable(task)):
                return task
        return _NOTHING


# No task for the worker now.
_NOTHING = object()
# The states count_pending counts.
_PENDING_STATES = (luigi.scheduler.PENDING, luigi.scheduler.FAILED)


class _ResultQueue:
    """Where a worker's task runs leave their results: a list for those run in this process (inline,
    or in one of the worker's threads), a multiprocessing queue for those run in a child process
    (a step with a timeout).

    Luigi hands every result over through a multiprocessing queue, even that of a task it ran
    in its own process and has just finished: a feeder thread, a pipe, a wake-up.  Measured, 200
    files of 1,000 rows, two runs each: Luigi's handling of the results 1.37 ms per file, 0.68
    with the list."""

    # While steps run in threads, how often a child process's result is looked for (a thread's
    # result wakes the worker at once; a child's, rare, only at the next look).
    CHILD_POLL = 0.02

    def __init__(self, children: multiprocessing.Queue) -> None:
        self._pid = os.getpid()
        self._here: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._children = children
        self.threaded = False  # set when steps may finish in other threads of this process

    def put(self, result) -> None:
        if os.getpid() == self._pid:
            with self._ready:
                self._here.append(result)
                self._ready.notify()
        else:  # a task process Luigi forked
            self._children.put(result)

    def get(self, timeout: float | None = None):
        if self._here:
            return self._here.popleft()
        if not self.threaded:  # the steps run inline: only a child's result can still come
            return self._children.get(timeout=timeout)
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        with self._ready:
            while not self._here:
                try:
                    return self._children.get_nowait()
                except queue.Empty:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                self._ready.wait(min(left, self.CHILD_POLL))
            return self._here.popleft()

    def close(self) -> None:
        self._children.close()


class _ThreadedStep:
    """A step run in one of the worker's threads, with what Luigi's worker asks of a task
    process: ``start``, ``is_alive``, ``exitcode``, ``terminate``."""

    use_multiprocessing = True  # Luigi's worker: start() it rather than run() it inline
    timeout_time = None  # a step with a timeout runs in a process (a thread cannot be stopped)
    exitcode = None  # TaskProcess.run reports every outcome itself, a failure included

    def __init__(self, step: luigi.worker.TaskProcess, slots: ThreadPoolExecutor) -> None:
        self._step = step
        self._slots = slots
        self._running: Future | None = None
        self.task = step.task
        self.worker_timeout = step.worker_timeout

    def start(self) -> None:
        self._running = self._slots.submit(self._step.run)

    def is_alive(self) -> bool:
        return self._running is not None and not self._running.done()

    def terminate(self) -> None:
        # Only when the worker stops with steps still running (an error in the worker itself):
        # a thread cannot be stopped from outside; the worker waits for it as it exits.
        log.warning("%s is still running: waiting for it to end", self.task)


# The most threads a run's steps get (see _Worker._create_task_process).
MAX_SLOTS = 64


class _Worker(luigi.worker.Worker):
    """Luigi's worker; with ``--workers N`` above 1 it runs the steps in N threads of this process.

    Luigi runs each task of a multi-worker run in a new process, which connects to the SFTP
    server and the database anew and warms Polars up again: on two cores, 200 files of 1,000
    rows took three times as long with two workers as with one.  In threads, each slot keeps its
    connections for the whole run (:func:`visitas.runtime.runinfo.per_thread`), and one file's
    step overlaps another's where either waits for the database, the disk or the network, or
    works in Polars, which releases the GIL.  A step with a timeout (``[worker] timeout``, a
    task's ``worker_timeout``) still runs in a process of its own, which Luigi can stop; so does
    every step under ``[worker] force_multiprocessing``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Luigi's private attribute: read by _handle_next_task, written by the task processes and
        # _purge_children (held to Luigi's own queue by tests/unit/ops/test_runner.py).  Its queue
        # stays, for the steps run in a child process.
        self._task_result_queue = _ResultQueue(self._task_result_queue)
        self._slots: ThreadPoolExecutor | None = None

    def _create_task_process(self, task):
        step = super()._create_task_process(task)
        if (self.worker_processes <= 1 or self._config.force_multiprocessing
                or step.timeout_time is not None):
            return step  # Luigi's way: inline with one worker, else a process of its own
        if self._slots is None:
            # A thread is made when a step finds none idle, so a run has as many as the steps it
            # ran at once: Luigi's worker runs no more steps than its count, which luigid may
            # raise while the run goes on (up to MAX_SLOTS threads, or the count at the first
            # step if larger) or lower (a thread then stays idle).
            self._slots = ThreadPoolExecutor(max(MAX_SLOTS, self.worker_processes),
                                             thread_name_prefix="slot")
            self._task_result_queue.threaded = True
        step.use_multiprocessing = False
        return _ThreadedStep(step, self._slots)

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._slots is not None:
                self._slots.shutdown(wait=True)


class _SchedulerFactory(luigi.interface._WorkerSchedulerFactory):
    def create_local_scheduler(self):
        return LocalScheduler(prune_on_get_work=False, record_task_history=False)

    def create_worker(self, scheduler, worker_processes, assistant=False):
        return _Worker(scheduler=scheduler, worker_processes=worker_processes, assistant=assistant)


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
