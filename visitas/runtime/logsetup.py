"""Logging for visitas: stderr and a rotating file, configured once per process, secrets masked.

With ``--workers N`` each task runs in a process of its own, all writing the same file: records
go out as single ``O_APPEND`` writes, and whichever process finds the file full rotates it under
a file lock; the others notice the new file by its inode and reopen.  (``RotatingFileHandler``
rotates per process: two processes rotating at once shift each other's backups.)"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import re
import urllib.parse
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
_configured = False
# user:password@ in URIs, and password=... in key/value DSNs
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+(@)|(password\s*=\s*)('[^']*'|\S+)", re.I)


def mask(text: str, secrets: list[str] | None = None) -> str:
    """Replace passwords in DSNs and any of the given secret values with ***."""
    text = _DSN_PASSWORD.sub(lambda m: (m.group(1) + "***" + m.group(2)) if m.group(1)
                             else m.group(3) + "***", text)
    for secret in sorted(secrets or [], key=len, reverse=True):  # a longer one first
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def one_line(error: BaseException) -> str:
    """The first line of an error's message, masked: what an operator's command prints."""
    lines = str(error).strip().splitlines()
    try:
        secrets = configured_secrets()
    except Exception:  # an unreadable configuration is itself often the error being shown
        secrets = []
    return mask(lines[0] if lines else type(error).__name__, secrets)


def dsn_secrets(dsn: str) -> list[str]:
    """The password of a DSN as written and as meant (percent-decoded), to mask either form."""
    values = []
    for match in _DSN_PASSWORD.finditer(dsn):
        written = (dsn[match.start(): match.end()].split(":")[-1].split("@")[0]
                   if match.group(1) else match.group(4).strip("'"))
        values += [written, urllib.parse.unquote(written)]
    # A URI password with an unencoded '@' or ':' fools the pattern: everything between the
    # scheme's '//' and the last '@' is then masked whole, and its parts after the user too.
    if "://" in dsn and "@" in dsn:
        userinfo = dsn.split("://", 1)[1].rsplit("@", 1)[0]
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            values += [password, urllib.parse.unquote(password)]
    return [v for v in values if v]


def configured_secrets() -> list[str]:
    """Every secret value in the configuration (so that it can be masked wherever it shows)."""
    from visitas import config

    values: list[str] = []
    # Each section on its own: a command that needs only [postgres] (visitas report) must not
    # fail on an [sftp] whose ${VAR}s are not set where it runs.
    for read in (lambda: [config.sftp().password, config.sftp().key_passphrase],
                 lambda: [config.notify().smtp_password],
                 lambda: dsn_secrets(config.postgres().resolved_dsn())):
        try:
            values += read()
        except ValueError:  # Luigi: a parameter's value could not be read (a missing ${VAR})
            continue
    return [v for v in values if v]


class SecretFilter(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # tracebacks too (the formatter keeps this)
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info),
                                   self.secrets)
        return True


class SharedRotatingFileHandler(logging.Handler):
    """A size-rotated log file that several processes write at once without losing lines."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        super().__init__()
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._fd = -1
        self._inode = -1
        self._open()

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._inode = os.fstat(self._fd).st_ino

    def _moved(self) -> bool:
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            if self._moved():
                self._open()
            if self.max_bytes and os.fstat(self._fd).st_size + len(data) > self.max_bytes:
                self._rotate(len(data))
            os.write(self._fd, data)  # one write per record: O_APPEND keeps records whole
        except Exception:
            self.handleError(record)

    def _rotate(self, incoming: int) -> None:
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:  # another process may have rotated it meanwhile
                if os.stat(self.path).st_size + incoming <= self.max_bytes:
                    self._open()
                    return
            except FileNotFoundError:
                self._open()
                return
            if self.backups > 0:
                for n in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{n}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink()
            self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def configure() -> None:
    """Once per process: files private to the ETL user (reports hold personal data), and
    handlers on the ``visitas`` logger (and Luigi's, for the file)."""
    global _configured
    if _configured:
        return
    _configured = True
    os.umask(0o077)
    from visitas import config

    settings = config.logfile()
    secret_filter = SecretFilter(configured_secrets())
    formatter = logging.Formatter(FORMAT)
    package = logging.getLogger("visitas")
    package.setLevel(settings.level.upper())
    package.propagate = False
    stderr = logging.StreamHandler()
    handlers: list[logging.Handler] = [stderr]
    if settings.path:
        path = Path(settings.path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        rotating = SharedRotatingFileHandler(path, settings.max_mb * 1024 * 1024, settings.backups)
        handlers.append(rotating)
        for name in ("luigi-interface", "luigi"):
            logging.getLogger(name).addHandler(rotating)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(secret_filter)
        package.addHandler(handler)
