"""The zmesh CLI without etcd: argument parsing, agent flags, manifest reading, cross-object
validation and output formatting."""

from __future__ import annotations

import io
import ipaddress
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.cli import output
from controller.cli.main import (
    CliError,
    UsageError,
    agent_config,
    agent_main,
    build_parser,
    connection,
    main,
    package_version,
)
from controller.cli.manifests import read_manifests
from controller.models.manifest import parse_object
from controller.models.resources import (
    AggregatorStatus, Condition, NetworkResourceFacts, NetworkResourceVerdicts, Node, PortRange, ResourceStatus,
    TunnelVerdict,
)
from controller.reconciler.config import AgentConfig, split_endpoints

from test_models import network_doc, workload_doc


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in ("ZMESH_ETCD", "ZMESH_PREFIX", "ZMESH_ETCD_CACERT", "ZMESH_ETCD_CERT", "ZMESH_ETCD_KEY",
                "ZMESH_ETCD_USER", "ZMESH_ETCD_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)


def parse(*argv):
    return build_parser().parse_args(list(argv))


# --- global options ------------------------------------------------------------------------


def test_connection_defaults():
    assert connection(parse("get", "networks")) == (["127.0.0.1:2379"], "/zmesh/", 5.0)


def test_connection_from_environment(monkeypatch):
    monkeypatch.setenv("ZMESH_ETCD", "10.0.0.1:2379,10.0.0.2:2379")
    monkeypatch.setenv("ZMESH_PREFIX", "/other/")
    assert connection(parse("status"))[:2] == (["10.0.0.1:2379", "10.0.0.2:2379"], "/other/")


def test_etcd_is_comma_separated_or_repeated_before_or_after_the_command():
    args = parse("--etcd", "a:1,b:2", "--etcd", "c:3", "get", "nodes")
    assert connection(args)[0] == ["a:1", "b:2", "c:3"]
    args = parse("get", "nodes", "--etcd", "x:9", "--prefix", "/p/", "--timeout", "1.5")
    assert connection(args) == (["x:9"], "/p/", 1.5)


def test_flags_beat_the_environment(monkeypatch):
    monkeypatch.setenv("ZMESH_ETCD", "env:1")
    assert connection(parse("--etcd", "flag:2", "status"))[0] == ["flag:2"]


@pytest.mark.parametrize("bad", ["host:port", ":2379", "h:70000", "ftp://h:1", "h:1/x"])
def test_a_bad_etcd_endpoint_is_one_clear_usage_error(bad, capsys):
    assert main(["--etcd", bad, "get", "networks"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zmesh: --etcd: bad etcd endpoint")


def test_a_prefix_must_be_absolute(capsys):
    assert main(["--prefix", "zmesh", "status"]) == 2
    assert capsys.readouterr().err == "zmesh: --prefix: 'zmesh' must start with '/'\n"


@pytest.mark.parametrize("argv", [
    ["--help"], ["apply", "--help"], ["get", "--help"], ["describe", "--help"], ["delete", "--help"],
    ["status", "--help"], ["agent", "--help"], ["demo", "--help"], ["version", "--help"], ["purge", "--help"],
])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: zmesh" in capsys.readouterr().out


def test_zmeshd_help(capsys):
    with pytest.raises(SystemExit) as e:
        agent_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--node-id", "--etcd", "--host-netns", "--name-prefix", "--state-dir", "--public-endpoint",
                 "--listen-port-range", "--resync-interval", "--metrics-addr", "--log-level"]:
        assert flag in out


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "controller.cli.main", "agent", "--help"],  # how the simulator starts agents
    [str(Path(sys.executable).with_name("zmeshd")), "--help"],
    [str(Path(sys.executable).with_name("zmesh")), "--help"],
])
def test_the_entry_points_run(argv):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout and r.stderr == ""


@pytest.mark.parametrize("argv, line", [
    (["get", "pods"], "zmesh: argument KIND: unknown kind 'pods': use networks | workloads | nodes "
                      "(see 'zmesh get --help')"),
    (["get", "netwroks"], "zmesh: argument KIND: unknown kind 'netwroks' (did you mean networks?): "
                          "use networks | workloads | nodes (see 'zmesh get --help')"),
    (["apply"], "zmesh: the following arguments are required: -f/--filename (see 'zmesh apply --help')"),
    (["frobnicate"], "zmesh: argument COMMAND: invalid choice: 'frobnicate'"),
    (["describe", "pod", "p1"], "zmesh: argument KIND: unknown kind 'pod': use networks | workloads | nodes"),
    (["delete", "node", "n1"], "zmesh: argument KIND: unknown kind 'node': use networks | workloads"),
    (["get", "networks", "--bogus"], "zmesh: unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_prefixed_line_and_exit_2(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


@pytest.mark.parametrize("argv, line", [
    (["delete", "network"], "zmesh: delete: give KIND NAME..."),
    (["delete", "network", "blue", "-f", "x.yaml"], "zmesh: delete: give either KIND NAME... or -f FILE"),
    (["get", "networks", "--network", "blue"], "zmesh: get networks: --network does not apply"),
    (["get", "nodes", "--node", "n1"], "zmesh: get nodes: --node does not apply"),
    (["demo", "--world-prefix", "Bad!"], "zmesh: --world-prefix: 'Bad!' must be 1-3 lower-case letters"),
    (["purge", "--state-dir", "/nonexistent", "--name-prefix", "BAD"], "zmesh: --name-prefix: name prefix 'BAD'"),
])
def test_usage_errors_found_after_parsing_exit_2_too(argv, line, capsys):
    assert main(["--etcd", "127.0.0.1:1", "--timeout", "0.5", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


def test_zmeshd_usage_errors_are_prefixed_zmeshd(capsys):
    with pytest.raises(SystemExit) as e:
        agent_main([])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("zmeshd: the following arguments are required: --node-id "
                                       "(see 'zmeshd --help')\n")


def test_version_and_dash_dash_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"zmesh {package_version()}\n"
    assert package_version()[0].isdigit()
    assert main(["version", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"zmesh": package_version()}
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"zmesh {package_version()}\n"


def test_get_accepts_singular_plural_and_short_kinds():
    for kind, canonical in [("network", "Network"), ("networks", "Network"), ("net", "Network"),
                            ("workload", "Workload"), ("workloads", "Workload"), ("wl", "Workload"),
                            ("node", "Node"), ("nodes", "Node"), ("Networks", "Network")]:
        assert parse("get", kind).kind == canonical
    assert parse("get", "networks", "blue", "-o", "json").output == "json"
    assert parse("get", "workloads", "-o", "wide", "--network", "blue", "--node", "n1").node == "n1"


def test_global_options_are_accepted_after_every_command_that_talks_to_etcd():
    for argv in (["apply", "-f", "x"], ["get", "nodes"], ["describe", "network", "x"], ["delete", "network", "x"],
                 ["status"], ["agent", "--node-id", "n1"]):
        args = parse(*argv, "--etcd", "e:1", "--prefix", "/p/", "--timeout", "3")
        assert connection(args) == (["e:1"], "/p/", 3.0), argv
        before = parse("--etcd", "e:2", "--timeout", "4", *argv)
        assert connection(before) == (["e:2"], "/zmesh/", 4.0), argv
    assert agent_config(parse("agent", "--node-id", "n1", "--timeout", "3")).etcd_timeout == 3.0


# --- agent flags ---------------------------------------------------------------------------


def agent_args(*argv):
    return parse("agent", *argv)


def test_agent_flags_fill_the_config():
    cfg = agent_config(agent_args(
        "--node-id", "n1", "--etcd", "a:1,b:2", "--etcd", "c:3", "--prefix", "/t/",
        "--host-netns", "w1-n1", "--name-prefix", "w1n1-", "--state-dir", "/tmp/s",
        "--public-endpoint", "198.51.100.11", "--public-endpoint", "2001:db8:100::11",
        "--listen-port-range", "52000-52010", "--resync-interval", "2.5",
        "--metrics-addr", "127.0.0.1:9100", "--log-level", "DEBUG",
    ))
    assert cfg == AgentConfig(
        node_id="n1", etcd=["a:1", "b:2", "c:3"], prefix="/t/", host_netns="w1-n1",
        name_prefix="w1n1-", state_dir=Path("/tmp/s"),
        public_endpoints=[ipaddress.ip_address("198.51.100.11"), ipaddress.ip_address("2001:db8:100::11")],
        listen_port_range=PortRange(min=52000, max=52010), resync_interval=2.5,
        metrics_host="127.0.0.1", metrics_port=9100, log_level="debug",
    )
    assert not cfg.hidden and cfg.metrics_addr == "127.0.0.1:9100"


def test_agent_defaults_make_a_hidden_node():
    cfg = agent_config(agent_args("--node-id", "n2"))
    assert cfg.hidden and cfg.etcd == ["127.0.0.1:2379"] and cfg.prefix == "/zmesh/"
    assert cfg.host_netns is None and cfg.name_prefix == ""
    assert cfg.listen_port_range == PortRange() and cfg.resync_interval == 30.0


def test_agent_reads_the_environment(monkeypatch):
    monkeypatch.setenv("ZMESH_ETCD", "e:1")
    monkeypatch.setenv("ZMESH_PREFIX", "/env/")
    cfg = agent_config(agent_args("--node-id", "n2"))
    assert (cfg.etcd, cfg.prefix) == (["e:1"], "/env/")


def test_agent_takes_etcd_tls_and_credentials_from_flags_or_environment(monkeypatch):
    cfg = agent_config(agent_args("--node-id", "n1", "--etcd", "https://e:1", "--etcd-cacert", "/p/ca.crt",
                                  "--etcd-cert", "/p/n1.crt", "--etcd-key", "/p/n1.key",
                                  "--etcd-user", "zmesh-node-n1", "--etcd-password-file", "/p/pw"))
    assert (cfg.etcd_cacert, cfg.etcd_cert, cfg.etcd_key) == ("/p/ca.crt", "/p/n1.crt", "/p/n1.key")
    assert (cfg.etcd_user, cfg.etcd_password_file) == ("zmesh-node-n1", "/p/pw")
    assert cfg.etcd_access.authenticated
    monkeypatch.setenv("ZMESH_ETCD_CACERT", "/env/ca.crt")
    monkeypatch.setenv("ZMESH_ETCD_USER", "u")
    monkeypatch.setenv("ZMESH_ETCD_PASSWORD_FILE", "/env/pw")
    cfg = agent_config(agent_args("--node-id", "n1"))
    assert (cfg.etcd_cacert, cfg.etcd_user, cfg.etcd_password_file) == ("/env/ca.crt", "u", "/env/pw")
    assert not agent_config(agent_args("--node-id", "n1", "--etcd-user", "x", "--etcd-password-file", "y")
                            ).etcd_access.cert


def test_etcd_credentials_go_together_and_no_flag_is_abbreviated():
    with pytest.raises(CliError, match="go together"):
        agent_config(agent_args("--node-id", "n1", "--etcd-user", "u"))
    with pytest.raises(SystemExit):
        parse("get", "nodes", "--etcd-password", "secret")  # not --etcd-password-file


@pytest.mark.parametrize("argv", [
    ("--etcd-password", "hunter2-secret", "get", "networks"),   # argparse: an invalid COMMAND
    ("get", "networks", "--etcd-password", "hunter2-secret"),   # argparse: unrecognized arguments
    ("get", "networks", "--etcd-password=hunter2-secret"),
    ("agent", "--node-id", "n1", "--password", "hunter2-secret"),
])
def test_a_password_typed_on_the_command_line_is_never_echoed(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("zmesh: ") and len(err.splitlines()) == 1
    assert "hunter2" not in err and "--etcd-password-file" in err
    with pytest.raises(SystemExit):
        agent_main(["--etcd-password", "hunter2-secret"])
    assert "hunter2" not in capsys.readouterr().err


def test_ipv6_metrics_address():
    cfg = agent_config(agent_args("--node-id", "n1", "--metrics-addr", "[::1]:9100"))
    assert (cfg.metrics_host, cfg.metrics_port, cfg.metrics_addr) == ("::1", 9100, "[::1]:9100")


def test_metrics_port_zero_lets_the_kernel_choose():
    assert agent_config(agent_args("--node-id", "n1", "--metrics-addr", "127.0.0.1:0")).metrics_port == 0


@pytest.mark.parametrize("flag, value, message", [
    ("--node-id", "Node_1", "--node-id: bad node id"),
    ("--public-endpoint", "example.org", "--public-endpoint: bad public endpoint"),
    ("--listen-port-range", "9-1", "--listen-port-range: bad port range"),
    ("--resync-interval", "0", "--resync-interval: bad interval"),
    ("--resync-interval", "soon", "--resync-interval: bad interval"),
    ("--metrics-addr", "9100", "--metrics-addr: bad address"),
    ("--etcd", "h:port", "--etcd: bad etcd endpoint"),
])
def test_bad_agent_flags_are_one_clear_usage_error(flag, value, message, capsys):
    argv = ["--node-id", "n1", flag, value] if flag != "--node-id" else [flag, value]
    with pytest.raises(UsageError, match=message):
        agent_config(agent_args(*argv))
    assert agent_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zmeshd: {message}") and err.count("\n") == 1


def test_split_endpoints_ignores_blanks():
    assert split_endpoints([" a:1 , ", "b:2"]) == ["a:1", "b:2"]
    assert split_endpoints(None, env="") == ["127.0.0.1:2379"]


# --- reading manifests ----------------------------------------------------------------------


def write(tmp_path, name, docs) -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump_all(docs) if name.endswith(".yaml") else json.dumps(docs))
    return str(p)


def test_read_manifests_from_files_and_stdin(tmp_path, monkeypatch):
    f = write(tmp_path, "a.yaml", [network_doc(), workload_doc()])
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(network_doc(name="red"))))
    read = read_manifests([f, "-"])
    assert read.problems == []
    assert [(it.obj.kind, it.obj.name, it.where) for it in read.items] == [
        ("Network", "blue", f"{f}#1"), ("Workload", "web", f"{f}#2"), ("Network", "red", "<stdin>")]


def test_read_manifests_reports_every_problem_with_its_place(tmp_path):
    good = write(tmp_path, "good.yaml", [network_doc()])
    bad = write(tmp_path, "bad.yaml", [network_doc(name="Bad"), workload_doc(ip="1.2.3")])
    (tmp_path / "broken.json").write_text('{"kind": ')
    (tmp_path / "empty.yaml").write_text("")
    node = write(tmp_path, "node.json", {"apiVersion": "zmesh.io/v1", "kind": "Node",
                                         "metadata": {"name": "n1"}, "spec": {}})
    read = read_manifests([good, bad, str(tmp_path / "broken.json"), str(tmp_path / "empty.yaml"),
                           str(tmp_path / "missing.yaml"), node])
    assert [it.obj.name for it in read.items] == ["blue"]
    text = "\n".join(read.problems)
    assert f"{bad}#1 Network/Bad: metadata.name: 'Bad' is not a valid name" in text
    assert f"{bad}#2 Workload/web: spec.ip: '1.2.3' is not an IPv4 address" in text
    assert f"{tmp_path}/broken.json:1:10: not valid YAML or JSON: " in text
    assert f"{tmp_path}/empty.yaml: no documents" in text
    assert f"{tmp_path}/missing.yaml: cannot read: No such file or directory" in text
    assert f"{node}: kind: 'Node' is not one of Network, Workload" in text
    assert all("\n" not in p for p in read.problems)
    assert read.broken == {("Network", "Bad"), ("Workload", "web")}


# --- output -------------------------------------------------------------------------------


def test_table_aligns_columns():
    assert output.table(["A", "LONGER"], [["xx", 1], ["y", None]]) == "A    LONGER\nxx   1\ny"


def ready(node, gen=1, status="True", reason="Converged"):
    return ResourceStatus(network="blue", node=node, observedGeneration=gen,
                          conditions=[Condition(type="Ready", status=status, reason=reason)])


def test_network_readiness_counts_nodes_ready_for_the_current_generation():
    net = parse_object(network_doc())
    net.metadata.generation = 5
    view = output.NetworkView(net, {"n1": ready("n1", 5), "n2": ready("n2", 4),
                                    "n3": ready("n3", 5, "False", "ApplyFailed")})
    assert view.ready_count == 1 and not view.ready
    row = re.split(r"\s{2,}", output.networks_table([view]).splitlines()[1])
    assert row == ["blue", "10.1.0.0/16", "n1,n2,n3", "1/3", "auto", "5", "Updating (n2); ApplyFailed (n3)"]
    wide = output.networks_table([view], wide=True).splitlines()
    assert wide[0].split()[-3:] == ["EGRESS", "SUBNETS", "REASON"]
    assert re.split(r"\s{2,}", wide[1])[-2] == "n1=10.1.1.0/24,n2=10.1.2.0/24,n3=10.1.3.0/24"


def test_nodes_table_shows_endpoints_hidden_and_alive():
    pub = Node.model_validate({"metadata": {"name": "n1"}, "spec": {"endpoints": ["198.51.100.11"]}})
    hid = Node.model_validate({"metadata": {"name": "n2"}, "spec": {}})
    text = output.nodes_table([output.NodeView(pub, True), output.NodeView(hid, False)])
    assert text.splitlines()[0].split() == ["NAME", "ENDPOINTS", "HIDDEN", "ALIVE", "PORTS", "VERSION"]
    assert text.splitlines()[1].split()[:4] == ["n1", "198.51.100.11", "no", "yes"]
    assert text.splitlines()[2].split()[:4] == ["n2", "-", "yes", "no"]


def test_describe_network_shows_every_nr_and_its_conditions():
    net = parse_object(network_doc(aggregators=["n1"]))
    hid = Node.model_validate({"metadata": {"name": "n2"}, "spec": {}})
    text = output.describe_network(output.NetworkView(net, {"n1": ready("n1")}), {"n2": output.NodeView(hid, True)})
    assert "IP range:     10.1.0.0/16" in text
    assert "n1  subnet 10.1.1.0/24  gateway 10.1.1.1  (unregistered node)" in text
    assert "n2  subnet 10.1.2.0/24  gateway 10.1.2.1  (hidden, alive)" in text
    assert "    Ready   True     Converged" in text
    assert "status: none reported yet" in text
    assert text.splitlines()[-3:] == ["Workloads:", "  (none)", "Events:       <none>"]


def test_describe_network_shows_hidden_nodes_and_the_aggregator_in_effect_and_why():
    net = parse_object(network_doc(aggregators=["n1", "n3"]))
    key = {n: base64.b64encode(n.encode().ljust(32, b".")).decode() for n in ("n1", "n2", "n3")}
    facts = {n: NetworkResourceFacts(network="blue", node=n, publicKey=key[n], listenPort=51820,
                                     endpoints=[] if n == "n2" else [f"198.51.100.{i}"],
                                     subnet=f"10.1.{i}.0/24")
             for i, n in ((1, "n1"), (2, "n2"), (3, "n3"))}
    verdicts = {p: NetworkResourceVerdicts(network="blue", node=p, verdicts=[
        TunnelVerdict(node="n1", state="Failing", since="2026-01-01T00:00:00Z")]) for p in ("n2", "n3")}
    status = ready("n2").model_copy(update={"aggregator": AggregatorStatus(
        node="n1", reason="Preferred", lastSwitchTime="2026-01-01T00:00:00Z")})
    view = output.NetworkView(net, {"n2": status}, facts, verdicts=verdicts, alive={"n1", "n2", "n3"})
    text = output.describe_network(view, {})
    assert "Hidden nodes: n2" in text
    assert ("Aggregator:   n3 (FailedOver): n3, because n1 is not forwarding (tunnels from n2, n3 fail)"
            in text)
    assert "not yet followed by: n2 (uses n1)" in text
    assert "aggregator as this node derives it: n1 (Preferred)" in text
    assert "probe verdicts: n1 Failing since 2026-01-01T00:00:00+00:00" in text
    empty = output.describe_network(output.NetworkView(parse_object(network_doc()), {}, facts,
                                                       alive={"n1", "n3"}), {}, [])
    assert "Aggregators:  (empty: the 3 live public nodes ranked first" in empty
    assert "Aggregator:   n" in empty and "(Preferred)" in empty


def test_json_output_of_a_list_is_a_kind_list_of_reappliable_manifests():
    net = parse_object(network_doc())
    data = json.loads(output.dump(output.as_list([output.manifest(net)]), "json"))
    assert data["kind"] == "List"
    assert parse_object(data["items"][0]) == net


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_positive_seconds_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--timeout", value, "get", "networks"])
    assert e.value.code == 2
    assert f"argument --timeout: {value!r} is not a number of seconds above 0" in capsys.readouterr().err


def test_yaml_output_reads_apiversion_kind_metadata_spec_in_that_order():
    net = parse_object(network_doc())
    text = output.dump(output.manifest(net), "yaml")
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")] == [
        "apiVersion", "kind", "metadata", "spec"]


def test_the_agent_runs_the_indexer_only_without_an_etcd_user_unless_told():
    assert agent_config(agent_args("--node-id", "n1")).runs_indexer
    creds = ("--etcd-user", "zmesh-node-n1", "--etcd-password-file", "/p")
    assert not agent_config(agent_args("--node-id", "n1", *creds)).runs_indexer
    assert agent_config(agent_args("--node-id", "n1", *creds, "--indexer", "on")).runs_indexer
    assert not agent_config(agent_args("--node-id", "n1", "--indexer", "off")).runs_indexer


def test_auth_commands_take_passwords_from_files_only():
    args = parse("auth", "add-node", "n1", "--password-file", "/p", "--etcd-user", "root",
                 "--etcd-password-file", "/r")
    assert (args.auth_command, args.node, args.password_file, args.etcd_user) == ("add-node", "n1", "/p", "root")
    assert parse("auth", "add-user", "alice", "--password-file", "/p").role == "zmesh-admin"
    for argv in (["auth", "init"], ["auth", "add-node", "n1"], ["auth", "add-user", "a", "--password", "x"]):
        with pytest.raises(SystemExit):
            parse(*argv)
