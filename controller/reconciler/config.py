"""The node agent's configuration, filled from `zmesh agent` / `zmeshd` flags (controller/cli).

Everything that design.md section 4 asks to be a parameter, so that many agents can share one
machine: the namespace playing the node's host, a name prefix for what it creates, a state dir.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from controller.http.snapshot import (
    DEFAULT_OBSERVE_INTERVAL,
    DEFAULT_PEER_SERIES_LIMIT,
    DEFAULT_STALE_AFTER,
    min_stale_after,
)
from controller.models.resources import NodeId, PortRange, parse_public_address
from controller.planner.ndmz import UplinkConfig
from controller.store.access import EtcdAccess
from pydantic import TypeAdapter

DEFAULT_ETCD = "127.0.0.1:2379"
DEFAULT_PREFIX = "/zmesh/"
DEFAULT_STATE_DIR = Path("/var/lib/zmesh")
DEFAULT_METRICS_ADDR = "127.0.0.1:9477"
LOG_LEVELS = ("debug", "info", "warning", "error")

_node_id = TypeAdapter(NodeId)


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    etcd: list[str] = field(default_factory=lambda: [DEFAULT_ETCD])
    prefix: str = DEFAULT_PREFIX
    # Namespace that plays the node's host (uplink, public address); None: the process's own.
    host_netns: str | None = None
    # Prefix of every namespace/link/socket name the agent creates (names are machine-global).
    name_prefix: str = ""
    state_dir: Path = DEFAULT_STATE_DIR
    # Addresses other nodes reach this node at; none makes the node hidden (behind NAT).
    public_endpoints: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(default_factory=list)
    listen_port_range: PortRange = field(default_factory=PortRange)
    resync_interval: float = 30.0
    # Tunnels to candidate aggregators are probed this often (seconds); a tunnel that failed
    # counts as forwarding again only after working for the hold-down (damps moving back).
    probe_interval: float = 1.0
    probe_hold_down: float = 30.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9477
    log_level: str = "info"
    etcd_timeout: float = 5.0
    # etcdctl-style TLS files and credentials (the password stays in its file until used).
    etcd_cacert: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password_file: str | None = None
    # The index repairer inside the agent: "auto" = only without etcd credentials (with auth on
    # the node's user may not write the index; `zmesh indexer` runs it with admin credentials).
    indexer: str = "auto"
    # How many networks are reconciled at the same time (one hung helper delays only its own).
    reconcile_workers: int = 4

    # How the ndmz reaches the Internet: through the host namespace (default), or a NIC of its own.
    uplink: UplinkConfig = field(default_factory=UplinkConfig)

    @property
    def etcd_access(self) -> EtcdAccess:
        return EtcdAccess(self.etcd, cacert=self.etcd_cacert, cert=self.etcd_cert, key=self.etcd_key,
                          user=self.etcd_user, password_file=self.etcd_password_file)

    @property
    def runs_indexer(self) -> bool:
        return self.indexer == "on" or (self.indexer == "auto" and self.etcd_user is None)
    # Observability (docs/observability.md): how often WireGuard is read apart from reconciles,
    # when a peer that should be talking counts as stale, and the per-node cap on per-peer series.
    observe_interval: float = DEFAULT_OBSERVE_INTERVAL
    peer_stale_after: float = DEFAULT_STALE_AFTER
    metrics_peer_limit: int = DEFAULT_PEER_SERIES_LIMIT

    def __post_init__(self):
        if not self.peer_stale_after >= min_stale_after(self.observe_interval):
            raise ValueError(
                f"a peer stale-after of {self.peer_stale_after:g} s is too short for an observe interval "
                f"of {self.observe_interval:g} s: use at least {min_stale_after(self.observe_interval):g} s "
                "(a healthy peer answers within 10 s, and is seen answering at the next observation)")

    @property
    def hidden(self) -> bool:
        return not self.public_endpoints

    @property
    def metrics_addr(self) -> str:
        host = f"[{self.metrics_host}]" if ":" in self.metrics_host else self.metrics_host
        return f"{host}:{self.metrics_port}"


# --- parsers shared by the CLI: each raises ValueError with a one-line message -----------------


def split_endpoints(values: list[str] | None, env: str | None = None) -> list[str]:
    """`--etcd a,b --etcd c` → [a, b, c]; falls back to $ZMESH_ETCD, then 127.0.0.1:2379."""
    raw = values or [env if env is not None else os.environ.get("ZMESH_ETCD", "")]
    out = [e.strip() for v in raw for e in v.split(",") if e.strip()]
    for e in out:
        # Same forms as the store accepts: [http://]HOST[:PORT] and [V6]:PORT.
        parts = urlsplit(e if "://" in e else f"http://{e}")
        try:
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.path:
            raise ValueError(f"bad etcd endpoint {e!r}: expected HOST:PORT")
    return out or [DEFAULT_ETCD]


def parse_node_id(text: str) -> str:
    try:
        return _node_id.validate_python(text)
    except Exception:
        raise ValueError(
            f"bad node id {text!r}: use up to 40 lower-case letters, digits and '-'") from None


def parse_endpoint(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A public endpoint as peers will read it from our facts (the same strict rule)."""
    try:
        return parse_public_address(text.strip().strip("[]"))
    except ValueError as e:
        raise ValueError(f"bad public endpoint {text!r}: {e}") from None


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    # Port 0 asks the kernel for a free one (tests run many agents on one machine).
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def parse_count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad number {text!r}: expected a whole number, 0 or more")
    return int(text)
def parse_interface_address(text: str) -> ipaddress.IPv4Interface:
    try:
        value = ipaddress.IPv4Interface(text)
    except ValueError:
        raise ValueError(f"bad address {text!r}: expected an IPv4 address with its prefix, "
                         "e.g. 198.51.100.111/24") from None
    if "/" not in text:
        raise ValueError(f"bad address {text!r}: give its prefix length too, e.g. {text}/24")
    return value


def parse_ipv4(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"bad address {text!r}: expected an IPv4 address") from None


def parse_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad interval {text!r}: expected seconds") from None
    if not value > 0:
        raise ValueError(f"bad interval {text!r}: must be more than 0 seconds")
    return value
