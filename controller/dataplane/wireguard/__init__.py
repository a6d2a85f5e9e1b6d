"""WireGuard backends behind one interface (`base.WireGuardBackend`); `select_backend` picks one."""

from __future__ import annotations

from ..links import Links
from .base import WireGuardBackend


def select_backend(
    state_dir: str,
    host_netns: str | None = None,
    links: Links | None = None,
    prefer: str | None = None,
) -> WireGuardBackend:
    """Kernel WireGuard when the module exists, else wireguard-go.

    `prefer` ("kernel" or "userspace") forces one; forcing "kernel" without the module raises.
    """
    from .kernel import KernelBackend, kernel_available
    from .userspace import UserspaceBackend

    if prefer not in (None, "kernel", "userspace"):
        raise ValueError(f"unknown WireGuard backend {prefer!r}: use 'kernel' or 'userspace'")
    if prefer == "kernel" or (prefer is None and kernel_available()):
        if not kernel_available():
            raise RuntimeError("kernel WireGuard requested but the wireguard module is not available")
        return KernelBackend(state_dir, host_netns, links)
    return UserspaceBackend(state_dir, host_netns, links)


__all__ = ["select_backend", "WireGuardBackend"]
