"""What the integration tests share: a configured environment that runs the real `luigi` command."""

from __future__ import annotations

import configparser
import contextlib
import datetime as dt
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import psycopg
from psycopg import sql

from visitas.dev import sample, servers as devservers

REMOTE_DIR = "home/vinkOS/archivosVisitas"
# Quick retries and lock waits: the tests' servers are local and their outages deliberate.
TEST_SETTINGS = """
[worker]
keep_alive = false
[postgres]
lock_wait = 300
[retry]
attempts = 3
first_delay = 0.2
max_delay = 1
"""
LUIGI = str(Path(sys.executable).with_name("luigi"))
VISITAS = str(Path(sys.executable).with_name("visitas"))


def run_command(command: str, task: str = "RunAll", scheduler_port: int | None = None) -> list[str]:
    """The command line of a run: ``"luigi"``, Luigi's own command (a process per step with
    several workers), or ``"visitas run"``, the operator's (steps in threads of one process);
    with ``scheduler_port``, against that luigid instead of a local scheduler."""
    scheduler = (["--scheduler-host", "127.0.0.1", "--scheduler-port", str(scheduler_port)]
                 if scheduler_port else [])
    if command == "visitas run":
        assert task == "RunAll", "visitas run runs RunAll only"
        return [VISITAS, "run", *scheduler]
    return [LUIGI, "--module", "visitas", task, *(scheduler or ["--local-scheduler"])]

class Env:
    """One test's world: an SFTP server's folder, local folders, a schema, a luigi.cfg."""

    def __init__(self, tmp: Path, dsn: str, schema: str, sftp_host_cfg: dict, remote_dir: Path,
                 remote_path: str, extra_cfg: str = ""):
        self.tmp, self.dsn, self.schema = tmp, dsn, schema
        self.remote_dir = remote_dir  # the server's folder, as seen locally
        self.remote_path = remote_path  # the same folder, as the SFTP server shows it
        self.download_dir = tmp / "download"
        self.backup_dir = tmp / "bckp"
        self.state_dir = tmp / "state"
        self.log_file = tmp / "logs" / "visitas.log"
        self.generated = tmp / "generated"
        self.sftp_cfg = sftp_host_cfg
        self.sftp_password = ""  # set by make_env when the server asks for one
        self.config = tmp / "luigi.cfg"
        self.write_config(extra_cfg)

    def write_config(self, extra: str = "") -> None:
        """The test's luigi.cfg; ``extra`` (cfg text) adds sections or overrides keys."""
        self.config.write_text(devservers.luigi_config(
            self.tmp, {**self.sftp_cfg, "remote_dir": self.remote_path, "timeout": 10}, self.schema,
            TEST_SETTINGS, extra, dsn_variable="VISITAS_TEST_PIPELINE_DSN"))

    # ------------------------------------------------------------------ running

    def environment(self, extra: dict | None = None) -> dict:
        """The process environment of a run: the config file, and the secrets it refers to."""
        return {**os.environ, "LUIGI_CONFIG_PATH": str(self.config),
                "VISITAS_TEST_PIPELINE_DSN": self.dsn,
                "VISITAS_TEST_SFTP_PASSWORD": self.sftp_password, **(extra or {})}

    def _run_environment(self, env: dict | None) -> dict:
        environment = self.environment(env)
        environment.pop("VISITAS_RUN_ID", None)  # each run makes its own
        return environment

    def luigi(self, *args: str, timeout: float = 300, env: dict | None = None,
              task: str = "RunAll", scheduler_port: int | None = None) -> subprocess.CompletedProcess:
        """The real command, as cron runs it (a fresh interpreter, our config); with
        ``scheduler_port``, against that luigid instead of a local scheduler."""
        return self.run("luigi", *args, timeout=timeout, env=env, task=task,
                        scheduler_port=scheduler_port)

    def run(self, command: str, *args: str, timeout: float = 300, env: dict | None = None,
            task: str = "RunAll", scheduler_port: int | None = None) -> Finished:
        """A run by ``command`` (see :func:`run_command`), waited for."""
        return run_measured([*run_command(command, task, scheduler_port), *args], cwd=self.tmp,
                            env=self._run_environment(env), timeout=timeout)

    def popen(self, *args: str, env: dict | None = None, scheduler_port: int | None = None,
              command: str = "luigi") -> "Running":
        """Start a run by ``command`` (see :func:`run_command`) in the background; its output goes
        to a file (never a full pipe)."""
        self._runs = getattr(self, "_runs", 0) + 1
        output = self.tmp / f"run-{self._runs}.out"
        with open(output, "w") as handle:
            process = subprocess.Popen(
                [*run_command(command, scheduler_port=scheduler_port), *args], cwd=self.tmp,
                env=self._run_environment(env), stdout=handle, stderr=subprocess.STDOUT, text=True)
        return Running(process, output)

    def host_config(self, name: str, extra: str = "") -> dict:
        """Another host: its own download, state, backup and log folders, ``[cluster] host``
        ``name``, the same database and SFTP server.  Returns the environment of its runs."""
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        cfg = self.config.read_text()
        for mine in (self.download_dir, self.state_dir, self.backup_dir, self.log_file.parent):
            cfg = cfg.replace(str(mine), str(folder / mine.name))
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(cfg)
        parser.read_string(f"[cluster]\nhost = {name}\n" + extra)
        with open(folder / "luigi.cfg", "w") as handle:
            parser.write(handle)
        return {"LUIGI_CONFIG_PATH": str(folder / "luigi.cfg")}

    # ------------------------------------------------------------------ data

    def generate(self, files: int = 3, rows: int = 300, seed: int = 7, defects: float = 0.05,
                 first_number: int = 1, visitors: int | None = None) -> dict:
        """Generate reports, keep pristine copies, upload them (copy into the server's folder)."""
        out = self.generated / f"batch{first_number}-{seed}"
        manifest = sample.generate(out, files=files, rows=rows, seed=seed, defects=defects,
                                   first_number=first_number, visitors=visitors)
        for name in manifest["files"]:
            self.upload(out / name, name)
        manifest["dir"] = out
        return manifest

    def upload(self, source: Path, name: str) -> None:
        self.remote_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, self.remote_dir / name)

    def truth(self, *manifests: dict) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(m["dir"] / "truth.parquet") for m in manifests])

    def remote_reports(self) -> list[str]:
        return sorted(p.name for p in self.remote_dir.glob("report_*.txt"))

    def local_files(self) -> list[Path]:
        return [p for p in self.download_dir.rglob("*") if p.is_file()] if self.download_dir.exists() else []

    def zip_members(self, *hosts: str) -> dict[str, bytes]:
        """The backups' members, of this env's folders and of ``hosts``' (host_config)."""
        members: dict[str, bytes] = {}
        folders = [self.backup_dir, *(self.tmp / host / self.backup_dir.name for host in hosts)]
        for path in sorted(p for folder in folders for p in folder.glob("visitas_*.zip")):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    members[f"{path.name}:{name}"] = archive.read(name)
        return members

    # ------------------------------------------------------------------ database

    def query(self, text: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.dsn) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            return conn.execute(text, params).fetchall()

    def execute(self, text: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            conn.execute(text)

    def fail_loads_of(self, file_name: str, message: str = "injected failure") -> None:
        """A real database error whenever that file's statistics are inserted (a trigger)."""
        from visitas.db import Database

        Database(self.dsn, self.schema).connection().close()  # the schema must exist first
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            conn.execute(sql.SQL("""
                CREATE FUNCTION visitas_test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.source_file = {file} THEN RAISE EXCEPTION {message}; END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER visitas_test_fault BEFORE INSERT ON statistics
                    FOR EACH ROW EXECUTE FUNCTION visitas_test_fault();""").format(
                file=sql.Literal(file_name), message=sql.Literal(message)))

    def stop_failing(self) -> None:
        self.execute("DROP TRIGGER visitas_test_fault ON statistics")

    def visitors(self, source: str = "visitor", params: tuple = ()) -> pl.DataFrame:
        """The visitor table (every counter), or the visit counters of ``visitor_as_of(%s)`` or
        ``visitor_today``."""
        schema = VISITOR_SCHEMA if source == "visitor" else VISIT_COUNTERS
        rows = self.query(f"SELECT {', '.join(schema)} FROM {source} ORDER BY email", params)
        return pl.DataFrame(rows, orient="row", schema=schema)

    def load_count(self) -> int:
        """Rows in load_log, 0 while the schema does not exist yet (for polling)."""
        try:
            return self.query("SELECT count(*) FROM load_log")[0][0]
        except psycopg.errors.UndefinedTable:
            return 0

    def loads(self) -> list[tuple]:
        return self.query("SELECT file_name, status, rows_read, rows_loaded, rows_rejected"
                          " FROM load_log ORDER BY id")


class Finished(subprocess.CompletedProcess):
    """A finished command with its own peak memory (``max_rss_kib``, from wait4)."""

    max_rss_kib: int = 0


def run_measured(command: list[str], cwd: Path, env: dict, timeout: float) -> Finished:
    """``subprocess.run`` with captured text output, plus the peak RSS of that process alone
    (``wait4``'s rusage: not every child this test session ever waited for)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise subprocess.TimeoutExpired(command, timeout)
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Finished(command, process.returncode, out.read(), err.read())
    result.max_rss_kib = usage.ru_maxrss
    return result


class Running:
    def __init__(self, process: subprocess.Popen, output: Path):
        self.process, self.output = process, output

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def pid(self) -> int:
        return self.process.pid

    def communicate(self, timeout: float = 300) -> tuple[str, None]:
        self.process.wait(timeout)
        return self.output.read_text(), None

    def text(self) -> str:
        return self.output.read_text()


def assert_exactly_once(env: Env, *manifests: dict, hosts: tuple[str, ...] = ()) -> None:
    """How every fault and outage test ends: each file loaded once (and nothing else recorded),
    statistics and visitors as the rule over all visits, every file in a backup zip, nothing left
    at the source or in the download folder."""
    from polars.testing import assert_frame_equal

    files = sorted(name for m in manifests for name in m["files"])
    assert sorted((r[0], r[1]) for r in env.loads()) == [(n, "loaded") for n in files]
    assert env.query("SELECT count(*) FROM load_log WHERE status = 'loaded'"
                     " GROUP BY sha256 HAVING count(*) > 1") == []
    truth = env.truth(*manifests)
    assert env.query("SELECT count(*) FROM statistics") == [(truth.height,)]
    assert_frame_equal(env.visitors(), expected_visitors(truth))
    members = [name.split(":", 1)[1] for name in env.zip_members(*hosts)]
    assert sorted(members) == files
    assert env.remote_reports() == []
    assert env.local_files() == []
    for host in hosts:
        assert [p for p in (env.tmp / host / env.download_dir.name).rglob("*") if p.is_file()] == []


VISIT_COUNTERS = {
    "email": pl.String, "fecha_primera_visita": pl.Date, "fecha_ultima_visita": pl.Date,
    "visitas_totales": pl.Int64, "visitas_anio_actual": pl.Int64, "visitas_mes_actual": pl.Int64}
VISITOR_SCHEMA = {
    **VISIT_COUNTERS, "opens_totales": pl.Int64, "clicks_totales": pl.Int64,
    "visitas_abiertas": pl.Int64, "visitas_clicadas": pl.Int64, "fecha_ultimo_open": pl.Date,
    "fecha_ultimo_click": pl.Date}


def cut_mid_line(data: bytes, fraction: float = 0.5) -> bytes:
    """The first bytes of ``data``, ending inside a line (as a stalled upload does)."""
    cut = int(len(data) * fraction)
    while data[cut - 1:cut] in (b"\n", b"\r") or data[cut:cut + 1] in (b"\n", b"\r"):
        cut += 1
    return data[:cut]


def expected_visitors(truth: pl.DataFrame, as_of: dt.date | None = None) -> pl.DataFrame:
    """The visitor table the rule gives for all these visits, worked out here in plain Python
    (an oracle written apart from visitas.visitors, which it checks), from what the generator
    wrote in each row.  ``as_of``: the visit counters relative to that day instead of the
    latest visit (visitor_as_of, visitor_today)."""
    by_email: dict[str, list[dict]] = {}
    for visit in truth.iter_rows(named=True):
        by_email.setdefault(visit["email"], []).append(visit)
    rows = []
    for email in sorted(by_email):
        visits = by_email[email]
        days = [v["sent_at"].date() for v in visits]
        current = as_of or max(days)
        counters = (email, min(days), max(days), len(days),
                    sum(1 for d in days if d.year == current.year),
                    sum(1 for d in days if (d.year, d.month) == (current.year, current.month)))
        if as_of is None:
            counters += (sum(v["opens_total"] for v in visits),
                         sum(v["clicks_total"] for v in visits),
                         sum(1 for v in visits if v["opened"]), sum(1 for v in visits if v["clicked"]),
                         max((v["opened_on"] for v in visits if v["opened_on"]), default=None),
                         max((v["clicked_on"] for v in visits if v["clicked_on"]), default=None))
        rows.append(counters)
    return pl.DataFrame(rows, orient="row", schema=VISIT_COUNTERS if as_of else VISITOR_SCHEMA)


def start_sftp(kind: str, tmp: Path, keys: devservers.SshKeys, password: str = ""):
    """(server, sftp cfg, remote_dir) for the embedded server or OpenSSH's sshd."""
    if kind == "asyncssh":
        root = tmp / "sftp-root"
        server = devservers.SftpServer(root, keys, username="vinkos", password=password).start()
        remote_dir = root / REMOTE_DIR
        cfg = {"host": "127.0.0.1", "port": server.port, "username": "vinkos",
               "key_file": keys.client_key,
               # As in production: a ${VAR} reference (Luigi's parser reads % as interpolation).
               **({"password": "${VISITAS_TEST_SFTP_PASSWORD}"} if password else {}),
               "known_hosts": keys.write_known_hosts(tmp / "known_hosts", server.port)}
        return server, cfg, remote_dir, "/" + REMOTE_DIR
    server = devservers.OpenSshServer(tmp, keys).start()
    remote_dir = tmp / "openssh-remote"
    import getpass

    cfg = {"host": "127.0.0.1", "port": server.port, "username": getpass.getuser(),
           "key_file": keys.client_key,
           "known_hosts": keys.write_known_hosts(tmp / "known_hosts", server.port)}
    return server, cfg, remote_dir, str(remote_dir)


# ---------------------------------------------------------------------- waiting and mail

def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def wait_until_blocked_on_a_lock(env: Env, timeout: float = 180.0, count: int = 1) -> None:
    """Until ``count`` of the run's database sessions wait on a lock (the test holds it)."""
    def blocked():
        return env.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'visitas'"
                         " AND wait_event_type = 'Lock'")[0][0] >= count
    assert wait_for(blocked, timeout), "the run never reached the lock"


@contextlib.contextmanager
def holding_the_archive(env: Env) -> Iterator[None]:
    """While this holds the day's zip lock, a run's ArchiveZip waits there, after its file's commit."""
    env.backup_dir.mkdir(mode=0o700, exist_ok=True)
    with open(env.backup_dir / f".visitas_{time.strftime('%Y%m%d')}.zip.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def notify_cfg(smtp, **extra) -> str:
    """A [notify] section that mails the run mail to the test's SMTP server."""
    lines = ["[notify]", "smtp_host = 127.0.0.1", f"smtp_port = {smtp.port}",
             "sender = visitas@example.com", "recipients = ops@example.com, data@example.com"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"
