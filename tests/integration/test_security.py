"""Nobody let in, nothing leaked: host keys, secrets, file modes, unsafe remote names."""

from __future__ import annotations

import json
import stat
import urllib.parse
import urllib.request

import psycopg

from visitas import db, devservers

from .harness import notify_cfg, wait_for, wait_until_blocked_on_a_lock


def test_unknown_host_key_is_refused(env, tmp_path):
    env.generate(files=1, rows=20)
    (tmp_path / "known_hosts").write_text("")  # the server's key is not there
    result = env.luigi()
    assert result.returncode == 35, result.stderr[-3000:]
    assert "is not in" in result.stderr and "refusing to connect" in result.stderr
    assert env.remote_reports() == ["report_1.txt"]


def test_changed_host_key_is_refused(env, ssh_keys, tmp_path):
    env.generate(files=1, rows=20)
    impostor = devservers.SshKeys(tmp_path / "impostor")
    (tmp_path / "known_hosts").write_text(impostor.known_hosts_line(env.sftp_server.port))
    result = env.luigi()
    assert result.returncode == 35, result.stderr[-3000:]
    assert "BadHostKeyException" in result.stderr or "does not match" in result.stderr
    assert env.remote_reports() == ["report_1.txt"]


def test_secrets_never_appear_in_logs_errors_mails_or_luigid(make_env, own_pg, luigid):
    sftp_password = "sftp-" + "Q7" * 10
    smtp = devservers.SmtpServer().start()
    try:
        env = make_env(password=sftp_password, dsn=own_pg.dsn(),
                       extra_cfg="[sftp]\nkey_file =\n" + notify_cfg(smtp, send_always="true"))
        env.generate(files=2, rows=100, defects=0.05)
        env.fail_loads_of("report_2.txt")
        run = env.luigi(scheduler_port=luigid)
        assert run.returncode == 30  # a failure happened, with its traceback printed
        assert "Traceback" in run.stderr
        # A database outage too: its errors go through the same logs.
        own_pg.stop("immediate")
        down = env.luigi()
        own_pg.start()
        assert wait_for(lambda: len(smtp.messages) >= 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{luigid}/api/task_list?data="
                                    + urllib.parse.quote(json.dumps({}))) as response:
            luigid_view = response.read().decode()
        state_files = " ".join(p.read_text(errors="replace") for p in env.state_dir.rglob("*")
                               if p.is_file() and p.suffix in (".json", ".jsonl"))
        everything = "\n".join([
            run.stdout, run.stderr, down.stdout, down.stderr, env.log_file.read_text(),
            luigid_view, state_files, *[m.as_string() for m in smtp.messages],
        ])
        assert "refused" in down.stderr.lower() or "connection" in down.stderr.lower()
        assert sftp_password not in everything
        assert own_pg.password not in everything
    finally:
        smtp.stop()


def test_downloads_and_backups_are_private(env):
    env.generate(files=1, rows=50)
    with psycopg.connect(env.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
        run = env.popen()
        wait_until_blocked_on_a_lock(env)  # downloaded, loading
        [download] = env.local_files()
        modes = (stat.S_IMODE(download.stat().st_mode), stat.S_IMODE(download.parent.stat().st_mode))
        holder.execute("SELECT pg_advisory_unlock(%s, 0)", (db.LOCK_VISITORS,))
    out, _ = run.communicate()
    assert run.returncode == 0, out[-3000:]
    assert modes == (0o600, 0o700)
    [backup] = env.backup_dir.glob("visitas_*.zip")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(env.backup_dir.stat().st_mode) == 0o700


def test_remote_names_outside_the_safe_set_are_refused(env):
    manifest = env.generate(files=1, rows=30)
    for name in ("report_1 copia.txt", "report_$(reboot).txt", "report_é.txt"):
        (env.remote_dir / name).write_bytes((manifest["dir"] / "report_1.txt").read_bytes())
    result = env.luigi()
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r[0] for r in env.loads()] == ["report_1.txt"]
    assert sorted(p.name for p in env.remote_dir.iterdir()) == sorted(
        ["report_1 copia.txt", "report_$(reboot).txt", "report_é.txt"])
    log = env.log_file.read_text()
    assert log.count("characters outside [A-Za-z0-9._-]") >= 3
    assert not any("reboot" in p.name for p in env.tmp.rglob("*") if "sftp" not in str(p)
                   and "generated" not in str(p))
