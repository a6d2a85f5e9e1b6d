"""pinned_netns against the real kernel: what is refused, and that the pinned path keeps naming
the verified namespace even when the original path is swapped for a FIFO meanwhile."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from controller.dataplane.netns import NotANetns, netns_identity, pinned_netns

pytestmark = pytest.mark.root


@pytest.fixture
def netns():
    name = f"zpin-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_refusals_name_what_the_path_is(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("")
    for ref, says in ((tmp_path / "fifo", "is a FIFO"), (tmp_path / "file", "is a regular file"),
                      (tmp_path, "is a directory"), (tmp_path / "nope", "does not exist"),
                      ("/proc/self/ns/mnt", "not a network namespace")):
        with pytest.raises(NotANetns, match=says):
            with pinned_netns(str(ref)):
                pass


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_the_pinned_path_outlives_a_swap_of_the_original(netns, tmp_path):
    link = tmp_path / "ns"
    link.symlink_to(f"/var/run/netns/{netns}")
    with pinned_netns(str(link)) as (identity, pinned):
        assert identity == netns_identity(netns)
        link.unlink()
        os.mkfifo(link)  # swapped for something that would block an open
        fd = os.open(pinned, os.O_RDONLY | os.O_NONBLOCK)  # still the namespace
        try:
            st = os.fstat(fd)
            assert (st.st_dev, st.st_ino) == identity
        finally:
            os.close(fd)
