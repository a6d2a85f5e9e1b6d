"""docs/cli.md cannot drift: every `$ command` of its examples runs, in order, as a reader would
paste it, and its output must have the documented shape and its exit status the documented one.

How the examples are read:
- a fenced block with lines starting `$ ` is a session; the lines below a command, up to the next
  `$ `, are its expected output (stdout and stderr as a terminal shows them, in order);
- `...` on a line of its own stands for any number of lines, `...` inside a line for any text;
- `$ echo $?` shows the exit status of the command before; a command not followed by one must
  succeed (exit 0);
- a heredoc (`$ cat > f.yaml <<'EOF'` ... `EOF`) writes a file for the commands after it;
- blocks without `$ ` lines (synopses, tables) are not run.

The world the page describes: `$ZMESH_ETCD` names an etcd (here a private one) where the agents
of n1, n2 (public) and n3 (hidden, behind NAT) have registered and report nothing yet. Sessions
that talk to `https://10.0.0.1:2379` run against a second, TLS-only etcd (with `ca.crt` trusted,
`wrong-ca.crt` from another CA and `root.pw` holding root's password in the working directory);
the address is the only thing substituted. The commands run in a copy of the repository's
examples/ with the installed `zmesh` first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller.sim.etcd import EmbeddedEtcd, ServerTLS

pytestmark = pytest.mark.etcd

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cli.md"
TLS_ADDRESS = "10.0.0.1:2379"


@dataclass
class Command:
    line: int  # in the page, for messages
    text: str  # what bash runs (with a heredoc's lines)
    expected: list[str] = field(default_factory=list)


def sessions(markdown: str) -> list[list[Command]]:
    out, block, in_block, current = [], [], False, None
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            if in_block and any(block):
                out.append(block)
            in_block, block, current = not in_block, [], None
        elif in_block and line.startswith("$ "):
            current = Command(i + 1, line[2:])
            if re.search(r"<<'?EOF'?", line):  # the heredoc's lines belong to the command
                while not lines[i].startswith("EOF"):
                    i += 1
                    current.text += "\n" + lines[i]
            block.append(current)
        elif in_block and current is not None:
            current.expected.append(line)
        i += 1
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """`...` alone: any lines; `...` in a line: any text."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head.strip() == "...":
        return any(matches(rest, actual[k:]) for k in range(len(actual) + 1))
    if not actual:
        return False
    pattern = ".*".join(re.escape(part) for part in head.rstrip().split("..."))
    return re.fullmatch(pattern, actual[0].rstrip()) is not None and matches(rest, actual[1:])


class Shell:
    def __init__(self, cwd: Path, env: dict[str, str], substitute: dict[str, str]):
        self.cwd, self.env, self.substitute = cwd, env, substitute
        self.last = 0

    def run(self, cmd: Command) -> tuple[int, list[str]]:
        if cmd.text == "echo $?":
            return 0, [str(self.last)]
        text = cmd.text
        for a, b in self.substitute.items():
            text = text.replace(a, b)
        r = subprocess.run(["bash", "-c", text], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
        self.last = r.returncode
        out = r.stdout
        for a, b in self.substitute.items():
            out = out.replace(b, a)
        return r.returncode, out.splitlines()


def register(etcd, *nodes: str, hidden=()) -> None:
    env = {**os.environ, "ETCDCTL_API": "3"}
    for n in nodes:
        spec = {} if n in hidden else {"endpoints": [f"198.51.100.{10 + int(n[1:])}"]}
        node = {"apiVersion": "zmesh.io/v1", "kind": "Node", "metadata": {"name": n},
                "spec": spec | {"version": "0.1.0"}}
        for key, value in ((f"/zmesh/v1/nodes/{n}/registration", json.dumps(node)),
                           (f"/zmesh/v1/nodes/{n}/mesh/alive", '{"since":"2026-01-01T00:00:00+00:00"}')):
            subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "put", key, "--", value], env=env,
                           check=True, capture_output=True, timeout=30)


def test_every_example_of_docs_cli_md_runs_as_documented(tmp_path, pki, other_pki):
    all_sessions = sessions(DOC.read_text())
    assert len(all_sessions) >= 8, "the page lost its examples"
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copy(pki.ca, tmp_path / "ca.crt")
    shutil.copy(other_pki.ca, tmp_path / "wrong-ca.crt")
    (tmp_path / "root.pw").write_text("a root password for the docs\n")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZMESH_")} | {
        "PATH": path, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with EmbeddedEtcd() as etcd, EmbeddedEtcd(tls=ServerTLS(pki.server.cert, pki.server.key)) as tls:
        register(etcd, "n1", "n2", "n3", hidden=("n3",))
        plain = Shell(tmp_path, base | {"ZMESH_ETCD": etcd.endpoint, "ETCDCTL_ENDPOINTS": etcd.endpoint,
                                        "ETCDCTL_API": "3"}, {})
        secure = Shell(tmp_path, base, {f"https://{TLS_ADDRESS}": tls.endpoint})
        failures = []
        for session in all_sessions:
            shell = secure if any(TLS_ADDRESS in c.text for c in session) else plain
            for i, cmd in enumerate(session):
                code, out = shell.run(cmd)
                shown_status = i + 1 < len(session) and session[i + 1].text == "echo $?"
                if not matches(cmd.expected, out) or (code != 0 and not shown_status):
                    failures.append(f"docs/cli.md:{cmd.line}: $ {cmd.text.splitlines()[0]}\n  exit {code}; "
                                    "got:\n    " + "\n    ".join(out) + "\n  documented:\n    "
                                    + "\n    ".join(cmd.expected))
        assert not failures, "\n".join(failures)


def test_the_pattern_rules():
    assert matches(["a", "...", "z"], ["a", "b", "c", "z"]) and matches(["a", "...", "z"], ["a", "z"])
    assert matches(["x ... y"], ["x 1 2 y"]) and not matches(["x ... y"], ["x 1 2"])
    assert not matches(["a"], ["a", "b"]) and matches([], [])
