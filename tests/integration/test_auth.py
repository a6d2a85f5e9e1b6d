"""`zmesh auth` on a real etcd with TLS: init, add-node, add-user, as an operator runs them, and
what the resulting roles allow. A node's credentials cannot write any key of another node
(facts, status, registration, liveness, index entries) nor any spec, guard or leader key: each
attempt is refused by etcd itself. They can do everything an agent does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from controller.store.access import EtcdAccess
from controller.store.client import PermissionDenied, Put
from controller.store.layout import Layout

pytestmark = pytest.mark.etcd

ZMESH = [sys.executable, "-m", "controller.cli.main"]
LAY = Layout()


def zmesh(*argv):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMESH_")}
    res = subprocess.run([*ZMESH, *argv], capture_output=True, text=True, timeout=60, env=env)
    return res


@pytest.fixture
def roles(tls_etcd, pki, tmp_path):
    """tls_etcd set up by `zmesh auth`: root, nodes n1 and n2, admin alice. Returns
    {user: EtcdAccess}."""
    base = ["--etcd", tls_etcd.endpoint, "--etcd-cacert", pki.ca]
    files = {}
    for user in ("root", "n1", "n2", "alice"):
        files[user] = tmp_path / f"{user}.pw"
        files[user].write_text(f"pw-of-{user}-0123456789\n")
    res = zmesh(*base, "auth", "init", "--root-password-file", str(files["root"]))
    assert res.returncode == 0, res.stderr
    assert "authentication enabled" in res.stdout
    as_root = [*base, "--etcd-user", "root", "--etcd-password-file", str(files["root"])]
    for node in ("n1", "n2"):
        res = zmesh(*as_root, "auth", "add-node", node, "--password-file", str(files[node]))
        assert res.returncode == 0 and f"user zmesh-node-{node} created" in res.stdout, res.stderr
    res = zmesh(*as_root, "auth", "add-user", "alice", "--password-file", str(files["alice"]))
    assert res.returncode == 0, res.stderr

    def access(user, name):
        return EtcdAccess(tls_etcd.endpoints, cacert=pki.ca, user=name, password_file=str(files[user]))

    return {"base": base, "files": files, "root": access("root", "root"), "alice": access("alice", "alice"),
            "n1": access("n1", "zmesh-node-n1"), "n2": access("n2", "zmesh-node-n2")}


def other_nodes_keys(node: str) -> list[str]:
    """Every kind of key that tells node `node` (or everyone) what to do."""
    return [LAY.facts(node, "blue"), LAY.verdicts(node, "blue"), LAY.nr_status(node, "blue"),
            LAY.workload_status(node, "w1"), LAY.node_registration(node), LAY.node_alive(node),
            LAY.node_events(node) + "e1", LAY.index_network(node, "blue"), LAY.index_workload(node, "w1"),
            LAY.network("blue"), LAY.workload("w1"), LAY.leader("indexer"), LAY.network_guard("blue")]


async def test_a_nodes_credentials_cannot_write_what_tells_another_node_what_to_do(roles):
    async with roles["alice"].open_store(timeout=3) as admin:
        await admin.put(LAY.facts("n2", "blue"), "{}")  # something to (not) delete
        await admin.put(LAY.network("blue"), "{}")
    async with roles["n1"].open_store(timeout=3) as n1:
        for key in other_nodes_keys("n2") + [LAY.index_network("n1", "blue")]:
            with pytest.raises(PermissionDenied, match="permission denied for user 'zmesh-node-n1'"):
                await n1.put(key, "x")
        for key in (LAY.facts("n2", "blue"), LAY.network("blue")):
            with pytest.raises(PermissionDenied):
                await n1.delete(key)
        with pytest.raises(PermissionDenied):
            await n1.delete(LAY.node_root("n2"), prefix=True)
        # A transaction that also writes its own key is refused as a whole.
        with pytest.raises(PermissionDenied):
            await n1.txn([], [Put(LAY.facts("n1", "blue"), "{}"), Put(LAY.facts("n2", "blue"), "{}")])
        assert await n1.get(LAY.facts("n1", "blue")) is None
    async with roles["alice"].open_store(timeout=3) as admin:
        assert (await admin.get(LAY.facts("n2", "blue"))).value == b"{}"
    # The same refusal through the real etcdctl, so it is etcd's and not our client's.
    pw = roles["files"]["n1"].read_text().strip()
    res = subprocess.run(["etcdctl", f"--endpoints={roles['n1'].endpoints[0]}", f"--cacert={roles['n1'].cacert}",
                          f"--user=zmesh-node-n1:{pw}", "put", LAY.facts("n2", "blue"), "{}"],
                         env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert res.returncode != 0 and "permission denied" in res.stderr


async def test_a_nodes_credentials_do_all_an_agent_needs(roles):
    async with roles["alice"].open_store(timeout=3) as admin:
        await admin.put(LAY.network("blue"), "{}")
        await admin.put(LAY.index_network("n1", "blue"), "")
        await admin.put(LAY.facts("n2", "blue"), "{}")
    async with roles["n1"].open_store(timeout=3) as n1:
        # Reads: its index, specs, other nodes' facts and status.
        for prefix in (LAY.node_index("n1"), LAY.networks(), LAY.node_mesh("n2"), LAY.nodes()):
            await n1.list_prefix(prefix)
        watch = n1.watch(LAY.node_mesh("n2"), prefix=True, start_revision=1)
        assert (await anext(watch)).key == LAY.facts("n2", "blue")
        await watch.aclose()
        # Writes under its own prefix, with a lease for liveness: grant, attach, keep alive, revoke.
        lease = await n1.grant_lease(10)
        await n1.txn([], [Put(LAY.node_registration("n1"), "{}"), Put(LAY.node_alive("n1"), "{}", lease=lease)])
        assert await n1.refresh_lease(lease) > 0
        for key in (LAY.facts("n1", "blue"), LAY.nr_status("n1", "blue"), LAY.workload_status("n1", "w1"),
                    LAY.verdicts("n1", "blue"), LAY.node_events("n1") + "e1"):
            await n1.put(key, "{}")
            await n1.delete(key)
        await n1.revoke_lease(lease)
        assert await n1.get(LAY.node_alive("n1")) is None


async def test_admins_write_specs_and_index_and_read_everything(roles):
    async with roles["alice"].open_store(timeout=3) as admin:
        for key in other_nodes_keys("n2"):
            await admin.put(key, "{}")
        entries, _ = await admin.list_prefix(LAY.root)
        assert len(entries) == len(other_nodes_keys("n2"))
        # ... but not outside Zero-Mesh's prefix, nor users and roles.
        with pytest.raises(PermissionDenied):
            await admin.put("/elsewhere", "x")


def test_auth_commands_are_idempotent_and_need_root(roles, tmp_path):
    base, files = roles["base"], roles["files"]
    # init again, with auth on: it logs in as root itself and changes nothing.
    res = zmesh(*base, "auth", "init", "--root-password-file", str(files["root"]))
    assert res.returncode == 0 and "user root updated" in res.stdout, res.stderr
    as_root = [*base, "--etcd-user", "root", "--etcd-password-file", str(files["root"])]
    res = zmesh(*as_root, "auth", "add-node", "n1", "--password-file", str(files["n1"]))
    assert res.returncode == 0 and "user zmesh-node-n1 updated" in res.stdout, res.stderr
    # A node (or an admin) cannot create users.
    as_n1 = [*base, "--etcd-user", "zmesh-node-n1", "--etcd-password-file", str(files["n1"])]
    res = zmesh(*as_n1, "auth", "add-node", "n3", "--password-file", str(files["n1"]))
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1 and "permission denied" in res.stderr
    res = zmesh(*as_root, "auth", "add-node", "Bad/Name", "--password-file", str(files["n1"]))
    assert res.returncode == 2 and "bad node id" in res.stderr  # a usage error
    res = zmesh(*as_root, "auth", "add-user", "bob", "--password-file", str(tmp_path / "missing"))
    assert res.returncode == 1 and "--password-file" in res.stderr and "cannot read" in res.stderr
    for f in files.values():
        assert f.read_text().strip() not in res.stdout + res.stderr
    # alice is an admin: the CLI works for her.
    as_alice = [*base, "--etcd-user", "alice", "--etcd-password-file", str(files["alice"])]
    res = zmesh(*as_alice, "get", "nodes", "-o", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["items"] == [], res.stderr


async def test_two_prefixes_on_one_etcd_have_their_own_roles_and_cannot_write_each_other(roles, tmp_path):
    """Users and roles are cluster-wide in etcd: node n1 of the Zero-Mesh under /team-b/ is
    another user than n1 under /zmesh/, and neither gains a write on the other's keys."""
    team_b = Layout("/team-b/")
    as_root = [*roles["base"], "--prefix", "/team-b/", "--etcd-user", "root",
               "--etcd-password-file", str(roles["files"]["root"])]
    pw = tmp_path / "b-n1.pw"
    pw.write_text("pw-of-team-b-n1-0123456789\n")
    res = zmesh(*as_root, "auth", "init", "--root-password-file", str(roles["files"]["root"]))
    assert res.returncode == 0 and "role zmesh-admin@/team-b/: read and write /team-b/v1/" in res.stdout, res.stderr
    res = zmesh(*as_root, "auth", "add-node", "n1", "--password-file", str(pw))
    assert res.returncode == 0 and "user zmesh-node-n1@/team-b/ created" in res.stdout, res.stderr
    res = zmesh(*as_root, "auth", "add-user", "bert", "--password-file", str(pw))
    assert res.returncode == 0 and "role zmesh-admin@/team-b/ granted to bert" in res.stdout, res.stderr
    b_n1 = EtcdAccess(roles["n1"].endpoints, cacert=roles["n1"].cacert, user="zmesh-node-n1@/team-b/",
                      password_file=str(pw))
    async with b_n1.open_store(timeout=3) as store:
        await store.put(team_b.facts("n1", "blue"), "{}")  # its own
        with pytest.raises(PermissionDenied):
            await store.put(LAY.facts("n1", "blue"), "{}")  # the other Zero-Mesh's n1
    async with roles["n1"].open_store(timeout=3) as store:
        await store.put(LAY.facts("n1", "blue"), "{}")
        with pytest.raises(PermissionDenied):
            await store.put(team_b.facts("n1", "blue"), "{}")
    bert = EtcdAccess(roles["n1"].endpoints, cacert=roles["n1"].cacert, user="bert", password_file=str(pw))
    async with bert.open_store(timeout=3) as store:
        with pytest.raises(PermissionDenied):
            await store.put(LAY.network("blue"), "{}")
