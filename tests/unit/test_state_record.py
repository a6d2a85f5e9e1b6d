"""The state record (state.json) is written off the event loop, bounded by a timeout, and never
claims in memory what is not on disk: a hung state disk fails only the change that needed it."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import threading
import time

import pytest

from controller.models.resources import PortRange
from controller.planner.allocation import allocate_listen_port, allocate_public_ip
from controller.reconciler import state as state_module
from controller.reconciler.state import LocalState, StateWriteError, StateWriteTimeout

REAL_WRITE = state_module._write_durably


class BlockedDisk:
    """A state disk whose writes hang until released (then they complete for real)."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.writes = 0

    def __call__(self, path, text):
        self.started.set()
        assert self.release.wait(30), "the test never released the disk"
        self.writes += 1
        REAL_WRITE(path, text)


@pytest.fixture
def disk(monkeypatch):
    blocked = BlockedDisk()
    monkeypatch.setattr(state_module, "_write_durably", blocked)
    yield blocked
    blocked.release.set()  # no thread outlives the test blocked


def on_disk(path) -> dict:
    return LocalState(path).networks


async def test_the_event_loop_runs_on_while_a_write_is_blocked(tmp_path, disk):
    state = LocalState(tmp_path)
    writing = asyncio.create_task(state.record("blue", 51820))
    assert await asyncio.to_thread(disk.started.wait, 10)
    ticks = 0
    while ticks < 100:  # another coroutine (think /healthz) makes progress meanwhile
        await asyncio.sleep(0)
        ticks += 1
    assert not writing.done() and "blue" not in state.networks  # not claimed before it is durable
    disk.release.set()
    await asyncio.wait_for(writing, 10)
    assert state.networks["blue"].listen_port == 51820 and on_disk(tmp_path) == state.networks


async def test_a_hung_write_times_out_naming_the_state_file_and_records_nothing(tmp_path, disk):
    state = LocalState(tmp_path, write_timeout=0.2)
    with pytest.raises(StateWriteTimeout, match=rf"writing the state record {tmp_path}/state.json "
                                                r"did not finish within 0.2s"):
        await state.record("blue", 51820)
    assert state.networks == {} and on_disk(tmp_path) == {}
    # While that write still hangs no other starts (it could land after it and undo it).
    with pytest.raises(StateWriteTimeout, match="an earlier write of the state record .* has not finished"):
        await state.record("red", 51821)
    assert disk.writes == 0 and state.networks == {}


async def test_a_write_that_lands_after_its_timeout_is_written_again_before_it_counts(tmp_path, disk):
    state = LocalState(tmp_path, write_timeout=0.2)
    disk.release.set()
    await state.record("blue", 51820)
    disk.release.clear()
    # The teardown's forget times out, but the write lands later: the disk no longer has blue
    # while memory still does (it claims an NR that is already gone, never one not recorded).
    with pytest.raises(StateWriteTimeout):
        await state.forget("blue")
    disk.release.set()
    while state._writing is not None and not state._writing.done():
        await asyncio.sleep(0.01)
    assert "blue" in state.networks and on_disk(tmp_path) == {}
    # blue wanted again, unchanged in memory: it is written anyway, before it is used.
    await state.record("blue", 51820)
    assert on_disk(tmp_path) == state.networks == {"blue": state_module.NRRecord(51820)}
    writes = disk.writes
    await state.record("blue", 51820)  # confirmed now: nothing to write
    assert disk.writes == writes


async def test_a_failed_write_leaves_the_old_record_whole_and_memory_unchanged(tmp_path, monkeypatch):
    state = LocalState(tmp_path)
    await state.record("blue", 51820)
    before = (tmp_path / "state.json").read_text()

    def broken_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(state_module.os, "fsync", broken_fsync)
    with pytest.raises(StateWriteError, match=rf"cannot write the state record {tmp_path}/state.json: "
                                              r".*Input/output error"):
        await state.record("red", 51821, public_ip=ipaddress.IPv4Address("100.64.0.3"))
    monkeypatch.undo()
    assert set(state.networks) == {"blue"} and state.public_ips() == {}
    assert (tmp_path / "state.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


async def test_concurrent_allocations_under_the_lock_never_collide(tmp_path, monkeypatch):
    def slow_write(path, text):  # every other reconcile runs meanwhile
        time.sleep(0.005)
        REAL_WRITE(path, text)

    monkeypatch.setattr(state_module, "_write_durably", slow_write)
    ports = PortRange(min=51820, max=51900)

    async def reconcile(state: LocalState, network: str, locked: bool) -> None:
        async def allocate():
            port = allocate_listen_port(ports, state.ports(), network)
            public_ip = allocate_public_ip(state.public_ips(), network)
            await state.record(network, port, public_ip=public_ip)
        if locked:
            async with state.exclusive():
                await allocate()
        else:
            await allocate()

    networks = sorted(f"net{i}" for i in range(12))
    state = LocalState(tmp_path / "locked")
    await asyncio.gather(*(reconcile(state, n, locked=True) for n in networks))
    assert sorted(state.ports()) == networks
    assert len(set(state.ports().values())) == len(networks)
    assert len(set(state.public_ips().values())) == len(networks)
    assert on_disk(tmp_path / "locked") == state.networks
    record = json.loads((tmp_path / "locked" / "state.json").read_text())
    assert len(record["networks"]) == len(networks)

    # The same reconciles choosing outside the lock hand out one port to several networks:
    # what the lock prevents (so the test above can fail).
    unlocked = LocalState(tmp_path / "unlocked")
    await asyncio.gather(*(reconcile(unlocked, n, locked=False) for n in networks))
    assert len(set(unlocked.ports().values())) < len(networks)


async def test_the_lock_is_reentrant_within_a_task_and_waiting_for_it_is_bounded(tmp_path):
    state = LocalState(tmp_path, write_timeout=0.2)
    async with state.exclusive():
        await state.record("blue", 51820)  # takes the lock again: no deadlock
        other = asyncio.create_task(state.record("red", 51821))
        with pytest.raises(StateWriteTimeout, match=rf"waited 0.2s for the state record {tmp_path}/state.json"):
            await other
    await state.record("red", 51821)
    assert on_disk(tmp_path) == state.networks and set(state.networks) == {"blue", "red"}
