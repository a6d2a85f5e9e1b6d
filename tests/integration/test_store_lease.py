"""Node registration: the leased liveness key lives exactly as long as its keep-alive."""

from __future__ import annotations

import asyncio

import pytest
from waits import wait_for

from controller.models.resources import Node

pytestmark = pytest.mark.etcd

NODE = Node.model_validate({"metadata": {"name": "node-a"}, "spec": {}})


async def test_alive_key_outlives_its_ttl_while_kept_alive_and_expires_after(store):
    reg = await store.register_node(NODE, ttl=2)
    try:
        await asyncio.sleep(4.5)  # more than twice the TTL
        assert await store.alive_nodes() == {"node-a"}
    finally:
        await reg.stop(revoke=False)  # as if the agent died: nobody keeps the lease alive
    assert reg.task is None
    await wait_for(lambda: _gone(store), 5, "alive/node-a to expire")
    assert [n.name for n in await store.list_nodes()] == ["node-a"]  # the record persists


async def test_lost_lease_is_granted_again(store):
    reg = await store.register_node(NODE, ttl=2)
    try:
        first = reg.lease_id
        await store.revoke_lease(first)  # e.g. expired while etcd was unreachable
        assert await store.alive_nodes() == set()
        await wait_for(lambda: _alive(store), 5, "the node to register again")
        assert reg.lease_id != first and reg.lost == 1
    finally:
        await reg.stop()
    assert await store.alive_nodes() == set()


async def test_keep_alive_survives_etcd_restart(etcd, store):
    reg = await store.register_node(NODE, ttl=2)
    try:
        await etcd.arestart()
        await asyncio.sleep(4.5)
        assert await store.alive_nodes() == {"node-a"}
    finally:
        await reg.stop()


async def test_store_close_cancels_keep_alive(etcd):
    from controller.store.client import EtcdStore

    async with EtcdStore(etcd.endpoints) as s:
        reg = await s.register_node(NODE, ttl=2)
    assert reg.task.done()


async def _gone(store) -> bool:
    return await store.alive_nodes() == set()


async def _alive(store) -> bool:
    return await store.alive_nodes() == {"node-a"}
