"""etcd users and roles for Zero-Mesh (`zmesh auth ...`): who may write what.

- `zmesh-admin` (operators, the indexer): read and write everything under `<prefix>v1/`.
- `zmesh-node-<node>` (that node's agent): read everything under `<prefix>v1/` (specs, the
  index, other nodes' facts and status) and write only `<prefix>v1/nodes/<node>/`, so no node's
  credentials can change what another node is told to do: not its facts, status or index
  entries, nor any spec (etcd itself refuses the request).
- `root` with etcd's `root` role, needed by etcd to switch authentication on; used for these
  commands only.

Users and roles are cluster-wide in etcd while a prefix is not: under any prefix but the default
`/zmesh/` the names carry it (`zmesh-admin@/team-a/`, `zmesh-node-n1@/team-a/`; node names
cannot contain `@`), so node n1 of one Zero-Mesh on a shared etcd never gains a write on another's.

Every operation is idempotent: running a command again sets the given password and adds any
missing permission; nothing else is changed or removed. Leases need no permission of their own in etcd 3.4: granting
and keeping one alive is open to every authenticated user, and attaching a key to it (a put with
a lease) or revoking it is checked against the keys it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from aetcd import rpc

from .client import EtcdStore, StoreError, prefix_end
from .layout import Layout

ADMIN_ROLE = "zmesh-admin"
NODE_ROLE_PREFIX = "zmesh-node-"
ROOT = "root"
DEFAULT_PREFIX = "/zmesh/"


def _scoped(name: str, layout: Layout) -> str:
    return name if layout.prefix == DEFAULT_PREFIX else f"{name}@{layout.prefix}"


def admin_role(layout: Layout) -> str:
    """The admin role of the Zero-Mesh under `layout`'s prefix."""
    return _scoped(ADMIN_ROLE, layout)


def node_user(node: str, layout: Layout) -> str:
    """The etcd user (and role) of node `node` of the Zero-Mesh under `layout`'s prefix."""
    return _scoped(f"{NODE_ROLE_PREFIX}{node}", layout)


@dataclass(frozen=True)
class Grant:
    """A permission of a role over a key prefix: READ, WRITE or READWRITE."""

    kind: str
    prefix: str

    def to_pb(self):
        kinds = {"READ": rpc.Permission.READ, "WRITE": rpc.Permission.WRITE,
                 "READWRITE": rpc.Permission.READWRITE}
        key = self.prefix.encode()
        return rpc.Permission(permType=kinds[self.kind], key=key, range_end=prefix_end(key))


def admin_grants(store: EtcdStore) -> list[Grant]:
    return [Grant("READWRITE", store.layout.root)]


def node_grants(store: EtcdStore, node: str) -> list[Grant]:
    return [Grant("READ", store.layout.root), Grant("READWRITE", store.layout.node_root(node))]


async def _tolerating(coro, *already: str):
    """Run an auth call; an error saying the thing is already so is success."""
    try:
        return await coro
    except StoreError as e:
        if any(a in str(e) for a in already):
            return None
        raise


async def ensure_user(store: EtcdStore, name: str, password: str) -> str:
    """Create `name` with `password`, or set its password if it exists. "created"/"updated"."""
    try:
        await store.auth_rpc("UserAdd", rpc.AuthUserAddRequest(name=name, password=password),
                             f"add user {name}")
        return "created"
    except StoreError as e:
        if "user name already exists" not in str(e):
            raise
    await store.auth_rpc("UserChangePassword", rpc.AuthUserChangePasswordRequest(name=name, password=password),
                         f"set the password of {name}")
    return "updated"


async def ensure_role(store: EtcdStore, role: str, grants: list[Grant]) -> None:
    """The role exists and holds `grants` (other permissions it has are left alone: an operator
    may have added some)."""
    await _tolerating(store.auth_rpc("RoleAdd", rpc.AuthRoleAddRequest(name=role), f"add role {role}"),
                      "role name already exists")
    current = await store.auth_rpc("RoleGet", rpc.AuthRoleGetRequest(role=role), f"read role {role}")
    have = {(p.permType, p.key, p.range_end) for p in current.perm}
    for g in grants:
        pb = g.to_pb()
        if (pb.permType, pb.key, pb.range_end) not in have:
            await store.auth_rpc("RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=role, perm=pb),
                                 f"grant {g.kind} on {g.prefix} to {role}")


async def grant_role(store: EtcdStore, user: str, role: str) -> None:
    await _tolerating(store.auth_rpc("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user, role=role),
                                     f"grant role {role} to {user}"), "already")


async def init(store: EtcdStore, root_password: str) -> list[str]:
    """Create root (or set its password), its root role, the zmesh-admin role, and switch
    etcd's authentication on. `store` must be unauthenticated while auth is off, or root once
    it is on. Returns what was done, one line each."""
    done = [f"user {ROOT} {await ensure_user(store, ROOT, root_password)}"]
    await grant_role(store, ROOT, ROOT)
    admin = admin_role(store.layout)
    await ensure_role(store, admin, admin_grants(store))
    done.append(f"role {admin}: read and write {store.layout.root}")
    await _tolerating(store.auth_rpc("AuthEnable", rpc.AuthEnableRequest(), "enable authentication"),
                      "already enabled")
    done.append("authentication enabled")
    return done


async def add_node(store: EtcdStore, node: str, password: str) -> list[str]:
    user = node_user(node, store.layout)
    done = [f"user {user} {await ensure_user(store, user, password)}"]
    await ensure_role(store, user, node_grants(store, node))
    await grant_role(store, user, user)
    done.append(f"role {user}: read {store.layout.root}, write only {store.layout.node_root(node)}")
    return done


async def add_user(store: EtcdStore, name: str, password: str, role: str = ADMIN_ROLE) -> list[str]:
    """`role` ADMIN_ROLE means this prefix's admin role (created if missing)."""
    done = [f"user {name} {await ensure_user(store, name, password)}"]
    if role == ADMIN_ROLE:
        role = admin_role(store.layout)
        await ensure_role(store, role, admin_grants(store))
    await grant_role(store, name, role)
    done.append(f"role {role} granted to {name}")
    return done
