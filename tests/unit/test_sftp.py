"""The read size agreed with an SFTP server, from its limits@openssh.com reply."""

from __future__ import annotations

import paramiko
import pytest

from visitas import sftp


class _Server:
    """Answers the limits@openssh.com request as a server would (or refuses it)."""

    def __init__(self, max_read: int | None):
        self.max_read = max_read
        self.asked: list[tuple] = []

    def _request(self, kind, *args):
        self.asked.append((kind, *args))
        if self.max_read is None:
            raise OSError("Operation unsupported")
        reply = paramiko.Message()
        for value in (256 * 1024, self.max_read, 256 * 1024 - 1024, 1024):
            reply.add_int64(value)
        return paramiko.sftp.CMD_EXTENDED_REPLY, paramiko.Message(reply.asbytes())


@pytest.mark.parametrize(("max_read", "expected"), [
    (261120, 261120),          # OpenSSH 9
    (4 * 1024 * 1024, 261120),  # asyncssh: more than paramiko's packets are set up for
    (65536, 65536),            # an older server
    (0, 261120),               # 0: no limit
    (1000, 32768),             # never below paramiko's own size
    (None, 32768),             # no such extension: paramiko's own size
])
def test_the_read_size_follows_the_servers_limit(max_read, expected):
    server = _Server(max_read)
    assert sftp.server_read_size(server) == expected
    assert server.asked == [(paramiko.sftp.CMD_EXTENDED, "limits@openssh.com")]


def test_a_reply_of_another_kind_keeps_paramikos_size():
    class Odd(_Server):
        def _request(self, kind, *args):
            return paramiko.sftp.CMD_STATUS, paramiko.Message()

    assert sftp.server_read_size(Odd(261120)) == sftp.READ_DEFAULT
