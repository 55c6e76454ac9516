"""Outages of the real servers during a run: short ones are ridden out, long ones fail the run
loudly (exit code and mail) and the next run finishes the job with nothing lost or doubled."""

from __future__ import annotations

import time

import psycopg
import pytest

from visitas import db
from visitas.dev import servers as devservers

from .harness import assert_exactly_once, notify_cfg, wait_for, wait_until_blocked_on_a_lock

RETRY = "[retry]\nattempts = 8\nfirst_delay = 0.5\nmax_delay = 2\n"  # about 11 s of patience
SHORT_RETRY = "[retry]\nattempts = 2\nfirst_delay = 0.5\nmax_delay = 0.5\n"


def _pause_at_visitor_merge(env):
    """Hold the visitor-merge lock: the run stops inside its first load (a real mid-run point)."""
    holder = psycopg.connect(env.dsn, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
    return holder


@pytest.mark.parametrize("command, loads", [("luigi", 1), ("visitas run", 2)])
def test_short_database_outage_is_ridden_out(make_env, own_pg, command, loads):
    """With ``visitas run --workers 2``, two loads are under way (each thread with its own
    connection) when the server stops; both reconnect and load once."""
    env = make_env(extra_cfg=RETRY, dsn=own_pg.dsn())
    manifest = env.generate(files=3, rows=200)
    holder = _pause_at_visitor_merge(env)
    run = env.popen(*(["--workers", "2"] if loads > 1 else []), command=command)
    wait_until_blocked_on_a_lock(env, count=loads)
    own_pg.stop("fast")  # every session dies, the load's transaction is rolled back
    holder.close()
    time.sleep(2)
    own_pg.start()
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    assert "retrying in" in out
    assert_exactly_once(env, manifest)


def test_long_database_outage_fails_loudly_then_the_next_run_completes(make_env, own_pg):
    smtp = devservers.SmtpServer().start()
    try:
        env = make_env(extra_cfg=SHORT_RETRY + notify_cfg(smtp), dsn=own_pg.dsn())
        manifest = env.generate(files=2, rows=200)
        holder = _pause_at_visitor_merge(env)
        run = env.popen()
        wait_until_blocked_on_a_lock(env)
        own_pg.stop("fast")
        holder.close()
        out, _ = run.communicate(timeout=300)
        assert run.returncode != 0, out[-3000:]
        assert env.remote_reports() == sorted(manifest["files"])  # nothing deleted
        assert wait_for(lambda: smtp.messages)
        body = smtp.messages[0].get_body(("plain",)).get_content()
        assert "failed" in smtp.messages[0]["Subject"] and "LoadPostgres" in body
        assert own_pg.password not in body and own_pg.password not in out

        own_pg.start()
        rerun = env.luigi()
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert_exactly_once(env, manifest)
    finally:
        smtp.stop()


def _hold_the_statistics_copy(env, line_no: int = 20) -> None:
    """A trigger makes the first statistics COPY sleep at one row, once: a real COPY, visibly
    active in pg_stat_activity, at a known point."""
    db.Database(env.dsn, env.schema).connection().close()  # the schema must exist first
    env.execute(f"""
        CREATE SEQUENCE copy_holds;
        CREATE FUNCTION hold_copy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.line_no = {line_no} AND nextval('{env.schema}.copy_holds') = 1 THEN
                PERFORM pg_sleep(120);
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER hold_copy BEFORE INSERT ON statistics FOR EACH ROW EXECUTE FUNCTION hold_copy();""")


def _wait_until_copying(env) -> None:
    def copying():
        return env.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'visitas'"
                         " AND state = 'active' AND query LIKE 'COPY%%statistics%%'")[0][0] > 0
    assert wait_for(copying, 180), "the statistics COPY never started"


# Three statistics batches: while the first one's COPY is held, the formatter thread has the
# other two queued and waits to hand over the end (where a restart used to hang the run).
SMALL_BATCHES = "[load]\nbatch_mb = 1\n"


def _stop_the_server_during_a_copy(make_env, own_pg, retry: str):
    """A run whose statistics COPY is active when PostgreSQL is stopped (fast: every session is
    terminated, the load's transaction rolled back)."""
    env = make_env(extra_cfg=retry + SMALL_BATCHES, dsn=own_pg.dsn())
    manifest = env.generate(files=1, rows=20_000, defects=0.0)
    _hold_the_statistics_copy(env)
    run = env.popen()
    _wait_until_copying(env)
    own_pg.stop("fast")
    return env, manifest, run


def test_database_restart_during_a_copy_is_ridden_out(make_env, own_pg):
    env, manifest, run = _stop_the_server_during_a_copy(make_env, own_pg, RETRY)
    time.sleep(5)
    own_pg.start()
    out, _ = run.communicate(timeout=300)  # used to hang here, holding Luigi's pid lock
    assert run.returncode == 0, out[-3000:]
    assert "retrying in" in out
    assert_exactly_once(env, manifest)


def test_database_down_during_a_copy_for_longer_than_the_retries_fails_then_resumes(make_env, own_pg):
    env, manifest, run = _stop_the_server_during_a_copy(make_env, own_pg, SHORT_RETRY)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 30, out[-3000:]  # [retcode] task_failed, no hang
    assert env.remote_reports() == ["report_1.txt"]  # nothing deleted
    own_pg.start()
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_short_sftp_outage_is_ridden_out(make_env):
    env = make_env(extra_cfg=RETRY)
    manifest = env.generate(files=2, rows=200)
    holder = _pause_at_visitor_merge(env)
    run = env.popen()
    wait_until_blocked_on_a_lock(env)
    env.sftp_server.stop()  # the archive step will need the server to delete the file
    holder.close()
    time.sleep(2)
    env.sftp_server.start()
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    assert "retrying in" in out
    assert_exactly_once(env, manifest)


def test_long_sftp_outage_fails_then_the_next_run_completes(make_env):
    env = make_env(extra_cfg=SHORT_RETRY)
    manifest = env.generate(files=2, rows=200)
    holder = _pause_at_visitor_merge(env)
    run = env.popen()
    wait_until_blocked_on_a_lock(env)
    env.sftp_server.stop()
    holder.close()
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 30, out[-3000:]
    env.sftp_server.start()
    assert sorted(env.remote_reports()) == sorted(manifest["files"])  # nothing was deleted
    rerun = env.luigi()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(env, manifest)


def test_sftp_down_at_start_fails_with_a_clear_message_and_changes_nothing(make_env):
    env = make_env(extra_cfg=SHORT_RETRY)
    env.generate(files=1, rows=20)
    env.sftp_server.stop()
    result = env.luigi()
    assert result.returncode == 35, result.stderr[-3000:]  # [retcode] scheduling_error
    assert "Connection refused" in result.stderr or "Unable to connect" in result.stderr
    assert env.remote_reports() == ["report_1.txt"]
    assert env.local_files() == []


def test_luigi_retries_a_failed_task_within_the_same_cron_run(make_env):
    """[worker] keep_alive with [scheduler] retry_delay/retry_count: the one-shot worker waits
    for the retry instead of exiting, and the run ends well."""
    env = make_env(extra_cfg="[worker]\nkeep_alive = true\nwait_interval = 0.2\n"
                             "[scheduler]\nretry_delay = 1\nretry_count = 3\n")
    manifest = env.generate(files=2, rows=100)
    db.Database(env.dsn, env.schema).connection()
    env.execute(f"""
        CREATE SEQUENCE attempts;
        CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.source_file = 'report_2.txt' AND nextval('{env.schema}.attempts') = 1 THEN
                RAISE EXCEPTION 'transient failure';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_once BEFORE INSERT ON statistics FOR EACH ROW EXECUTE FUNCTION fail_once();""")
    result = env.luigi()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transient failure" in result.stderr
    assert_exactly_once(env, manifest)
