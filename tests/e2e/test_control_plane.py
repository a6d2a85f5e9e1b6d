"""The control plane as a shared, secured service: etcd with TLS (certificates made by the test)
and authentication set up with `zmesh auth`; every agent runs with its own node's credentials,
operators with an admin's, and `zmesh indexer` (admin) repairs the index of specs written by
hand, since agents may not write it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from meshlib import RESYNC, ZMESH, Mesh, network_manifest, wait_until, workload_manifest

from controller.sim.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]


def run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMESH_")}
    res = subprocess.run([*ZMESH, *argv], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, f"zmesh {' '.join(argv)}: {res.stderr}"
    return res


@pytest.fixture
async def secure(tls_etcd, pki, tmp_path):
    """(mesh, node_flags, admin_flags, indexer process) on tls_etcd with auth on."""
    pw = {}
    for user in ("root", "admin", "n1", "n2"):
        pw[user] = tmp_path / f"{user}.pw"
        pw[user].write_text(f"{user}-password-{os.urandom(6).hex()}\n")
        pw[user].chmod(0o600)
    tls = ["--etcd", tls_etcd.endpoint, "--etcd-cacert", pki.ca]
    run(*tls, "auth", "init", "--root-password-file", str(pw["root"]))
    root = [*tls, "--etcd-user", "root", "--etcd-password-file", str(pw["root"])]
    run(*root, "auth", "add-user", "admin", "--password-file", str(pw["admin"]))
    for node in ("n1", "n2"):
        run(*root, "auth", "add-node", node, "--password-file", str(pw[node]))
    admin = ["--etcd-cacert", pki.ca, "--etcd-user", "admin", "--etcd-password-file", str(pw["admin"])]
    log = open(tmp_path / "indexer.log", "wb")
    indexer = subprocess.Popen([*ZMESH, "--etcd", tls_etcd.endpoint, *admin, "indexer", "--identity", "ops-1"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    admin_pw = pw["admin"].read_text().strip()
    try:
        async with World(tls_etcd.endpoints, resync_interval=RESYNC, agent_args=["--etcd-cacert", pki.ca]) as world:
            mesh = Mesh(world, tls_etcd, cli_args=admin,
                        etcdctl_args=["--cacert", pki.ca, f"--user=admin:{admin_pw}"])

            def node_flags(node):
                return ["--etcd-user", f"zmesh-node-{node}", "--etcd-password-file", str(pw[node])]

            yield mesh, node_flags, indexer, pw
    finally:
        if indexer.poll() is None:  # ours, by PID
            indexer.send_signal(signal.SIGTERM)
            try:
                indexer.wait(20)
            except subprocess.TimeoutExpired:
                indexer.kill()
                indexer.wait()


async def test_agents_with_their_own_credentials_build_the_mesh_and_the_indexer_runs_as_admin(secure, tmp_path):
    mesh, node_flags, indexer, pw = secure
    mesh.start("n1", "n2", agent_args=node_flags)
    w1, w2 = mesh.add_workload_ns("w1"), mesh.add_workload_ns("w2")
    mesh.apply(network_manifest("blue", {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24"})
               + workload_manifest("w1", "blue", "n1", w1, "10.1.1.10")
               + workload_manifest("w2", "blue", "n2", w2, "10.1.2.10"))
    mesh.wait_mesh({"w1": "10.1.1.10", "w2": "10.1.2.10"}, timeout=30)

    # The leader of the index repair is the admin's `zmesh indexer`, not an agent: an agent with
    # an etcd user does not campaign (--indexer auto).
    wait_until(lambda: mesh.etcdctl("get", "--print-value-only", "/zmesh/v1/leader/indexer").stdout.strip(),
               20, what="an indexer leader")
    assert mesh.etcdctl("get", "--print-value-only", "/zmesh/v1/leader/indexer").stdout.strip() == "ops-1"
    # A network written by hand (no index entries) is indexed by it and built by both agents.
    green = network_manifest("green", {"n1": "10.2.1.0/24", "n2": "10.2.2.0/24"}, ip_range="10.2.0.0/16")
    mesh.etcdctl("put", "/zmesh/v1/networks/green", "--", green)
    for node in ("n1", "n2"):
        wait_until(lambda node=node: mesh.netns_inode(mesh.nr_netns(node, "green")), 30,
                   what=f"NR of green on {node}")
    assert indexer.poll() is None, (tmp_path / "indexer.log").read_text()

    # The agents' credentials are theirs only: nothing denied in their logs, no password there.
    for node in ("n1", "n2"):
        log = mesh.world.agent_log(node)
        assert "permission denied" not in log.lower(), log[-3000:]
        assert all(p.read_text().strip() not in log for p in pw.values())


async def test_an_indexer_with_a_nodes_credentials_stops_with_one_clear_error(secure, tls_etcd, pki):
    _mesh, node_flags, _indexer, _pw = secure
    res = subprocess.run([*ZMESH, "--etcd", tls_etcd.endpoint, "--etcd-cacert", pki.ca, *node_flags("n1"),
                          "indexer", "--identity", "n1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "permission denied" in res.stderr and "admin credentials" in res.stderr
