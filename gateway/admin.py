"""``AdminChanges``: emergency and limits changes, durable before they are
answered.

Every change is staged in the engine, fsynced (in every fsync mode),
published, pushed to every subscriber that keeps up, and only then answered;
one at a time (``admin_lock``). In a cluster (``cluster`` set) a change goes
to the shared state first, version checked, and is answered once every live
member applied it or ``S`` passed (protocol section 10); another member's
change arrives through ``stage_durably``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from gateway.cluster.member import ClusterMember
from gateway.core.engine import RiskEngine
from gateway.core.limits import LimitChange, Limits
from gateway.core.records import StagedRecord
from gateway.fanout import Fanout
from gateway.persistence import PersistenceError, RecordStore
from protocol.messages import EmergencySet, LimitsSet

log = logging.getLogger("gateway.service")

Result = Mapping[str, Any]


class AdminChanges:
    """The admin changes of one gateway; ``commit`` and ``publish`` are the
    service's (records to the store, events to the fan-out)."""

    def __init__(
        self,
        *,
        engine: RiskEngine,
        store: RecordStore,
        fanout: Fanout,
        clock: Callable[[], int],
        commit: Callable[[], int],
        publish: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.store = store
        self.fanout = fanout
        self.clock = clock
        self._commit = commit
        self._publish = publish
        self.admin_lock = asyncio.Lock()
        #: Set when this gateway is a member of a cluster (section 10).
        self.cluster: ClusterMember | None = None

    def commit(self) -> int:
        return self._commit()

    def publish(self) -> None:
        self._publish()

    async def set_emergency(self, params: EmergencySet, actor: str) -> Result:
        """Durable before the response and the push, in every fsync mode.

        Towards safety the change is enforced at once, so validations stop
        before the fsync; away from safety it applies only once durable, so a
        crash can never leave the gateway more open than what was
        acknowledged (the engine's mode table decides). Either way the
        EMERGENCY document, its version and the push change only once the
        record is durable. The answer follows the push: it means "everyone
        connected was told", and a script changing modes in a loop is paced
        by the fan-out it causes.

        Raises ``PersistenceError`` when the change cannot be made durable.
        In a cluster the change goes through the shared state first (see
        ``_set_shared``).
        """
        engine = self.engine
        if self.cluster is not None:
            return await self._set_shared_emergency(self.cluster, params, actor)
        async with self.admin_lock:
            record = engine.prepare_emergency(params, actor, self.clock())
            if record is None:
                return engine.emergency_view()
            _log_emergency(engine, params, actor, record["v"])
            await self._stage_durably(record)
            view = engine.emergency_view()
            await self.fanout.flusher.barrier()
            return view

    async def set_limits(self, params: LimitsSet, actor: str) -> Result:
        """Like ``set_emergency``: answered once durable and published."""
        engine = self.engine
        if self.cluster is not None:
            return await self._set_shared_limits(self.cluster, params, actor)
        async with self.admin_lock:
            record = engine.prepare_limits(params.version, params.limits, actor, self.clock())
            if record is None:
                return engine.limits_view()
            current = engine.limits.to_wire()
            log.warning(
                "limits change by %s to version %d: %s",
                actor,
                record["v"],
                ", ".join(
                    f"{key} {_show_limit(current.get(key))} -> {_show_limit(value)}"
                    for key, value in record["limits"].items()
                    if current.get(key) != value
                ),
            )
            await self._stage_durably(record)
            return engine.limits_view()

    async def reload_limits(self, limits: Limits, actor: str = "config") -> bool:
        """Apply the config file's [limits] (SIGHUP, or a start with an edited
        file): only the keys the file changed since it was last applied, each
        logged with its old and new value. True when a value changed.

        Raises ``PersistenceError`` when the change cannot be made durable.
        """
        engine = self.engine
        async with self.admin_lock:
            record, changed = engine.prepare_file_limits(limits, actor, self.clock())
            if record is None:
                return False
            if changed and self.cluster is not None:
                # The limits are the cluster's: the edit goes to every member.
                self.cluster.require_reachable()
                _log_limits_change(actor, record["v"], changed)

                def prepare() -> list[StagedRecord]:
                    again, _changed = engine.prepare_file_limits(limits, actor, self.clock())
                    return [] if again is None else [again]

                await self.cluster.documents.write_with_retry("limits", prepare)
                return True
            if changed:
                log.warning(
                    "limits change by %s to version %d: %s",
                    actor,
                    record["v"],
                    ", ".join(
                        f"{key} {_show_limit(old)} -> {_show_limit(new)}"
                        for key, old, new in changed
                    ),
                )
            else:
                log.info("limits from the config file: no value changes (version %d)", record["v"])
            await self._stage_durably(record)
            return bool(changed)

    async def _set_shared_emergency(
        self, member: ClusterMember, params: EmergencySet, actor: str
    ) -> Result:
        """A cluster's emergency change: written to the shared state (version
        checked), then durable in this member's journal and pushed, then
        answered once every live member applied it or S has passed."""
        engine = self.engine
        async with self.admin_lock:
            member.require_reachable()

            def prepare() -> list[StagedRecord]:
                record = engine.prepare_emergency(params, actor, self.clock())
                if record is not None:
                    _log_emergency(engine, params, actor, record["v"])
                return [] if record is None else [record]

            changed = await member.documents.write_with_retry("emergency", prepare)
            version = engine.emergency_version
        if changed:
            await member.directory.wait_applied("emergency", version)
            await self.fanout.flusher.barrier()
        return engine.emergency_view()

    async def _set_shared_limits(
        self, member: ClusterMember, params: LimitsSet, actor: str
    ) -> Result:
        """A cluster's limits change, ordered like ``_set_shared_emergency``."""
        engine = self.engine
        async with self.admin_lock:
            member.require_reachable()

            def prepare() -> list[StagedRecord]:
                record = engine.prepare_limits(params.version, params.limits, actor, self.clock())
                return [] if record is None else [record]

            changed = await member.documents.write_with_retry("limits", prepare)
            version = engine.limits_version
        if changed:
            await member.directory.wait_applied("limits", version)
        return engine.limits_view()

    async def stage_durably(self, records: Sequence[StagedRecord]) -> None:
        """Stage emergency or limits records (another member's change, in a
        cluster) and return once published, as ``_stage_durably``."""
        failed = self.store.failed
        if failed is not None:
            raise PersistenceError(str(failed))
        for record in records:
            self.engine.stage(record)
        seq = self.commit()
        await self.store.synced(seq)
        self.publish()

    async def synced(self, seq: int) -> None:
        """Return once record ``seq`` is fsynced (every fsync mode)."""
        await self.store.synced(seq)

    async def _stage_durably(self, record: StagedRecord) -> None:
        """Stage an emergency or limits record and return once it is published
        (fsynced first, in every fsync mode); its events are pushed by then.

        Raises ``PersistenceError`` when it cannot be made durable; then
        nothing is staged.
        """
        failed = self.store.failed
        if failed is not None:
            raise PersistenceError(str(failed))
        self.engine.stage(record)
        seq = self.commit()
        await self.store.synced(seq)
        self.publish()


def _log_limits_change(actor: str, version: int, changed: list[LimitChange]) -> None:
    log.warning(
        "limits change by %s to version %d: %s",
        actor,
        version,
        ", ".join(f"{key} {_show_limit(old)} -> {_show_limit(new)}" for key, old, new in changed),
    )


def _show_limit(value: object) -> str:
    """A limit's value for the log: decimals and numbers as they are, the rest as JSON."""
    if isinstance(value, str | int):
        return str(value)
    return orjson.dumps(value).decode()


def _log_emergency(engine: RiskEngine, params: EmergencySet, actor: str, version: int) -> None:
    """The log line of an emergency change, before it is staged."""
    log.warning(
        "emergency change by %s: %s %s -> %s (%s), version %d",
        actor,
        "gateway" if params.account is None else f"account {params.account}",
        engine.mode_of(params.account).value,
        params.mode.value,
        params.reason,
        version,
    )
