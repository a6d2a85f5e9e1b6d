"""`zmesh demo` as a user runs it: a subprocess that must pass, print the matrix, and leave
nothing behind, also when interrupted by SIGINT (Ctrl-C) or SIGTERM part-way.

"Nothing behind" is checked against what this run made: namespaces and wireguard-go processes
carry the demo's world id (printed by the demo), the private etcd is identified by the PID and
data dir the demo prints. Comparing with a snapshot taken before keeps other worlds running on
the machine at the same time (parallel tests) out of the verdict.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.root,
    pytest.mark.etcd,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go") or not os.path.exists("/usr/bin/etcd"),
                       reason="the demo needs root, wireguard-go and etcd"),
]

DEMO = [sys.executable, "-m", "controller.cli.main", "demo"]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
WORKLOADS = ("web-1", "web-2", "db-3", "app-4")  # app-4 on h4, a hidden node behind NAT


# --- what exists on the machine -----------------------------------------------------------------


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def processes(*comms: str) -> dict[int, str]:
    """PID → command line of every process whose name is one of `comms` (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() in comms:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # exited while we looked
            continue
    return found


def state(pid: int) -> tuple[str, int] | None:
    """(state, parent PID) of `pid` as /proc says it, None when there is no such process."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    st = state(pid)
    return st is not None and st[0] != "Z"


class Snapshot:
    def __init__(self):
        self.netns = netns_names()
        self.procs = processes("wireguard-go", "etcd")


class DemoRun:
    """The demo subprocess with its stdout read line by line from a thread (so a test can wait
    for one line with a timeout) and the ids it printed."""

    def __init__(self, *args: str):
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(DEMO + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8", env=ENV, stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; got:\n"
                                     + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"demo exited before printing {pattern!r}; got:\n" + "\n".join(self.lines)
                                     + f"\nstderr: {self.proc.stderr.read()}")
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        while True:
            item = self._queue.get_nowait() if not self._queue.empty() else None
            if item is None:
                break
            self.lines.append(item)
        self.stderr = self.proc.stderr.read()
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    # The ids the demo printed, to tell its leftovers from other runs' objects.
    @property
    def world_id(self) -> str | None:
        m = re.search(r"World ([a-z][a-z0-9]{0,2}):", self.output)
        return m.group(1) if m else None

    @property
    def etcd(self) -> tuple[int, str] | None:
        m = re.search(r"\(pid (\d+), data in (\S+)\)", self.output)
        return (int(m.group(1)), m.group(2)) if m else None

    @property
    def agent_pids(self) -> list[int]:
        m = re.search(r"agents running and ready \((.*)\)", self.output)
        return [int(p) for p in re.findall(r"pid (\d+)", m.group(1))] if m else []


def leftovers(run: DemoRun, before: Snapshot) -> list[str]:
    left = []
    wid = run.world_id
    if wid:
        left += [f"netns {n}" for n in sorted(netns_names() - before.netns) if n.startswith(wid)]
    etcd = run.etcd
    for pid, cmdline in processes("wireguard-go", "etcd").items():
        if pid in before.procs or not alive(pid):
            continue
        ours = (wid and f" {wid}" in cmdline) or (etcd and etcd[1] in cmdline)
        if ours:
            # Which process, whose child, in which state: enough to tell a leftover of the
            # demo from one still exiting (seen once, not reproduced since).
            st, printed = state(pid), " (the etcd the demo printed)" if etcd and pid == etcd[0] else ""
            left.append(f"pid {pid}{printed} state/parent {st} {cmdline.strip()}")
    for pid in run.agent_pids + ([etcd[0]] if etcd else []):
        if alive(pid):
            left.append(f"pid {pid} still running")
    if etcd and os.path.exists(etcd[1]):
        left.append(f"etcd dir {etcd[1]}")
    if wid:  # the world's work dir (agents' state dirs, keys, logs)
        left += [f"dir {p}" for p in Path(tempfile.gettempdir()).glob(f"zmesh-world-{wid}-*")]
    return left


def force_cleanup(run: DemoRun, before: Snapshot) -> None:
    """Only when the demo itself failed to clean up: remove what it made, found by the ids it
    printed, and signal only those PIDs."""
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT)
        try:
            run.proc.wait(30)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
    wid, etcd = run.world_id, run.etcd
    for pid, cmdline in processes("wireguard-go", "etcd", "python3", "python", "zmesh").items():
        if pid in before.procs:
            continue
        if (wid and f" {wid}" in cmdline) or (etcd and etcd[1] in cmdline) or pid in run.agent_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if wid:
        for ns in netns_names() - before.netns:
            if ns.startswith(wid):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if etcd:
        shutil.rmtree(etcd[1], ignore_errors=True)


@pytest.fixture
def demo_run():
    """Start `zmesh demo` with `start(*args)`; whatever happens, nothing it made survives the test."""
    before = Snapshot()
    runs: list[DemoRun] = []

    def start(*args: str) -> tuple[DemoRun, Snapshot]:
        runs.append(DemoRun(*args))
        return runs[-1], before

    yield start
    for run in runs:
        force_cleanup(run, before)


# --- tests ----------------------------------------------------------------------------------------


def test_demo_passes_shows_matrix_and_leaves_nothing(demo_run):
    run, before = demo_run()
    code = run.finish(timeout=120)
    out = run.output
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{run.stderr}"
    # The matrix: a header naming every workload, then one row per workload with ✓ for the
    # two others and a dash for itself.
    header = next(line for line in run.lines if "from \\ to" in line)
    assert header.split()[3:] == [*WORKLOADS, "Internet", "(203.0.113.10)"]
    for i, w in enumerate(WORKLOADS):
        row = next(line for line in run.lines if line.strip().startswith(f"{w} (10.10."))
        cells = re.findall(r"✓ [\d.]+ ms|✗|—", row)
        assert len(cells) == 5 and cells[i] == "—", row
        assert all(c.startswith("✓") for j, c in enumerate(cells[:4]) if j != i), row
    # Beside the matrix, each workload's Internet access as the Internet host saw it: as its
    # node (the hidden one as its home router), except on the IPv6-only n3: no IPv4 uplink.
    for w, ip, seen in (("web-1", "10.10.1.10", "198.51.100.11"), ("web-2", "10.10.2.10", "198.51.100.12"),
                        ("app-4", "10.10.4.10", "198.51.100.201")):
        assert re.search(rf"{w} \({re.escape(ip)}\).*✓ [\d.]+ ms, HTTP seen as {re.escape(seen)}$", out, re.M), w
    assert re.search(r"db-3 \(10\.10\.3\.10\).*✗ \(n3 has no IPv4 uplink\)$", out, re.M)
    assert "All 12 workload pairs reach each other; 3 of 4 workloads reach the Internet" in out
    # With n2 as egress every workload, db-3 and the hidden app-4 included, leaves as n2.
    for w, node in zip(WORKLOADS, ("n1", "n2", "n3", "h4")):
        assert re.search(rf"^\s+{w} on {node}\s+✓ [\d.]+ ms, HTTP seen as 198\.51\.100\.12$", out, re.M), w
    assert "Every workload reaches the Internet as n2 (198.51.100.12)" in out
    # The hidden node's only tunnel goes to the aggregator n1, which learned its router's address.
    assert [l.split()[2] for l in run.lines if re.match(r"^\s+h4\s+\S+-zw\S+\s", l)] == ["n1"], out
    assert re.search(r"^\s+n1\s+\S+\s+h4\s+198\.51\.100\.201:\d+", out, re.M), out
    # Then the aggregator dies and every node moves to n2 on its own.
    assert re.search(r"✓ Failed over to n2 in [\d.]+ s, with no human and no leader", out), out
    assert "because n1 is not" in out
    assert "Traffic crossed WireGuard" in out
    assert re.search(r"^\s+n3\s+\S+\s+n1\s+\[2001:db8:100::11\]:\d+", out, re.M), "n3 is reached over IPv6"
    assert "demo passed" in out
    assert run.world_id and run.etcd, out
    assert leftovers(run, before) == []


@pytest.mark.parametrize("sig, after, code", [
    (signal.SIGINT, r"agents running and ready", 130),  # Ctrl-C with the mesh coming up
    (signal.SIGTERM, r"World z\w+:", 143),  # before any agent runs
])
def test_demo_interrupted_cleans_up(demo_run, sig, after, code):
    run, before = demo_run()
    run.wait_for_line(after, timeout=60)
    run.proc.send_signal(sig)
    exit_code = run.finish(timeout=30)  # prompt: well before a whole demo run would end
    assert exit_code == code, f"exit {exit_code}\nstdout:\n{run.output}\nstderr:\n{run.stderr}"
    assert "interrupted" in run.output and "Cleaned up" in run.output, run.output
    assert leftovers(run, before) == []


def test_demo_on_a_given_etcd_uses_a_private_prefix_and_removes_it(demo_run, etcd):
    user_key = "/zmesh/v1/networks/users-own"
    subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "put", user_key, "untouched"],
                   check=True, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"})
    run, before = demo_run("--etcd", etcd.endpoint)
    code = run.finish(timeout=120)
    assert code == 0, f"exit {code}\nstdout:\n{run.output}\nstderr:\n{run.stderr}"
    assert re.search(r"under the private prefix /zmesh-demo-[0-9a-f]+/", run.output)
    keys = subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "get", "", "--prefix", "--keys-only"],
                          check=True, capture_output=True, text=True,
                          env={**os.environ, "ETCDCTL_API": "3"}).stdout.split()
    assert keys == [user_key]
    assert leftovers(run, before) == []


def test_a_kept_demo_named_by_world_prefix_ends_on_ctrl_c_with_130(demo_run):
    # Random world ids start with "z"; this one starts with "k" and is checked free, so it
    # collides neither with random worlds nor with this test in another engineer's run.
    from controller.sim.world import world_id_problem

    prefix = next(p for p in (f"k{secrets.choice(string.ascii_lowercase + string.digits)}"
                              f"{secrets.choice(string.ascii_lowercase)}" for _ in range(100))
                  if world_id_problem(p) is None)
    run, before = demo_run("--keep", "--world-prefix", prefix)
    run.wait_for_line(r"Press Ctrl-C to clean up", timeout=120)
    assert run.world_id == prefix
    ours = sorted(n for n in netns_names() - before.netns if n.startswith(prefix))
    # The world's own namespaces are <prefix>-..., its agents' NRs <prefix><node>-...
    assert ours and all(re.match(rf"{prefix}(\d+)?-", n) for n in ours) and f"{prefix}-inet" in ours, ours
    run.proc.send_signal(signal.SIGINT)
    exit_code = run.finish(timeout=60)
    assert exit_code == 130, f"exit {exit_code}\nstdout:\n{run.output}\nstderr:\n{run.stderr}"
    assert "demo stopped by SIGINT" in run.output and "Cleaned up" in run.output, run.output
    assert leftovers(run, before) == []
