"""The real `luigi --module visitas RunAll` against real SFTP and PostgreSQL servers."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from polars.testing import assert_frame_equal

from .conftest import SFTP_KINDS
from .harness import expected_visitors


def _assert_loaded_exactly_as_planted(env, *manifests):
    files = {name: info for m in manifests for name, info in m["files"].items()}
    loads = env.query("SELECT file_name, status, rows_read, rows_loaded, rows_rejected, encoding"
                      " FROM load_log WHERE status = 'loaded' ORDER BY file_name")
    assert [row[0] for row in loads] == sorted(files)
    for name, status, read, loaded, rejected, encoding in loads:
        info = files[name]
        assert (read, loaded, rejected, encoding) == (
            info["rows"], info["valid_rows"], info["rejected_rows"], info["encoding"])
    truth = env.truth(*manifests)
    stats = env.query("SELECT source_file, line_no FROM statistics ORDER BY source_file, line_no")
    assert stats == sorted(zip(truth["source_file"], truth["line_no"]))
    error_lines = {(f, n) for f, n in env.query("SELECT source_file, line_no FROM errors")}
    planted = {(name, n) for name, info in files.items() for lines in info["defects"].values()
               for n in lines}
    assert error_lines == planted
    assert_frame_equal(env.visitors(), expected_visitors(truth))


@pytest.mark.parametrize("kind", SFTP_KINDS)
def test_three_reports_end_to_end_and_rerun_changes_nothing(make_env, kind):
    env = make_env(kind)
    manifest = env.generate(files=3, rows=400, defects=0.05)
    originals = {name: (manifest["dir"] / name).read_bytes() for name in manifest["files"]}

    result = env.luigi()
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_loaded_exactly_as_planted(env, manifest)
    # Archived byte for byte, then removed at the source and locally.
    today = f"{dt.date.today():%Y%m%d}"
    assert env.zip_members() == {f"visitas_{today}.zip:{n}": data for n, data in originals.items()}
    assert env.remote_reports() == []
    assert env.local_files() == []
    archived = env.query("SELECT count(*) FROM load_log WHERE archived_at IS NOT NULL"
                         " AND source_removed_at IS NOT NULL AND backup_archive LIKE 'visitas_%%'")
    assert archived == [(3,)]

    before = (env.loads(), env.query("SELECT count(*) FROM statistics"), env.visitors())
    again = env.luigi()
    assert again.returncode == 0, again.stderr[-3000:]
    assert (env.loads(), env.query("SELECT count(*) FROM statistics")) == before[:2]
    assert_frame_equal(env.visitors(), before[2])


def test_same_content_under_a_new_name_is_a_duplicate(env):
    manifest = env.generate(files=2, rows=200)
    assert env.luigi().returncode == 0
    stats_before = env.query("SELECT count(*) FROM statistics")
    visitors_before = env.visitors()

    env.upload(manifest["dir"] / "report_1.txt", "report_9.txt")
    result = env.luigi()
    assert result.returncode == 0, result.stderr[-3000:]
    assert env.query("SELECT file_name, status, rows_loaded, message LIKE 'same content as report_1.txt%%'"
                     " FROM load_log WHERE file_name = 'report_9.txt'") == [("report_9.txt", "duplicate", 0, True)]
    assert env.query("SELECT count(*) FROM statistics") == stats_before
    assert_frame_equal(env.visitors(), visitors_before)
    assert any(name.endswith(":duplicate/report_9.txt") for name in env.zip_members())
    assert env.remote_reports() == []


def test_rerun_after_a_failure_in_load_postgres_loads_every_file_once(env):
    manifest = env.generate(files=3, rows=300, defects=0.05)
    env.fail_loads_of("report_2.txt")

    failed = env.luigi()
    assert failed.returncode == 30, failed.stderr[-3000:]  # [retcode] task_failed
    # The failure is recorded, in a transaction of its own: nothing of the load itself.
    assert sorted(r[:2] for r in env.loads()) == [
        ("report_1.txt", "loaded"), ("report_2.txt", "failed"), ("report_3.txt", "loaded")]
    [(load_id, message)] = env.query("SELECT id, message FROM load_log WHERE status = 'failed'")
    assert "injected failure" in message
    assert env.query("SELECT line_no, column_name, reason, load_id, message LIKE '%%injected failure%%'"
                     " FROM errors WHERE source_file = 'report_2.txt'") == [
        (0, "(file)", "load_error", load_id, True)]
    assert env.query("SELECT count(*) FROM statistics WHERE source_file = 'report_2.txt'") == [(0,)]
    assert env.remote_reports() == ["report_2.txt"]  # nothing deleted before it is committed

    env.stop_failing()
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # The successful load replaced the record: counted once, no failure left behind.
    assert env.query("SELECT count(*) FROM load_log WHERE status = 'failed'") == [(0,)]
    assert env.query("SELECT count(*) FROM errors WHERE reason = 'load_error'") == [(0,)]
    _assert_loaded_exactly_as_planted(env, manifest)
    assert env.remote_reports() == []
    assert len(env.zip_members()) == 3


def test_same_name_with_new_content_next_day_is_a_new_file(env):
    first = env.generate(files=1, rows=150, seed=1)
    assert env.luigi("--date", "2026-11-01").returncode == 0
    second = env.generate(files=1, rows=150, seed=2)  # report_1.txt again, new content
    result = env.luigi("--date", "2026-11-02")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r[:2] for r in env.loads()] == [("report_1.txt", "loaded"), ("report_1.txt", "loaded")]
    # truncate_each_run: statistics hold the second day's file only; visitors hold both.
    assert env.query("SELECT count(*) FROM statistics") == [(second["files"]["report_1.txt"]["valid_rows"],)]
    assert_frame_equal(env.visitors(), expected_visitors(env.truth(first, second)))
    assert sorted(env.zip_members()) == ["visitas_20261101.zip:report_1.txt",
                                         "visitas_20261102.zip:report_1.txt"]


def test_truncate_each_run_off_keeps_statistics(make_env):
    env = make_env(extra_cfg="[load]\ntruncate_each_run = false\n")
    env.generate(files=1, rows=100, seed=1)
    assert env.luigi("--date", "2026-11-01").returncode == 0
    env.generate(files=1, rows=100, seed=2, first_number=2)
    assert env.luigi("--date", "2026-11-02").returncode == 0
    assert env.query("SELECT count(DISTINCT source_file) FROM statistics") == [(2,)]


@pytest.mark.parametrize("command", ["luigi", "visitas run"])
def test_two_workers_give_the_same_visitors_as_a_serial_load(env, command):
    """Luigi's two workers run each step in a process of its own, ``visitas run``'s in two threads
    of its one process."""
    # Few visitors, many files: every file shares emails with every other.
    manifest = env.generate(files=6, rows=400, visitors=60, defects=0.02)
    result = env.run(command, "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_loaded_exactly_as_planted(env, manifest)
    ran_in = set(re.findall(r"\[pid (\d+)\] Worker .* running ", env.log_file.read_text()))
    # One process for every step, or a process per step.
    assert (len(ran_in) == 1) == (command == "visitas run") and ran_in


def test_rejected_file_is_recorded_archived_and_removed(env):
    manifest = env.generate(files=1, rows=50)
    env.remote_dir.joinpath("report_2.txt").write_bytes(b"\x00\x01binary\xff" * 100)
    result = env.luigi()
    assert result.returncode == 0, result.stderr[-3000:]
    assert env.query("SELECT status, reason FROM load_log WHERE file_name = 'report_2.txt'") == [
        ("rejected", "binary_file")]
    assert env.query("SELECT line_no, column_name, reason FROM errors WHERE source_file = 'report_2.txt'") == [
        (1, "(file)", "binary_file")]
    assert any(name.endswith(":rejected/report_2.txt") for name in env.zip_members())
    assert env.remote_reports() == []
    del manifest


def test_visitor_as_of_any_day_matches_the_rule(env):
    """visitor_as_of(day) (and visitor_today, which is it at current_date) against the plain
    Python oracle, on days around the latest visits: month and year ends, leap days."""
    manifest = env.generate(files=3, rows=400, visitors=30, seed=5)
    assert env.luigi().returncode == 0
    truth = env.truth(manifest)
    latest = truth["sent_at"].max().date()
    days = [latest, latest.replace(day=28), dt.date(latest.year, 12, 31),
            dt.date(latest.year + 1, 1, 1), dt.date(2028, 2, 29), dt.date(2031, 7, 15)]
    for day in [d for d in days if d >= latest]:
        assert_frame_equal(env.visitors("visitor_as_of(%s)", (day,)),
                           expected_visitors(truth, as_of=day), check_row_order=True)
    today = dt.date.today()
    if today >= latest:
        assert_frame_equal(env.visitors("visitor_today"), expected_visitors(truth, as_of=today))
