"""Shared pytest fixtures. Keep each fixture small, documented, and cleaning up after itself
even when the test fails. Sections: etcd, etcd with TLS."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from controller.sim.etcd import EmbeddedEtcd, ServerTLS
from controller.sim.pki import TestPKI
from controller.store.client import EtcdStore

# --- etcd -------------------------------------------------------------------------------------


@pytest.fixture
def etcd():
    """A private etcd (the installed binary) on free loopback ports, with a temp data dir;
    stopped by its PID and removed afterwards. `etcd.restart()` keeps ports and data."""
    with EmbeddedEtcd() as server:
        yield server


@pytest.fixture
async def store(etcd):
    """An EtcdStore on the `etcd` fixture, default prefix."""
    async with EtcdStore(etcd.endpoints, timeout=3.0) as s:
        yield s


class TcpProxy:
    """A loopback TCP forwarder in front of etcd, so a test can cut a client's connection
    (and refuse new ones) while other clients keep writing to etcd directly."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Close every connection and stop accepting new ones until `start()`."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _handle(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_w))

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()

        for t in (asyncio.create_task(pipe(reader, up_w)), asyncio.create_task(pipe(up_r, writer))):
            self._pipes.add(t)
            t.add_done_callback(self._pipes.discard)


@pytest.fixture
async def etcd_proxy(etcd):
    """A TcpProxy to the `etcd` fixture; cut() severs clients connected through it."""
    proxy = TcpProxy(etcd.client_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        with contextlib.suppress(Exception):
            await proxy.cut()


# --- etcd with TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1/::1/localhost, made with openssl;
    `pki.client(cn)` issues client certificates."""
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory):
    """A second, unrelated CA: what a client with the wrong --etcd-cacert trusts."""
    return TestPKI(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def tls_etcd(pki):
    """A private etcd that serves clients over TLS only (https://, `pki`'s server certificate);
    authentication is off until the test switches it on."""
    with EmbeddedEtcd(tls=ServerTLS(pki.server.cert, pki.server.key)) as server:
        yield server


ROOT_SECRET = "root-" + "s3cret" * 4


class SecuredEtcd:
    """An etcd with TLS and authentication on, and what a client needs to use it."""

    def __init__(self, etcd, pki, root_password_file: str):
        self.etcd, self.pki, self.root_password_file = etcd, pki, root_password_file
        self.root_password = ROOT_SECRET
        self.endpoint = etcd.endpoint
        self.endpoints = etcd.endpoints
        self.ca = pki.ca

    def flags(self, user: str = "root", password_file: str | None = None) -> list[str]:
        """zmesh connection flags for `user` (default: root)."""
        return ["--etcd", self.endpoint, "--etcd-cacert", self.ca, "--etcd-user", user,
                "--etcd-password-file", password_file or self.root_password_file]

    def etcdctl(self, *args: str, user: str | None = "root", password: str = ROOT_SECRET, check: bool = True):
        import subprocess

        auth = [f"--user={user}:{password}"] if user else []
        return subprocess.run(["etcdctl", f"--endpoints={self.etcd.client_url}", f"--cacert={self.ca}", *auth, *args],
                              env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                              timeout=30, check=check)


@pytest.fixture
def secured_etcd(tls_etcd, pki, tmp_path):
    """`tls_etcd` with authentication on: a root user whose password (ROOT_SECRET) is in a file."""
    pw = tmp_path / "root.pw"
    pw.write_text(ROOT_SECRET + "\n")
    secured = SecuredEtcd(tls_etcd, pki, str(pw))
    secured.etcdctl("user", "add", f"root:{ROOT_SECRET}", user=None)
    secured.etcdctl("auth", "enable", user=None)
    return secured
