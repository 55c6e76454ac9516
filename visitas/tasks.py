"""The Luigi task graph, one thin class per step: read the inputs, call the stage, write the output.

    RunAll(date) ─► ArchiveZip ─► LoadPostgres ─► SplitVisitorStats ─► ValidateReport ─► DownloadReport
                                      └─► PrepareRun(date)

There is one chain per remote file (``DownloadReport`` is the per-file form of the design's
DownloadReports), so files are independent: a bad file never blocks a good one, and several
workers or hosts can share a day's files.  Every output is a target, so a rerun skips what is done.
Task parameters are the run date, the file name and the host (``[cluster] host``): no secret ever
reaches luigid, and with several hosts on one luigid each host's tasks are its own.  A file is
processed by the host that claims it (:mod:`visitas.db.claims`); the others skip it this run.  A
step reads what the steps before it made through ``self.input()`` (records of
:mod:`visitas.handoff`); every derived path comes from :class:`visitas.paths.RunPaths`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import luigi

from visitas import archive, config, db, handoff, housekeeping, sftp
from visitas.ops import runmail
from visitas.paths import RunPaths
from visitas.runtime import retrying, runinfo, setup
from visitas.transform import split, validate

log = logging.getLogger(__name__)


class VisitasTask(config.FixedParams, luigi.Task):
    """Shared by every step: the run date, the host, and where its files live."""

    date = luigi.DateParameter(default=dt.date.today())
    host = luigi.Parameter(default=socket.gethostname(),
                           config_path={"section": "cluster", "name": "host"},
                           description="this host's name ([cluster] host; default: the machine's)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        setup.configure()

    def __repr__(self) -> str:
        # Made once: Luigi's repr resolves every parameter again, and a task is shown in several log
        # lines and events per run (measured: 2 ms per file, for the task-time line alone).
        shown = self.__dict__.get("_repr")
        if shown is None:
            shown = self.__dict__["_repr"] = super().__repr__()
        return shown

    @functools.cached_property
    def paths(self) -> RunPaths:
        # Once per task instance: reading a luigi.Config section is costly (Luigi resolves every
        # parameter again), and complete() alone asks for paths several times per task.
        return RunPaths.from_config(self.date)


class FileTask(VisitasTask):
    """A step applied to one remote file."""

    file_name = luigi.Parameter()

    def skipped(self) -> bool:
        """Another worker or host took this file (it vanished from the source after its load),
        or this run left it: still being written, or another host holds its claim."""
        if self.paths.elsewhere(self.file_name).exists():
            return True
        deferred = self.paths.deferred(self.file_name)
        return deferred.exists() and deferred.read_text() == runinfo.run_id()

    def complete(self) -> bool:
        # A file skipped this run completes every step of its chain for this run.
        return self.skipped() or super().complete()

    def run(self):
        """Every step of a file: only while this host holds the file's claim."""
        if self.skipped():  # scheduled before another host took it, or left this run
            return
        claims = db.claims()
        claim = claims.claim(self.file_name)
        if not claim.mine:
            log.info("%s is being handled by host %s: left to it this run", self.file_name,
                     claim.holder)
            self.leave()
            return
        with _RENEWALS.holding(claims, self.file_name):
            self.work()

    def work(self) -> None:
        raise NotImplementedError

    def leave(self) -> None:
        """This run will not handle the file: its chain completes as skipped, this run only."""
        handoff.write_text(self.paths.deferred(self.file_name), runinfo.run_id())

    def verdict(self) -> handoff.Verdict | None:
        """ValidateReport's verdict, for a step that requires it as ``checked`` (None: not yet).
        Read once: a verdict never changes once written."""
        verdict = self.__dict__.get("_verdict")
        if verdict is None:
            path = Path(self.input()["checked"].path) / handoff.VERDICT_FILE
            verdict = self.__dict__["_verdict"] = (handoff.read(path, handoff.Verdict)
                                                   if path.exists() else None)
        return verdict

    def part_of(self, task_class: type[VisitasTask]) -> VisitasTask:
        """Another step of the same file (or of the run date, such as PrepareRun), date and host
        (made once per step: Luigi asks for a step's requirements many times, and each new task
        resolves its parameters again)."""
        parts = self.__dict__.setdefault("_parts", {})
        if task_class not in parts:
            per_file = {"file_name": self.file_name} if issubclass(task_class, FileTask) else {}
            parts[task_class] = task_class(date=self.date, host=self.host, **per_file)
        return parts[task_class]


class DownloadReport(FileTask):
    """Fetch one report: temporary name, size and mtime checked, fsync'd, then renamed."""

    def output(self):
        return {"file": luigi.LocalTarget(str(self.paths.download(self.file_name))),
                "remote": luigi.LocalTarget(str(self.paths.remote_record(self.file_name)))}

    def work(self):
        self.set_status_message(f"downloading {self.file_name}")
        try:
            sftp.source().download(self.file_name, Path(self.output()["file"].path),
                                   min_age=config.sftp().min_age, before_rename=self._record)
        except sftp.StillBeingWritten as why:
            log.warning("%s left at the source for a later run: %s", self.file_name, why)
            runmail.record_deferred(self.file_name, str(why))
            self.leave()
            db.claims().release(self.file_name)
        except FileNotFoundError:
            if not db.load_log().removed_at_source(self.file_name, self.date):
                raise
            log.info("%s was loaded and removed by another worker or host: skipping it",
                     self.file_name)
            handoff.write_text(self.paths.elsewhere(self.file_name), "")
            db.claims().release(self.file_name)

    def _record(self, remote: sftp.RemoteFile) -> None:
        # Before the download appears under its name: a download on disk always has its record.
        handoff.write(Path(self.output()["remote"].path), handoff.RemoteRecord(remote.size, remote.mtime))


class FolderStep(FileTask):
    """A step whose output is a folder: made under a temporary name, then renamed (atomic)."""

    def work(self):
        with self.output().temporary_path() as tmp:
            self.set_status_message(self.make(Path(tmp)))

    def make(self, out: Path) -> str:
        """Fill ``out``; return the status message luigid shows."""
        raise NotImplementedError


class ValidateReport(FolderStep):
    """File- and row-level checks; typed rows in bounded batches."""

    def requires(self):
        return self.part_of(DownloadReport)

    def output(self):
        return luigi.LocalTarget(str(self.paths.checked(self.file_name)))

    def make(self, out: Path) -> str:
        settings = config.load()
        verdict = validate.validate_report(
            Path(self.input()["file"].path), self.file_name, out, settings.batch_mb * 1024 * 1024,
            settings.parallel_batches, progress=self._progress, max_line_bytes=settings.max_line_bytes)
        if verdict.status != "valid":
            return f"rejected: {verdict.message}"
        return f"{verdict.rows_read} rows read, {verdict.rows_rejected} rejected"

    def _progress(self, done: int, total: int) -> None:
        self.set_progress_percentage(round(100 * done / max(total, 1)))
        self.set_status_message(f"validated {done // 1048576} of {total // 1048576} MiB")


class SplitVisitorStats(FolderStep):
    """Checked rows -> errors (COPY-ready), one visitor summary per email, warnings and counts.

    The statistics rows stay in ValidateReport's batches: LoadPostgres formats them for COPY
    while the server loads the previous batch."""

    def requires(self):
        return self.part_of(ValidateReport)

    def output(self):
        return luigi.LocalTarget(str(self.paths.split(self.file_name)))

    def make(self, out: Path) -> str:
        summary = split.split_report(Path(self.input().path), self.file_name, out)
        return (f"{summary.rows_loaded} statistics rows, {summary.error_count} errors,"
                f" {summary.visitors} visitors")


class PrepareRun(VisitasTask):
    """Once per run date: empty statistics and errors (``[load] truncate_each_run``)."""

    def output(self):
        return db.RunLogTarget(self.date)

    def complete(self) -> bool:
        # Asked again before each file's load; a prepared run date stays prepared (run_log rows
        # are never deleted), so once seen it is not asked of the database again.
        if not self.__dict__.get("_prepared"):
            self.__dict__["_prepared"] = super().complete()
        return self.__dict__["_prepared"]

    def run(self):
        db.load_log().prepare_run(self.date, config.load().truncate_each_run)


class LoadPostgres(FileTask):
    """One transaction per file: rows, errors, visitors and the load_log row (the marker)."""

    def requires(self):
        return {"download": self.part_of(DownloadReport), "checked": self.part_of(ValidateReport),
                "split": self.part_of(SplitVisitorStats), "run": self.part_of(PrepareRun)}

    def output(self):
        verdict = self.verdict()
        return db.LoadLogTarget(self.file_name, verdict and verdict.sha256, self.date)

    def work(self):
        started_at = dt.datetime.now(dt.UTC)
        self.set_status_message(f"loading {self.file_name}")
        job = split.LoadJob(source=Path(self.input()["download"]["file"].path),
                            checked_dir=Path(self.input()["checked"].path),
                            split_dir=Path(self.input()["split"].path),
                            work_dir=self.paths.reload(self.file_name))
        # Deflate the backup while the database works (ISA-L releases the GIL): ArchiveZip then
        # only copies the compressed bytes into the day's zip, after the commit.
        packing = threading.Thread(target=self._precompress, args=(job,), name="precompress",
                                   daemon=True)
        packing.start()
        try:
            result = db.loader().load_file(job, self.output(), runinfo.run_id(), started_at)
        except Exception as error:
            # Recorded in load_log and errors (their own transaction); the next successful
            # load of the file replaces the record.
            db.load_log().record_failed_load(self.file_name, job.sha256, job.size, self.date,
                                             runinfo.run_id(), started_at,
                                             f"{type(error).__name__}: {error}")
            raise
        finally:
            packing.join()
        self.set_status_message(f"{result.status}: {result.rows_loaded} rows loaded, "
                                f"{result.rows_rejected} rejected")
        log.info("%s %s: %d rows read, %d loaded, %d rejected (load_log id %d)", self.file_name,
                 result.status, result.rows_read, result.rows_loaded, result.rows_rejected, result.id)

    def _precompress(self, job: split.LoadJob) -> None:
        # Lower priority than the COPY path: on two cores the server's backend is the critical one
        # (Linux: a thread's nice value is its own; elsewhere this may be refused, which is fine).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            archive.precompress(job.source, self.paths.deflated(self.file_name),
                                config.load().zip_level, job.sha256)
        except (OSError, archive.ArchiveError) as error:  # ArchiveZip tries again
            log.warning("could not precompress %s: %s", self.file_name, error)


class ArchiveZip(FileTask):
    """Zip, fsync and verify; only then delete at the source and locally."""

    def requires(self):
        return {"load": self.part_of(LoadPostgres), "download": self.part_of(DownloadReport),
                "checked": self.part_of(ValidateReport)}

    def output(self):
        return luigi.LocalTarget(str(self.paths.archived(self.file_name)))

    def work(self):
        downloaded = self.input()["download"]
        verdict = self.verdict()
        if verdict is None:
            raise LookupError(f"{self.file_name}: no verdict to archive it by")
        load_log = db.load_log()
        status = load_log.file_status(self.file_name, verdict.sha256)
        member = self.file_name if status == "loaded" else f"{status}/{self.file_name}"
        self.set_status_message(f"archiving {member}")
        where = archive.add_to_archive(Path(config.paths().backup_dir), self.date,
                                       Path(downloaded["file"].path), member, verdict.sha256,
                                       config.load().zip_level,
                                       packed=self.paths.deflated(self.file_name),
                                       note=self.paths.zip_note(self.file_name),
                                       part_members=config.paths().files_per_zip)
        load_log.mark_archived(self.file_name, verdict.sha256, where)
        archive.prune_backups(Path(config.paths().backup_dir), config.paths().keep_backups_days,
                              dt.date.today(), self.date)
        source = sftp.source()
        removed = False
        if self._unchanged_at_source(source, Path(downloaded["remote"].path)):
            removed = source.remove(self.file_name)
            load_log.mark_removed(self.file_name, verdict.sha256)
        Path(downloaded["file"].path).unlink(missing_ok=True)
        shutil.rmtree(self.paths.state(self.file_name), ignore_errors=True)
        with self.output().temporary_path() as tmp:
            handoff.write(Path(tmp), handoff.Archived(where, status, verdict.sha256, removed))
        db.claims().release(self.file_name)

    def _unchanged_at_source(self, source: sftp.SftpSource, record: Path) -> bool:
        """Never delete a file the partner replaced or touched after we downloaded it: its
        size and mtime must be those recorded at the download."""
        try:
            recorded = handoff.read(record, handoff.RemoteRecord)
        except (OSError, ValueError, TypeError):
            log.warning("%s: no record of its size and mtime at the download: left at the"
                        " source (the next run sees it again)", self.file_name)
            return False
        try:
            now = source.stat(self.file_name)
        except FileNotFoundError:
            return True  # already gone (another worker or host removed it)
        if (now.size, now.mtime) != (recorded.size, recorded.mtime):
            log.warning("%s changed at the source since it was downloaded (%d bytes, mtime %d ->"
                        " %d bytes, mtime %d): left there for the next run", self.file_name,
                        recorded.size, recorded.mtime, now.size, now.mtime)
            return False
        return True


class RunAll(config.FixedParams, luigi.WrapperTask):
    """Everything for one run date: every report currently on the server, each to the end (or
    left to the host that claimed it)."""

    date = luigi.DateParameter(default=dt.date.today())
    host = VisitasTask.host

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        setup.configure()

    def requires(self):
        if not hasattr(self, "_reports"):
            runmail.send_at_exit(self.date)
            self._prune_past_dates()
            listed = sftp.source().list_reports()
            log.info("%d report(s) on the server: %s", len(listed),
                     ", ".join(r.name for r in listed) or "none")
            self._reports = [r for r in listed if self._old_enough(r)]
            if not listed:
                self._check_silence()
        return [self._chain(r, rank) for rank, r in enumerate(
            sorted(self._reports, key=lambda r: r.size, reverse=True))]

    def _chain(self, report: sftp.RemoteFile, rank: int) -> ArchiveZip:
        """A file's chain, smaller files first: a stalled partial upload on the server beside its
        completed version loads before it, so the completion is taken as its extension.  (Luigi's
        scheduler passes a task's priority on to the steps it requires.)"""
        task = ArchiveZip(date=self.date, host=self.host, file_name=report.name)
        task.priority = rank
        return task

    def _prune_past_dates(self) -> None:
        """The local folders of run dates past ``[paths] keep_state_days``
        (:mod:`visitas.housekeeping`); a failure here is logged, and the run goes on."""
        settings = config.paths()
        try:
            housekeeping.prune_local(Path(settings.download_dir),
                                     Path(settings.resolved_state_dir()), settings.keep_state_days,
                                     dt.date.today(), self.date,
                                     lambda sha256: db.load_log().archived(sha256),
                                     kept=runmail.record_unarchived)
        except (OSError, *retrying.TRANSIENT) as error:
            log.warning("could not remove the folders of past run dates: %s", error)

    @staticmethod
    def _check_silence() -> None:
        """Nothing at the source: has the partner been silent longer than ``[notify]
        stale_after_hours``?  Then the run mail says since when."""
        hours = config.notify().stale_after_hours
        if hours <= 0:
            return
        last = db.load_log().last_received()
        if last is not None and dt.datetime.now(dt.UTC) - last[1] <= dt.timedelta(hours=hours):
            return
        file_name, at = last if last else (None, None)
        log.warning("no file at the source, and %s: longer than [notify] stale_after_hours"
                    " (%g h)", f"the last one ({file_name}) was received at {at:%Y-%m-%d %H:%M %Z}"
                    if at else "none was ever received", hours)
        runmail.record_silence(file_name, at, hours)

    @staticmethod
    def _old_enough(report: sftp.RemoteFile) -> bool:
        """A file modified less than ``[sftp] min_age`` ago may still be being uploaded."""
        age = time.time() - report.mtime
        min_age = config.sftp().min_age
        if age >= min_age:
            return True
        why = (f"modified {max(age, 0):.0f}s ago (min_age is {min_age:.0f}s): it may still be"
               " being written")
        log.warning("%s left at the source for a later run: %s", report.name, why)
        runmail.record_deferred(report.name, why)
        return False


# Claims of the steps running in this process, renewed while they run.
_RENEWALS = db.Renewals()
