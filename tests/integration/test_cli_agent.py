"""`zmesh agent` as a user starts it: the flags reach the agent, which registers its node, and
the rest of the CLI sees that node alive; also over TLS with etcd authentication on. No network
is applied, so only the node's ndmz is created (in a namespace of the test's playing the node's
host, never in this machine's own)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.etcd, pytest.mark.root]

ZMESH = str(Path(sys.executable).with_name("zmesh"))


@pytest.fixture(params=["plain", "tls-auth"])
def etcd_flags(request):
    """zmesh's connection flags for a plain etcd, or for one with TLS and auth on."""
    if request.param == "plain":
        return ["--etcd", request.getfixturevalue("etcd").endpoint]
    return request.getfixturevalue("secured_etcd").flags()


def zmesh(flags, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([ZMESH, *flags, *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent needs root")
def test_an_agent_started_by_the_cli_registers_its_node(etcd_flags, tmp_path):
    host = f"tcl-host-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", host], check=True)
    log = open(tmp_path / "agent.log", "w")
    agent = subprocess.Popen(
        [ZMESH, "agent", "--node-id", "cli-n1", *etcd_flags, "--state-dir", str(tmp_path / "state"),
         "--name-prefix", "tcl1-", "--metrics-addr", "127.0.0.1:0", "--public-endpoint", "198.51.100.11",
         "--listen-port-range", "52000-52009", "--host-netns", host],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        rows = []
        while time.monotonic() < deadline and agent.poll() is None:
            out = zmesh(etcd_flags, "get", "nodes").stdout
            rows = [line.split() for line in out.splitlines()[1:]]
            if rows:
                break
            time.sleep(0.2)
        assert rows, f"node never registered; agent log:\n{(tmp_path / 'agent.log').read_text()}"
        assert rows[0][:5] == ["cli-n1", "198.51.100.11", "no", "yes", "52000-52009"]
        assert zmesh(etcd_flags, "status").stdout.splitlines()[0] == "Nodes: 1/1 alive"
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            code = agent.wait()
        log.close()
        purged = zmesh([], "purge", "--state-dir", str(tmp_path / "state"), "--name-prefix", "tcl1-")
        subprocess.run(["ip", "netns", "del", host])
    assert code == 0, (tmp_path / "agent.log").read_text()
    assert purged.returncode == 0 and "tcl1-zmndmz" in purged.stdout, purged
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith("tcl1-")]
