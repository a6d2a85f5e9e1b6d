"""The store over TLS and with etcd authentication, against a real etcd serving https only
(certificates made by the test with openssl): server certificates are verified, a client
certificate is presented when the cluster requires one, the password is never echoed."""

from __future__ import annotations

import asyncio

import pytest

from controller.sim.etcd import EmbeddedEtcd, ServerTLS
from controller.store.access import ConfigError, EtcdAccess
from controller.store.client import AuthError, EtcdStore, StoreUnavailable, TLSFiles

pytestmark = pytest.mark.etcd


async def etcdctl(etcd, pki, *args: str, user: str | None = None) -> str:
    auth = [f"--user={user}"] if user else []
    proc = await asyncio.create_subprocess_exec(
        "etcdctl", f"--endpoints={etcd.client_url}", f"--cacert={pki.ca}", *auth, *args,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode()


async def unreachable_reason(store: EtcdStore) -> str:
    with pytest.raises(StoreUnavailable) as e:
        await store.get("/t/a")
    return str(e.value)


async def test_tls_with_the_right_ca_reads_writes_and_watches(tls_etcd, pki):
    assert tls_etcd.endpoints[0].startswith("https://")
    async with EtcdStore(tls_etcd.endpoints, tls=TLSFiles(cacert=pki.ca), timeout=3) as s:
        await s.put("/t/a", "1")
        events = s.watch("/t/", prefix=True, start_revision=1)
        assert (await s.get("/t/a")).value == b"1"
        assert (await asyncio.wait_for(anext(events), 5)).key == "/t/a"
        await events.aclose()


async def test_an_endpoint_without_scheme_is_https_once_tls_files_are_given(tls_etcd, pki):
    plain = f"127.0.0.1:{tls_etcd.client_port}"
    async with EtcdStore([plain], tls=TLSFiles(cacert=pki.ca), timeout=3) as s:
        assert str(s.endpoint).startswith("https://")
        await s.put("/t/a", "1")
    with pytest.raises(ConfigError, match="https"):
        EtcdStore([f"http://{plain}"], tls=TLSFiles(cacert=pki.ca))


async def test_the_server_certificate_is_verified(tls_etcd, pki, other_pki):
    # A wrong CA and no CA at all (the system's roots do not know the test CA) both fail.
    for tls in (TLSFiles(cacert=other_pki.ca), None):
        async with EtcdStore(tls_etcd.endpoints, tls=tls, timeout=2, retry_for=0.5) as s:
            assert "certificate is not trusted" in await unreachable_reason(s)


async def test_plaintext_to_a_tls_endpoint_says_so(tls_etcd):
    async with EtcdStore([f"127.0.0.1:{tls_etcd.client_port}"], timeout=2, retry_for=0.5) as s:
        assert "expect TLS" in await unreachable_reason(s)


def test_missing_or_bad_files_are_one_clear_error(tmp_path, pki):
    with pytest.raises(ConfigError, match="--etcd-cacert .*/nope: cannot read"):
        EtcdStore(["h:1"], tls=TLSFiles(cacert=str(tmp_path / "nope")))
    (tmp_path / "junk").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        EtcdStore(["h:1"], tls=TLSFiles(cacert=str(tmp_path / "junk")))
    with pytest.raises(ConfigError, match="both --etcd-cert and --etcd-key"):
        EtcdAccess(["h:1"], cert=pki.server.cert)
    with pytest.raises(ConfigError, match="go together"):
        EtcdAccess(["h:1"], user="root")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        EtcdAccess(["h:1"], user="root", password_file=str(tmp_path / "empty")).open_store()


async def test_client_certificates_when_the_cluster_requires_them(pki, tmp_path):
    client = pki.client("zmesh-test")
    with EmbeddedEtcd(tls=ServerTLS(pki.server.cert, pki.server.key, client_ca=pki.ca)) as etcd:
        async with EtcdStore(etcd.endpoints, tls=TLSFiles(pki.ca), timeout=2, retry_for=0.5) as s:
            assert "requires a client certificate" in await unreachable_reason(s)
        async with EtcdStore(etcd.endpoints, tls=TLSFiles(pki.ca, client.cert, client.key), timeout=3) as s:
            await s.put("/t/a", "1")
            assert (await s.get("/t/a")).value == b"1"


async def test_user_and_password_over_tls(tls_etcd, pki, tmp_path):
    secret = "pw-" + "x" * 20
    await etcdctl(tls_etcd, pki, "user", "add", f"root:{secret}")
    await etcdctl(tls_etcd, pki, "auth", "enable")
    (tmp_path / "pw").write_text(secret + "\n")  # the trailing newline is not part of it
    access = EtcdAccess(tls_etcd.endpoints, cacert=pki.ca, user="root", password_file=str(tmp_path / "pw"))
    async with access.open_store(timeout=3) as s:
        await s.put("/t/a", "1")
        assert (await s.get("/t/a")).value == b"1"
        assert secret not in repr(s.settings)
    async with EtcdStore(tls_etcd.endpoints, tls=TLSFiles(pki.ca), timeout=2) as s:
        with pytest.raises(AuthError, match="requires authentication"):
            await s.get("/t/a")
    async with EtcdStore(tls_etcd.endpoints, tls=TLSFiles(pki.ca), username="root",
                         password="not-" + secret, timeout=2) as s:
        with pytest.raises(AuthError, match="authentication failed for user 'root'") as e:
            await s.get("/t/a")
        assert secret not in str(e.value)


async def test_credentials_for_a_cluster_without_auth_are_not_an_error(tls_etcd, pki):
    async with EtcdStore(tls_etcd.endpoints, tls=TLSFiles(pki.ca), username="someone", password="pw", timeout=3) as s:
        await s.put("/t/a", "1")
