"""The authorization table: one entry per method, each role's reach as documented."""

from __future__ import annotations

import pytest

from gateway.service import ACCESS, Scope
from protocol import codec
from protocol.codes import Role


def test_access_when_compared_with_the_protocol_then_one_entry_per_method() -> None:
    assert set(ACCESS) == set(codec.METHODS)


@pytest.mark.parametrize("method", ["emergency.set", "limits.set"])
def test_admin_changes_when_listed_then_admin_only_and_writing(method: str) -> None:
    access = ACCESS[method]
    assert access.roles == {Role.ADMIN}
    assert access.writes


def test_trading_methods_when_listed_then_scoped_to_the_callers_accounts() -> None:
    for method in ("order.validate", "position.update", "position.snapshot"):
        assert ACCESS[method].scope is Scope.TRADE, method
    assert ACCESS["price.update"].roles == {Role.FEED, Role.ADMIN}
    assert Role.VIEWER not in ACCESS["reservation.release"].roles


def test_reads_when_listed_then_open_to_every_role_and_never_writing() -> None:
    for method in ("ping", "state.get", "emergency.get", "limits.get", "subscribe"):
        assert ACCESS[method].roles == set(Role), method
        assert not ACCESS[method].writes, method
