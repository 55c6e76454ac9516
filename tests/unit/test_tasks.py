"""The task wiring, in process and fast: luigi.build over the real steps, with fake adapters for
the SFTP server (a local folder) and the database (an in-memory load log and loader).  The real
servers are the integration tests' business; here: what runs, in which order, what is skipped
on a rerun, and what a failure leaves behind."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import time
import zipfile
from pathlib import Path

import luigi
import pytest

from visitas import db, sftp, tasks
from visitas.dev import sample
from visitas.db.claims import Claim
from visitas.handoff import LoadResult
from visitas.ops import runmail

DAY = dt.date(2026, 11, 20)


class FakeSource:
    """The SFTP adapter over a local folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.downloads: list[str] = []

    def _remote(self, path: Path) -> sftp.RemoteFile:
        info = path.stat()
        return sftp.RemoteFile(path.name, info.st_size, int(info.st_mtime))

    def list_reports(self) -> list[sftp.RemoteFile]:
        return [self._remote(p) for p in sorted(self.folder.glob("report_*.txt"))]

    def stat(self, name: str) -> sftp.RemoteFile:
        return self._remote(self.folder / name)

    def download(self, name, local_path: Path, min_age=0.0, before_rename=None) -> sftp.RemoteFile:
        remote = self.stat(name)
        if time.time() - remote.mtime < min_age:
            raise sftp.StillBeingWritten(f"{name} is too young")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.folder / name, local_path)
        if before_rename:
            before_rename(remote)
        self.downloads.append(name)
        return remote

    def remove(self, name: str) -> bool:
        (self.folder / name).unlink()
        return True


@dataclasses.dataclass
class Row:
    id: int
    file_name: str
    sha256: str
    run_date: dt.date
    status: str
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    archived: str | None = None
    removed: bool = False


class FakeDatabase:
    """load_log and the loader, in memory, with the rules the tasks rely on."""

    def __init__(self):
        self.rows: list[Row] = []
        self.prepared: set[dt.date] = set()
        self.loads: list[str] = []
        self.fail: set[str] = set()

    # LoadLog
    def load_recorded(self, file_name, sha256, run_date):
        return any(r.file_name == file_name and r.sha256 == sha256 and r.status != "failed"
                   and (r.run_date == run_date or r.archived is None) for r in self.rows)

    def run_prepared(self, run_date):
        return run_date in self.prepared

    def prepare_run(self, run_date, truncate):
        self.prepared.add(run_date)

    def removed_at_source(self, file_name, run_date):
        return any(r.file_name == file_name and r.removed for r in self.rows)

    def file_status(self, file_name, sha256):
        return next(r.status for r in reversed(self.rows)
                    if r.file_name == file_name and r.sha256 == sha256 and r.status != "failed")

    def mark_archived(self, file_name, sha256, archive):
        for r in self.rows:
            if r.file_name == file_name and r.sha256 == sha256:
                r.archived = archive

    def mark_removed(self, file_name, sha256):
        for r in self.rows:
            if r.file_name == file_name and r.sha256 == sha256:
                r.removed = True

    def record_failed_load(self, file_name, sha256, size, run_date, run_id, started_at, message):
        self.rows.append(Row(len(self.rows) + 1, file_name, sha256, run_date, "failed"))

    # Loader
    def load_file(self, job, marker, run_id, started_at) -> LoadResult:
        if job.name in self.fail:
            raise RuntimeError(f"injected failure loading {job.name}")
        self.loads.append(job.name)
        summary, _ = job.split()
        row = Row(len(self.rows) + 1, marker.file_name, marker.sha256, marker.run_date,
                  "rejected" if summary.status == "rejected" else "loaded", summary.rows_read,
                  summary.rows_loaded, summary.rows_rejected)
        self.rows.append(row)
        return LoadResult(row.id, row.status, row.rows_read, row.rows_loaded, row.rows_rejected)


class FakeClaims:
    """Every file is this host's (claims between hosts are the integration tests' business)."""

    lease = 3600.0

    def __init__(self):
        self.released: list[str] = []

    def claim(self, file_name):
        return Claim(True, "here")

    def renew(self, file_name):
        pass

    def release(self, file_name):
        self.released.append(file_name)


@pytest.fixture
def world(tmp_path, monkeypatch, luigi_config):
    remote = tmp_path / "remote"
    manifest = sample.generate(remote, files=2, rows=60, seed=4, defects=0.1)
    for name in manifest["files"]:
        old = time.time() - 3600
        os.utime(remote / name, (old, old))
    for section, key, value in [("paths", "download_dir", tmp_path / "download"),
                                ("paths", "backup_dir", tmp_path / "bckp"),
                                ("paths", "state_dir", tmp_path / "state"),
                                ("logfile", "path", ""), ("sftp", "min_age", 60)]:
        if not luigi_config.has_section(section):
            luigi_config.add_section(section)
        luigi_config.set(section, key, str(value))
    source, database = FakeSource(remote), FakeDatabase()
    monkeypatch.setattr(sftp, "source", lambda: source)
    monkeypatch.setattr(db, "load_log", lambda: database)
    monkeypatch.setattr(db, "loader", lambda: database)
    claims = FakeClaims()
    monkeypatch.setattr(db, "claims", lambda: claims)
    monkeypatch.setattr(runmail, "send_at_exit", lambda run_date: None)  # mailed in integration
    yield source, database, manifest, tmp_path
    luigi.task_register.Register.clear_instance_cache()


def _run() -> bool:
    """One run, as a new process would make it (Luigi caches task instances per parameters)."""
    luigi.task_register.Register.clear_instance_cache()
    return luigi.build([tasks.RunAll(date=DAY)], local_scheduler=True, workers=1,
                       log_level="WARNING")


def test_a_run_takes_every_file_through_every_step_once(world):
    source, database, manifest, tmp = world
    assert _run()
    assert sorted(database.loads) == sorted(manifest["files"])
    for row in database.rows:
        info = manifest["files"][row.file_name]
        assert (row.status, row.rows_read, row.rows_loaded) == ("loaded", info["rows"], info["valid_rows"])
        assert row.archived and row.removed
    [backup] = (tmp / "bckp").glob("visitas_*.zip")
    assert sorted(zipfile.ZipFile(backup).namelist()) == sorted(manifest["files"])
    assert source.list_reports() == []
    assert [p for p in (tmp / "download").rglob("*") if p.is_file()] == []


def test_a_rerun_redoes_only_what_did_not_finish(world):
    source, database, manifest, tmp = world
    database.fail.add("report_2.txt")
    assert not _run()
    assert database.loads == ["report_1.txt"]
    fetched = list(source.downloads)
    database.fail.clear()
    assert _run()
    assert database.loads == ["report_1.txt", "report_2.txt"]
    assert source.downloads == fetched  # report_2.txt was downloaded, validated and split once


def test_smaller_files_go_first_whatever_their_names(world):
    """report_1.txt, listed first, is the smaller: Luigi alone would run it last."""
    source, database, manifest, tmp = world
    first = source.folder / "report_1.txt"
    first.write_bytes(first.read_bytes()[:2000])
    os.utime(first, (time.time() - 3600,) * 2)
    assert _run()
    assert database.loads == ["report_1.txt", "report_2.txt"]


def test_a_young_file_is_left_at_the_source_and_the_run_succeeds(world):
    source, database, manifest, tmp = world
    os.utime(source.folder / "report_2.txt")  # modified just now
    assert _run()
    assert database.loads == ["report_1.txt"]
    assert [r.name for r in source.list_reports()] == ["report_2.txt"]


def test_a_failed_load_is_recorded_and_the_file_stays_at_the_source(world):
    source, database, manifest, tmp = world
    database.fail.add("report_2.txt")
    assert not _run()
    assert [(r.file_name, r.status) for r in database.rows if r.file_name == "report_2.txt"] == [
        ("report_2.txt", "failed")]
    assert [r.name for r in source.list_reports()] == ["report_2.txt"]


def test_a_prepared_run_date_is_not_asked_of_the_database_again(world):
    """Every load asks whether its run date is prepared; once it is, the answer stays."""
    _, database, manifest, _ = world
    asked = []
    prepared = database.run_prepared
    database.run_prepared = lambda run_date: asked.append(run_date) or prepared(run_date)
    assert _run()
    assert len(database.loads) == len(manifest["files"]) == 2
    assert asked == [DAY, DAY]  # before it was prepared, then once after
