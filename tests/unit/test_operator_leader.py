"""Leader election over a Lease (pure decision + the elector against an in-memory API with
resourceVersion conflicts, as the API server has them)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.operator.leader import LeaderElector, LeaseRecord, decide

pytestmark = pytest.mark.unit


class FakeLeases:
    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.down = False

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.down:
            raise OSError("connection refused")
        return copy.deepcopy(self.lease)

    def write_lease(self, body: dict[str, Any], create: bool) -> bool:
        if self.down:
            raise OSError("connection refused")
        if create and self.lease is not None:
            return False
        if not create:
            assert self.lease is not None
            if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
                return False
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rec(holder: str, duration: int = 10) -> LeaseRecord:
    return LeaseRecord(holder, "t", 0, duration, "1")


def test_decide() -> None:
    assert decide(None, "a", 0) == "create"
    assert decide(_rec("a"), "a", 0) == "renew"
    assert decide(_rec(""), "a", 0) == "take"
    assert decide(_rec("b"), "a", 9.9) == "wait"
    assert decide(_rec("b"), "a", 10) == "take"


def test_only_one_of_two_replicas_leads_and_the_other_takes_over_after_expiry() -> None:
    api, clock, elected = FakeLeases(), Clock(), []
    a = LeaderElector(api, "ns", identity="a", duration_seconds=10, clock=clock)
    b = LeaderElector(
        api,
        "ns",
        identity="b",
        duration_seconds=10,
        clock=clock,
        on_elected=lambda: elected.append("b"),
    )
    assert a.try_once() is True
    assert b.try_once() is False
    for _ in range(5):  # a keeps renewing: b never leads
        clock.now += 3
        assert a.try_once() is True
        assert b.try_once() is False
        assert a.is_leader()
        assert not b.is_leader()
    # a dies (stops renewing): b waits the full duration on its own clock, then takes over.
    clock.now += 9
    assert b.try_once() is False
    clock.now += 1.5
    assert not a.is_leader()  # a's own view expired before b could take over
    assert b.try_once() is True
    assert elected == ["b"]
    assert api.lease is not None
    assert api.lease["spec"]["leaseTransitions"] == 1
    assert a.try_once() is False  # a comes back: b leads


def test_a_lost_race_does_not_lead() -> None:
    api, clock = FakeLeases(), Clock()
    a = LeaderElector(api, "ns", identity="a", duration_seconds=10, clock=clock)
    real_write = api.write_lease

    def racing_write(body: dict[str, Any], create: bool) -> bool:
        real_write({**body, "spec": {**body["spec"], "holderIdentity": "b"}}, create)
        return real_write(body, create)  # 409: b got there first

    api.write_lease = racing_write  # type: ignore[method-assign]
    assert a.try_once() is False
    assert not a.is_leader()


def test_an_unreachable_api_server_keeps_the_lease_only_until_it_expires() -> None:
    api, clock = FakeLeases(), Clock()
    a = LeaderElector(api, "ns", identity="a", duration_seconds=10, clock=clock)
    assert a.try_once()
    api.down = True
    clock.now += 5
    assert a.try_once() is True  # still within the lease
    clock.now += 4
    assert a.try_once() is False  # 0.8 x duration passed without a renewal: stop acting
    api.down = False
    assert a.try_once() is True  # the record is still ours: renew at once


def test_release_hands_over_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    a = LeaderElector(api, "ns", identity="a", duration_seconds=10, clock=clock)
    b = LeaderElector(api, "ns", identity="b", duration_seconds=10, clock=clock)
    assert a.try_once()
    a.stop(release=True)
    assert not a.is_leader()
    assert b.try_once() is True
