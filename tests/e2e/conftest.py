"""End-to-end fixtures: a simulated world (controller/sim/world.py) of node namespaces with one
real agent per node and real wireguard-go, against the real etcd of the `etcd` fixture. Torn down
by World.close(), also when a test fails."""

from __future__ import annotations

import pytest
from meshlib import running_mesh


@pytest.fixture
async def mesh(etcd):
    async with running_mesh(etcd) as m:
        yield m
