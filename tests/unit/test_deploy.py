"""deploy/ stays true to the code: files parse, the alerts and the dashboard use exactly the
metrics the agent exports (each one used, none missing), promtool accepts the rules, the
exposition and the scrape configuration and its rule tests pass, the systemd unit and its
environment file agree, and the etcd cluster configuration uses only options the installed etcd
knows (and, with etcd present, forms a 3-member cluster). tests/e2e/test_prometheus.py
evaluates the same expressions on a real Prometheus scraping real agents."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from agent_metrics import full_metrics

from controller.sim.etcd import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
OBSERVABILITY_DOC = DEPLOY.parent / "docs" / "observability.md"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "zmesh-dashboard.json"
ETCD_CONF = DEPLOY / "etcd" / "etcd.conf.yml"
UNIT = DEPLOY / "zmeshd.service"
ENV_EXAMPLE = DEPLOY / "agent.env.example"
INDEXER_UNIT = DEPLOY / "zmesh-indexer.service"
INDEXER_ENV_EXAMPLE = DEPLOY / "indexer.env.example"
METRIC = re.compile(r"\b(zmesh_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "untyped": ("",)}


def families() -> dict[str, str]:
    """Every metric family the agent can export (fully wired) → its type."""
    return {f.name: f.type for f in full_metrics()[0].registry.collect()}


def exported() -> dict[str, str]:
    """Every sample name the agent can export → its family's help text."""
    names = {}
    for family in full_metrics()[0].registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.documentation
    return names


def alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_every_yaml_and_json_file_parses():
    for path in DEPLOY.rglob("*"):
        if path.suffix in (".yml", ".yaml"):
            assert yaml.safe_load(path.read_text()) is not None, path
        elif path.suffix == ".json":
            json.loads(path.read_text())


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_metrics_used_exist_in_the_agent(source):
    exprs = alert_exprs() if source == "alerts" else dashboard_exprs()
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used, f"no zmesh metric found in the {source}"
    missing = used - set(exported())
    assert not missing, f"{source} use metrics the agent does not export: {sorted(missing)}"


# Exported for people and tools other than the dashboard: the version label is on every agent.
NOT_ON_THE_DASHBOARD = {"zmesh_node_info"}


def test_every_metric_the_agent_exports_is_on_the_dashboard_or_in_an_alert():
    used = {m for e in alert_exprs() + dashboard_exprs() for m in METRIC.findall(e)}
    unused = [f for f, kind in families().items()
              if not any(f + suffix in used for suffix in SUFFIXES[kind]) and f not in NOT_ON_THE_DASHBOARD]
    assert not unused, f"exported but neither charted nor alerted on: {sorted(unused)}"


def test_every_metric_is_documented():
    doc = OBSERVABILITY_DOC.read_text()
    undocumented = [f for f, kind in families().items()
                    if f"`{f}{'_total' if kind == 'counter' else ''}`" not in doc]
    assert not undocumented, f"not in {OBSERVABILITY_DOC.name}: {undocumented}"


needs_promtool = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed")


def promtool(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], input=input, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_the_rules_and_the_scrape_configuration(tmp_path):
    res = promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr
    # check config resolves rule_files relative to the file: check a copy next to the rules.
    for path in (PROMETHEUS, ALERTS):
        (tmp_path / path.name).write_text(path.read_text())
    res = promtool("check", "config", str(tmp_path / PROMETHEUS.name))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_rule_tests_show_the_stale_handshake_and_agent_down_alerts_firing():
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    fired = {a["alertname"] for t in tests["tests"] for a in t["alert_rule_test"] if a["exp_alerts"]}
    assert {"ZmeshPeerHandshakeStale", "ZmeshAgentDown"} <= fired
    res = promtool("test", "rules", str(ALERTS_TEST))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


@needs_promtool
def test_promtool_lints_the_exposition_clean():
    text = full_metrics()[0].exposition().decode()
    res = promtool("check", "metrics", input=text)
    assert (res.returncode, res.stdout + res.stderr) == (0, "")
    # ... and it does complain about what breaks the conventions (the check can fail).
    bad = "# HELP zmesh_x_total x\n# TYPE zmesh_x_total gauge\nzmesh_x_total 1\n"
    assert promtool("check", "metrics", input=bad).returncode != 0


def test_reconcile_results_used_are_the_agents_vocabulary():
    help_text = exported()["zmesh_reconcile_total"]
    for expr in alert_exprs() + dashboard_exprs():
        for values in re.findall(r'result=~?"([^"]+)"', expr):
            for value in values.split("|"):
                assert value in help_text, f"result {value!r} is not one the agent reports ({help_text})"


def test_alerts_select_the_scrape_job():
    jobs = {c["job_name"] for c in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    for expr in alert_exprs():
        for job in re.findall(r'job="([^"]+)"', expr):
            assert job in jobs
    conf = yaml.safe_load(PROMETHEUS.read_text())
    assert ALERTS.name in conf["rule_files"]
    agent_targets = [t for c in conf["scrape_configs"] if c["job_name"] == "zmesh-agent"
                     for s in c.get("static_configs", []) for t in s["targets"]]
    assert agent_targets and all(t.endswith(":9477") for t in agent_targets)


def test_every_alert_has_severity_and_summary():
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_dashboard_panels_have_unique_ids_and_the_import_datasource():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"], p["title"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]


def unit_service(unit: Path = UNIT) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(unit.read_text())
    return parser["Service"]


def test_unit_keeps_wireguard_go_alive_across_restarts_and_reads_the_env_file():
    svc = unit_service()
    assert svc["KillMode"] == "process"
    assert svc["Restart"] == "always"
    assert svc["EnvironmentFile"] == "/etc/zmesh/agent.env"
    caps = set(svc["CapabilityBoundingSet"].split())
    assert {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"} <= caps
    # Any of these would hide `ip netns add`'s mounts from the host (see the unit's comment).
    for key in ("ProtectSystem", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectHome"):
        assert key not in svc, key


@pytest.mark.parametrize("unit, example", [(UNIT, ENV_EXAMPLE), (INDEXER_UNIT, INDEXER_ENV_EXAMPLE)])
def test_unit_variables_are_all_in_the_env_example(unit, example):
    svc = unit_service(unit)
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", svc["ExecStart"]))
    defined = {line.split("=", 1)[0] for line in example.read_text().splitlines()
               if line and not line.startswith("#") and "=" in line}
    assert used and used <= defined, f"not in {example.name}: {sorted(used - defined)}"
    assert svc["EnvironmentFile"] == f"/etc/zmesh/{example.name.removesuffix('.example')}"


def test_the_indexer_unit_runs_the_indexer_unprivileged():
    svc = unit_service(INDEXER_UNIT)
    assert " indexer " in svc["ExecStart"] + " " and svc["DynamicUser"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""


needs_etcd = pytest.mark.skipif(not os.path.exists("/usr/bin/etcd") or not shutil.which("etcdctl"),
                                reason="etcd and etcdctl not installed")


@needs_etcd
def test_etcd_config_uses_only_known_options():
    help_text = subprocess.run(["/usr/bin/etcd", "--help"], capture_output=True, text=True).stdout
    flags = set(re.findall(r"--([a-z0-9-]+)", help_text))
    conf = yaml.safe_load(ETCD_CONF.read_text())
    # Nested TLS sections are the config file's own names for the --peer-*/--* TLS flags.
    unknown = [k for k in conf if k not in flags and k not in ("peer-transport-security", "client-transport-security")]
    assert not unknown, f"etcd does not know {unknown}"
    for key in conf.get("peer-transport-security", {}):
        assert f"peer-{key}" in flags, key
    for key in conf.get("client-transport-security", {}):
        assert key in flags, key
    assert all(u.startswith("https://") for u in conf["listen-client-urls"].split(","))
    assert conf["max-txn-ops"] > 128 and conf["auto-compaction-mode"] in ("periodic", "revision")


@pytest.mark.etcd
@needs_etcd
def test_etcd_config_forms_a_three_member_cluster(tmp_path):
    """The example's values, moved to loopback ports and with certificates made here (the
    file's TLS sections kept, only their paths changed), start three real members that talk TLS
    to each other and to clients, elect a leader and accept a transaction of max-txn-ops size."""
    from controller.sim.pki import TestPKI

    pki = TestPKI(tmp_path / "pki")
    files = {"cert-file": pki.server.cert, "key-file": pki.server.key, "trusted-ca-file": pki.ca}
    base = yaml.safe_load(ETCD_CONF.read_text())
    members = [(f"etcd-{i}", free_port(), free_port(), free_port()) for i in (1, 2, 3)]
    cluster = ",".join(f"{n}=https://127.0.0.1:{peer}" for n, _, peer, _ in members)
    procs = []
    try:
        for name, client, peer, metrics in members:
            conf = dict(base, **{
                "name": name, "data-dir": str(tmp_path / name),
                "listen-client-urls": f"https://127.0.0.1:{client}",
                "advertise-client-urls": f"https://127.0.0.1:{client}",
                "listen-peer-urls": f"https://127.0.0.1:{peer}",
                "initial-advertise-peer-urls": f"https://127.0.0.1:{peer}",
                "listen-metrics-urls": f"http://127.0.0.1:{metrics}",
                "initial-cluster": cluster, "log-level": "warn",
            })
            for section in ("peer-transport-security", "client-transport-security"):
                conf[section] = {**conf[section], **{k: v for k, v in files.items() if k in conf[section]}}
            path = tmp_path / f"{name}.yml"
            path.write_text(yaml.safe_dump(conf))
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen(["/usr/bin/etcd", "--config-file", str(path)],
                                          stdout=log, stderr=log, stdin=subprocess.DEVNULL))
            log.close()
        endpoints = ",".join(f"https://127.0.0.1:{c}" for _, c, _, _ in members)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{members[0][3]}/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "etcd-1.log").read_text()[-2000:]
            time.sleep(0.1)
        env = {**os.environ, "ETCDCTL_API": "3"}
        etcdctl = ["etcdctl", "--endpoints", endpoints, "--cacert", pki.ca]
        res = subprocess.run([*etcdctl, "member", "list"], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        status = res.stdout
        assert status.count("started") == 3, status
        # 200 puts in one transaction: over etcd's default limit of 128, within the example's.
        txn = "\n" + "\n".join(f"put /t/{i} x" for i in range(200)) + "\n\n\n"
        res = subprocess.run([*etcdctl, "txn"], input=txn,
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stderr
    finally:
        for p in procs:  # ours, by PID
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
