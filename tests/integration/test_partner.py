"""What partners really do, through the real `luigi` command on real servers: uploads still being
written, stalled half uploads completed later, files replaced at the source, values the
database refuses.  Whatever happens, every visit is counted once."""

from __future__ import annotations

import os
import time

import polars as pl
import psycopg
from polars.testing import assert_frame_equal
import pytest

from visitas import db

from .harness import (assert_exactly_once, cut_mid_line, expected_visitors, holding_the_archive,
                      notify_cfg, wait_for, wait_until_blocked_on_a_lock)

MIN_AGE = "[sftp]\nmin_age = 60\n"


def _age(path, seconds: float) -> None:
    """Set a file's mtime ``seconds`` in the past (an upload that finished then)."""
    when = time.time() - seconds
    os.utime(path, (when, when))


@pytest.mark.parametrize("completed_as", ["same name, next day", "another name, same day",
                                          "another name, both on the server at once"])
def test_a_stalled_half_upload_then_completed_counts_every_visit_once(make_env, completed_as):
    env = make_env(extra_cfg=MIN_AGE)
    manifest = env.generate(files=1, rows=3000, defects=0.02)
    full = (manifest["dir"] / "report_1.txt").read_bytes()
    remote = env.remote_dir / "report_1.txt"
    remote.write_bytes(cut_mid_line(full))  # the upload stalled half-way, long ago
    _age(remote, 3600)
    if completed_as.endswith("at once"):  # re-sent complete under a name listed after it
        (env.remote_dir / "report_7.txt").write_bytes(full)
        _age(env.remote_dir / "report_7.txt", 3600)
        both = env.luigi("--date", "2026-11-01")
        assert both.returncode == 0, both.stderr[-3000:]
        assert env.query("SELECT file_name, extends IS NOT NULL FROM load_log ORDER BY id") == [
            ("report_1.txt", False), ("report_7.txt", True)]
        assert_frame_equal(env.visitors(), expected_visitors(env.truth(manifest)))
        assert env.remote_reports() == []
        return

    first = env.luigi("--date", "2026-11-01")
    assert first.returncode == 0, first.stderr[-3000:]
    [(half_id, lines_done, half_read)] = env.query(
        "SELECT id, lines_done, rows_read FROM load_log WHERE status = 'loaded'")
    assert env.remote_reports() == []  # loaded and removed: the partner uploads again

    name, date = (("report_1.txt", "2026-11-02") if completed_as.startswith("same")
                  else ("report_7.txt", "2026-11-01"))
    (env.remote_dir / name).write_bytes(full)
    _age(env.remote_dir / name, 3600)
    second = env.luigi("--date", date)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "extends report_1.txt" in second.stderr

    [(extends, status, read, message)] = env.query(
        "SELECT extends, status, rows_read, message FROM load_log WHERE id <> %s", (half_id,))
    total = manifest["files"]["report_1.txt"]["rows"]
    # The extension reads the lines the half did not finish: its cut last line included.
    assert (extends, status, read) == (half_id, "loaded", total - (lines_done - 1))
    assert half_read + read == total + 1  # the cut line was read twice: rejected, then loaded
    assert message.startswith(f"extends report_1.txt (load_log id {half_id})")
    # The visitor counters are those of the complete file loaded once.
    assert_frame_equal(env.visitors(), expected_visitors(env.truth(manifest)))
    assert env.remote_reports() == []


def test_a_file_modified_seconds_ago_is_left_then_loaded_once_older(make_env, smtp):
    env = make_env(extra_cfg=MIN_AGE + notify_cfg(smtp))
    manifest = env.generate(files=2, rows=100, defects=0.0)
    _age(env.remote_dir / "report_1.txt", 3600)  # report_2.txt was written just now

    first = env.luigi()
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r[:2] for r in env.loads()] == [("report_1.txt", "loaded")]
    assert env.remote_reports() == ["report_2.txt"]  # untouched, for a later run
    assert "report_2.txt left at the source for a later run" in env.log_file.read_text()
    assert wait_for(lambda: smtp.messages)
    [mail] = smtp.messages
    assert mail["Subject"].endswith("1 left at the source")
    assert "report_2.txt: modified" in mail.get_body(("plain",)).get_content()

    _age(env.remote_dir / "report_2.txt", 3600)
    second = env.luigi()
    assert second.returncode == 0, second.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_a_file_written_again_after_the_listing_is_left_at_the_source(make_env):
    """The listing saw both files old enough; by the second one's download the partner was
    writing it again: it is left for the next run, which loads the new version once."""
    env = make_env(extra_cfg=MIN_AGE)
    manifest = env.generate(files=2, rows=100, defects=0.0)
    for name in manifest["files"]:
        _age(env.remote_dir / name, 3600)
    with psycopg.connect(env.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
        run = env.popen()
        wait_until_blocked_on_a_lock(env)  # one file is loading, the other listed, not fetched
        [loading] = [p.name for p in env.local_files()]
        [other] = [name for name in manifest["files"] if name != loading]
        (env.remote_dir / other).write_bytes((manifest["dir"] / other).read_bytes())
        holder.execute("SELECT pg_advisory_unlock(%s, 0)", (db.LOCK_VISITORS,))
    out, _ = run.communicate()
    assert run.returncode == 0, out[-3000:]
    assert f"{other} left at the source for a later run" in out
    assert "may still be being written" in out
    assert [r[:2] for r in env.loads()] == [(loading, "loaded")]
    assert env.remote_reports() == [other]

    _age(env.remote_dir / other, 3600)
    again = env.luigi()
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_a_same_size_replacement_at_the_source_is_never_deleted(env):
    """Replaced after its download with other content of the same size (a new mtime): the
    archive step must not delete what was never loaded."""
    manifest = env.generate(files=1, rows=200, defects=0.0)
    original = (manifest["dir"] / "report_1.txt").read_bytes()
    replacement = original.replace(b"visitante", b"visitanta", 1)
    assert len(replacement) == len(original) and replacement != original
    with holding_the_archive(env):  # ArchiveZip waits there, after its file's commit
        run = env.popen()
        assert wait_for(lambda: env.load_count() == 1, 180)
        remote = env.remote_dir / "report_1.txt"
        remote.write_bytes(replacement)
        later = remote.stat().st_mtime + 5  # a clock tick the file system surely shows
        os.utime(remote, (later, later))
    out, _ = run.communicate()
    assert run.returncode == 0, out[-3000:]
    assert "changed at the source since it was downloaded" in out
    assert env.remote_reports() == ["report_1.txt"]
    assert (env.remote_dir / "report_1.txt").read_bytes() == replacement
    assert env.query("SELECT status, archived_at IS NOT NULL, source_removed_at FROM load_log") == [
        ("loaded", True, None)]


def test_a_value_the_database_refuses_rejects_its_row_and_the_rest_loads(env):
    """Defence in depth: a row the contract let through but the database refuses (here a
    constraint of the site's own) is rejected as db_refused; the file loads in the same run."""
    manifest = env.generate(files=2, rows=300, defects=0.02)
    db.Database(env.dsn, env.schema).connection().close()  # the schema must exist first
    truth = env.truth(manifest)
    refused = (truth.filter(pl.col("source_file") == "report_1.txt")["line_no"]
               .gather([10, 11, 150]).to_list())  # two in a row, one further on
    env.execute("ALTER TABLE statistics ADD CONSTRAINT site_rule CHECK (NOT (source_file ="
                f" 'report_1.txt' AND line_no IN ({', '.join(map(str, refused))})))")

    result = env.luigi()
    assert result.returncode == 0, result.stderr[-3000:]
    info = manifest["files"]["report_1.txt"]
    assert env.query("SELECT rows_read, rows_loaded, rows_rejected FROM load_log"
                     " WHERE file_name = 'report_1.txt'") == [
        (info["rows"], info["valid_rows"] - 3, info["rejected_rows"] + 3)]
    found = env.query("SELECT line_no, reason, message LIKE '%%site_rule%%' FROM errors"
                      " WHERE reason = 'db_refused' ORDER BY line_no")
    assert found == [(n, "db_refused", True) for n in refused]
    kept = truth.filter(~((pl.col("source_file") == "report_1.txt") & pl.col("line_no").is_in(refused)))
    assert env.query("SELECT count(*) FROM statistics") == [(kept.height,)]
    assert_frame_equal(env.visitors(), expected_visitors(kept))
    assert env.remote_reports() == []
