"""The Luigi task graph, one class per step.

    RunAll(date) ─► ArchiveZip ─► LoadPostgres ─► SplitVisitorStats ─► ValidateReport ─► DownloadReport
                                      └─► PrepareRun(date)

There is one chain per remote file (``DownloadReport`` is the per-file form of the design's
DownloadReports), so files are independent: a bad file never blocks a good one, and several
workers or hosts can share a day's files.  Every output is a target, so a rerun skips what is done.
Only the run date and the file name are task parameters: no secret ever reaches luigid.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import luigi

from visitas import archive, config, db, logsetup, notify, processing, sftp
from visitas.runinfo import RUN_ID

log = logging.getLogger(__name__)


class VisitasTask(luigi.Task):
    """Shared by every step: the run date and where its files live."""

    date = luigi.DateParameter(default=dt.date.today())

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        logsetup.configure()

    def day_dir(self, root: str) -> Path:
        return Path(root) / f"{self.date:%Y%m%d}"

    def state_root(self) -> Path:
        return self.day_dir(config.paths().resolved_state_dir())


class FileTask(VisitasTask):
    """A step applied to one remote file."""

    file_name = luigi.Parameter()

    def file_state(self, *parts: str) -> Path:
        return self.state_root().joinpath(sftp.check_safe(self.file_name), *parts)

    def download_path(self) -> Path:
        return self.day_dir(config.paths().download_dir) / sftp.check_safe(self.file_name)

    def verdict(self) -> dict | None:
        path = self.file_state("checked", processing.VERDICT_FILE)
        return json.loads(path.read_text()) if path.exists() else None

    def remote_record(self) -> Path:
        """The file's size and mtime at the source when it was downloaded."""
        return self.file_state("remote.json")

    def elsewhere_marker(self) -> Path:
        return self.state_root() / "elsewhere" / sftp.check_safe(self.file_name)

    def deferred_marker(self) -> Path:
        return self.state_root() / "deferred" / sftp.check_safe(self.file_name)

    def skipped(self) -> bool:
        """Another worker or host took this file (it vanished from the source after its load),
        or this run left it at the source because it is still being written."""
        if self.elsewhere_marker().exists():
            return True
        deferred = self.deferred_marker()
        return deferred.exists() and deferred.read_text() == RUN_ID

    def complete(self) -> bool:
        # A file skipped this run completes every step of its chain for this run.
        return self.skipped() or super().complete()


class DownloadReport(FileTask):
    """Fetch one report: temporary name, size checked against the server, then renamed."""

    def output(self):
        return luigi.LocalTarget(str(self.download_path()))

    def run(self):
        self.set_status_message(f"downloading {self.file_name}")
        try:
            sftp.source().download(self.file_name, self.download_path(),
                                   min_age=config.sftp().min_age, before_rename=self._record_remote)
        except sftp.StillBeingWritten as why:
            log.warning("%s left at the source for a later run: %s", self.file_name, why)
            notify.record_deferred(self.file_name, str(why))
            _write_atomically(self.deferred_marker(), RUN_ID)
        except FileNotFoundError:
            if not db.database().removed_at_source(self.file_name, self.date):
                raise
            log.info("%s was loaded and removed by another worker or host: skipping it",
                     self.file_name)
            _write_atomically(self.elsewhere_marker(), "")

    def _record_remote(self, remote: sftp.RemoteFile) -> None:
        # Before the download appears under its name: a download on disk always has its record.
        _write_atomically(self.remote_record(), json.dumps({"size": remote.size,
                                                            "mtime": remote.mtime}))


class ValidateReport(FileTask):
    """File- and row-level checks; typed rows in bounded batches."""

    def requires(self):
        return DownloadReport(date=self.date, file_name=self.file_name)

    def output(self):
        return luigi.LocalTarget(str(self.file_state("checked")))

    def run(self):
        if self.skipped():  # scheduled before another host took it, or left this run
            return
        settings = config.load()
        with self.output().temporary_path() as tmp:
            verdict = processing.validate_report(
                Path(self.input().path), self.file_name, Path(tmp), settings.batch_mb * 1024 * 1024,
                settings.parallel_batches, progress=self._progress,
                max_line_bytes=settings.max_line_bytes)
        self.set_status_message(f"{verdict.rows_read} rows read, {verdict.rows_rejected} rejected"
                                if verdict.status == "valid" else f"rejected: {verdict.message}")

    def _progress(self, done: int, total: int) -> None:
        self.set_progress_percentage(round(100 * done / max(total, 1)))
        self.set_status_message(f"validated {done // 1048576} of {total // 1048576} MiB")


class SplitVisitorStats(FileTask):
    """Checked rows -> errors (COPY-ready), one visitor summary per email, warnings and counts.

    The statistics rows stay in ValidateReport's batches: LoadPostgres formats them for COPY
    while the server loads the previous batch."""

    def requires(self):
        return ValidateReport(date=self.date, file_name=self.file_name)

    def output(self):
        return luigi.LocalTarget(str(self.file_state("split")))

    def run(self):
        if self.skipped():  # scheduled before another host took it, or left this run
            return
        with self.output().temporary_path() as tmp:
            summary = processing.split_report(Path(self.input().path), self.file_name, Path(tmp))
        self.set_status_message(f"{summary['rows_loaded']} statistics rows, "
                                f"{summary['error_count']} errors, {summary['visitors']} visitors")


class PrepareRun(VisitasTask):
    """Once per run date: empty statistics and errors (``[load] truncate_each_run``)."""

    def output(self):
        return db.RunLogTarget(self.date)

    def run(self):
        db.database().prepare_run(self.date, config.load().truncate_each_run)


class LoadPostgres(FileTask):
    """One transaction per file: rows, errors, visitors and the load_log row (the marker)."""

    def requires(self):
        return {"split": SplitVisitorStats(date=self.date, file_name=self.file_name),
                "run": PrepareRun(date=self.date)}

    def output(self):
        verdict = self.verdict()
        return db.LoadLogTarget(self.file_name, verdict and verdict["sha256"], self.date)

    def run(self):
        if self.skipped():  # scheduled before another host took it, or left this run
            return
        started_at = dt.datetime.now(dt.timezone.utc)
        self.set_status_message(f"loading {self.file_name}")
        job = processing.LoadJob(source=self.download_path(), checked_dir=self.file_state("checked"),
                                 split_dir=Path(self.input()["split"].path),
                                 work_dir=self.file_state("reload"))
        database = db.database()
        # Deflate the backup while the database works (zlib releases the GIL): ArchiveZip then
        # only copies the compressed bytes into the day's zip, after the commit.
        packing = threading.Thread(target=self._precompress, name="precompress", daemon=True)
        packing.start()
        try:
            row = database.load_file(job, self.date, RUN_ID, started_at)
        except Exception as error:
            # Recorded in load_log and errors (their own transaction); the next successful
            # load of the file replaces the record.
            database.record_failed_load(self.file_name, job.sha256, job.size, self.date, RUN_ID,
                                        started_at, f"{type(error).__name__}: {error}")
            raise
        finally:
            packing.join()
        self.set_status_message(f"{row['status']}: {row['rows_loaded']} rows loaded, "
                                f"{row['rows_rejected']} rejected")
        log.info("%s %s: %d rows read, %d loaded, %d rejected (load_log id %d)", self.file_name,
                 row["status"], row["rows_read"], row["rows_loaded"], row["rows_rejected"], row["id"])

    def _precompress(self) -> None:
        # Lower priority than the COPY path: on two cores the server's backend is the critical one
        # (Linux: a thread's nice value is its own; elsewhere this may be refused, which is fine).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            archive.precompress(self.download_path(), self.file_state("backup.deflate"),
                                config.load().zip_level, self.verdict()["sha256"])
        except (OSError, archive.ArchiveError) as error:  # ArchiveZip tries again
            log.warning("could not precompress %s: %s", self.file_name, error)


class ArchiveZip(FileTask):
    """Zip, fsync and verify; only then delete at the source and locally."""

    def requires(self):
        return LoadPostgres(date=self.date, file_name=self.file_name)

    def output(self):
        return luigi.LocalTarget(str(self.state_root() / "archived" / f"{self.file_name}.json"))

    def run(self):
        if self.skipped():  # scheduled before another host took it, or left this run
            return
        database = db.database()
        sha = self.verdict()["sha256"]
        status = database.file_status(self.file_name, sha)
        member = self.file_name if status == "loaded" else f"{status}/{self.file_name}"
        self.set_status_message(f"archiving {member}")
        where = archive.add_to_archive(Path(config.paths().backup_dir), self.date,
                                       self.download_path(), member, sha, config.load().zip_level,
                                       packed=self.file_state("backup.deflate"))
        database.mark_archived(self.file_name, sha, where)
        source = sftp.source()
        removed = False
        if self._unchanged_at_source(source):
            removed = source.remove(self.file_name)
            database.mark_removed(self.file_name, sha)
        self._clean_local()
        with self.output().temporary_path() as tmp:
            Path(tmp).write_text(json.dumps({"archive": where, "status": status, "sha256": sha,
                                             "removed_at_source": removed}))

    def _unchanged_at_source(self, source: sftp.SftpSource) -> bool:
        """Never delete a file the partner replaced or touched after we downloaded it: its
        size and mtime must be those recorded at the download."""
        try:
            recorded = json.loads(self.remote_record().read_text())
        except (OSError, ValueError):
            log.warning("%s: no record of its size and mtime at the download: left at the"
                        " source (the next run sees it again)", self.file_name)
            return False
        try:
            now = source.stat(self.file_name)
        except FileNotFoundError:
            return True  # already gone (another worker or host removed it)
        if (now.size, now.mtime) != (recorded["size"], recorded["mtime"]):
            log.warning("%s changed at the source since it was downloaded (%d bytes, mtime %d ->"
                        " %d bytes, mtime %d): left there for the next run", self.file_name,
                        recorded["size"], recorded["mtime"], now.size, now.mtime)
            return False
        return True

    def _clean_local(self) -> None:
        self.download_path().unlink(missing_ok=True)
        shutil.rmtree(self.file_state(), ignore_errors=True)


class RunAll(luigi.WrapperTask):
    """Everything for one run date: every report currently on the server, each to the end."""

    date = luigi.DateParameter(default=dt.date.today())

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        logsetup.configure()

    def requires(self):
        if not hasattr(self, "_reports"):
            notify.send_report_at_exit(self.date)
            listed = sftp.source().list_reports()
            log.info("%d report(s) on the server: %s", len(listed),
                     ", ".join(r.name for r in listed) or "none")
            self._reports = [r for r in listed if self._old_enough(r)]
        return [self._chain(r, rank) for rank, r in enumerate(
            sorted(self._reports, key=lambda r: r.size, reverse=True))]

    def _chain(self, report: sftp.RemoteFile, rank: int) -> "ArchiveZip":
        """A file's chain, smaller files first: a stalled partial upload on the server beside its
        completed version loads before it, so the completion is taken as its extension.  (Luigi's
        scheduler passes a task's priority on to the steps it requires.)"""
        task = ArchiveZip(date=self.date, file_name=report.name)
        task.priority = rank
        return task

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
        notify.record_deferred(report.name, why)
        return False


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


@luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
def _log_processing_time(task: luigi.Task, seconds: float) -> None:
    log.info("task %s took %.2fs", task, seconds)
