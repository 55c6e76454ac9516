"""Real servers for the integration tests: PostgreSQL (throwaway cluster), SFTP, SMTP."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from visitas.dev import servers as devservers

from .harness import Env, start_sftp

# OpenSSH's sshd needs root here (privilege separation); .ci/run installs it and runs as root.
SFTP_KINDS = ["asyncssh"] + (["openssh"] if devservers.sshd_path() and os.geteuid() == 0 else [])


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway cluster for the session, or VISITAS_TEST_DSN's existing server."""
    if os.environ.get("VISITAS_TEST_DSN"):
        yield None
        return
    cluster = devservers.PostgresCluster(devservers.scratch_dir("visitas-test-pg-"), fsync=False)
    cluster.init().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def pg_dsn(pg_cluster) -> str:
    return os.environ.get("VISITAS_TEST_DSN") or pg_cluster.dsn()


@pytest.fixture
def schema(pg_dsn):
    """Each test gets its own schema, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory):
    return devservers.SshKeys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def make_env(tmp_path, pg_dsn, schema, ssh_keys):
    """make_env(kind="asyncssh", extra_cfg="") -> a started SFTP server and a configured Env."""
    servers = []

    def _make(kind: str = "asyncssh", extra_cfg: str = "", password: str = "",
              dsn: str | None = None) -> Env:
        server, cfg, remote_dir, remote_path = start_sftp(kind, tmp_path, ssh_keys, password)
        servers.append(server)
        env = Env(tmp_path, dsn or pg_dsn, schema, cfg, remote_dir, remote_path, extra_cfg)
        env.sftp_server = server
        env.sftp_password = password
        return env

    yield _make
    for server in servers:
        server.stop()


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


@pytest.fixture
def own_pg():
    """A cluster of this test's own, for tests that stop and restart the server."""
    cluster = devservers.PostgresCluster(devservers.scratch_dir("visitas-own-pg-"), fsync=False)
    cluster.init().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def luigid(tmp_path):
    """A real luigid on a free port; yields the port."""
    port = devservers.free_port()
    (tmp_path / "luigid-logs").mkdir()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("luigid")), "--port", str(port), "--address", "127.0.0.1",
         "--state-path", str(tmp_path / "luigid.pickle"), "--logdir", str(tmp_path / "luigid-logs")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    devservers.wait_for_port(port)
    yield port
    process.terminate()
    process.wait(10)


@pytest.fixture
def smtp():
    """A real SMTP server (aiosmtpd) that keeps what it receives."""
    server = devservers.SmtpServer().start()
    yield server
    server.stop()
