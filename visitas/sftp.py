"""The partner's SFTP server, through paramiko, with host keys always verified."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import posixpath
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from visitas.paths import SAFE_NAME, check_safe
from visitas.runtime import logsetup, retrying
from visitas.runtime.runinfo import per_thread

log = logging.getLogger(__name__)

# A download is read in windows of this many bytes, each as pipelined read requests, and each
# written before the next is asked for.  paramiko's prefetching get buffers without bound whatever
# the disk cannot take yet (measured: a 1 GiB download peaked at 1,124 MiB of memory while the disk
# was busy writing back; capping its requests in flight does not help, a reply frees its slot).
FETCH_WINDOW = 8 * 1024 * 1024
# Read requests are as large as the server takes whole (its limits@openssh.com reply), up to
# OpenSSH's 255 KiB, instead of paramiko's 32 KiB: paramiko's cost is per packet and per reply
# (measured, 244 MiB from OpenSSH 9.2 on loopback: 1.5-1.9 s with 32 KiB, 0.85-1.0 s with 255 KiB,
# as fast as OpenSSH's own sftp).  A server that does not say keeps 32 KiB: a reply shorter than
# asked makes paramiko read the rest of the window one request at a time.
READ_DEFAULT = 32 * 1024
READ_MAX = 256 * 1024 - 1024
# The SSH channel's receive window and largest packet: with paramiko's 2 MiB window the server
# stalls for window updates several times per fetch window, and a 255 KiB reply needs a packet
# that holds it.  Data in flight stays bounded by FETCH_WINDOW's requests.
SSH_WINDOW = 64 * 1024 * 1024
SSH_PACKET = 256 * 1024 + 1024
# AES-GCM first, when the server offers it: one pass over each packet (AES-NI and carry-less
# multiply) where paramiko's first choice, AES-CTR, needs HMAC-SHA2-256 as a second one.  Measured,
# 244 MiB from OpenSSH 9.2 on loopback, four runs each, alternating: 0.88-0.94 s with aes128-ctr,
# 0.59-0.64 s with aes128-gcm@openssh.com, paramiko's CPU falling alike.  A server without it
# gets paramiko's own order.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _transport(sock: socket.socket, **kwargs) -> paramiko.Transport:
    """paramiko's transport, with PREFERRED_CIPHERS ahead of its own order."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in offered) + tuple(
        c for c in offered if c not in PREFERRED_CIPHERS)
    return transport


def _fetch(sftp: paramiko.SFTPClient, remote: str, local: Path, size: int,
           read_size: int = READ_DEFAULT) -> None:
    """Copy ``remote`` to ``local``, holding at most one window of it in memory."""
    with sftp.open(remote, "rb") as reader, open(local, "wb") as writer:
        reader.MAX_REQUEST_SIZE = read_size  # paramiko cuts readv's pieces into requests this big
        for start in range(0, size, FETCH_WINDOW):
            end = min(size, start + FETCH_WINDOW)
            for data in reader.readv([(o, min(read_size, end - o))
                                      for o in range(start, end, read_size)]):
                writer.write(data)


def server_read_size(sftp: paramiko.SFTPClient) -> int:
    """The read request size to use with this server: what its ``limits@openssh.com`` reply
    allows (0 there means no limit), at most READ_MAX; READ_DEFAULT if it does not reply."""
    try:  # paramiko has no public call for an extended request; _request is its own for them
        kind, reply = sftp._request(paramiko.sftp.CMD_EXTENDED, "limits@openssh.com")
        if kind != paramiko.sftp.CMD_EXTENDED_REPLY:
            return READ_DEFAULT
        reply.get_int64()  # max packet length
        max_read = reply.get_int64()
    except (OSError, EOFError, paramiko.SFTPError, paramiko.SSHException):
        return READ_DEFAULT
    return READ_MAX if max_read == 0 else max(READ_DEFAULT, min(max_read, READ_MAX))


class StillBeingWritten(Exception):
    """The file is younger than ``min_age`` or changed while it was read: leave it this run."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    mtime: int

    @classmethod
    def of(cls, name: str, attrs: paramiko.SFTPAttributes) -> RemoteFile:
        return cls(name, attrs.st_size or 0, attrs.st_mtime or 0)


class SftpSource:
    """One SSH connection to the partner's server (reconnects after an outage)."""

    def __init__(self, host: str, port: int, username: str, *, password: str = "",
                 key_file: str = "", key_passphrase: str = "", known_hosts: str = "",
                 remote_dir: str = ".", pattern: str = "report_*.txt", timeout: float = 30.0,
                 retry: dict | None = None):
        self.host, self.port, self.username = host, port, username
        self._password, self._key_file, self._key_passphrase = password, key_file, key_passphrase
        self.known_hosts = os.path.expanduser(known_hosts) if known_hosts else ""
        self.remote_dir, self.pattern, self.timeout = remote_dir, pattern, timeout
        self.retry = retry or {}
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._read_size = READ_DEFAULT

    @classmethod
    def from_config(cls) -> SftpSource:
        from visitas.config import sftp

        cfg = sftp()
        return cls(cfg.host, cfg.port, cfg.username, password=cfg.password, key_file=cfg.key_file,
                   key_passphrase=cfg.key_passphrase, known_hosts=cfg.known_hosts,
                   remote_dir=cfg.remote_dir, pattern=cfg.pattern, timeout=cfg.timeout,
                   retry=retrying.from_config())

    def __repr__(self) -> str:  # never the password
        return f"SftpSource({self.username}@{self.host}:{self.port}{self.remote_dir})"

    # ------------------------------------------------------------------ connection

    def _connect(self) -> paramiko.SFTPClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        if not self.known_hosts or not os.path.exists(self.known_hosts):
            raise FileNotFoundError(
                f"known_hosts file {self.known_hosts or '(not set)'} not found: the server's host "
                "key cannot be verified (add it with ssh-keyscan, see README)")
        client.load_host_keys(self.known_hosts)
        pkey = None
        if self._key_file:
            pkey = paramiko.PKey.from_path(os.path.expanduser(self._key_file),
                                           self._key_passphrase or None)
        try:
            # paramiko leaves Nagle's algorithm on: each handshake step then waits for a delayed
            # ACK (about 90 ms per connection instead of 5, measured on loopback).
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.connect(
                self.host, port=self.port, username=self.username,
                password=self._password or None, pkey=pkey, timeout=self.timeout,
                banner_timeout=self.timeout, auth_timeout=self.timeout, channel_timeout=self.timeout,
                allow_agent=False, look_for_keys=False, sock=sock, transport_factory=_transport)
        except (paramiko.SSHException, OSError) as error:
            client.close()
            if "not found in known_hosts" in str(error):
                raise UnknownHostKey(self.host, self.port, self.known_hosts) from None
            masked = logsetup.mask(str(error), [self._password, self._key_passphrase])
            if masked != str(error):  # never a secret in a traceback, a mail or luigid
                raise type(error)(masked) from None
            raise
        sftp = paramiko.SFTPClient.from_transport(client.get_transport(), window_size=SSH_WINDOW,
                                                  max_packet_size=SSH_PACKET)
        self._read_size = server_read_size(sftp)
        sftp.get_channel().settimeout(self.timeout)
        self._client, self._sftp = client, sftp
        log.info("connected to SFTP %s@%s:%d (%s, reads of %d bytes)", self.username, self.host,
                 self.port, self.cipher, self._read_size)
        return sftp

    @property
    def read_size(self) -> int:
        """The read request size used with the server (known once connected)."""
        return self._read_size

    @property
    def cipher(self) -> str:
        """The cipher agreed with the server for what it sends ("" until connected)."""
        transport = self._client.get_transport() if self._client else None
        return transport.remote_cipher if transport else ""

    def _session(self) -> paramiko.SFTPClient:
        transport = self._client.get_transport() if self._client else None
        if self._sftp is None or transport is None or not transport.is_active():
            self.close()
            return self._connect()
        return self._sftp

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = self._sftp = None

    def _call(self, what: str, operation):
        return retrying.retry_call(what, lambda: operation(self._session()),
                                   on_retry=self.close, **self.retry)

    # ------------------------------------------------------------------ operations

    def remote_path(self, name: str) -> str:
        return posixpath.join(self.remote_dir, name)

    def list_reports(self) -> list[RemoteFile]:
        """Regular files in ``remote_dir`` matching ``pattern``; never follows links."""

        def listing(sftp: paramiko.SFTPClient) -> list[RemoteFile]:
            found = []
            for entry in sftp.listdir_attr(self.remote_dir):
                if not fnmatch.fnmatchcase(entry.filename, self.pattern):
                    continue
                attrs = sftp.lstat(self.remote_path(entry.filename))
                if not stat.S_ISREG(attrs.st_mode or 0):
                    log.warning("skipping %s: not a regular file (a directory or a link)",
                                entry.filename)
                    continue
                if not SAFE_NAME.match(entry.filename):
                    log.warning("refusing %r: characters outside [A-Za-z0-9._-]", entry.filename)
                    continue
                found.append(RemoteFile.of(entry.filename, attrs))
            return sorted(found, key=lambda f: _natural_key(f.name))

        return self._call(f"listing {self.remote_dir}", listing)

    def list_once(self) -> list[RemoteFile]:
        """One connection, one listing, no retry, then closed (the operator's commands)."""
        self.retry = {**self.retry, "attempts": 1}
        try:
            return self.list_reports()
        finally:
            self.close()

    def stat(self, name: str) -> RemoteFile:
        def lstat(sftp: paramiko.SFTPClient) -> RemoteFile:
            return RemoteFile.of(name, sftp.lstat(self.remote_path(name)))

        return self._call(f"stat {name}", lstat)

    def download(self, name: str, local_path: Path, min_age: float = 0.0,
                 before_rename: Callable[[RemoteFile], None] | None = None) -> RemoteFile:
        """Download to a temporary name beside ``local_path``, check it, rename into place.

        Raises :class:`StillBeingWritten` (and keeps nothing) when the file was modified less
        than ``min_age`` seconds ago, or when its size or mtime changed during the download: a
        partner's upload still going on.  ``before_rename(remote)`` is called with the file's
        size and mtime before the download appears under its name.
        """
        check_safe(name)
        local_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = local_path.with_name(f".{local_path.name}.part-{os.getpid()}")

        def get(sftp: paramiko.SFTPClient) -> RemoteFile:
            before = sftp.lstat(self.remote_path(name))
            age = time.time() - (before.st_mtime or 0)
            if age < min_age:
                raise StillBeingWritten(f"{name} was modified {max(age, 0):.0f}s ago (min_age is"
                                        f" {min_age:.0f}s): it may still be being written")
            try:
                started = time.perf_counter()
                _fetch(sftp, self.remote_path(name), partial, before.st_size or 0, self._read_size)
                os.chmod(partial, 0o600)
                after = sftp.lstat(self.remote_path(name))
                if (after.st_size, after.st_mtime) != (before.st_size, before.st_mtime):
                    raise StillBeingWritten(
                        f"{name} changed while it was downloaded ({before.st_size} -> "
                        f"{after.st_size} bytes): it is still being written")
                got = partial.stat().st_size
                if got != before.st_size:
                    raise EOFError(f"download of {name} is incomplete: {got} of {before.st_size} bytes")
                fetched = time.perf_counter()
                with open(partial, "rb") as handle:
                    os.fsync(handle.fileno())
                remote = RemoteFile.of(name, before)
                if before_rename:
                    before_rename(remote)
                os.replace(partial, local_path)
                log.info("downloaded %s (%d bytes) in %.2fs, written to disk in %.2fs", name, got,
                         fetched - started, time.perf_counter() - fetched)
                return remote
            finally:
                partial.unlink(missing_ok=True)

        return self._call(f"download {name}", get)

    def remove(self, name: str) -> bool:
        """Delete a file at the source; ``False`` if it was already gone."""
        check_safe(name)

        def delete(sftp: paramiko.SFTPClient) -> bool:
            try:
                sftp.remove(self.remote_path(name))
                return True
            except FileNotFoundError:
                return False

        removed = self._call(f"delete {name}", delete)
        log.info("%s %s at the source", "deleted" if removed else "already gone:", name)
        return removed


class UnknownHostKey(retrying.PermanentError, paramiko.SSHException):
    def __init__(self, host: str, port: int, known_hosts: str):
        super().__init__(
            f"host key of {host}:{port} is not in {known_hosts}: refusing to connect "
            "(verify the key with the partner and add it, see README)")


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@per_thread
def source() -> SftpSource:
    """This thread's connection to the SFTP server."""
    return SftpSource.from_config()
