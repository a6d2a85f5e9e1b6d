"""One gRPC connection to one etcd endpoint: plaintext or TLS, authenticated or not.

aetcd 1.0 gives us etcd's generated stubs (`aetcd.rpc`) but opens plaintext channels only, so
the channel is built here: `grpc.aio.secure_channel` with `grpc.ssl_channel_credentials` for
`https://` endpoints (the server certificate is always verified: against `--etcd-cacert`, else
the system's trust roots; a client certificate is presented when one is given), the insecure
channel for `http://`. With a user name, the connection authenticates once (etcd's
`Authenticate`) and sends the token with every call, as etcdctl does.

The password lives only in `Settings.password` (never in a repr, a log line or an error: etcd's
own answers do not echo it either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
from aetcd import rpc

from .access import ConfigError

# Above gRPC's 4 MiB default so that one large value (or page) does not fail; listing still
# paginates, this is only head-room.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
GRPC_OPTIONS = {
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    # Notice a dead peer on an idle watch stream. etcd refuses pings more often than every 5s.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    scheme: str = "http"

    @property
    def target(self) -> str:
        """What gRPC dials (and, with TLS, the name the server certificate must carry)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.target}"


def parse_endpoint(text: str, default_scheme: str = "http") -> Endpoint:
    """`host:port`, `http://host:port`, `https://host:port`, `[v6]:port` or `host` (port 2379);
    without a scheme, `default_scheme` (https when TLS files are configured)."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty etcd endpoint")
    parts = urlsplit(raw if "://" in raw else f"{default_scheme}://{raw}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {text!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {text!r} has no host")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"etcd endpoint {text!r} has a bad port") from None
    return Endpoint(parts.hostname, port, parts.scheme)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files, as etcdctl's --cacert/--cert/--key: `cacert` verifies the server (None: the
    system's trust roots); `cert`+`key` are this client's certificate, for etcd clusters that
    require one (`--client-cert-auth`)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def __bool__(self) -> bool:
        return any((self.cacert, self.cert, self.key))

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files now (a missing one is a ConfigError naming it)."""
        if bool(self.cert) != bool(self.key):
            raise ConfigError("a client certificate needs both --etcd-cert and --etcd-key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.cacert, "--etcd-cacert"),
            private_key=_read(self.key, "--etcd-key"),
            certificate_chain=_read(self.cert, "--etcd-cert"),
        )


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class Settings:
    """What every connection of one store shares."""

    timeout: float = 5.0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: grpc.ChannelCredentials | None = field(default=None, repr=False)
    client_cert: bool = False  # a client certificate is presented (for error messages)
    options: dict = field(default_factory=lambda: dict(GRPC_OPTIONS))


class Connection:
    """A channel to one endpoint with the stubs the store calls (`kvstub`, `leasestub`,
    `authstub`, `channel`) and the metadata (the auth token) to send with each call."""

    def __init__(self, endpoint: Endpoint, settings: Settings):
        self.endpoint = endpoint
        self.settings = settings
        self.channel: grpc.aio.Channel | None = None
        self.metadata: tuple = ()

    async def connect(self) -> None:
        s = self.settings
        options = list(s.options.items())
        if self.endpoint.scheme == "https":
            if s.tls is None:
                raise ConfigError(f"{self.endpoint}: https needs TLS settings")
            self.channel = grpc.aio.secure_channel(self.endpoint.target, s.tls, options)
        else:
            self.channel = grpc.aio.insecure_channel(self.endpoint.target, options)
        self.kvstub = rpc.KVStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.authstub = rpc.AuthStub(self.channel)
        self.metadata = ()
        if s.username is not None:
            try:
                resp = await self.authstub.Authenticate(
                    rpc.AuthenticateRequest(name=s.username, password=s.password or ""), timeout=s.timeout)
            except grpc.aio.AioRpcError as e:
                if "authentication is not enabled" in (e.details() or ""):
                    return  # as etcdctl: credentials for a cluster without auth are not an error
                raise
            self.metadata = (("token", resp.token),)

    async def close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()


def connect_to(endpoint: Endpoint, settings: Settings) -> Connection:
    """The default connection factory."""
    return Connection(endpoint, settings)


def connection_problem(details: str, endpoint: Endpoint, settings: Settings) -> str | None:
    """A short, actionable reason when a gRPC connection error is about TLS, else None."""
    d = details or ""
    if endpoint.scheme == "http":
        if "Socket closed" in d or "Connection reset" in d:
            return "the server closed the connection: does it expect TLS? (use https:// and --etcd-cacert)"
        return None
    if "CERTIFICATE_VERIFY_FAILED" in d or "certificate verify failed" in d:
        return "TLS: the server's certificate is not trusted (check --etcd-cacert)"
    if "WRONG_VERSION_NUMBER" in d or "wrong version number" in d:
        return "TLS handshake failed: the endpoint does not speak TLS (use http://)"
    if "is not in peer certificate" in d:
        return "TLS: the server's certificate does not name this endpoint's host"
    if "TSI_DATA_CORRUPTED" in d or "BAD_CERTIFICATE" in d or "CERTIFICATE_REQUIRED" in d:
        return ("TLS: the server refused this client's certificate" if settings.client_cert else
                "TLS: the server requires a client certificate (--etcd-cert, --etcd-key)")
    if "Ssl handshake failed" in d or "SSL_ERROR" in d or "handshake" in d.lower():
        return f"TLS handshake failed ({d.rsplit(':', 1)[-1].strip() or 'no details'})"
    return None
