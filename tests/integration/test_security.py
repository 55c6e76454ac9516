"""Nobody let in, nothing leaked: host keys, secrets, file modes, unsafe remote names."""

from __future__ import annotations

import json
import stat
import urllib.parse
import urllib.request

import psycopg
from psycopg import sql

from visitas import db
from visitas.dev import servers as devservers

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


def _luigid_view(port: int) -> str:
    """What luigid shows: every task, and the error text of each failed one."""
    def get(path: str, data: dict) -> str:
        url = f"http://127.0.0.1:{port}/api/{path}?data=" + urllib.parse.quote(json.dumps(data))
        with urllib.request.urlopen(url) as response:
            return response.read().decode()

    tasks = get("task_list", {})
    failed = json.loads(get("task_list", {"status": "FAILED"}))["response"]
    return "\n".join([tasks, *(get("fetch_error", {"task_id": task_id}) for task_id in failed)])


def _mail_text(message) -> str:
    """A mail as its reader sees it: headers and every part decoded (bodies may be base64)."""
    parts = [str(message["Subject"])]
    for part in message.walk():
        payload = part.get_payload(decode=True)
        if payload:
            parts.append(payload.decode("utf-8", errors="replace"))
    return "\n".join(parts)


def _windows(secret: str, width: int) -> set[str]:
    """Every piece of ``width`` characters of a secret: a partial echo counts as a leak (libpq
    quotes as little as four characters of a DSN it cannot parse)."""
    return {secret[i:i + width] for i in range(len(secret) - width + 1)}


def test_secrets_never_appear_in_logs_errors_mails_or_luigid(make_env, own_pg, luigid, smtp):
    """Passwords with %, @ and : (which DSN parsers quote back in their errors), through a failed
    load, a database outage and a malformed DSN: not a piece of them in any output."""
    db_password = "Pw%4@d:Q7zK3m%2F@9"
    sftp_password = "sf%:@tp" + "Q7" * 6
    with psycopg.connect(own_pg.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE etl LOGIN SUPERUSER PASSWORD {}").format(
            sql.Literal(db_password)))
    host = f"127.0.0.1:{own_pg.port}/postgres"
    dsn = f"postgresql://etl:{urllib.parse.quote(db_password, safe='')}@{host}"
    luigi_mail = (f"[email]\nmethod = smtp\nreceiver = oncall@example.com\n"
                  f"sender = luigi@example.com\nforce_send = true\n"
                  f"[smtp]\nhost = 127.0.0.1\nport = {smtp.port}\n")
    env = make_env(password=sftp_password, dsn=dsn,
                   extra_cfg="[sftp]\nkey_file =\n" + notify_cfg(smtp, send_always="true") + luigi_mail)
    env.generate(files=2, rows=100, defects=0.05)
    env.fail_loads_of("report_2.txt")
    failing = env.luigi(scheduler_port=luigid)
    assert failing.returncode == 30, failing.stderr[-3000:]  # a failure, its traceback printed
    assert "Traceback" in failing.stderr
    own_pg.stop("immediate")  # a database outage: its errors go through the same paths
    down = env.luigi()
    own_pg.start()
    assert "refused" in down.stderr.lower() or "connection" in down.stderr.lower()
    # The password written unencoded: libpq quotes the token it cannot parse.
    malformed = env.luigi(env={"VISITAS_TEST_PIPELINE_DSN": f"postgresql://etl:{db_password}@{host}"})
    assert malformed.returncode != 0
    # Each run mails its report, and Luigi mails each task that failed or failed scheduling.
    assert wait_for(lambda: sum("failed scheduling" in m["Subject"] for m in smtp.messages) >= 2
                    and sum(m["Subject"].startswith("[visitas]") for m in smtp.messages) >= 3, 20)

    state_files = " ".join(p.read_text(errors="replace") for p in env.state_dir.rglob("*")
                           if p.is_file() and p.suffix in (".json", ".jsonl"))
    with psycopg.connect(own_pg.dsn()) as conn:
        recorded = [m for (m,) in conn.execute(f"SELECT coalesce(message, '') FROM {env.schema}.load_log")]
    everything = "\n".join([
        *(r.stdout + r.stderr for r in (failing, down, malformed)), env.log_file.read_text(),
        _luigid_view(luigid), state_files, *map(_mail_text, smtp.messages), *recorded,
    ])
    assert "injected failure" in everything and "Traceback" in everything  # the places were read
    # Pieces of 4 for the made-up passwords; of 8 for the random one (chance matches otherwise).
    for secret, width in ((db_password, 4), (urllib.parse.quote(db_password, safe=""), 4),
                          (sftp_password, 4), (own_pg.password, 8)):
        leaked = [piece for piece in _windows(secret, width) if piece in everything]
        assert not leaked, f"pieces of a secret leaked: {leaked}"
    assert "DSN ([postgres] dsn or VISITAS_DSN) cannot be parsed" in malformed.stderr


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
