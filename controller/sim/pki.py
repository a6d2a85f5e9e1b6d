"""Throw-away certificates for tests and local trials, made with the `openssl` command line.

    pki = TestPKI(directory)          # a CA and a server certificate for 127.0.0.1/localhost
    pki.server.cert, pki.server.key   # give to etcd
    pki.client("zmesh-node-n1")       # a client certificate whose CN is that name
    TestPKI(other).ca                 # a CA that trusts none of the above (wrong-CA tests)

EC P-256 keys, one day of validity. Nothing here is fit for production: operators make their
certificates as docs/operations.md describes (the same openssl commands, with their own names).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class CertFiles:
    cert: str
    key: str


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()[-500:]}")


class TestPKI:
    __test__ = False  # not a pytest test class

    def __init__(self, directory: str | Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")):
        if not os.path.exists(OPENSSL):
            raise RuntimeError("openssl not found (Debian: apt-get install openssl)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ca = str(self.dir / "ca.crt")
        self._ca_key = str(self.dir / "ca.key")
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", self._ca_key, "-out", self.ca, "-days", "1", "-subj", "/CN=zmesh-test-ca",
                 cwd=self.dir)
        sans = ",".join(f"IP:{h}" if h[0].isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
        self.server = self._issue("server", "etcd-server", f"subjectAltName={sans}\n"
                                  "extendedKeyUsage=serverAuth,clientAuth\n")

    def client(self, common_name: str) -> CertFiles:
        """A client certificate; etcd with auth on takes its CN as the user name."""
        return self._issue(f"client-{common_name}", common_name, "extendedKeyUsage=clientAuth\n")

    def _issue(self, stem: str, common_name: str, extensions: str) -> CertFiles:
        key, csr, crt, ext = (str(self.dir / f"{stem}.{s}") for s in ("key", "csr", "crt", "ext"))
        Path(ext).write_text(extensions)
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={common_name}", cwd=self.dir)
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self._ca_key, "-CAcreateserial",
                 "-out", crt, "-days", "1", "-extfile", ext, cwd=self.dir)
        os.chmod(key, 0o600)
        return CertFiles(crt, key)
