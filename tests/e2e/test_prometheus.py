"""deploy/ against a real Prometheus: it scrapes the real agents of a simulated world on loopback
with the shipped alert rules loaded, and every expression of the dashboard and of the alert
rules is evaluated through its HTTP API: none errors, and each one that should have data has it.

The world is made to have something to show: one peer whose WireGuard UDP is dropped while
traffic goes to it (a stale peer), a listen port taken by another program (a reconcile error
the agent then works around: the error series exist), an aggregator in the spec, workloads
using the Internet host (NAT counters), a workload sending from an address not its own and
SYNs from the Internet host toward a node's ndmz (firewall drops), and a scrape target where
no agent answers (an agent that is down)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from internetlib import answered, ping_from
from meshlib import (
    OBSERVE_FAST, network_manifest, pinging, running_mesh, wait_until, wireguard_udp_dropped, workload_manifest,
)

from controller.sim.etcd import free_port
from controller.sim.world import INTERNET_HOST, run_ip_batch

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "zmesh-dashboard.json"

SUBNETS = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24", "n3": "10.1.3.0/24"}
IPS = {"w1": "10.1.1.10", "w2": "10.1.2.10", "w3": "10.1.3.10"}
NODE_OF = {"w1": "n1", "w2": "n2", "w3": "n3"}

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd,
              pytest.mark.skipif(not shutil.which("prometheus") or not shutil.which("promtool"),
                                 reason="prometheus (Debian package) not installed")]

# Grafana's variables, as "All" selects them; a rate window of several scrapes at 1 s.
GRAFANA_VARS = {"$instance": ".*", "$network": ".*", "$__rate_interval": "30s"}
SELECTOR = re.compile(r"\b(up|zmesh_[a-z0-9_]+)(\{[^}]*\})?(?!\s*\()")


class Prometheus:
    """The Debian package's prometheus on a free loopback port, with its own data dir; stopped
    by its PID."""

    def __init__(self, config: dict, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad expression is a 400 with a JSON body
            return json.loads(e.read())

    def ready(self) -> bool:
        assert self.proc.poll() is None, (self.workdir / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def scrape_config(targets: dict[str, int]) -> dict:
    """deploy/prometheus/prometheus.yml's agent job and rules, pointed at this world's agents
    (instance = the node's name, as the shipped relabelling makes it the host's)."""
    shipped = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [c for c in shipped["scrape_configs"] if c["job_name"] == "zmesh-agent"]
    job = {k: v for k, v in job.items() if k not in ("file_sd_configs", "static_configs", "relabel_configs")}
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": {"node": node}}
                             for node, port in targets.items()]
    job["relabel_configs"] = [{"source_labels": ["node"], "target_label": "instance"},
                              {"regex": "node", "action": "labeldrop"}]
    job["scrape_interval"] = "1s"
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)], "scrape_configs": [job]}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:  # label_values(METRIC, LABEL): the series must exist
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"]).groups()
        out.append((f"variable {var['name']}", f"count by ({label}) ({metric})"))
    return out


def alert_rules() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


async def test_a_real_prometheus_evaluates_every_dashboard_and_alert_expression_on_real_agents(etcd, tmp_path):
    from controller.dataplane.netns import open_socket_in

    async with running_mesh(etcd, agent_args=OBSERVE_FAST) as mesh:
        world = mesh.world
        world.add_node("n1")
        squatter = open_socket_in(world.nodes["n1"].netns, socket.AF_INET, socket.SOCK_DGRAM)
        prometheus = None
        try:
            squatter.bind(("0.0.0.0", 51820))  # n1's first listen port, held by another program
            world.start_agent("n1")
            mesh.start("n2", "n3")
            wait_until(lambda: mesh.ready("n1"), 30, what="n1 ready")
            manifest = network_manifest("blue", SUBNETS, aggregators=["n2"])
            manifest += "".join(workload_manifest(w, "blue", NODE_OF[w], mesh.add_workload_ns(w), ip)
                                for w, ip in IPS.items())
            mesh.apply(manifest)
            mesh.wait_mesh(IPS)

            targets = {n: world.nodes[n].metrics_port for n in ("n1", "n2", "n3")}
            targets["gone"] = free_port()  # nothing listens: an agent that is down
            prometheus = Prometheus(scrape_config(targets), tmp_path)
            wait_until(prometheus.ready, 60, what="prometheus ready")

            # promtool accepts what a real agent serves.
            for node in ("n1", "n2", "n3"):
                res = subprocess.run(["promtool", "check", "metrics"], input=mesh.metrics_text(node),
                                     capture_output=True, text=True, timeout=60)
                assert (res.returncode, res.stdout + res.stderr) == (0, ""), node

            # Internet traffic once Prometheus scrapes (an increase needs two samples): every
            # workload's request masqueraded, spoofed packets from w1, SYNs from the Internet
            # host toward n1's ndmz link dropped by n1's host chains.
            def scraped(expr):
                r = prometheus.query(expr)
                return r["status"] == "success" and r["data"]["result"]
            wait_until(lambda: scraped('count(zmesh_firewall_dropped_packets_total) >= 9'), 60, interval=1,
                       what="Prometheus scraping the firewall counters of every agent")
            for w in IPS:
                assert world.http_get(mesh.workload_ns(w)) is not None, w
            run_ip_batch(mesh.workload_ns("w1"), ["addr add 192.0.2.99/32 dev lo"])
            assert not any([ping_from(mesh.workload_ns("w1"), "192.0.2.99", str(INTERNET_HOST)) for _ in range(3)])
            run_ip_batch(world.inet, [f"route add 100.64.0.0/10 via {world.nodes['n1'].ipv4}"])
            assert answered(world.ihost, ["100.127.255.254"], world.python) == set()
            for expr in ('zmesh_internet_connections_total{instance="n3"} > 0',
                         'zmesh_firewall_dropped_packets_total{instance="n1", reason="spoofed"} > 0',
                         'zmesh_ndmz_dropped_packets_total{instance="n1", reason="inbound"} > 0'):
                wait_until(lambda: scraped(expr), 60, interval=1, what=f"Prometheus seeing {expr}")

            port = (await mesh.wg_device("n3", "blue")).listen_port
            with wireguard_udp_dropped(mesh, "n3", port), pinging(mesh, "w1", IPS["w3"]):
                def stale_seen():
                    r = prometheus.query('zmesh_wireguard_peers_stale{instance="n1", network="blue"} > 0')
                    return r["status"] == "success" and r["data"]["result"]
                wait_until(stale_seen, 120, interval=1, what="Prometheus seeing n1's stale peer")

                def enough_scrapes():  # every rate window has a few samples of every agent
                    r = prometheus.query('min(count_over_time(up{job="zmesh-agent"}[30s])) >= 10')
                    return r["status"] == "success" and r["data"]["result"]
                wait_until(enough_scrapes, 60, interval=1, what="enough scrapes")

                problems, empty = [], []
                for where, expr in dashboard_exprs() + alert_rules():
                    r = prometheus.query(grafana(expr))
                    if r["status"] != "success":
                        problems.append(f"{where}: {expr}: {r.get('error')}")
                    elif not r["data"]["result"]:
                        empty.append((where, expr))
                assert not problems, "\n".join(problems)
                # Every dashboard expression has data in this world ...
                assert not [w for w, _ in empty if not w.startswith("Zmesh")], empty
                # ... and so does every series an alert looks at; the alerts whose condition
                # this world meets have data themselves.
                no_data = []
                for alert, expr in alert_rules():
                    for name, labels in SELECTOR.findall(expr):
                        r = prometheus.query(name + labels)
                        if not r["data"]["result"]:
                            no_data.append(f"{alert}: {name}{labels}")
                assert not no_data, no_data
                met_here = {"ZmeshAgentDown", "ZmeshPeerHandshakeStale", "ZmeshSpoofedTraffic"}
                assert not met_here & {w for w, _ in empty}, empty

                # Prometheus itself loaded and evaluated the shipped rules without an error, and
                # the alerts of this world's faults are on their way (pending their `for`).
                rules = [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]
                assert {r["name"] for r in rules} == {a for a, _ in alert_rules()}
                assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules

                def alerts_pending():
                    alerts = prometheus.api("alerts")["data"]["alerts"]
                    return {(a["labels"]["alertname"], a["labels"].get("instance")) for a in alerts}
                seen = wait_until(lambda: {("ZmeshAgentDown", "gone"), ("ZmeshPeerHandshakeStale", "n1"),
                                           ("ZmeshSpoofedTraffic", "n1")}
                                  <= alerts_pending() and alerts_pending(), 30, what="the alerts pending or firing")
                assert ("ZmeshAgentDown", "n1") not in seen
        finally:
            squatter.close()
            if prometheus is not None:
                prometheus.stop()
