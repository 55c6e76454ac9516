"""The operator's commands against real servers: `visitas run` (exit codes without [retcode], run
history, metrics file, backup retention), the silence alert, `visitas check`, `visitas status`."""

from __future__ import annotations

import configparser
import datetime as dt
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from visitas.dev import servers as devservers

from .harness import notify_cfg, wait_for

VISITAS = str(Path(sys.executable).with_name("visitas"))


def _visitas(env, *args: str, timeout: float = 300,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    environment = env.environment(extra_env)
    environment.pop("VISITAS_RUN_ID", None)
    return subprocess.run([VISITAS, *args], cwd=env.tmp, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def _without_retcode(env, extra: str = "") -> None:
    """The env's config with no [retcode] section (Luigi's own command then exits 0 always)."""
    env.write_config(extra)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(env.config)
    parser.remove_section("retcode")
    with open(env.config, "w") as handle:
        parser.write(handle)


def _metrics(path: Path) -> dict[str, float]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[re.sub(r'host="[^"]*",?', "", name).replace("{}", "")] = float(value)
    return values


def test_visitas_run_exit_codes_history_metrics_and_retention(env):
    metrics = env.tmp / "textfile" / "visitas.prom"
    _without_retcode(env, f"[paths]\nmetrics_file = {metrics}\nkeep_backups_days = 30\n")
    env.backup_dir.mkdir(mode=0o700, exist_ok=True)
    old = dt.date.today() - dt.timedelta(days=31)
    (env.backup_dir / f"visitas_{old:%Y%m%d}.zip").write_bytes(b"old backup")
    recent = dt.date.today() - dt.timedelta(days=29)
    (env.backup_dir / f"visitas_{recent:%Y%m%d}.zip").write_bytes(b"recent backup")
    manifest = env.generate(files=2, rows=200, defects=0.05)

    ok = _visitas(env, "run")
    assert ok.returncode == 0, ok.stderr[-3000:]
    loaded = sum(i["valid_rows"] for i in manifest["files"].values())
    rejected = sum(i["rejected_rows"] for i in manifest["files"].values())
    [(outcome, code, files, rows)] = env.query(
        "SELECT outcome, exit_code, files_loaded, rows_loaded FROM run_history")
    assert (outcome, code, files, rows) == ("ok", 0, 2, loaded)
    values = _metrics(metrics)
    assert values['visitas_last_run_files{status="loaded"}'] == 2
    assert values['visitas_last_run_rows{status="loaded"}'] == loaded
    assert values['visitas_last_run_rows{status="rejected"}'] == rejected
    assert values["visitas_last_run_exit_code"] == 0
    assert abs(values["visitas_last_success_timestamp_seconds"] - time.time()) < 300
    assert values["visitas_last_success_timestamp_seconds"] == values["visitas_last_run_timestamp_seconds"]
    # Retention: the zip of a run date 31 days ago went, 29 days ago stayed, today's is there.
    assert sorted(p.name for p in env.backup_dir.glob("*.zip")) == sorted(
        [f"visitas_{recent:%Y%m%d}.zip", f"visitas_{dt.date.today():%Y%m%d}.zip"])

    # A refused host key: `luigi` without [retcode] tells cron "success"; `visitas run` does not.
    _wrong_host_key(env, env.tmp / "known_hosts")
    env.generate(files=1, rows=20, first_number=3, seed=3)
    _without_retcode(env, f"[paths]\nmetrics_file = {metrics}\n[sftp]\nknown_hosts = {env.tmp / 'known_hosts'}\n")
    luigi_says = env.luigi()
    assert luigi_says.returncode == 0  # the problem this command exists for
    refused = _visitas(env, "run")
    assert refused.returncode == 35, refused.stderr[-3000:]  # requires() failed: scheduling error
    values = _metrics(metrics)
    assert values["visitas_last_run_exit_code"] == 35
    assert values["visitas_last_success_timestamp_seconds"] < values["visitas_last_run_timestamp_seconds"]
    assert env.query("SELECT outcome, exit_code FROM run_history ORDER BY finished_at") == [
        ("ok", 0), ("failed", 35)]


def _wrong_host_key(env, path: Path) -> None:
    """known_hosts naming another key for the server (the client's own): a mismatch."""
    line = Path(env.sftp_cfg["known_hosts"]).read_text().split()
    line[2] = Path(str(env.sftp_cfg["key_file"]) + ".pub").read_text().split()[1]
    path.write_text(" ".join(line) + "\n")


def test_a_silent_partner_is_reported_and_exits_missing_data(make_env, smtp):
    env = make_env(extra_cfg=notify_cfg(smtp, stale_after_hours=2))
    env.generate(files=1, rows=30, defects=0.0)
    assert _visitas(env, "run").returncode == 0  # a clean run: no mail
    assert smtp.messages == []

    # Nothing at the source, the last file received an hour ago: not yet a silence.
    env.execute("UPDATE load_log SET started_at = started_at - interval '1 hour'")
    assert _visitas(env, "run").returncode == 0
    time.sleep(0.5)
    assert smtp.messages == []

    # Three hours ago: longer than stale_after_hours.
    env.execute("UPDATE load_log SET started_at = started_at - interval '2 hours'")
    silent = _visitas(env, "run")
    assert silent.returncode == 20, silent.stderr[-3000:]
    assert wait_for(lambda: smtp.messages)
    [message] = smtp.messages
    assert message["Subject"].endswith("NO FILE received for more than 2 h")
    [(received,)] = env.query("SELECT started_at FROM load_log")
    body = message.get_body(("plain",)).get_content()
    assert f"the last file, report_1.txt, was received at {received.isoformat(timespec='seconds')}" in body
    assert env.query("SELECT outcome, exit_code, silent FROM run_history ORDER BY finished_at DESC"
                     " LIMIT 1") == [("silent", 20, True)]

    # A file at the source, even one too young to take, is no silence.
    env.write_config(notify_cfg(smtp, stale_after_hours=2) + "[sftp]\nmin_age = 3600\n")
    env.generate(files=1, rows=30, first_number=2, seed=4)
    assert _visitas(env, "run").returncode == 0
    # 0 turns the alert off.
    env.write_config(notify_cfg(smtp, stale_after_hours=0))
    (env.remote_dir / "report_2.txt").unlink()
    assert _visitas(env, "run").returncode == 0


def test_check_names_each_problem_on_its_own_line(make_env, smtp):
    env = make_env(extra_cfg=notify_cfg(smtp))
    env.generate(files=2, rows=20)
    good = _visitas(env, "check")
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "config"], ["ok", "sftp"],
                                                   ["ok", "database"], ["ok", "smtp"], ["ok", "folders"]]
    assert "host key matches" in lines[1] and "lists 2 report(s)" in lines[1]
    assert "schema" in lines[2] and "does not exist yet" in lines[2]  # nothing is created by a check
    assert env.query("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (env.schema,)) == [(0,)]
    assert good.stderr == ""

    _wrong_host_key(env, env.tmp / "wrong_known_hosts")
    (env.tmp / "a-file").write_text("")
    env.write_config(notify_cfg(smtp).replace(f"smtp_port = {smtp.port}", "smtp_port = 1")
                     + f"[sftp]\nknown_hosts = {env.tmp / 'wrong_known_hosts'}\n"
                     + f"[paths]\nbackup_dir = {env.tmp / 'a-file' / 'bckp'}\n")
    bad = _visitas(env, "check")
    assert bad.returncode == 1
    lines = {line.split()[1]: line for line in bad.stdout.splitlines()}
    assert lines["config"].startswith("ok")
    assert lines["sftp"].startswith("FAIL") and "does not match" in lines["sftp"]
    assert lines["database"].startswith("ok")
    assert lines["smtp"].startswith("FAIL")
    assert lines["folders"].startswith("FAIL") and "backup_dir" in lines["folders"]
    assert "Traceback" not in bad.stdout + bad.stderr

    # The database unreachable: that line fails, the others still run.
    unreachable = f"postgresql://nobody:secret-pw@127.0.0.1:{devservers.free_port()}/visitas"
    down = _visitas(env, "check", extra_env={"VISITAS_TEST_PIPELINE_DSN": unreachable})
    lines = {line.split()[1]: line for line in down.stdout.splitlines()}
    assert lines["database"].startswith("FAIL") and "secret-pw" not in down.stdout + down.stderr
    assert lines["sftp"].startswith("FAIL") and lines["config"].startswith("ok")


def test_status_shows_what_waits_what_failed_and_the_last_runs(env):
    manifest = env.generate(files=2, rows=40, defects=0.0)
    env.fail_loads_of("report_2.txt", "disk on fire")
    failed = _visitas(env, "run")
    assert failed.returncode == 30, failed.stderr[-3000:]
    env.write_config("[sftp]\nmin_age = 3600\n")
    (env.remote_dir / "report_3.txt").write_bytes((manifest["dir"] / "report_1.txt").read_bytes())
    # As if uploaded again just now: too young.  SFTP gives whole seconds and the first run can
    # end within the second of the upload: touched until the new time falls in a later second
    # (file times come from the kernel's coarse clock, a few ms behind time.time()).
    remote_2 = env.remote_dir / "report_2.txt"
    uploaded = int(remote_2.stat().st_mtime)
    while int(remote_2.stat().st_mtime) == uploaded:
        time.sleep(0.05)
        remote_2.touch()
    env.execute("UPDATE load_log SET archived_at = NULL, source_removed_at = NULL"
                " WHERE file_name = 'report_1.txt'")  # as after a crash between load and archive

    shown = _visitas(env, "status")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    source = text.split("\n\n")[0]
    assert "report_2.txt" in source and "too young" in source.split("report_2.txt")[1].split("\n")[0]
    assert "report_3.txt" in source and "too young" in source.split("report_3.txt")[1].split("\n")[0]
    handled = text.split("Handled, not finished")[1].split("\n\n")[0]
    assert "report_1.txt  loaded" in handled and "not archived" in handled
    failures = text.split("Failed loads")[1].split("\n\n")[0]
    assert "report_2.txt" in failures and "disk on fire" in failures
    assert "Last successful run: none recorded" in text
    assert "exit code 30 (failed)" in text
    assert "Last file received: report_" in text

    env.stop_failing()
    env.write_config()
    env.execute("UPDATE load_log SET archived_at = now(), source_removed_at = now()"
                " WHERE file_name = 'report_1.txt'")
    (env.remote_dir / "report_3.txt").unlink()
    assert _visitas(env, "run").returncode == 0
    after = _visitas(env, "status")
    assert "Failed loads (the next run tries again):\n  none" in after.stdout
    # report_2.txt was touched at the source after its download: loaded, archived, left there.
    assert ("Handled, not finished (not archived, or not removed at the source):\n  report_2.txt"
            "  loaded") in after.stdout
    assert "archived, not removed at the source" in after.stdout
    assert "(already loaded, not removed yet)" in after.stdout.split("\n\n")[0]
    [(finished,)] = env.query("SELECT finished_at FROM run_history WHERE exit_code = 0")
    assert f"Last successful run: {finished.astimezone():%Y-%m-%d %H:%M:%S}" in after.stdout

    # The source unreachable: said, and exit 1; the database part still shows.
    env.sftp_server.stop()
    down = _visitas(env, "status")
    assert down.returncode == 1 and "cannot list the source" in down.stdout
    assert "Last successful run:" in down.stdout


def test_visitas_run_under_luigid(env, luigid):
    env.generate(files=2, rows=30)
    done = _visitas(env, "run", "--workers", "2", "--scheduler-host", "127.0.0.1",
                    "--scheduler-port", str(luigid))
    assert done.returncode == 0, done.stderr[-3000:]
    query = urllib.parse.quote(json.dumps({"status": "DONE"}))
    with urllib.request.urlopen(f"http://127.0.0.1:{luigid}/api/task_list?data={query}") as response:
        tasks = json.load(response)["response"]
    archived = {t["params"]["file_name"] for t in tasks.values() if t["name"] == "ArchiveZip"}
    assert archived == {"report_1.txt", "report_2.txt"}
    assert env.query("SELECT outcome FROM run_history") == [("ok",)]
