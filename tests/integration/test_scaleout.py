"""Several hosts under one real luigid, one PostgreSQL and one SFTP server: each file wholly on one
host, every host exits 0, luigid shows every task done, a dead host's file is taken over."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request

import psycopg
from polars.testing import assert_frame_equal

from visitas import db

from .harness import (assert_exactly_once, cut_mid_line, expected_visitors, notify_cfg, wait_for,
                      wait_until_blocked_on_a_lock)


LUIGID_DONE_COOLDOWN = 10  # luigid's [scheduler] stable_done_cooldown_secs, by default


def _tasks(port: int, status: str = "") -> dict:
    data = urllib.parse.quote(json.dumps({"status": status} if status else {}))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data={data}") as response:
        return json.load(response)["response"]


def test_two_hosts_share_a_days_files_under_one_luigid(make_env, luigid, smtp):
    env = make_env()
    manifest = env.generate(files=20, rows=20_000, visitors=30_000, defects=0.01)
    hosts = {name: env.host_config(name, notify_cfg(smtp, send_always="true"))
             for name in ("host-a", "host-b")}
    with psycopg.connect(env.dsn, autocommit=True) as holder:
        # Both hosts inside a load at once (each its own file: claims) before either goes on.
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
        runs = {name: env.popen("--no-lock", env=cfg, scheduler_port=luigid)
                for name, cfg in hosts.items()}
        wait_until_blocked_on_a_lock(env, timeout=180, count=2)
        holder.execute("SELECT pg_advisory_unlock(%s, 0)", (db.LOCK_VISITORS,))
    outputs = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, outputs[name][-3000:]
        assert "not granted run permission" not in outputs[name]

    by_host = dict(env.query("SELECT host, count(*) FROM load_log WHERE status = 'loaded' GROUP BY host"))
    assert set(by_host) == {"host-a", "host-b"} and sum(by_host.values()) == 20  # both did work
    assert _tasks(luigid, "FAILED") == {}
    families = {(t["name"], t["params"]["host"]) for t in _tasks(luigid, "DONE").values()}
    assert {("RunAll", "host-a"), ("RunAll", "host-b")} <= families
    assert env.query("SELECT count(*) FROM file_claims") == [(0,)]
    assert env.query("SELECT file_name FROM load_log WHERE status = 'loaded'"
                     " GROUP BY file_name HAVING count(*) > 1") == []
    assert env.query("SELECT count(*) FROM statistics") == [(env.truth(manifest).height,)]
    assert_frame_equal(env.visitors(), expected_visitors(env.truth(manifest)))
    assert env.remote_reports() == []
    # Each host's run mail lists the files that host handled.
    assert wait_for(lambda: len(smtp.messages) == 2)
    mailed = {frozenset(re.findall(r"^(report_\d+\.txt) ", m.get_body(("plain",)).get_content(), re.M))
              for m in smtp.messages}
    handled = {frozenset(n for (n,) in env.query("SELECT file_name FROM load_log WHERE host = %s", (h,)))
               for h in hosts}
    assert mailed == handled


def test_an_extension_loaded_beside_its_first_part_waits_for_it(make_env, luigid):
    """Host A loads a stalled partial upload while host B loads its completion (another name):
    B found no first part when it looked; under the merge lock it finds A's commit, and loads
    again as an extension."""
    env = make_env()
    manifest = env.generate(files=1, rows=3000, defects=0.02)
    full = (manifest["dir"] / "report_1.txt").read_bytes()
    (env.remote_dir / "report_1.txt").write_bytes(cut_mid_line(full))
    env.upload(manifest["dir"] / "report_1.txt", "report_7.txt")
    runs = {}
    with psycopg.connect(env.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
        runs["a"] = env.popen("--no-lock", env=env.host_config("host-a"), scheduler_port=luigid)
        wait_until_blocked_on_a_lock(env)  # A: the partial (smaller, first), at the merge
        runs["b"] = env.popen("--no-lock", env=env.host_config("host-b"), scheduler_port=luigid)
        wait_until_blocked_on_a_lock(env, count=2)  # B: the complete file, queued behind A
        holder.execute("SELECT pg_advisory_unlock(%s, 0)", (db.LOCK_VISITORS,))
    outputs = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, outputs[name][-3000:]
    assert "a file it extends was loaded meanwhile" in outputs["b"]
    [(first_id,)] = env.query("SELECT id FROM load_log WHERE file_name = 'report_1.txt'")
    assert env.query("SELECT host, extends FROM load_log WHERE file_name = 'report_7.txt'") == [
        ("host-b", first_id)]
    assert_frame_equal(env.visitors(), expected_visitors(env.truth(manifest)))


def test_a_host_killed_mid_file_is_taken_over_by_the_next_run(make_env, luigid):
    env = make_env()
    manifest = env.generate(files=4, rows=500)
    host_a, host_b = env.host_config("host-a"), env.host_config("host-b")
    with psycopg.connect(env.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
        run_a = env.popen("--no-lock", env=host_a, scheduler_port=luigid)
        wait_until_blocked_on_a_lock(env)  # host A is inside its first file's load
        run_a.process.kill()
        run_a.process.wait()
        holder.execute("SELECT pg_advisory_unlock(%s, 0)", (db.LOCK_VISITORS,))
    [(taken, holder_host)] = env.query("SELECT file_name, host FROM file_claims")
    assert holder_host == "host-a" and env.loads() == []  # claimed, nothing committed

    # While host A's claim is live, host B leaves that file to it and does the others.
    first = env.luigi("--no-lock", env=host_b, scheduler_port=luigid)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"{taken} is being handled by host host-a" in first.stderr
    assert env.remote_reports() == [taken]

    # The claim's lease runs out (host A is dead): the next run takes the file over, from the start.
    env.execute("UPDATE file_claims SET lease_until = now() - interval '1 second'")
    # A next run, not an instant one: luigid ignores a task's return to pending within
    # [scheduler] stable_done_cooldown_secs (10) of it being done, and the first run's skipped
    # tasks were done.
    time.sleep(LUIGID_DONE_COOLDOWN + 1)
    second = env.luigi("--no-lock", env=host_b, scheduler_port=luigid)
    assert second.returncode == 0, second.stderr[-3000:]
    assert env.query("SELECT host FROM load_log WHERE file_name = %s", (taken,)) == [("host-b",)]
    # (host A's own folders keep what it had fetched when it died: its next run clears them)
    assert_exactly_once(env, manifest, hosts=("host-b",))
