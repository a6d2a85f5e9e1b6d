"""`zmesh purge`: an agent's NRs, wireguard-go processes, sockets and keys removed from its state
dir alone; nothing it did not record is touched; bad arguments are one clear line."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from controller.dataplane.links import Links
from controller.dataplane.netns import create_netns, delete_netns, netns_exists
from controller.dataplane.wireguard.base import KeyStore
from controller.dataplane.wireguard.userspace import UserspaceBackend
from controller.planner import names
from controller.reconciler.state import LocalState

pytestmark = [pytest.mark.root]

ZMESH = [sys.executable, "-m", "controller.cli.main"]


def zmesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(ZMESH + list(args), capture_output=True, text=True, timeout=60)


async def test_purge_removes_what_the_agent_recorded_and_nothing_else(tmp_path):
    prefix = "p" + secrets.token_hex(2) + "-"
    bystander = f"{prefix}bystander"  # same prefix, but no record says we made it
    nr = names.nr_netns(prefix, "blue")
    ifname = names.wg_ifname(prefix, "blue")
    links = Links()
    wg = UserspaceBackend(str(tmp_path), None, links)
    try:
        # What an agent leaves behind: a recorded NR with its wireguard-go and key.
        await LocalState(tmp_path).record("blue", 51820)
        KeyStore(str(tmp_path)).load_or_create(ifname)
        await links.ensure_nr(nr)
        await wg.ensure_device(ifname, nr)
        pid = wg.pid(ifname)
        await create_netns(bystander)

        res = zmesh("purge", "--state-dir", str(tmp_path), "--name-prefix", prefix)
        assert res.returncode == 0, res.stderr
        assert f"removed netns {nr}" in res.stdout
        assert not netns_exists(nr)
        assert not os.path.exists(f"/proc/{pid}/cmdline") or b"wireguard-go" not in open(f"/proc/{pid}/cmdline", "rb").read()
        assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")
        assert not (tmp_path / "keys" / f"{ifname}.key").exists()
        assert LocalState(tmp_path).networks == {}
        assert netns_exists(bystander)

        again = zmesh("purge", "--state-dir", str(tmp_path), "--name-prefix", prefix)
        assert again.returncode == 0 and again.stdout.strip() == "nothing to remove"
    finally:
        await wg.delete_device(ifname, nr)
        await wg.close()
        for ns in (nr, bystander):
            if netns_exists(ns):
                await delete_netns(ns)
        links.close()


def test_purge_rejects_bad_arguments_with_one_line(tmp_path):
    res = zmesh("purge", "--state-dir", str(tmp_path / "missing"))
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "no such directory" in res.stderr
    res = zmesh("purge", "--state-dir", str(tmp_path), "--name-prefix", "Bad_Prefix")
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "--name-prefix" in res.stderr
