"""EmbeddedEtcd: the private etcd of the tests and the demo never outlives its owner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from controller.sim.etcd import EmbeddedEtcd

pytestmark = pytest.mark.etcd


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_start_restart_close_removes_everything():
    etcd = EmbeddedEtcd()
    with etcd:
        first = etcd.pid
        assert "etcd" in open(f"/proc/{first}/cmdline").read()
        port = etcd.client_port
        etcd.restart()
        assert etcd.client_port == port and etcd.pid != first and not _alive(first)
        pid = etcd.pid
    assert not _alive(pid)
    assert not os.path.exists(etcd.base_dir)


def test_etcd_dies_with_a_killed_owner():
    code = (
        "import sys; from controller.sim.etcd import EmbeddedEtcd\n"
        "e = EmbeddedEtcd().start(); print(e.pid, e.base_dir, flush=True); sys.stdin.read()\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid, base_dir = None, None
    try:
        pid_s, base_dir = owner.stdout.readline().split()
        pid = int(pid_s)
        assert _alive(pid)
        owner.send_signal(signal.SIGKILL)  # no atexit, no clean-up: only the death signal
        owner.wait()
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)  # the etcd this test started, by its PID
        if base_dir:
            shutil.rmtree(base_dir, ignore_errors=True)
