"""The CLI against a real etcd: a `Cli` that runs `zmesh` in-process and writes by hand with the
real etcdctl, and manifest builders. Imported by the CLI tests, the `cli` fixture too (nodes n1, n2 and hidden n3 registered)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.cli.main import main

ZMESH = str(Path(sys.executable).with_name("zmesh"))
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "network.yaml"


class Cli:
    """Runs `zmesh` in-process against one etcd; keeps stdout, stderr and the exit code."""

    def __init__(self, etcd, capsys, prefix="/zmesh/"):
        self.etcd, self.capsys, self.prefix = etcd, capsys, prefix

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--etcd", self.etcd.endpoint, "--prefix", self.prefix, "--timeout", "2", *argv])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        return out

    def json(self, *argv: str):
        return json.loads(self.ok(*argv, "-o", "json"))

    def etcdctl(self, *args: str, input: str | None = None) -> str:
        env = {**os.environ, "ETCDCTL_API": "3"}
        r = subprocess.run(["etcdctl", "--endpoints", self.etcd.endpoint, *args], input=input,
                           capture_output=True, text=True, env=env, check=True)
        return r.stdout

    def put(self, key: str, value: str) -> None:
        self.etcdctl("put", key, "--", value)  # "--": a value may start with "-"

    def keys(self) -> list[str]:
        return self.etcdctl("get", "--prefix", "--keys-only", self.prefix).split()

    def register(self, *names: str, alive=True, hidden=()) -> None:
        for n in names:
            spec = {} if n in hidden else {"endpoints": [f"198.51.100.{10 + len(n)}"]}
            self.put(f"{self.prefix}v1/nodes/{n}/registration", json.dumps(
                {"apiVersion": "zmesh.io/v1", "kind": "Node", "metadata": {"name": n}, "spec": spec}))
            if alive:
                self.put(f"{self.prefix}v1/nodes/{n}/mesh/alive", '{"since":"2026-01-01T00:00:00+00:00"}')


@pytest.fixture
def cli(etcd, capsys):
    if not shutil.which("etcdctl"):
        pytest.skip("etcdctl not installed")
    c = Cli(etcd, capsys)
    c.register("n1", "n2", "n3", hidden=("n3",))
    return c


def network(name="blue", nodes=("n1", "n2", "n3"), **spec) -> dict:
    return {"apiVersion": "zmesh.io/v1", "kind": "Network", "metadata": {"name": name},
            "spec": {"ipRange": "10.1.0.0/16",
                     "resources": [{"node": n, "subnet": f"10.1.{i}.0/24"} for i, n in enumerate(nodes, 1)],
                     **spec}}


def workload(name="web", node="n1", ip=None, network="blue") -> dict:
    spec = {"network": network, "node": node, "netns": f"ctr-{name}"}
    if ip:
        spec["ip"] = ip
    return {"apiVersion": "zmesh.io/v1", "kind": "Workload", "metadata": {"name": name}, "spec": spec}


def manifest_file(tmp_path, *docs, name="m.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump_all(list(docs)))
    return str(p)


def without_generation(obj: dict) -> dict:
    obj = json.loads(json.dumps(obj))
    obj["metadata"].pop("generation", None)
    return obj
