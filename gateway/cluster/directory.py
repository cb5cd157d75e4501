"""``Directory``: who the members are and which accounts each owns, as the
latest heartbeat told; the ``WRONG_GATEWAY`` answers, ``cluster.get`` and
``cluster.forget`` (protocol section 10)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from gateway.cluster.ledger import from_units
from gateway.cluster.shared import Member, NotForgettable, SharedState, SharedStateUnavailable
from protocol.codes import ErrorCode
from protocol.errors import ProtocolError
from protocol.values import format_decimal as fmt

log = logging.getLogger("gateway.cluster")


class Directory:
    def __init__(
        self, name: str, accounts: Iterable[str], shared: SharedState, staleness_ms: int
    ) -> None:
        self.name = name
        self.accounts = frozenset(accounts)
        self.shared = shared
        self.staleness_ms = staleness_ms
        self.members: tuple[Member, ...] = ()
        #: account -> (owner name, owner url).
        self.owners: dict[str, tuple[str, str]] = {}
        self._updated = asyncio.Event()

    def update(self, members: tuple[Member, ...]) -> None:
        """What the latest heartbeat told."""
        self.members = members
        self.owners = {account: (m.name, m.url) for m in members for account in m.accounts}
        self._updated.set()

    # ------------------------------------------------------------ routing

    def owner_error(self, account: str) -> ProtocolError | None:
        """None when this member owns ``account``; else the WRONG_GATEWAY
        error naming its owner (null when no member owns it)."""
        if account in self.accounts:
            return None
        owner = self.owners.get(account)
        if owner is None:
            return ProtocolError(
                ErrorCode.WRONG_GATEWAY,
                f"account {account} is not owned by member {self.name}, nor by any member of "
                "the cluster",
                details={"owner": None},
            )
        name, url = owner
        return ProtocolError(
            ErrorCode.WRONG_GATEWAY,
            f"account {account} is owned by member {name} ({url})",
            details={"owner": {"name": name, "url": url}},
        )

    def reservation_owner_error(self, reservation_id: str) -> ProtocolError | None:
        """WRONG_GATEWAY for a reservation id made by another member (ids
        start with the member's name and a colon)."""
        member, sep, _rest = reservation_id.partition(":")
        if not sep or member == self.name:
            return None
        for known in self.members:
            if known.name == member:
                return ProtocolError(
                    ErrorCode.WRONG_GATEWAY,
                    f"reservation {reservation_id} was made by member {member} ({known.url})",
                    details={"owner": {"name": member, "url": known.url}},
                )
        return ProtocolError(
            ErrorCode.WRONG_GATEWAY,
            f"reservation {reservation_id} names member {member}, which is not in the cluster",
            details={"owner": None},
        )

    def all_applied(self, document: str, version: int) -> bool:
        """Has every other live member applied ``version`` of ``document``?"""
        return all(
            m.applied.get(document, 0) >= version
            for m in self.members
            if m.alive and m.name != self.name
        )

    async def wait_applied(self, document: str, version: int) -> None:
        """Return once every other live member has applied ``version`` of
        ``document`` (as their heartbeats report it), or ``S`` has passed."""
        try:
            async with asyncio.timeout(self.staleness_ms / 1000):
                while not self.all_applied(document, version):
                    self._updated.clear()
                    await self._updated.wait()
        except TimeoutError:
            log.info(
                "%s version %d: not every live member confirmed it within %d ms",
                document,
                version,
                self.staleness_ms,
            )

    # ------------------------------------------------------------ methods

    def view(self, *, with_figures: bool) -> dict[str, Any]:
        """The ``cluster.get`` result (``with_figures``: credit and exposure)."""
        members = []
        for m in sorted(self.members, key=lambda m: m.name):
            entry: dict[str, Any] = {
                "name": m.name,
                "url": m.url,
                "accounts": sorted(m.accounts),
                "alive": m.alive,
            }
            if with_figures:
                entry["credit"] = fmt(from_units(m.credit_units))
                entry["exposure"] = m.exposure
            members.append(entry)
        return {"name": self.name, "members": members}

    async def forget(self, name: str) -> dict[str, Any]:
        """``cluster.forget``: remove a member unreachable for longer than S."""
        if name == self.name:
            raise ProtocolError(ErrorCode.CONFLICT, f"member {name} cannot forget itself")
        if all(m.name != name for m in self.members):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no member {name} in the cluster")
        try:
            await self.shared.forget(name, min_unseen_ms=self.staleness_ms)
        except NotForgettable as error:
            code = ErrorCode.NOT_FOUND if str(error).startswith("no member") else ErrorCode.CONFLICT
            raise ProtocolError(code, str(error)) from None
        except SharedStateUnavailable as error:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"the shared state cannot be reached ({error})"
            ) from None
        log.warning("member %s forgotten: its accounts and credit are released", name)
        self.update(tuple(m for m in self.members if m.name != name))
        return {"forgotten": name}
