"""Downloads from real SFTP servers: large reads, many windows, every byte as on the server;
AES-GCM when the server offers it, paramiko's own order when it does not."""

from __future__ import annotations

import os

import pytest

from visitas import sftp
from visitas.dev import servers as devservers

from .conftest import SFTP_KINDS
from .harness import REMOTE_DIR


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
        # Both offer AES-GCM (paramiko alone would take AES-CTR with HMAC-SHA2-256).
        assert source.cipher == "aes128-gcm@openssh.com"
    finally:
        source.close()
    assert remote.size == len(data)
    assert (tmp_path / "got.txt").read_bytes() == data


def test_a_server_without_aes_gcm_gets_paramikos_own_choice(ssh_keys, tmp_path):
    server = devservers.SftpServer(tmp_path / "root", ssh_keys,
                                   ciphers=("aes256-ctr", "chacha20-poly1305@openssh.com")).start()
    try:
        (tmp_path / "root" / REMOTE_DIR).mkdir(parents=True)
        data = os.urandom(sftp.READ_MAX + 777)
        (tmp_path / "root" / REMOTE_DIR / "report_1.txt").write_bytes(data)
        source = sftp.SftpSource("127.0.0.1", server.port, "vinkos", key_file=str(ssh_keys.client_key),
                                 known_hosts=str(ssh_keys.write_known_hosts(tmp_path / "known_hosts",
                                                                            server.port)),
                                 remote_dir="/" + REMOTE_DIR)
        try:
            source.download("report_1.txt", tmp_path / "got.txt")
            assert source.cipher == "aes256-ctr"
        finally:
            source.close()
    finally:
        server.stop()
    assert (tmp_path / "got.txt").read_bytes() == data
