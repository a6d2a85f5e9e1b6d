"""The zmesh CLI against a real etcd (the `etcd` fixture): what it writes, what it reads, and
that bad input writes nothing. Hand-written values go in with the real `etcdctl`."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from cli_world import EXAMPLE, ZMESH, Cli, cli, manifest_file, network, without_generation, workload  # noqa: F401

pytestmark = pytest.mark.etcd

# --- apply ------------------------------------------------------------------------------------


def test_apply_creates_then_reports_unchanged_then_configured(cli, tmp_path):
    f = manifest_file(tmp_path, network(), workload(ip="10.1.1.10"))
    assert cli.ok("apply", "-f", f) == "network/blue created\nworkload/web created\n"
    assert cli.ok("apply", "-f", f) == "network/blue unchanged\nworkload/web unchanged\n"
    f2 = manifest_file(tmp_path, network(aggregators=["n1"]), name="m2.yaml")
    assert cli.ok("apply", "-f", f2) == "network/blue configured\n"
    assert cli.json("get", "networks", "blue")["spec"]["aggregators"] == ["n1"]


def test_apply_writes_canonical_json_and_the_node_index(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload()))
    stored = json.loads(cli.etcdctl("get", "--print-value-only", "/zmesh/v1/networks/blue"))
    assert stored == network() | {"spec": network()["spec"] | {"aggregators": []}}  # no generation
    assert "/zmesh/v1/index/nodes/n3/networks/blue" in cli.keys()
    assert "/zmesh/v1/index/nodes/n1/workloads/web" in cli.keys()


def test_apply_reads_stdin_and_json(cli, etcd):
    r = subprocess.run([ZMESH, "--etcd", etcd.endpoint, "apply", "-f", "-"], input=json.dumps(network()),
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "network/blue created\n", "")


def test_the_example_manifest_applies(cli):
    out = cli.ok("apply", "-f", str(EXAMPLE))
    assert "network/demo created" in out and out.count("workload/") == 3


def test_dry_run_writes_nothing(cli, tmp_path):
    assert cli.ok("apply", "--dry-run", "-f", manifest_file(tmp_path, network())) == "network/blue created (dry run)\n"
    assert not [k for k in cli.keys() if "/networks/" in k]


# --- validation writes nothing ----------------------------------------------------------------


def spec_keys(cli) -> list[str]:
    return [k for k in cli.keys() if "/v1/networks/" in k or "/v1/workloads/" in k or "/index/" in k]


def test_one_bad_document_means_nothing_is_written(cli, tmp_path):
    f = manifest_file(tmp_path, network(), workload(ip="10.1.1.1"), network("red", nodes=("n1", "n1")))
    code, out, err = cli("apply", "-f", f)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert f"zmesh: {f}#2 Workload/web: spec.ip: ip 10.1.1.1 is the gateway of 10.1.1.0/24, held by the network resource" in lines
    assert f"zmesh: {f}#3 Network/red: spec.resources[1].node: node 'n1' appears more than once" in lines
    assert lines[-1] == "zmesh: nothing applied: 2 problem(s)"
    assert all(l.startswith("zmesh: ") for l in lines)
    assert spec_keys(cli) == []


def test_concurrent_applies_of_conflicting_workloads_never_both_land(cli, tmp_path):
    """Validation across objects is not racy: of two applies started together that each claim
    10.1.1.50, exactly one lands and the other is refused with the conflict, every round."""
    cli.ok("apply", "-f", manifest_file(tmp_path, network()))
    for round_ in range(6):
        files = [manifest_file(tmp_path, workload(f"r{round_}-{side}", ip="10.1.1.50"), name=f"{round_}{side}.yaml")
                 for side in "ab"]
        procs = [subprocess.Popen([ZMESH, "--etcd", cli.etcd.endpoint, "apply", "-f", f], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for f in files]
        outcomes = [(p.wait(60), p.stdout.read(), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert sorted(code for code, _, _ in outcomes) == [0, 1], outcomes
        loser = next(err for code, _, err in outcomes if code == 1)
        assert "ip 10.1.1.50 is already used by workload" in loser, loser
        stored = [w["metadata"]["name"] for w in cli.json("get", "workloads")["items"]
                  if w["spec"].get("ip") == "10.1.1.50"]
        assert len(stored) == 1, stored
        cli.ok("delete", "workload", stored[0])


def test_an_unregistered_node_is_an_error(cli, tmp_path):
    code, _, err = cli("apply", "-f", manifest_file(tmp_path, network(nodes=("n1", "n9"))))
    assert (code, err) == (1, f"zmesh: {tmp_path}/m.yaml Network/blue: spec.resources[1].node: node 'n9' is not a "
                              "registered node\nzmesh: nothing applied: 1 problem(s)\n")
    assert spec_keys(cli) == []


def test_a_node_registered_with_a_malformed_record_still_exists(cli, tmp_path):
    cli.put("/zmesh/v1/nodes/n4/registration", "{broken")
    assert cli.ok("apply", "-f", manifest_file(tmp_path, network(nodes=("n4",)))) == "network/blue created\n"


def test_workloads_are_checked_against_the_network_in_etcd(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload("a", ip="10.1.1.10")))
    code, _, err = cli("apply", "-f", manifest_file(tmp_path, workload("b", ip="10.1.1.10"), name="b.yaml"))
    assert code == 1 and f"{tmp_path}/b.yaml Workload/b: spec.ip: ip 10.1.1.10 is already used by workload 'a'\n" in err
    code, _, err = cli("apply", "-f", manifest_file(tmp_path, workload("c", network="nope"), name="c.yaml"))
    assert code == 1 and f"{tmp_path}/c.yaml Workload/c: spec.network: network 'nope' does not exist\n" in err
    assert [w["metadata"]["name"] for w in cli.json("get", "workloads")["items"]] == ["a"]


def test_a_network_change_that_would_orphan_a_workload_is_refused(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload(node="n3")))
    code, _, err = cli("apply", "-f", manifest_file(tmp_path, network(nodes=("n1", "n2")), name="x.yaml"))
    assert code == 1 and ("x.yaml Network/blue: spec.resources: existing workload 'web' would become invalid: "
                          "node 'n3' is not part of network 'blue'\n") in err
    assert cli.json("get", "networks", "blue")["spec"]["resources"][2]["node"] == "n3"


def test_malformed_files_are_one_line_each(cli, tmp_path):
    (tmp_path / "bad.json").write_text('{"apiVersion": "zmesh.io/v1", ')
    code, out, err = cli("apply", "-f", str(tmp_path / "bad.json"), "-f", str(tmp_path / "missing.yaml"))
    assert code == 1 and out == ""
    assert err.splitlines()[0].startswith(f"zmesh: {tmp_path}/bad.json:1:31: not valid YAML or JSON: ")
    assert f"{tmp_path}/missing.yaml: cannot read" in err.splitlines()[1]


def test_two_networks_may_share_ranges(cli, tmp_path):
    out = cli.ok("apply", "-f", manifest_file(tmp_path, network("blue"), network("red")))
    assert out == "network/blue created\nnetwork/red created\n"


# --- reading: CLI-written and etcdctl-written values are the same ------------------------------


def test_values_written_with_etcdctl_read_exactly_like_the_clis(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network("blue")))
    # The same network by hand: keys in another order, and once as YAML.
    red = network("red")
    cli.put("/zmesh/v1/networks/red", json.dumps({k: red[k] for k in ("spec", "metadata", "kind", "apiVersion")}))
    green = network("green")
    cli.put("/zmesh/v1/networks/green", yaml.safe_dump(green))
    items = {i["metadata"]["name"]: i for i in cli.json("get", "networks")["items"]}
    assert set(items) == {"blue", "red", "green"}
    for name in ("red", "green"):
        assert items[name]["metadata"]["generation"] > 0
        expected = without_generation(items["blue"])
        expected["metadata"]["name"] = name
        assert without_generation(items[name]) == expected
    table = cli.ok("get", "networks").splitlines()
    assert [row.split()[1:4] for row in table[1:]] == [["10.1.0.0/16", "n1,n2,n3", "0/3"]] * 3


def test_malformed_values_are_listed_as_invalid_with_one_warning(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network("blue")))
    cli.put("/zmesh/v1/networks/broken", '{"apiVersion": "zmesh.io/v1", "kind": ')
    cli.put("/zmesh/v1/networks/reserved", json.dumps(network("reserved") | {"spec": {"ipRange": "100.64.0.0/16"}}))
    cli.put("/zmesh/v1/networks/misnamed", json.dumps(network("other")))
    code, out, err = cli("get", "networks")
    assert code == 0
    rows = {line.split()[0]: line.split("   ")[-1].strip() for line in out.splitlines()[1:]}
    assert rows == {"blue": "NoStatus (n1, n2, n3)", "broken": "InvalidSpec", "misnamed": "InvalidSpec",
                    "reserved": "InvalidSpec"}
    assert err == ("zmesh: warning: 3 invalid networks in etcd: broken, misnamed, reserved "
                   "('zmesh describe network NAME' shows why)\n")
    # Only what concerns the command: listing workloads says nothing about networks.
    assert cli("get", "workloads")[2] == "No workloads found.\n"


def test_get_nodes_shows_endpoints_hidden_and_alive(cli):
    cli.register("n4", alive=False)
    rows = [line.split() for line in cli.ok("get", "nodes").splitlines()]
    assert rows[0] == ["NAME", "ENDPOINTS", "HIDDEN", "ALIVE", "PORTS", "VERSION"]
    assert {r[0]: (r[2], r[3]) for r in rows[1:]} == {
        "n1": ("no", "yes"), "n2": ("no", "yes"), "n3": ("yes", "yes"), "n4": ("no", "no")}
    assert cli.json("get", "nodes", "n4")["status"] == {"alive": False}
    assert cli.json("get", "nodes", "n3")["spec"] == {
        "endpoints": [], "listenPortRange": {"max": 52819, "min": 51820}, "version": "", "capabilities": []}


def test_get_one_missing_object_is_an_error(cli):
    assert cli("get", "networks", "nope")[::2] == (1, "zmesh: network/nope not found\n")


def test_get_yaml_output_can_be_applied_again(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload(ip="10.1.1.10")))
    (tmp_path / "back.yaml").write_text(cli.ok("get", "workloads", "web", "-o", "yaml"))
    assert cli.ok("apply", "-f", str(tmp_path / "back.yaml")) == "workload/web unchanged\n"


# --- status from the agents -------------------------------------------------------------------


def nr_status(node, generation, ready="True", network_name="blue", **internet) -> str:
    return json.dumps({
        "apiVersion": "zmesh.io/v1", "kind": "NetworkResourceStatus", "network": network_name, "node": node,
        "observedGeneration": generation, **internet,
        "conditions": [{"type": "Ready", "status": ready, "reason": "Converged" if ready == "True" else "PeerMissing",
                        "message": "" if ready == "True" else "no peer for n3 yet",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    })


def test_describe_and_status_show_what_the_agents_report(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload(ip="10.1.1.10")))
    gen = cli.json("get", "networks", "blue")["metadata"]["generation"]
    cli.put("/zmesh/v1/nodes/n1/status/networks/blue", nr_status("n1", gen, publicAddress="100.64.0.2"))
    cli.put("/zmesh/v1/nodes/n2/status/networks/blue", nr_status("n2", gen, ready="False",
                                                                publicAddress="100.64.0.3", internetVia="n1"))
    cli.put("/zmesh/v1/nodes/n3/status/networks/blue", "garbage: [")
    cli.put("/zmesh/v1/nodes/n1/status/workloads/web", json.dumps({
        "apiVersion": "zmesh.io/v1", "kind": "WorkloadStatus", "workload": "web", "node": "n1",
        "observedGeneration": cli.json("get", "workloads", "web")["metadata"]["generation"], "conditions": [{"type": "Ready", "status": "False", "reason": "AttachFailed",
                                                 "message": "network namespace ctr-web does not exist (yet)",
                                                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))
    cli.put("/zmesh/v1/nodes/n1/mesh/facts/blue", json.dumps({
        "apiVersion": "zmesh.io/v1", "kind": "NetworkResourceFacts", "network": "blue", "node": "n1",
        "publicKey": "A" * 43 + "=", "listenPort": 51820, "endpoints": ["198.51.100.12"],
        "subnet": "10.1.1.0/24"}))
    code, out, err = cli("describe", "network", "blue")
    assert code == 0
    assert "Ready:        1/3 network resources (not ready: PeerMissing (n2); StatusUnreadable (n3))" in out
    assert "n3  subnet 10.1.3.0/24  gateway 10.1.3.1  (hidden, alive)" in out
    assert "PeerMissing" in out and "no peer for n3 yet" in out
    assert "    unreadable: NetworkResourceStatus at /zmesh/v1/nodes/n3/status/networks/blue: " in out
    assert err == ""
    assert out.splitlines()[-4:] == ["Workloads:", "  NAME   NODE   IP          READY   REASON",
                                     "  web    n1     10.1.1.10   False   AttachFailed",
                                     "Events:       <none>"]  # no agent ran to record any
    assert "listen port 51820; endpoints 198.51.100.12; public key " + "A" * 43 + "=" in out
    assert "public address 100.64.0.2; Internet through this node's ndmz" in out
    assert "public address 100.64.0.3; Internet through the egress NR, via node n1" in out
    row = cli.ok("get", "networks").splitlines()[1]
    assert row.split()[3] == "1/3" and row.endswith("PeerMissing (n2); StatusUnreadable (n3)")
    status = cli.json("status")
    assert status["nodes"]["alive"] == 3
    assert status["networks"]["items"] == [{"name": "blue", "ready": False, "readyResources": 1, "resources": 3}]
    assert status["workloads"] == {"total": 1, "ready": 0, "invalid": 0}
    described = cli.json("describe", "network", "blue")
    assert described["status"]["readyResources"] == 1
    assert "Ready:        False (AttachFailed)" in cli.ok("describe", "workload", "web")


# --- delete ----------------------------------------------------------------------------------


def test_delete_by_name_and_by_file(cli, tmp_path):
    f = manifest_file(tmp_path, network(), workload())
    cli.ok("apply", "-f", f)
    assert cli.ok("delete", "workload", "web") == "workload/web deleted\n"
    assert cli("delete", "workload", "web")[::2] == (1, "zmesh: workload/web not found\n")
    assert cli("delete", "workload", "web", "--ignore-not-found")[0] == 0
    cli.ok("apply", "-f", f)
    assert cli.ok("delete", "-f", f) == "workload/web deleted\nnetwork/blue deleted\n"
    assert spec_keys(cli) == []


def test_deleting_a_network_warns_about_its_workloads(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload()))
    code, out, err = cli("delete", "network", "blue")
    assert (code, out) == (0, "network/blue deleted\n")
    assert err == "zmesh: warning: workload/web still refers to deleted network/blue\n"


def test_a_malformed_value_can_still_be_deleted(cli):
    cli.put("/zmesh/v1/networks/broken", "{nope")
    assert cli.ok("delete", "network", "broken") == "network/broken deleted\n"


# --- prefix and failures ---------------------------------------------------------------------


def test_the_prefix_separates_installations(cli, etcd, capsys, tmp_path):
    other = Cli(etcd, capsys, prefix="/other/")
    other.register("n1", "n2", "n3")
    other.ok("apply", "-f", manifest_file(tmp_path, network()))
    assert "blue" not in cli.ok("get", "networks")
    assert other.json("get", "networks", "blue")["metadata"]["name"] == "blue"
    assert all(k.startswith("/other/v1/") for k in other.keys())


def test_etcd_down_is_one_clear_line(cli, etcd, tmp_path):
    etcd.stop()
    for argv in (["get", "networks"], ["apply", "-f", manifest_file(tmp_path, network())], ["status"]):
        code, out, err = cli(*argv)
        assert code == 1 and out == ""
        assert err.startswith(f"zmesh: cannot reach etcd at {etcd.endpoint} (")
        assert err.count("\n") == 1


def test_the_installed_command_reports_etcd_down_without_a_traceback(etcd):
    endpoint = etcd.endpoint
    etcd.stop()
    r = subprocess.run([ZMESH, "--etcd", endpoint, "--timeout", "1", "get", "networks"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"zmesh: cannot reach etcd at {endpoint} (") and r.stderr.count("\n") == 1


def test_deeply_nested_garbage_in_etcd_is_a_warning_not_a_failure(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network("blue")))
    # Too long for a command line: etcdctl reads the value from stdin.
    cli.etcdctl("put", "/zmesh/v1/networks/deep", input="[" * 100_000 + "]" * 100_000)
    code, out, err = cli("get", "networks")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["NAME", "blue", "deep"]
    assert err == "zmesh: warning: 1 invalid network in etcd: deep ('zmesh describe network NAME' shows why)\n"
    assert "  nested too deeply to be a manifest" in cli.ok("describe", "network", "deep")
    assert cli.ok("apply", "-f", manifest_file(tmp_path, network("blue"))) == "network/blue unchanged\n"
    assert cli.ok("delete", "network", "deep") == "network/deep deleted\n"
