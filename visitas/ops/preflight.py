"""``visitas check``: everything the first night needs, checked now, one line per check.

Nothing is changed: no schema is migrated, no file is downloaded or deleted; a folder that does
not exist yet is made (the run would make it), and a test file is written in each and removed.
Each check runs even when an earlier one failed, with one attempt (no retries).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import smtplib
import tempfile
from collections.abc import Callable
from pathlib import Path

from visitas.runtime import logsetup

log = logging.getLogger(__name__)

# Free space a run needs besides: the reports at the source take about three times their size
# (the download, the checked batches, the zip), plus this margin.
MARGIN_BYTES = 100 * 1024 * 1024
TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE"


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _run(name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, True, probe())
    except Exception as error:  # each problem is a line, never a traceback
        return Check(name, False, logsetup.one_line(error))


def check_config() -> str:
    """Every section of the configuration reads, and what a run cannot do without is set."""
    from visitas import config

    sections = {"sftp": config.sftp, "postgres": config.postgres, "paths": config.paths,
                "notify": config.notify, "load": config.load, "retry": config.retry,
                "logfile": config.logfile, "cluster": config.cluster}
    problems = []
    for name, section in sections.items():
        try:
            section()
        except Exception as error:
            problems.append(f"[{name}] {logsetup.one_line(error)}")
    if problems:
        raise ValueError("; ".join(problems))
    sftp, postgres = config.sftp(), config.postgres()
    missing = [key for key, value in (("[sftp] host", sftp.host), ("[sftp] username", sftp.username),
                                      ("[sftp] remote_dir", sftp.remote_dir),
                                      ("[postgres] dsn", postgres.resolved_dsn())) if not value]
    if not (sftp.password or sftp.key_file):
        missing.append("[sftp] password or key_file")
    if missing:
        raise ValueError("not set: " + ", ".join(missing))
    return f"every section reads ({os.environ.get('LUIGI_CONFIG_PATH') or 'luigi.cfg'})"


def check_sftp(found: dict) -> str:
    """Host key known and matching, login, remote_dir listable (one connection, no retry)."""
    import time

    from visitas import config, sftp

    source = sftp.SftpSource.from_config()
    reports = source.list_once()
    found["sizes"] = sum(r.size for r in reports)
    min_age = config.sftp().min_age
    young = sum(1 for r in reports if time.time() - r.mtime < min_age)
    return (f"{source.username}@{source.host}:{source.port}: host key matches {source.known_hosts},"
            f" logged in, {source.remote_dir} lists {len(reports)} report(s)"
            + (f" ({young} younger than min_age)" if young else ""))


def check_database() -> str:
    """Reachable; schema version; the privileges a run needs (nothing is migrated here)."""
    from visitas import db
    from visitas.db import schema as migrations
    from visitas.db.connection import scalar

    database = db.Database.from_config()
    with database.probe() as conn:
        server = conn.info.server_version
        name = database.schema
        exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).fetchone()
        if not exists:
            if not scalar(conn, "SELECT has_database_privilege(current_database(), 'CREATE')"):
                raise PermissionError(f"schema {name} does not exist and this user may not create it")
            return (f"PostgreSQL {server // 10000}.{server % 10000}: schema {name} does not exist"
                    " yet; the first run creates it")
        version = migrations.version(conn, name)
        if version > migrations.LATEST:
            raise RuntimeError(f"schema {name} is at version {version}, newer than this program's"
                               f" {migrations.LATEST}: upgrade visitas")
        if not scalar(conn, "SELECT has_schema_privilege(%s, 'USAGE')"
                            " AND has_schema_privilege(%s, 'CREATE')", (name, name)):
            raise PermissionError(f"this user lacks USAGE or CREATE on schema {name}")
        lacking = [row[0] for row in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = 'r' AND NOT has_table_privilege(c.oid, %s)"
            " ORDER BY 1", (name, TABLE_PRIVILEGES))]
        if lacking:
            raise PermissionError(f"this user lacks {TABLE_PRIVILEGES} on {', '.join(lacking)}")
        state = ("up to date" if version == migrations.LATEST
                 else f"at version {version} of {migrations.LATEST}: the next run migrates it")
        return f"PostgreSQL {server // 10000}.{server % 10000}: schema {name} {state}, privileges enough"


def check_smtp() -> str:
    """When there are recipients: the server answers, STARTTLS and login work."""
    from visitas import config

    settings = config.notify()
    recipients = [r.strip() for r in settings.recipients.split(",") if r.strip()]
    if not recipients:
        return "no [notify] recipients: no run mail is sent (nothing to check)"
    if not settings.smtp_host:
        raise ValueError("[notify] recipients are set but smtp_host is not")
    try:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=15)
    except OSError as error:
        raise ConnectionError(f"{settings.smtp_host}:{settings.smtp_port}: {error}") from None
    with smtp:
        smtp.ehlo()
        if settings.smtp_starttls:
            smtp.starttls()
            smtp.ehlo()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        code, _ = smtp.noop()
        if code != 250:
            raise ConnectionError(f"the SMTP server answered {code} to NOOP")
    return f"{settings.smtp_host}:{settings.smtp_port} answers; mail goes to {', '.join(recipients)}"


def check_folders(found: dict) -> str:
    """Each folder exists (or is made), is writable, and has room for what is at the source."""
    from visitas import config

    paths = config.paths()
    folders = {"download_dir": paths.download_dir, "state_dir": paths.resolved_state_dir(),
               "backup_dir": paths.backup_dir}
    log_path = config.logfile().path
    if log_path:
        folders["log folder"] = str(Path(log_path).expanduser().parent)
    need = 3 * found.get("sizes", 0) + MARGIN_BYTES
    notes = []
    for label, folder in folders.items():
        path = Path(folder).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".visitas-check-"):
                pass
        except OSError as error:
            raise PermissionError(f"{label} {path} is not writable: {error.strerror or error}") from None
        free = shutil.disk_usage(path).free
        if free < need:
            raise OSError(f"{label} {path} has {free // 2**20} MiB free, needs {need // 2**20} MiB"
                          " (three times the reports at the source, plus 100 MiB)")
        notes.append(f"{label} {free // 2**30} GiB free")
    return "writable: " + ", ".join(notes)


def run_checks() -> list[Check]:
    found: dict = {}
    checks = [_run("config", check_config)]
    checks.append(_run("sftp", lambda: check_sftp(found)))
    checks.append(_run("database", check_database))
    checks.append(_run("smtp", check_smtp))
    checks.append(_run("folders", lambda: check_folders(found)))
    return checks


def render(checks: list[Check]) -> str:
    return "".join(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<9} {c.detail}\n" for c in checks)
