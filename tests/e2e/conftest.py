"""End-to-end fixtures: a simulated world (controller/sim/world.py) of node namespaces with one
real agent per node and real wireguard-go, against the real etcd of the `etcd` fixture. Torn down
by World.close(), also when a test fails."""

from __future__ import annotations

import pytest
from meshlib import RESYNC, Mesh

from controller.sim.world import World


@pytest.fixture
async def mesh(etcd):
    async with World(etcd.endpoints, resync_interval=RESYNC) as world:
        m = Mesh(world, etcd)
        try:
            yield m
        finally:
            # On failure, the agents' logs are the first thing anyone wants to read.
            for node_id in world.nodes:
                log = world.agent_log(node_id)
                if "Traceback" in log or "ERROR" in log:
                    print(f"--- agent {node_id} log (tail) ---\n{log[-4000:]}")
