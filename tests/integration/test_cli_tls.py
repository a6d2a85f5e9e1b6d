"""Every zmesh command against an etcd with TLS and authentication on, run as a real process:
with the right CA and credentials (flags or ZMESH_ETCD_* variables) it works; without them,
or with the wrong CA, it fails with exactly one line on stderr that says why, and the password
never appears anywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.etcd

ZMESH = [sys.executable, "-m", "controller.cli.main"]
COMMANDS = [["get", "networks"], ["get", "nodes"], ["status"], ["describe", "network", "blue"],
            ["delete", "network", "blue", "--ignore-not-found"], ["apply", "-f", "-"]]
NETWORK = """apiVersion: zmesh.io/v1
kind: Network
metadata: {name: blue}
spec: {ipRange: 10.1.0.0/16, resources: []}
"""


def run(*argv, env=None, input=NETWORK):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ZMESH_")}
    return subprocess.run([*ZMESH, *argv], input=input, capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


@pytest.fixture
def secured(secured_etcd):
    return secured_etcd.etcd, secured_etcd.pki, secured_etcd.root_password_file


@pytest.fixture
def secret(secured_etcd):
    return secured_etcd.root_password


def test_every_command_works_with_the_ca_and_credentials(secured):
    etcd, pki, pw = secured
    flags = ["--etcd", etcd.endpoint, "--etcd-cacert", pki.ca, "--etcd-user", "root", "--etcd-password-file", pw]
    assert "network/blue created" in run(*flags, "apply", "-f", "-").stdout
    for cmd in COMMANDS[:4]:
        res = run(*flags, *cmd)
        assert res.returncode == 0, (cmd, res.stderr)
    # The same from the environment, flags after the command this time.
    env = {"ZMESH_ETCD": etcd.endpoint, "ZMESH_ETCD_CACERT": pki.ca, "ZMESH_ETCD_USER": "root",
           "ZMESH_ETCD_PASSWORD_FILE": pw}
    res = run("get", "networks", "-o", "json", env=env)
    assert res.returncode == 0 and '"blue"' in res.stdout, res.stderr
    assert run("delete", "network", "blue", env=env).returncode == 0


@pytest.mark.parametrize("case, expect", [
    ("no-credentials", "requires authentication"),
    ("wrong-password", "authentication failed for user 'root'"),
    ("wrong-ca", "certificate is not trusted"),
    ("no-ca", "certificate is not trusted"),
    ("plaintext", "expect TLS"),
    ("missing-password-file", "cannot read"),
])
def test_without_the_right_ca_or_credentials_every_command_fails_in_one_line(secured, secret, tmp_path, other_pki, case,
                                                                           expect):
    etcd, pki, pw = secured
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-" + secret)
    creds = ["--etcd-user", "root", "--etcd-password-file", pw]
    flags = {
        "no-credentials": ["--etcd", etcd.endpoint, "--etcd-cacert", pki.ca],
        "wrong-password": ["--etcd", etcd.endpoint, "--etcd-cacert", pki.ca,
                           "--etcd-user", "root", "--etcd-password-file", str(wrong)],
        "wrong-ca": ["--etcd", etcd.endpoint, "--etcd-cacert", other_pki.ca, *creds],
        "no-ca": ["--etcd", etcd.endpoint, *creds],
        "plaintext": ["--etcd", f"127.0.0.1:{etcd.client_port}", *creds],
        "missing-password-file": ["--etcd", etcd.endpoint, "--etcd-cacert", pki.ca,
                                  "--etcd-user", "root", "--etcd-password-file", str(tmp_path / "nope")],
    }[case]
    # Every command for the cases of the "done when"; one for the others (same path).
    for cmd in COMMANDS if case in ("no-credentials", "wrong-ca") else COMMANDS[:1]:
        res = run(*flags, "--timeout", "2", *cmd)
        lines = res.stderr.splitlines()
        assert res.returncode == 1 and len(lines) == 1, (cmd, res.stderr)
        assert lines[0].startswith("zmesh: ") and expect in lines[0], (cmd, lines)
        assert secret not in res.stderr + res.stdout


def test_no_flag_takes_a_password_in_argv():
    secret = "root-" + "s3cret" * 4
    # Not even as an abbreviation of --etcd-password-file (its error would echo the "path").
    res = run("get", "networks", "--etcd-password", secret)
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr
