"""The agent's local record of what it created, in its state dir (`state.json`, mode 0600).

It is the agent's proof of ownership: garbage collection only removes NRs recorded here, and an
NR is recorded *before* it is created, so a crash at any point leaves nothing the next start
would not find. It also keeps what must survive restarts: each NR's listen port and the
addresses allocated to workloads (so they never change under a running container), each NR's
public-leg address in the ndmz, and the ndmz itself (what purge must undo: a NIC moved into it,
our table in the host namespace).
Private keys are not here: they live in `keys/` (see dataplane.wireguard.base.KeyStore).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class NRRecord:
    listen_port: int
    # workload name -> address this node allocated or confirmed for it
    workloads: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)
    # the NR's public leg in the ndmz (100.64.0.0/16), recorded before it is used
    public_ip: ipaddress.IPv4Address | None = None


@dataclass(frozen=True)
class NdmzRecord:
    """The node's ndmz as made: enough for `zmesh purge` to undo it without etcd."""

    netns: str
    host_netns: str | None  # None: the agent's own namespace
    host_table: str  # our nftables table in the host namespace
    nic: str | None = None  # dual NIC: the NIC moved into the ndmz (moved back on purge)
    # single NIC: the host's net.ipv4.ip_forward before the agent turned it on (restored on purge)
    host_forwarding: str | None = None


class StateDirInUse(RuntimeError):
    """The state dir records NRs made under another name prefix: an agent with this prefix
    would neither find them (names differ) nor be allowed to touch them."""


class LocalState:
    FILE = "state.json"

    def __init__(self, state_dir: Path | str):
        self.dir = Path(state_dir)
        self.path = self.dir / self.FILE
        self.networks: dict[str, NRRecord] = {}
        self.ndmz: NdmzRecord | None = None
        # The --name-prefix the recorded NRs were made with (None: not recorded yet).
        self.name_prefix: str | None = None
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            prefix = raw.get("namePrefix")
            self.name_prefix = prefix if isinstance(prefix, str) else None
            self.networks = {
                name: NRRecord(int(rec["listenPort"]),
                               {w: ipaddress.IPv4Address(ip) for w, ip in rec.get("workloads", {}).items()},
                               ipaddress.IPv4Address(rec["publicIp"]) if rec.get("publicIp") else None)
                for name, rec in raw.get("networks", {}).items()
            }
            ndmz = raw.get("ndmz")
            self.ndmz = None if ndmz is None else NdmzRecord(
                str(ndmz["netns"]), ndmz.get("hostNetns"), str(ndmz["hostTable"]), ndmz.get("nic"),
                ndmz.get("hostForwarding"))
        except FileNotFoundError:
            self.networks = {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Never guess about ownership from a damaged record: keep it aside for an operator
            # and start empty (the NRs it listed are then left alone, not deleted).
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)
            log.error("state record %s is damaged (%s); moved to %s", self.path, e, aside)
            self.networks = {}
            self.ndmz = None

    def claim_prefix(self, name_prefix: str) -> None:
        """Bind the record to `name_prefix`; StateDirInUse if it holds NRs made under another
        one (their names differ: building new NRs beside them would fight them for listen
        ports and UAPI names, and garbage collection could never find the old ones)."""
        if self.name_prefix not in (None, name_prefix) and (self.networks or self.ndmz):
            made = sorted(self.networks) + ([f"ndmz {self.ndmz.netns}"] if self.ndmz else [])
            raise StateDirInUse(
                f"state dir {self.dir} holds network resources made with --name-prefix "
                f"{self.name_prefix!r} ({', '.join(made)}), not {name_prefix!r}: "
                f"start the agent with --name-prefix {self.name_prefix!r}, or remove them first "
                f"with `zmesh purge --state-dir {self.dir}`")
        if self.name_prefix != name_prefix:
            self.name_prefix = name_prefix
            try:
                self.save()
            except OSError as e:  # written with the next record; the NRs keep working meanwhile
                log.warning("cannot write %s yet: %s", self.path, e)

    def save(self) -> None:
        self._save(self.networks, self.name_prefix, self.ndmz)

    def _save(self, networks: dict[str, NRRecord], name_prefix: str | None,
              ndmz: NdmzRecord | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data: dict = {"networks": {
            name: {"listenPort": rec.listen_port,
                   "workloads": {w: str(ip) for w, ip in sorted(rec.workloads.items())},
                   **({"publicIp": str(rec.public_ip)} if rec.public_ip else {})}
            for name, rec in sorted(networks.items())
        }}
        if name_prefix is not None:
            data["namePrefix"] = name_prefix
        if ndmz is not None:
            data["ndmz"] = {"netns": ndmz.netns, "hostNetns": ndmz.host_netns,
                            "hostTable": ndmz.host_table, "nic": ndmz.nic,
                            "hostForwarding": ndmz.host_forwarding}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new record

    def ports(self) -> dict[str, int]:
        return {name: rec.listen_port for name, rec in self.networks.items()}

    def public_ips(self) -> dict[str, ipaddress.IPv4Address]:
        return {name: rec.public_ip for name, rec in self.networks.items() if rec.public_ip}

    def record(self, network: str, listen_port: int,
               workloads: dict[str, ipaddress.IPv4Address] | None = None,
               public_ip: ipaddress.IPv4Address | None = None) -> None:
        """Record (and persist) the NR; writes only when something changed. `workloads` and
        `public_ip` None keep what is recorded."""
        current = self.networks.get(network)
        new = NRRecord(listen_port, dict(workloads if workloads is not None
                                         else (current.workloads if current else {})),
                       public_ip if public_ip is not None else (current.public_ip if current else None))
        if current != new:
            # On disk first: if the write fails, memory must not claim a record (or an address)
            # that a restart would not find, so the caller fails again until it is written.
            self._save({**self.networks, network: new}, self.name_prefix, self.ndmz)
            self.networks[network] = new

    def record_ndmz(self, ndmz: NdmzRecord | None) -> None:
        """Record (and persist) the ndmz, before it is made; None once it is gone."""
        if ndmz != self.ndmz:
            self._save(self.networks, self.name_prefix, ndmz)
            self.ndmz = ndmz

    def forget(self, network: str) -> None:
        if network in self.networks:
            self._save({n: r for n, r in self.networks.items() if n != network}, self.name_prefix, self.ndmz)
            del self.networks[network]
