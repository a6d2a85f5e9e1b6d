"""How to reach etcd and who to be there, as etcdctl says it: endpoints, --cacert/--cert/--key,
--user and a password file. Plain data, no gRPC: the CLI parses it before anything connects.

The password is read from its file only when a store is opened, and kept nowhere else than in
the store's connection settings (never in argv, a repr, a log line or an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """The connection settings cannot work (a file that cannot be read, a plaintext endpoint
    with TLS files); the message is one line naming what to fix."""


def read_password_file(path: str, flag: str = "--etcd-password-file") -> str:
    """The password in `path`: its first line (a trailing newline is not part of it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    password = text.split("\n", 1)[0].rstrip("\r")
    if not password:
        raise ConfigError(f"{flag} {path}: the file is empty")
    return password


@dataclass(frozen=True)
class EtcdAccess:
    endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    cacert: str | None = None  # verifies the server; None: the system's trust roots
    cert: str | None = None  # this client's certificate (etcd --client-cert-auth) ...
    key: str | None = None  # ... and its key
    user: str | None = None
    password_file: str | None = None

    def __post_init__(self):
        if (self.user is None) != (self.password_file is None):
            raise ConfigError("--etcd-user and --etcd-password-file go together")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("a client certificate needs both --etcd-cert and --etcd-key")

    @property
    def authenticated(self) -> bool:
        """Whether this client will be someone in etcd: a user, or a client certificate (whose
        CN etcd takes as the user name when authentication is on)."""
        return self.user is not None or self.cert is not None

    def open_store(self, prefix: str = "/zmesh/", timeout: float = 5.0, **kw):
        """An EtcdStore with these settings (reads the password file now)."""
        from .client import EtcdStore  # lazy: gRPC only for commands that connect
        from .connection import TLSFiles

        password = read_password_file(self.password_file) if self.password_file else None
        tls = TLSFiles(self.cacert, self.cert, self.key)
        return EtcdStore(self.endpoints, prefix, username=self.user, password=password, timeout=timeout,
                         tls=tls if tls else None, **kw)
