"""A prober's verdict on one tunnel, from its probe results over time (pure: the caller passes
the time in; no clock, no I/O).

    (no verdict) --ok--> Forwarding --fail x FAIL_AFTER--> Failing --ok--> Recovering
    (no verdict) --fail x FAIL_AFTER, and never ok for GRACE s--> Failing
    Recovering --ok for HOLD_DOWN s--> Forwarding;  Recovering --fail x FAIL_AFTER--> Failing
    Forwarding/Recovering --the target's lease came back after a gap--> Recovering

Failing needs several failures in a row, so one lost probe changes nothing; Recovering blames
like Failing (aggregator.blamed_nodes), so a tunnel that failed counts again only once it has
worked for the whole hold-down: a link that comes and goes never gets there, and the choice of
aggregator does not follow it back and forth. Any failure while Recovering restarts the hold-down.
A tunnel that has never worked gets a grace period first: while a mesh comes up (or a hidden NR
has just re-pointed) its peers configure each other within seconds, and a probe that fails
meanwhile is no evidence against anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .aggregator import FAILING, FORWARDING, RECOVERING

FAIL_AFTER = 3  # probes in a row
HOLD_DOWN = 30.0  # seconds a tunnel that failed must work before it counts as Forwarding again
GRACE = 10.0  # seconds a tunnel probed for the first time may take to work before it is Failing


@dataclass
class TunnelHealth:
    fail_after: int = FAIL_AFTER
    hold_down: float = HOLD_DOWN
    grace: float = GRACE
    state: str | None = None  # None until there is a verdict
    since: float = 0.0  # when the state was entered (unix time, as the caller counts)
    failures: int = 0  # consecutive failed probes
    working_since: float | None = None  # start of the current run of working probes
    first_probe: float | None = None

    def observe(self, ok: bool, now: float) -> bool:
        """Feed one probe result; True if the verdict changed."""
        if self.first_probe is None:
            self.first_probe = now
        if ok:
            self.failures = 0
            if self.working_since is None:
                self.working_since = now
            if self.state is None:
                return self._enter(FORWARDING, now)
            if self.state == FAILING:
                return self._enter(RECOVERING, now)
            if self.state == RECOVERING and now - self.working_since >= self.hold_down:
                return self._enter(FORWARDING, now)
            return False
        self.failures += 1
        self.working_since = None
        if self.state is None and now - self.first_probe < self.grace:
            return False
        if self.failures >= self.fail_after and self.state != FAILING:
            return self._enter(FAILING, now)
        return False

    def target_returned(self, now: float) -> bool:
        """The target's liveness lease came back after it had expired: hold the tunnel down as
        if it had failed (its agent was gone long enough for everyone to fail over)."""
        if self.state in (FORWARDING, RECOVERING):
            self.working_since = now
            return self._enter(RECOVERING, now) if self.state == FORWARDING else False
        return False

    @classmethod
    def restored(cls, state: str, since: float, now: float, **kw) -> "TunnelHealth":
        """The tracker of a verdict this prober published before it restarted: a failing tunnel
        stays failing until a probe works, a recovering one starts its hold-down again."""
        h = cls(state=state, since=since, **kw)
        if state == FAILING:
            h.failures = h.fail_after
        elif state == RECOVERING:
            h.working_since = now
        return h

    def _enter(self, state: str, now: float) -> bool:
        self.state, self.since = state, now
        return True


FIRST_HANDSHAKE_WINDOW = 5.0  # seconds: WireGuard's REKEY_TIMEOUT, after which it retries itself
REDIAL_INTERVAL = 1.0  # seconds between fresh dials within that window


@dataclass
class FirstDial:
    """A peer an NR dials (an endpoint and persistent keepalive: a hidden NR's aggregator), from
    when it was configured until its first handshake.

    The hidden NR and its aggregator learn of each other from etcd at about the same moment, so
    its first initiation may reach an aggregator that has not configured it yet. WireGuard meets
    that with silence and sends the next initiation only after REKEY_TIMEOUT (5 s). Within that
    window the peer is dialled afresh every REDIAL_INTERVAL instead; past it WireGuard's own
    retries are as quick. Times are the caller's monotonic clock."""

    configured_at: float
    dialled_at: float

    def due(self, now: float) -> bool:
        return self.waiting(now) and now - self.dialled_at >= REDIAL_INTERVAL

    def waiting(self, now: float) -> bool:
        """Still inside the window (without a handshake, as the caller knows)."""
        return now - self.configured_at < FIRST_HANDSHAKE_WINDOW

