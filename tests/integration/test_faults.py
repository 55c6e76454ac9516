"""Faults injected into real runs (real servers, real processes, the real `luigi` command).

Each ends with a clean rerun, then: every file loaded exactly once, visitor counts equal to the
rule over all visits, every file in a backup zip, nothing left at the source.
"""

from __future__ import annotations

import subprocess
import time
import zipfile

import psycopg
import pytest
from polars.testing import assert_frame_equal

from visitas import db

from .harness import (assert_exactly_once, expected_visitors, holding_the_archive, wait_for,
                      wait_until_blocked_on_a_lock)

FAST_RETRY = "[retry]\nattempts = 2\nfirst_delay = 0.2\nmax_delay = 0.2\n"


@pytest.mark.parametrize("command, loads", [("luigi", 1), ("visitas run", 2)])
def test_sigkill_after_copy_before_commit(env, command, loads):
    """One load under way; with ``visitas run --workers 2``, two at once in its two threads."""
    manifest = env.generate(files=3, rows=300)
    with psycopg.connect(env.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
        run = env.popen(*(["--workers", "2"] if loads > 1 else []), command=command)
        wait_until_blocked_on_a_lock(env, count=loads)  # COPY done, merge and commit not yet
        run.process.kill()
        run.process.wait()
        holder.execute("SELECT pg_advisory_unlock(%s, 0)", (db.LOCK_VISITORS,))
    assert env.loads() == []  # the killed transaction left nothing
    assert env.query("SELECT count(*) FROM statistics") == [(0,)]
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_sigkill_after_commit_before_archive(env):
    manifest = env.generate(files=3, rows=300)
    with holding_the_archive(env):  # ArchiveZip waits there, after its file's commit
        run = env.popen()
        assert wait_for(lambda: env.load_count() == 1, 180)
        time.sleep(0.5)
        run.process.kill()
        run.process.wait()
    assert len(env.loads()) == 1
    assert len(env.remote_reports()) == 3  # committed, but not archived: not deleted
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(env, manifest)
    assert len(env.loads()) == 3  # the committed file was not recorded again


def test_connection_dropped_mid_download_never_loads_a_partial_file(make_env, tmp_path):
    env = make_env(extra_cfg=FAST_RETRY)
    manifest = env.generate(files=2, rows=3000)
    size = (env.remote_dir / "report_1.txt").stat().st_size
    env.sftp_server.stop()
    env.sftp_server.drop_after_bytes = size // 3
    env.sftp_server.start()
    failed = env.luigi()
    assert failed.returncode == 30, failed.stderr[-3000:]
    assert env.loads() == []
    assert env.local_files() == []  # no partial file left, none renamed into place
    assert sorted(env.remote_reports()) == ["report_1.txt", "report_2.txt"]

    env.sftp_server.stop()
    env.sftp_server.drop_after_bytes = 0
    env.sftp_server.start()
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_unwritable_backup_dir_deletes_nothing(env):
    manifest = env.generate(files=2, rows=100)
    env.backup_dir.parent.mkdir(parents=True, exist_ok=True)
    env.backup_dir.write_text("not a directory")  # unwritable even for root
    failed = env.luigi()
    assert failed.returncode == 30, failed.stderr[-3000:]
    assert "cannot write" in failed.stderr or "File exists" in failed.stderr or "Not a directory" in failed.stderr
    assert sorted(env.remote_reports()) == ["report_1.txt", "report_2.txt"]
    assert len(env.loads()) == 2  # committed, kept, not deleted at the source
    env.backup_dir.unlink()
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_full_backup_disk_deletes_nothing(env):
    manifest = env.generate(files=2, rows=2000)
    env.backup_dir.mkdir(mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(env.backup_dir)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        failed = env.luigi()
        assert failed.returncode == 30, failed.stderr[-3000:]
        assert "No space left on device" in failed.stderr
        assert sorted(env.remote_reports()) == ["report_1.txt", "report_2.txt"]
        assert [p.name for p in env.backup_dir.iterdir() if not p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", str(env.backup_dir)], check=True)
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_two_hosts_overlapping_share_the_files_and_count_each_once(make_env, tmp_path):
    """Host A commits its first file and is held at that file's archive step while host B runs
    (separate folders, one database and SFTP server): B leaves A's claimed file to A and loads
    the others; A then finds them gone from the source and skips them.  Both loaded files, both
    exit 0, counters exact."""
    env = make_env()
    manifest = env.generate(files=6, rows=400, visitors=80)
    host_b = env.host_config("host-b")
    with holding_the_archive(env):  # ArchiveZip waits there, after its file's commit
        host_a = env.popen("--no-lock")
        assert wait_for(lambda: env.load_count() == 1, 180)
        run_b = env.luigi("--no-lock", env=host_b)
        assert host_a.returncode is None  # A was still running the whole time B ran
    out_a, _ = host_a.communicate()
    assert host_a.returncode == 0, out_a[-3000:]
    assert run_b.returncode == 0, run_b.stderr[-3000:]

    loaded_by = env.query("SELECT run_id, count(*) FROM load_log WHERE status = 'loaded'"
                          " GROUP BY run_id ORDER BY count(*)")
    assert [n for _, n in loaded_by] == [1, 5]  # both hosts loaded files
    assert "is being handled by host" in run_b.stderr  # B left A's claimed file to A
    assert out_a.count("was loaded and removed by another worker or host: skipping it") == 5
    assert env.query("SELECT file_name FROM load_log WHERE status = 'loaded'"
                     " GROUP BY file_name HAVING count(*) > 1") == []
    assert_frame_equal(env.visitors(), expected_visitors(env.truth(manifest)))
    assert env.remote_reports() == []
    archived = {name.split(":", 1)[1] for name in env.zip_members()}
    for path in (env.tmp / "host-b" / "bckp").glob("visitas_*.zip"):
        with zipfile.ZipFile(path) as archive:
            archived |= set(archive.namelist())
    assert archived == set(manifest["files"])


def test_a_file_taken_by_another_host_is_skipped_not_failed(env, tmp_path):
    """Host 2 listed report_1.txt, but host 1 loaded and removed it before host 2 downloaded it."""
    env.generate(files=1, rows=50)
    assert env.luigi().returncode == 0  # host 1
    host2 = env.luigi("--file-name", "report_1.txt", task="ArchiveZip", env=env.host_config("host-b"))
    assert host2.returncode == 0, host2.stderr[-3000:]
    assert "was loaded and removed by another worker or host" in host2.stderr
    assert [r[1] for r in env.loads()] == ["loaded"]

    missing = env.luigi("--file-name", "report_7.txt", task="ArchiveZip", env=env.host_config("host-b"))
    assert missing.returncode == 30  # gone without a trace in load_log: a real error
