"""Downloads from real SFTP servers: large reads, many windows, every byte as on the server."""

from __future__ import annotations

import os

import pytest

from visitas import sftp

from .conftest import SFTP_KINDS


@pytest.mark.parametrize("kind", SFTP_KINDS)
def test_a_download_of_several_windows_in_large_reads_is_byte_for_byte(make_env, kind, tmp_path):
    env = make_env(kind)
    # Three fetch windows and a tail that is not a whole read.
    data = os.urandom(2 * sftp.FETCH_WINDOW + 5 * sftp.READ_MAX + 12345)
    (tmp_path / "upload.bin").write_bytes(data)
    env.upload(tmp_path / "upload.bin", "report_1.txt")
    cfg = env.sftp_cfg
    source = sftp.SftpSource(cfg["host"], cfg["port"], cfg["username"], key_file=str(cfg["key_file"]),
                             known_hosts=str(cfg["known_hosts"]), remote_dir=env.remote_path)
    try:
        remote = source.download("report_1.txt", tmp_path / "got.txt")
        # Both servers state their limit: reads are OpenSSH's largest, not paramiko's 32 KiB.
        assert source.read_size == sftp.READ_MAX
    finally:
        source.close()
    assert remote.size == len(data)
    assert (tmp_path / "got.txt").read_bytes() == data
