"""The documents a cluster shares: the EMERGENCY modes and the limits.

Each lives in the shared state as ``(version, body)``; ``body`` is the JSON
of the engine's ``sharing.modes_document`` or ``limits_document``: every scope's mode
or the whole limits, so a member that missed changes catches up from the
latest document alone. One version sequence per document for the whole
cluster: a change is written to the shared state first (version checked, so
two members' concurrent changes cannot take the same version), then staged
in the member's own journal and published, exactly like a local change
(towards safety enforced at once, away from it only once durable).

A member applies what others wrote (``converge``) from the log it tails and
from the versions every heartbeat reports, whichever comes first; both go
through the same path under the admin lock, and a document whose version
is not above the member's is no change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from gateway.cluster.ledger import max_units_for
from gateway.cluster.shared import Document, DocumentName, SharedState, SharedStateUnavailable
from gateway.core.engine import RiskEngine
from gateway.core.limits import ConfigError, Limits
from gateway.core.records import StagedRecord
from protocol.codes import ErrorCode
from protocol.errors import ProtocolError

log = logging.getLogger("gateway.cluster")

#: How many times a change is retried after another member's change won the version.
_WRITE_ATTEMPTS = 8


class Host(Protocol):
    """What the documents need of the service that owns the engine."""

    engine: RiskEngine

    async def stage_durably(self, records: Sequence[StagedRecord]) -> None: ...


def unavailable(error: BaseException, *, unknown: bool) -> ProtocolError:
    """The UNAVAILABLE answer to a change the shared state did not confirm."""
    if unknown:
        text = (
            f"the shared state did not answer ({error}); the change may or may not have been "
            "made: read it back with emergency.get or limits.get"
        )
    else:
        text = f"the shared state cannot be reached ({error}); the change was not made"
    return ProtocolError(ErrorCode.UNAVAILABLE, text)


class SharedDocuments:
    """Writes this member's changes to the shared documents and applies the
    others'. Every method runs under the service's admin lock."""

    def __init__(self, shared: SharedState, host: Host, renewed: Callable[[], None]) -> None:
        self.shared = shared
        self.host = host
        #: Called after a document was applied (the fence may renew then).
        self._renewed = renewed

    @property
    def engine(self) -> RiskEngine:
        return self.host.engine

    def versions(self) -> dict[DocumentName, int]:
        """The document versions this member has applied (published)."""
        engine = self.engine
        return {"emergency": engine.emergency_version, "limits": engine.limits_version}

    # ---------------------------------------------------------- start-up

    async def start(self) -> None:
        """Bring the member and the shared state together: take what the
        shared state holds when it is newer, restore ours when the shared
        state lost it (or never had it: the first member seeds the cluster)."""
        for name in ("limits", "emergency"):
            stored = await self.shared.read_document(name)
            local = self._local_document(name)
            if stored is None or stored.version < local["version"]:
                restored = await self.shared.restore_document(
                    name, local["version"], _dumps(local), max_units=self._max_units(name, local)
                )
                if restored:
                    if stored is None:
                        log.info(
                            "shared %s document seeded from this member's journal at version %d",
                            name,
                            local["version"],
                        )
                    else:
                        log.warning(
                            "shared %s document restored from this member's journal at version "
                            "%d (the shared state held version %d)",
                            name,
                            local["version"],
                            stored.version,
                        )
                    continue
                stored = await self.shared.read_document(name)
            if stored is not None:
                # Same version, other limits (members started from different
                # files): the cluster's win.
                await self.converge(stored, same_version=True)

    # ------------------------------------------------------------ changes

    async def write(self, name: DocumentName, records: Sequence[StagedRecord]) -> None:
        """Write this member's change (``records``, prepared by the engine
        against its current version) to the shared state, then stage it.

        Raises ``ProtocolError(CONFLICT)`` when another member's change took
        the version first and this one no longer applies to the new one
        (the caller prepares it again), ``ProtocolError(UNAVAILABLE)`` when
        the shared state does not answer.
        """
        last = records[-1]
        version = last["v"]
        if last["t"] == "emg":
            body = self.engine.sharing.modes_document(last)
        else:
            body = self.engine.sharing.limits_document(last)
        body["version"] = version
        try:
            written = await self.shared.write_document(
                name, version - 1, _dumps(body), max_units=self._max_units(name, body)
            )
        except SharedStateUnavailable as error:
            raise unavailable(error, unknown=True) from None
        if not written.ok and not await self._ours(name, version, body):
            await self.sync(name)
            raise _Superseded(written.version)
        await self.host.stage_durably(records)

    async def write_with_retry(
        self, name: DocumentName, prepare: Callable[[], Sequence[StagedRecord] | None]
    ) -> bool:
        """``prepare`` the change and ``write`` it; when another member's
        change took the version first, catch up and prepare it again. False
        when, prepared again, it changes nothing."""
        for _attempt in range(_WRITE_ATTEMPTS):
            records = prepare()
            if not records:
                return False
            try:
                await self.write(name, records)
            except _Superseded:
                continue
            return True
        raise ProtocolError(
            ErrorCode.CONFLICT,
            f"the {name} document kept changing on other members; try again",
        )

    async def _ours(self, name: DocumentName, version: int, body: Mapping[str, Any]) -> bool:
        """A conflict on a repeated request: is the stored document this
        member's own write (its first attempt landed)?"""
        try:
            stored = await self.shared.read_document(name)
        except SharedStateUnavailable as error:
            raise unavailable(error, unknown=True) from None
        return stored is not None and stored.version == version and stored.body == _dumps(body)

    # ------------------------------------------------------------ others'

    async def sync(self, name: DocumentName) -> None:
        """Read one document and apply it if it is newer."""
        stored = await self.shared.read_document(name)
        if stored is not None:
            await self.converge(stored)

    async def converge(self, document: Document, *, same_version: bool = False) -> None:
        """Apply another member's document if its version is above ours."""
        try:
            body = orjson.loads(document.body)
        except orjson.JSONDecodeError:
            log.error("shared %s document %d is not JSON; ignored", document.name, document.version)
            return
        body["version"] = document.version
        records: Sequence[StagedRecord]
        if document.name == "emergency":
            records = self.engine.sharing.converge_modes(body)
        else:
            try:
                record = self.engine.sharing.converge_limits(body, same_version=same_version)
            except ConfigError as error:
                log.error("shared limits version %d refused: %s", document.version, error)
                return
            records = [] if record is None else [record]
        if records:
            log.info(
                "applying the shared %s document at version %d", document.name, document.version
            )
            await self.host.stage_durably(records)
        self._renewed()

    # ------------------------------------------------------------ helpers

    def _local_document(self, name: str) -> dict[str, Any]:
        if name == "emergency":
            return self.engine.sharing.modes_document()
        return self.engine.sharing.limits_document()

    def _max_units(self, name: str, body: Mapping[str, Any]) -> int | None:
        if name != "limits":
            return None
        limits = Limits.from_mapping(body["limits"], where="limits")
        return max_units_for(limits.max_exposure)


class _Superseded(Exception):
    """Another member's change took the version this one was prepared for."""

    def __init__(self, version: int) -> None:
        super().__init__(f"version {version} is taken")
        self.version = version


def _dumps(body: Mapping[str, Any]) -> str:
    return orjson.dumps(body).decode()
