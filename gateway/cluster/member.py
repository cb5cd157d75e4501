"""``ClusterMember``: one gateway's life as a member of a cluster (section 10).

At start it checks the shared state keeps what it acknowledges, claims its
accounts, brings the shared documents and its journal together and
re-asserts its credit; the gateway listens only after that. Then, in the
gateway's TaskGroup:

- the heartbeat (every ``S/3``): one round trip that marks the member seen,
  publishes its gross exposure (at most every 100 ms), and brings back the
  document versions, the members (their accounts, liveness, credit and
  exposure) and whether the shared state lost data. A completed heartbeat
  renews the fence, unless it reported a document version the member has
  not applied yet: then only once it has;
- the tail: the documents' logs, read as they grow;
- the syncer: applies what the heartbeat or the tail found, and leads the
  member through a recovery when the shared state lost data;
- the fence watch: fences the member on time even when no order comes;
- the credit keeper (``gateway.cluster.credit``).

The fence is also checked synchronously before every order, so a member
cut from the shared state rejects every order from ``S`` after its last
renewal, whatever its tasks are doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

from gateway.cluster.credit import CreditKeeper
from gateway.cluster.directory import Directory
from gateway.cluster.documents import SharedDocuments
from gateway.cluster.fence import Fence
from gateway.cluster.ledger import CreditLedger, CreditPolicy, max_units_for
from gateway.cluster.shared import (
    DOCUMENTS,
    Beat,
    CreditAnswer,
    Member,
    OwnershipRefused,
    SharedState,
    SharedStateError,
    SharedStateUnavailable,
)
from gateway.config import ClusterConfig
from gateway.core.engine import RiskEngine
from gateway.core.records import StagedRecord
from gateway.core.share import LimitShare
from gateway.persistence import PersistenceError
from protocol.codes import AlertCode, AlertLevel, ErrorCode, Mode
from protocol.errors import ProtocolError
from protocol.messages import EmergencySet
from protocol.values import ZERO
from protocol.values import format_decimal as fmt

log = logging.getLogger("gateway.cluster")

#: Exposure is published at most this often (section 10).
PUBLISH_EVERY_MS = 100
#: How long one read of the documents' logs waits for an entry.
TAIL_BLOCK_MS = 1000


class ClusterStartError(Exception):
    """The member cannot join the cluster; the message says why (a setting
    of the shared state, an account owned by another live member, the shared
    state unreachable)."""


class Host(Protocol):
    """What the member needs of the service that owns the engine."""

    engine: RiskEngine
    admin_lock: asyncio.Lock

    def clock(self) -> int: ...

    def commit(self) -> int: ...

    def publish(self) -> None: ...

    async def synced(self, seq: int) -> None: ...

    async def stage_durably(self, records: Sequence[StagedRecord]) -> None: ...

    async def set_emergency(self, params: EmergencySet, actor: str) -> Mapping[str, Any]: ...


class ClusterMember:
    """This gateway as a member of a cluster. See the module docstring."""

    def __init__(
        self,
        config: ClusterConfig,
        shared: SharedState,
        host: Host,
        *,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.config = config
        self.name = config.name
        self.shared = shared
        self.host = host
        self.accounts = frozenset(config.accounts)
        self._monotonic_ns = monotonic_ns
        staleness = config.max_staleness_ms
        self.fence = Fence(staleness, name=config.name, now=monotonic_ns)
        #: The beat's period, and how recently a member must have been seen to count as alive.
        self.period_s = max(staleness / 3, 5) / 1000
        self.alive_ms = max(4 * staleness, 250)
        self.share = LimitShare(name=config.name)
        limits = host.engine.limits
        self.ledger = CreditLedger(
            CreditPolicy(config.credit_low, config.credit_high),
            max_units_for(limits.max_exposure),
        )
        self.documents = SharedDocuments(shared, host, self._documents_applied)
        self.credit = CreditKeeper(
            config.name, shared, self.ledger, host, self.share, self._credit_answered
        )
        self.epoch = ""
        self.directory = Directory(config.name, self.accounts, shared, staleness)
        self.recovering: tuple[str, ...] = ()
        self.total_units = 0
        self._beats = 0
        self._sync_wanted = asyncio.Event()
        #: A heartbeat's send time that renews the fence once its versions are applied.
        self._pending: tuple[int, Mapping[str, int]] | None = None
        self._recovery_wanted = False
        self._credit_seen_ns = 0
        self._published_ms = 0
        self._unreachable_since_ms: int | None = None
        self._fenced_shown = False
        self._breach_task: asyncio.Task[Any] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._loops: list[asyncio.Task[Any]] = []

    @property
    def engine(self) -> RiskEngine:
        return self.host.engine

    # ---------------------------------------------------------- start-up

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Join the cluster, then run the member's tasks in ``tasks``.

        Raises ``ClusterStartError`` naming what refused the start.
        """
        shared = self.shared
        config = self.config
        try:
            await shared.check_durability()
            sent = self._monotonic_ns()
            joined = await shared.join(
                config.name,
                config.public_url,
                config.accounts,
                alive_ms=self.alive_ms,
                epoch=secrets.token_hex(8),
            )
            self.fence.renewed(sent)
            self.epoch = joined.epoch
            async with self.host.admin_lock:
                await self.documents.start()
            self._adopt_journaled_credit()
            await self.credit.reassert()
            await self._beat_once()
        except OwnershipRefused as error:
            raise ClusterStartError(f"cannot join the cluster: {error}") from None
        except SharedStateError as error:
            raise ClusterStartError(f"cannot join the cluster: {error}") from None
        self.engine.sharing.share_limit(self.share)
        self._refresh_fence()
        self._tasks = tasks
        log.info(
            "member %s joined the cluster (epoch %s) with accounts %s, credit %s",
            self.name,
            self.epoch,
            ", ".join(sorted(self.accounts)) or "none",
            fmt(self.ledger.credit),
        )
        self._loops = [
            tasks.create_task(self._heartbeat(), name="cluster-heartbeat"),
            tasks.create_task(self._tail(), name="cluster-tail"),
            tasks.create_task(self._syncer(), name="cluster-syncer"),
            tasks.create_task(self._watch_fence(), name="cluster-fence"),
            tasks.create_task(self.credit.keep(), name="cluster-credit"),
        ]

    def _adopt_journaled_credit(self) -> None:
        record = self.engine.sharing.credit_record
        if record is not None:
            self.ledger.recovered(record)
        self.share.allowance = self.ledger.credit

    async def close(self) -> None:
        """Stop the member's loops (the gateway's TaskGroup waits for them)
        and close the shared state."""
        self._tasks = None
        loops = [*self._loops, *([self._breach_task] if self._breach_task else [])]
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        self._loops = []
        with contextlib.suppress(SharedStateError):
            await self.shared.close()

    @property
    def members(self) -> tuple[Member, ...]:
        """The members as of the latest heartbeat."""
        return self.directory.members

    # ---------------------------------------------------------- requests

    def require_reachable(self) -> None:
        """UNAVAILABLE while fenced (emergency.set and limits.set)."""
        self._refresh_fence()
        if self.share.unavailable is not None:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"{self.share.unavailable}; the change was not made",
            )

    def check_fence(self) -> None:
        """Before an order: fence the member now if its freshness lapsed."""
        if self.fence.fenced != (self.share.unavailable is not None):
            self._refresh_fence()

    def needs_credit(self, exposure_after: Decimal | None) -> bool:
        """True when an order with this exposure after it would not fit the credit."""
        return (
            exposure_after is not None
            and exposure_after > self.share.allowance
            and self.share.unavailable is None
        )

    def health(self) -> dict[str, Any]:
        """The ``cluster`` object of ``/healthz``."""
        self._refresh_fence()
        return {
            "name": self.name,
            "reachable": self.share.unavailable is None,
            "credit": fmt(self.ledger.credit),
            "members": [
                {"name": m.name, "alive": m.alive}
                for m in sorted(self.members, key=lambda m: m.name)
            ],
        }

    def after_update(self) -> None:
        """After a position update: the shared mode goes ``reducing`` when
        the cluster's total crossed max_exposure (auto_reduce_on_breach)."""
        reason = self.share.breach
        if reason is None:
            return
        self.share.breach = None
        if self._breach_task is not None and not self._breach_task.done():
            return
        if self._tasks is not None:
            self._breach_task = self._tasks.create_task(self._reduce(reason), name="cluster-reduce")

    async def _reduce(self, reason: str) -> None:
        try:
            await self.host.set_emergency(
                EmergencySet(mode=Mode.REDUCING, reason=reason), "gateway"
            )
        except (ProtocolError, SharedStateError, PersistenceError) as error:
            log.error("cannot set the cluster reducing after a breach: %s", error)

    # --------------------------------------------------------- the loops

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self._beat_once()
            except SharedStateUnavailable as error:
                log.debug("heartbeat: %s", error)
            except SharedStateError as error:
                log.error("heartbeat: %s", error)
            self._refresh_fence()
            await asyncio.sleep(self.period_s)

    async def _beat_once(self) -> None:
        now = self.host.clock()
        exposure = None
        if now - self._published_ms >= PUBLISH_EVERY_MS:
            exposure = fmt(self.engine.gross_exposure)
            self._published_ms = now
        sent = self._monotonic_ns()
        beat = await self.shared.beat(
            self.name,
            exposure=exposure,
            applied={str(k): v for k, v in self.documents.versions().items()},
            alive_ms=self.alive_ms,
        )
        self._on_beat(beat, sent)

    def _on_beat(self, beat: Beat, sent: int) -> None:
        if beat.forgotten:
            if not self.fence.forgotten:
                log.critical(
                    "member %s was forgotten by an admin: fenced until it is restarted", self.name
                )
            self.fence.forget()
            self._refresh_fence()
            return
        lost_credit = sent > self._credit_seen_ns and beat.credit_units < self.ledger.units
        if beat.epoch != self.epoch or lost_credit:
            # The shared state lost data (or counts less than this member
            # uses; a heartbeat sent before the latest credit answer came
            # may show the credit before it, which is no loss). What it
            # shows now is not taken: the recovery waits for every member
            # known before the loss.
            self._recovery_wanted = True
            self._update_blocked()
            self._sync_wanted.set()
            self._refresh_fence()
            return
        self.directory.update(beat.members)
        self.recovering = beat.recovering
        self.total_units = beat.total_units
        self.ledger.max_units = beat.max_units
        self.share.elsewhere = sum(
            (Decimal(m.exposure) for m in beat.members if m.name != self.name and m.exposure),
            ZERO,
        )
        self.engine.sharing.changed()
        self._update_blocked()
        applied = self.documents.versions()
        if any(beat.versions.get(n, 0) > applied[n] for n in DOCUMENTS):
            self._pending = (sent, beat.versions)
            self._sync_wanted.set()
        else:
            self.fence.renewed(sent)
        self._beats += 1
        self._refresh_fence()

    def _update_blocked(self) -> None:
        if self._recovery_wanted and not self.recovering:
            self.share.adding_blocked = (
                "the shared state lost data; orders that add exposure wait until every member "
                "re-asserted its credit"
            )
        elif self.recovering:
            self.share.adding_blocked = (
                "the shared state lost data; orders that add exposure wait until members "
                f"{', '.join(sorted(self.recovering))} re-assert their credit"
            )
        else:
            self.share.adding_blocked = None

    def _documents_applied(self) -> None:
        pending = self._pending
        if pending is None:
            return
        sent, versions = pending
        applied = self.documents.versions()
        if all(versions.get(n, 0) <= applied[n] for n in DOCUMENTS):
            self._pending = None
            self.fence.renewed(sent)
            self._refresh_fence()

    def _credit_answered(self, answer: CreditAnswer) -> None:
        self._credit_seen_ns = self._monotonic_ns()
        self.total_units = answer.total_units
        self.recovering = answer.recovering
        self._update_blocked()

    async def _tail(self) -> None:
        while True:
            after = self.documents.versions()
            try:
                documents = await self.shared.tail(after, TAIL_BLOCK_MS)
            except SharedStateUnavailable:
                await asyncio.sleep(self.period_s)
                continue
            try:
                for document in documents:
                    async with self.host.admin_lock:
                        await self.documents.converge(document)
            except PersistenceError as error:
                # The gateway halted itself; it applies nothing more.
                log.error("shared document not applied: %s", error)
                await asyncio.sleep(self.period_s)

    async def _syncer(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            try:
                if self._recovery_wanted:
                    await self._recover()
                pending = self._pending
                if pending is not None:
                    for name in DOCUMENTS:
                        async with self.host.admin_lock:
                            await self.documents.sync(name)
                    self._documents_applied()
            except (SharedStateError, PersistenceError) as error:
                log.warning("catching up with the shared state: %s", error)
                await asyncio.sleep(self.period_s)
                self._sync_wanted.set()

    async def _recover(self) -> None:
        """The shared state lost data: mark the recovery if nobody did yet,
        claim the accounts again, restore the documents it lost from this
        member's journal, re-assert the credit."""
        known = sorted({m.name for m in self.members} | {self.name})
        log.critical(
            "the shared state lost data (epoch %s gone); re-asserting member %s",
            self.epoch,
            self.name,
        )
        epoch = await self.shared.begin_recovery(known, secrets.token_hex(8))
        try:
            await self.shared.join(
                self.name,
                self.config.public_url,
                self.config.accounts,
                alive_ms=self.alive_ms,
                epoch=epoch,
            )
        except OwnershipRefused as error:
            log.critical("%s: fenced until restarted", error)
            self.fence.forget()
            self._refresh_fence()
            return
        async with self.host.admin_lock:
            await self.documents.start()
        await self.credit.reassert()
        self.epoch = epoch
        self._recovery_wanted = False
        self._update_blocked()

    async def _watch_fence(self) -> None:
        """Fence on time when nothing else runs: sleep until the deadline."""
        while True:
            wait_ms = self.fence.remaining_ms()
            await asyncio.sleep(max(wait_ms, 1) / 1000 if wait_ms > 0 else self.period_s)
            self._refresh_fence()

    # --------------------------------------------------------- the fence

    def _refresh_fence(self) -> None:
        """Make the share, the EMERGENCY document and the alerts follow the
        fence (a change of reachability is pushed and alerted once)."""
        fence = self.fence
        share = self.share
        fenced = fence.fenced
        if fenced:
            share.unavailable = fence.rejection()[1]
        else:
            share.unavailable = None
        if fenced == self._fenced_shown:
            return
        self._fenced_shown = fenced
        now = self.host.clock()
        engine = self.engine
        if fenced:
            share.reachable = False
            share.unreachable_since_ms = now - max(
                fence.stale_ms() - self.config.max_staleness_ms, 0
            )
            log.critical("member %s fenced: %s", self.name, share.unavailable)
            engine.raise_alert(
                AlertLevel.CRITICAL,
                AlertCode.CLUSTER_UNAVAILABLE,
                f"{share.unavailable}; orders are rejected until it is reached again",
                now_ms=now,
                for_traders=True,
            )
        else:
            share.reachable = True
            share.unreachable_since_ms = None
            log.warning("member %s reaches the shared state again; fence lifted", self.name)
            engine.raise_alert(
                AlertLevel.INFO,
                AlertCode.CLUSTER_UNAVAILABLE,
                f"member {self.name} reaches the shared state again; orders are checked again",
                now_ms=now,
                for_traders=True,
            )
        engine.sharing.changed(now)
        self.host.publish()
