"""`zmesh` as an operator expects it, on a real etcd: one test per case an operator hit (the
message and the exit code asserted). Agents' statuses are written by hand with etcdctl, as an
agent would publish them; the running mesh is tests/e2e/test_admission.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import yaml

from cli_world import ZMESH, Cli, cli, manifest_file, network, workload  # noqa: F401
from controller.sim.etcd import EmbeddedEtcd

pytestmark = pytest.mark.etcd


def workload_status(cli, name, node, ip, ready="True", reason="Attached") -> None:
    generation = cli.json("get", "workloads", name)["metadata"]["generation"]
    cli.put(f"/zmesh/v1/nodes/{node}/status/workloads/{name}", json.dumps({
        "apiVersion": "zmesh.io/v1", "kind": "WorkloadStatus", "workload": name, "node": node,
        "observedGeneration": generation, "ip": ip,
        "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))


def spec_keys(cli) -> list[str]:
    return [k for k in cli.keys() if "/v1/networks/" in k or "/v1/workloads/" in k]


# --- admission that protects what runs ---------------------------------------------------------


def test_pinning_the_address_a_node_allocated_to_a_running_workload_is_refused_naming_it(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload("running")))
    workload_status(cli, "running", "n1", "10.1.1.2")  # the agent allocated it and published it
    f = manifest_file(tmp_path, workload("late", ip="10.1.1.2"), name="late.yaml")
    code, out, err = cli("apply", "-f", f)
    assert (code, out) == (1, "")
    assert err == (f"zmesh: {f} Workload/late: spec.ip: ip 10.1.1.2 is already used by workload 'running' "
                   "(allocated by node n1)\nzmesh: nothing applied: 1 problem(s)\n")
    assert [w["metadata"]["name"] for w in cli.json("get", "workloads")["items"]] == ["running"]


def test_a_subnet_change_that_would_renumber_a_running_workload_is_refused(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload("running")))
    workload_status(cli, "running", "n1", "10.1.1.2")
    moved = network()
    moved["spec"]["resources"][0]["subnet"] = "10.1.100.0/24"
    code, _, err = cli("apply", "-f", manifest_file(tmp_path, moved, name="moved.yaml"))
    assert code == 1
    assert ("Network/blue: spec.resources[0].subnet: existing workload 'running' would be renumbered: its address "
            "10.1.1.2 (allocated by node n1) is not a host of the new subnet 10.1.100.0/24\n") in err


# --- messages in the product's words --------------------------------------------------------------


def test_a_misspelt_field_is_one_line_with_a_suggestion(cli, tmp_path):
    doc = network()
    doc["spec"]["ipRnage"] = doc["spec"].pop("ipRange")
    f = manifest_file(tmp_path, workload(), doc, name="shop.yaml")
    code, out, err = cli("apply", "-f", f)
    assert (code, out) == (1, "")
    assert err == (f"zmesh: {f}#2 Network/blue: spec.ipRnage: unknown field (did you mean ipRange?)\n"
                   "zmesh: nothing applied: 1 problem(s)\n")
    assert spec_keys(cli) == []


def test_host_bits_are_one_problem_with_the_fix(cli, tmp_path):
    doc = network()
    doc["spec"]["ipRange"] = "10.1.0.1/16"
    f = manifest_file(tmp_path, doc)
    code, _, err = cli("apply", "-f", f)
    assert code == 1 and err.splitlines()[0] == (
        f"zmesh: {f} Network/blue: spec.ipRange: '10.1.0.1/16' has host bits set (did you mean 10.1.0.0/16?)")


def test_text_that_is_not_yaml_names_file_line_and_column_and_hides_no_other_problem(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload("a", ip="10.1.1.10")))
    f = tmp_path / "mixed.yaml"
    f.write_text(yaml.safe_dump(workload("b", ip="10.1.1.10")) + "---\nkind: [Network\n---\n"
                 + yaml.safe_dump(network("red", nodes=("n1", "n9"))))
    code, _, err = cli("apply", "-f", str(f))
    assert code == 1
    assert err.splitlines() == [
        f"zmesh: {f}:12:1: not valid YAML or JSON: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)",
        f"zmesh: {f}#3 Network/red: spec.resources[1].node: node 'n9' is not a registered node",
        f"zmesh: {f}#1 Workload/b: spec.ip: ip 10.1.1.10 is already used by workload 'a'",
        "zmesh: nothing applied: 3 problem(s)",
    ]
    assert "<unicode string>" not in err and "^" not in err


def test_one_path_style_for_field_and_cross_field_problems(cli, tmp_path):
    doc = network(nodes=("n1", "n2"))
    doc["spec"]["resources"][0]["subnet"] = "10.1.1.0/33"
    doc["spec"]["resources"][1]["subnet"] = "10.2.2.0/24"
    f = manifest_file(tmp_path, doc)
    err = cli("apply", "-f", f)[2]
    assert f"zmesh: {f} Network/blue: spec.resources[0].subnet: '10.1.1.0/33' is not an IPv4 prefix" in err
    other = network(nodes=("n1", "n2"))
    other["spec"]["resources"][1]["subnet"] = "10.2.2.0/24"
    err = cli("apply", "-f", manifest_file(tmp_path, other, name="o.yaml"))[2]
    assert "o.yaml Network/blue: spec.resources[1].subnet: subnet 10.2.2.0/24 is outside ipRange 10.1.0.0/16" in err


# --- kubectl habits ------------------------------------------------------------------------------


def test_describe_and_get_output_apply_again_unchanged(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload(ip="10.1.1.10")))
    for argv in (["describe", "network", "blue"], ["describe", "workload", "web"], ["get", "networks"],
                 ["get", "workloads", "web"]):
        r = subprocess.run([ZMESH, "--etcd", cli.etcd.endpoint, *argv, "-o", "yaml"], capture_output=True,
                           text=True, timeout=60)
        back = subprocess.run([ZMESH, "--etcd", cli.etcd.endpoint, "apply", "-f", "-"], input=r.stdout,
                              capture_output=True, text=True, timeout=60)
        assert (back.returncode, back.stderr) == (0, ""), argv
        assert back.stdout.endswith(" unchanged\n") and "created" not in back.stdout, back.stdout


def test_wide_and_name_output(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload(ip="10.1.1.10")))
    assert cli.ok("get", "workloads", "-o", "name") == "workload/web\n"
    assert cli.ok("get", "networks", "-o", "name") == "network/blue\n"
    wide = cli.ok("get", "workloads", "-o", "wide").splitlines()
    assert wide[0].split() == ["NAME", "NETWORK", "NODE", "IP", "READY", "NETNS", "INTERFACE", "GENERATION", "REASON"]
    assert wide[1].split()[:7] == ["web", "blue", "n1", "10.1.1.10", "Unknown", "ctr-web", "eth0"]


def test_version_from_the_installed_command():
    for argv in (["version"], ["--version"]):
        r = subprocess.run([ZMESH, *argv], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (0, "") and r.stdout.startswith("zmesh 0.")


def test_get_workloads_by_network_and_node(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), network("red"), workload("a"), workload("b", node="n2"),
                                        workload("c", network="red")))
    assert cli.ok("get", "workloads", "--network", "blue", "-o", "name") == "workload/a\nworkload/b\n"
    assert cli.ok("get", "workloads", "--network", "blue", "--node", "n2", "-o", "name") == "workload/b\n"
    assert cli.ok("get", "networks", "--node", "n1", "-o", "name") == "network/blue\nnetwork/red\n"
    assert cli.ok("get", "nodes", "--network", "red", "-o", "name") == "node/n1\nnode/n2\nnode/n3\n"
    assert cli("get", "workloads", "--network", "nope") == (0, "", "No workloads found.\n")
    # Invalid values are filtered as far as they can be read, and warned about only when shown.
    cli.put("/zmesh/v1/workloads/bad", json.dumps(workload("bad", network="red") | {"spec": {"network": "red"}}))
    assert cli("get", "workloads", "--network", "blue", "-o", "name") == (0, "workload/a\nworkload/b\n", "")
    code, out, err = cli("get", "workloads", "--network", "red", "-o", "name")
    assert (code, out) == (0, "workload/bad\nworkload/c\n") and "1 invalid workload in etcd: bad" in err
    cli.put("/zmesh/v1/nodes/n4/registration", "{broken")
    assert cli("get", "nodes", "--network", "red")[2] == ""
    assert cli("get", "nodes")[2] == "zmesh: warning: 1 node registration(s) in etcd cannot be read: n4\n"


def test_a_reason_for_what_is_not_ready_and_the_workloads_of_a_network(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload("a"), workload("b", ip="10.1.1.2")))
    workload_status(cli, "a", "n1", "10.1.1.2")
    workload_status(cli, "b", "n1", None, ready="False", reason="AddressUnavailable")
    rows = [line.split() for line in cli.ok("get", "workloads").splitlines()]
    assert rows == [["NAME", "NETWORK", "NODE", "IP", "READY", "REASON"],
                    ["a", "blue", "n1", "10.1.1.2", "True", "-"],
                    ["b", "blue", "n1", "10.1.1.2", "False", "AddressUnavailable"]]
    described = cli.ok("describe", "network", "blue").splitlines()
    assert described[-4:] == ["  NAME   NODE   IP         READY   REASON",
                              "  a      n1     10.1.1.2   True    -",
                              "  b      n1     10.1.1.2   False   AddressUnavailable",
                              "Events:       <none>"]  # no agent ran to record any


# --- invalid hand-written specs ---------------------------------------------------------------


def test_an_existing_invalid_network_is_described_with_its_problems_not_not_found(cli, tmp_path):
    bad = network()
    bad["spec"]["ipRange"] = "100.64.0.0/16"
    cli.put("/zmesh/v1/networks/blue", json.dumps(bad))
    cli.put("/zmesh/v1/nodes/n1/status/networks/blue", json.dumps({
        "apiVersion": "zmesh.io/v1", "kind": "NetworkResourceStatus", "network": "blue", "node": "n1",
        "conditions": [{"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": "bad range",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))
    code, out, err = cli("describe", "network", "blue")
    assert (code, err) == (0, "")
    assert out.splitlines()[:3] == ["Name:         blue", "Kind:         Network", "Key:          /zmesh/v1/networks/blue"]
    assert "  spec.ipRange: ipRange 100.64.0.0/16 overlaps 100.64.0.0/10, reserved for the node's ndmz" in out
    assert "Reported by n1:" in out and "InvalidSpec" in out
    assert cli.json("describe", "network", "blue")["status"]["valid"] is False


def test_status_counts_invalid_objects(cli, tmp_path):
    cli.ok("apply", "-f", manifest_file(tmp_path, network(), workload()))
    cli.put("/zmesh/v1/networks/broken", "{not json")
    cli.put("/zmesh/v1/workloads/typo", json.dumps(workload("typo") | {"spec": {"netwrk": "blue"}}))
    code, out, err = cli("status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "Networks: 0/2 ready, 1 invalid" in lines and "Workloads: 0/2 ready, 1 invalid" in lines
    assert any(line.split() == ["broken", "no", "-", "InvalidSpec"] for line in lines)
    data = cli.json("status")
    assert (data["networks"]["invalid"], data["workloads"]["invalid"]) == (1, 1)


# --- one error contract ----------------------------------------------------------------------


@pytest.mark.parametrize("argv, first", [
    (["get", "pods"], "zmesh: argument KIND: unknown kind 'pods'"),
    (["delete", "foo", "x"], "zmesh: argument KIND: unknown kind 'foo'"),
    (["delete", "node", "n1"], "zmesh: argument KIND: unknown kind 'node': use networks | workloads"),
    (["agent", "--node-id", "n1", "--listen-port-range", "9-1"], "zmesh: --listen-port-range: bad port range"),
    (["--etcd", "host:port", "status"], "zmesh: --etcd: bad etcd endpoint"),
    (["get", "networks", "--timeout", "0"], "zmesh: argument --timeout: '0' is not a number of seconds above 0"),
])
def test_usage_errors_of_the_installed_command_are_one_line_and_exit_2(argv, first):
    r = subprocess.run([ZMESH, *argv], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(first), r.stderr


def test_delete_f_naming_one_object_in_two_files_deletes_it_once(cli, tmp_path):
    a = manifest_file(tmp_path, network(), workload(), name="a.yaml")
    b = manifest_file(tmp_path, workload(), name="b.yaml")
    cli.ok("apply", "-f", a)
    assert cli("delete", "-f", a, "-f", b) == (0, "workload/web deleted\nnetwork/blue deleted\n", "")
    assert cli("delete", "-f", a, "--ignore-not-found") == (0, "", "")
    assert cli("delete", "-f", a) == (1, "", "zmesh: workload/web not found\nzmesh: network/blue not found\n")


def test_global_options_after_the_command(cli):
    r = subprocess.run([ZMESH, "status", "--etcd", cli.etcd.endpoint, "--timeout", "3", "-o", "json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["nodes"]["alive"] == 3


def reading_stdin(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields[:2] == ["0", "0x0"]  # syscall 0 (read) on fd 0


def test_an_interrupted_command_exits_130(cli):
    proc = subprocess.Popen([ZMESH, "--etcd", cli.etcd.endpoint, "apply", "-f", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not reading_stdin(proc.pid):  # a positive signal: it blocks in read(0, ...)
            assert time.monotonic() < deadline and proc.poll() is None, "never started reading stdin"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (130, "", "zmesh: interrupted\n")


def test_an_apply_too_large_for_one_transaction_never_says_nothing_applied_after_a_write(tmp_path, capsys):
    with EmbeddedEtcd(extra_args=("--max-txn-ops=8",)) as etcd:
        c = Cli(etcd, capsys)
        c.register("n1", "n2", "n3", *(f"w{i}" for i in range(10)))
        wide = network("wide", nodes=tuple(f"w{i}" for i in range(10)))
        code, out, err = c("apply", "-f", manifest_file(tmp_path, network(), wide))
        assert (code, out) == (1, "network/blue created\n")
        assert err.startswith(f"zmesh: {tmp_path}/m.yaml#2 Network/wide: 12 operations are more than etcd "
                              "takes in one transaction (--max-txn-ops, default 128;")
        assert err.endswith("(stopped after writing 1 object(s); applying the same files again completes it)\n")
        assert "nothing applied" not in err
