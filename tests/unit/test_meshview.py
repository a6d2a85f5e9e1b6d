"""The mesh page's data (/mesh/data) carries what /status has of Internet access: each NR's NAT
and firewall counters and the node's ndmz counters, from the same snapshot."""

from agent_metrics import full_metrics

from controller.reconciler.meshview import MeshView


class Scope:
    """Network blue, whose spec is not listed yet (no nodes to draw): only the snapshot speaks."""

    def network_names(self):
        return {"blue"}

    def network(self, name):
        return None, None

    def facts(self, name):
        return {}, {}


class Store:
    layout = None

    async def get_statuses(self, network, nodes):
        return {}


async def test_the_page_data_has_each_nrs_internet_counters_and_the_ndmzs():
    _, snap, _ = full_metrics()
    data = await MeshView("n1", Scope(), snap, Store(), hidden=False)()
    status = snap.view()
    (blue,) = data["networks"]
    assert blue["internet"] == status["networks"][0]["internet"]
    assert (blue["internet"]["connections"], blue["internet"]["sentBytes"]) == (3, 4000)
    assert blue["internet"]["droppedPackets"] == {"inbound": 7, "spoofed": 2, "to_node": 1}
    assert data["ndmz"] == status["ndmz"]
    assert data["ndmz"]["droppedPackets"]["inbound"] == 6 and data["ndmz"]["driftRepairs"] == 1


async def test_before_the_ndmz_is_read_the_page_data_says_so():
    _, snap, _ = full_metrics()
    snap.ndmz.read.clear()
    assert (await MeshView("n1", Scope(), snap, Store(), hidden=False)())["ndmz"] is None
