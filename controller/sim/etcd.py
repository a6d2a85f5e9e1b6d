"""A private etcd for the tests and `zmesh demo`: the installed `etcd` binary on free loopback
ports with a temporary data dir.

With `tls=ServerTLS(cert, key, ca)` it serves clients over TLS only (https://), optionally
requiring client certificates; its /health is then served on a separate plaintext loopback
port (etcd's --listen-metrics-urls). Authentication is switched on by the test itself, through
`zmesh auth init` or etcdctl, exactly as an operator would.

It is stopped by the PID it started (never by name: other etcds on the machine are not ours) and
can be restarted on the same ports and data dir, so that tests can take the store away and give
it back. Sync methods for fixtures and the demo; `a*` variants run them in a thread so that an
asyncio test keeps its loop (and its watches) running while etcd starts or stops.

    with EmbeddedEtcd() as etcd:
        store = EtcdStore(etcd.endpoints)
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

ETCD_BINARY = "/usr/bin/etcd"
SETPRIV = "/usr/bin/setpriv"  # util-linux, on every Debian


class EtcdStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerTLS:
    """etcd's --cert-file/--key-file; with `client_ca`, clients must present a certificate
    signed by it (--client-cert-auth --trusted-ca-file)."""

    cert: str
    key: str
    client_ca: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedEtcd:
    def __init__(
        self,
        data_dir: str | None = None,
        *,
        name: str = "zmesh-etcd",
        host: str = "127.0.0.1",
        binary: str = ETCD_BINARY,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 20.0,
        tls: ServerTLS | None = None,
    ):
        if not os.path.exists(binary):
            raise EtcdStartError(
                f"etcd binary {binary} not found: install it (Debian: apt-get install etcd-server)"
            )
        self.binary = binary
        self.name = name
        self.host = host
        self.extra_args = tuple(extra_args)
        self.tls = tls
        self.startup_timeout = startup_timeout
        # We own (and remove) the directory only if we made it.
        self._owns_dir = data_dir is None
        self.base_dir = data_dir or tempfile.mkdtemp(prefix="zmesh-etcd-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.log_path = os.path.join(self.base_dir, "etcd.log")
        self._pick_ports()
        self.proc: subprocess.Popen | None = None
        self._started_once = False
        atexit.register(self.close)

    # --- addresses --------------------------------------------------------------------------

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def health_url(self) -> str:
        base = f"http://{self.host}:{self.metrics_port}" if self.tls else self.client_url
        return f"{base}/health"

    @property
    def endpoint(self) -> str:
        """What clients are given: host:port, or the https:// URL with TLS."""
        return self.client_url if self.tls else f"{self.host}:{self.client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- lifecycle --------------------------------------------------------------------------

    def _pick_ports(self) -> None:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port(self.host))
        self.client_port, self.peer_port, self.metrics_port = sorted(ports)

    def start(self) -> "EmbeddedEtcd":
        if self.running():
            return self
        for attempt in range(3):
            try:
                self._start()
                self._started_once = True
                return self
            except EtcdStartError as e:
                # A port picked as free was taken meanwhile: new ports, but only before the first
                # start (a restart must keep its address for the clients).
                if self._started_once or "address already in use" not in str(e) or attempt == 2:
                    raise
                self._pick_ports()
        return self

    def _start(self) -> None:
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            self.binary,
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
            *self._tls_args(),
            *self.extra_args,
        ]
        if os.path.exists(SETPRIV) and threading.current_thread() is threading.main_thread():
            # If we are killed (SIGKILL, a test runner's timeout) etcd gets SIGTERM instead of
            # living on as an orphan. setpriv execs etcd, so the PID stays etcd's. The death
            # signal follows the thread that started it: only the main thread lives as long as
            # the process, so starts from other threads (astart) go without.
            args = [SETPRIV, "--pdeathsig", "TERM", "--", *args]
        os.makedirs(self.base_dir, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            # start_new_session: Ctrl-C in a terminal goes to us, and we stop etcd in order.
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        finally:
            log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        args = ["--cert-file", self.tls.cert, "--key-file", self.tls.key,
                "--listen-metrics-urls", f"http://{self.host}:{self.metrics_port}"]
        if self.tls.client_ca:
            args += ["--client-cert-auth", "--trusted-ca-file", self.tls.client_ca]
        return args

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdStartError(
                    f"etcd exited with status {self.proc.returncode} while starting on "
                    f"{self.client_url}; last log lines:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.health_url, timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
                    last = "unhealthy"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.05)
        raise EtcdStartError(
            f"etcd on {self.client_url} not healthy after {self.startup_timeout}s ({last}); "
            f"last log lines:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the etcd we started (SIGTERM, then SIGKILL), by its PID only. Data is kept."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> "EmbeddedEtcd":
        """Stop and start again with the same ports and data dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the data dir if we made it. Safe to call twice."""
        self.stop()
        if self._owns_dir and os.path.isdir(self.base_dir):
            shutil.rmtree(self.base_dir, ignore_errors=True)
        atexit.unregister(self.close)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- async variants (run in a thread so the event loop keeps going) ----------------------

    async def astart(self) -> "EmbeddedEtcd":
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> "EmbeddedEtcd":
        return await asyncio.to_thread(self.restart)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> "EmbeddedEtcd":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "EmbeddedEtcd":
        try:
            return await self.astart()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"EmbeddedEtcd({self.client_url}, pid={self.pid}, dir={self.base_dir})"
