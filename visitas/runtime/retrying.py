"""Bounded retries with exponential backoff for SFTP and database operations."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import paramiko
import psycopg

log = logging.getLogger(__name__)
T = TypeVar("T")

class RetryNow(Exception):
    """The operation met a state that a fresh attempt resolves (raised on purpose)."""


# What an outage looks like: the server is down, restarting, or the connection dropped.
TRANSIENT = (
    psycopg.OperationalError,
    paramiko.SSHException,
    socket.error,  # OSError: refused, reset, timed out
    EOFError,
    RetryNow,
)


class PermanentError(Exception):
    """Mixed into errors that look transient by type but that no retry will fix."""


class ConfigError(PermanentError, ValueError):
    """The configuration is incomplete or wrong: say what to fix, never a secret."""


# ...except these, which no retry will fix.
PERMANENT = (PermanentError, paramiko.BadHostKeyException, paramiko.AuthenticationException,
             FileNotFoundError, PermissionError)


def retry_call(what: str, operation: Callable[[], T], attempts: int = 5,
               first_delay: float = 1.0, max_delay: float = 30.0,
               on_retry: Callable[[], None] | None = None) -> T:
    """Call ``operation``; on a transient error wait and try again, ``attempts`` times in all."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except PERMANENT:
            raise
        except TRANSIENT as error:
            if attempt == attempts:
                log.error("%s failed after %d attempts: %s", what, attempts, _one_line(error))
                raise
            log.warning("%s failed (attempt %d of %d): %s; retrying in %.1fs",
                        what, attempt, attempts, _one_line(error), delay)
            if on_retry:
                on_retry()
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def from_config() -> dict:
    """The [retry] section as keyword arguments of :func:`retry_call`."""
    from visitas.config import retry

    cfg = retry()
    return {"attempts": cfg.attempts, "first_delay": cfg.first_delay, "max_delay": cfg.max_delay}
