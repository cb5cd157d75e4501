"""Push channels: per-channel seq, resume buffers, audiences, heartbeats, coalescing.

The server hands the fan-out the engine's events (``publish``, sync); it
numbers them per channel, encodes each push once, keeps the last
``buffer_size`` of each channel for ``resume``, and queues the same bytes on
every subscriber's outbox (docs/protocol.md section 5).

Sequence numbers. Each channel with a seq (``emergency``, ``alerts``,
``exposure``, ``decisions``) counts from 1 when the gateway starts, +1 per
event, and every subscriber sees the same number for the same event. A
snapshot push is stamped with the seq of the last event it includes; the
events that follow it start at that seq + 1, with no gap and no duplicate. The
``heartbeat`` carries each channel's last seq, so a client also notices a lost
last event. Seqs restart at 1 when the gateway restarts (``session.hello``
returns a new ``epoch``): a client resuming across a restart gets a snapshot.

Traders and the exposure channel. A trader receives exposure pushes only for
its own accounts, but the exposure seq is shared by all subscribers and counts
the pushes of every account. A trader therefore sees jumps in the exposure seq
(for instance 3, then 7): the numbers in between were pushes for accounts it
may not read, not lost data. Nothing is lost, because each exposure push
carries the whole state of one account (gross, limit, global, global_limit),
never a delta: the latest push for an account is that account's current state.
A trader should not treat an exposure seq jump as a gap; when in doubt it can
subscribe to ``exposure`` again (with no ``resume``) to get a fresh snapshot of
its accounts. Every other channel is the same for every subscriber that may
read it, and there a jump is a real gap: pushes dropped for a slow consumer
(see ``gateway.fanout.outbox``), which the client recovers with ``resume``.

Exposure pushes are coalesced: at most one per account every ``coalesce_ms``,
always carrying the values at send time, and a change inside the window is
pushed at the window's end, so the last push always shows the final state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, cast

from gateway.auth import Principal

# The engine's events, views and history: the fan-out's only imports from the core.
from gateway.core.events import AlertRaised, DecisionMade, Event, ExposureChanged, ModeChanged
from gateway.core.history import History
from gateway.core.views import AlertView, EmergencyView, ExposureView, filter_emergency
from gateway.fanout.charts import ChartHistory
from gateway.fanout.exposure import ExposureCoalescer
from gateway.fanout.flusher import Flusher
from gateway.fanout.outbox import Delivery, Outbox
from gateway.fanout.resume import ChannelLog
from protocol.codec import encode_push
from protocol.codes import AlertCode, AlertLevel, Channel, ErrorCode, Role
from protocol.errors import ProtocolError, bad_request
from protocol.messages import Subscribe, Unsubscribe
from protocol.values import format_decimal, format_time_ms

__all__ = ["SEQ_CHANNELS", "STAFF_ONLY", "Fanout", "RiskReader", "Subscriber"]

log = logging.getLogger("gateway.fanout")

#: Channels whose pushes carry a seq (``heartbeat`` has none).
SEQ_CHANNELS: tuple[Channel, ...] = (
    Channel.EMERGENCY,
    Channel.ALERTS,
    Channel.EXPOSURE,
    Channel.DECISIONS,
)
# Every authenticated connection is on these from `add` until `remove`.
_PERMANENT = frozenset({Channel.EMERGENCY, Channel.HEARTBEAT})
# Channels a connection joins and leaves with subscribe / unsubscribe.
_OPTIONAL = (Channel.ALERTS, Channel.EXPOSURE, Channel.DECISIONS)
#: Who may see a seq'd event: None (everyone on the channel), an account name
#: (whoever may read that account), or this, which is no account name (names
#: are [A-Za-z0-9._:/-]): staff only, never a trader (alerts about a connection).
STAFF_ONLY = "\x00staff"


class MaxExposure(Protocol):
    """The one limit the exposure pushes carry."""

    @property
    def max_exposure(self) -> Decimal: ...


class RiskReader(Protocol):
    """What the fan-out reads of the risk state, for snapshots and exposure pushes."""

    @property
    def accounts(self) -> Collection[str]: ...

    @property
    def global_exposure(self) -> Decimal: ...

    @property
    def limits(self) -> MaxExposure: ...

    def emergency_view(self, readable: Callable[[str], bool] | None = None) -> EmergencyView: ...

    def exposure_of(self, account: str) -> ExposureView: ...

    @property
    def history(self) -> History: ...

    def note_alert(self, alert: AlertView, now_ms: int, *, for_traders: bool) -> None: ...


class Subscriber(Protocol):
    """What the fan-out needs of a connection (the server's session)."""

    @property
    def conn_id(self) -> int: ...

    @property
    def principal(self) -> Principal | None: ...

    @property
    def outbox(self) -> Outbox: ...


@dataclass(eq=False, slots=True)
class _Member:
    conn_id: int
    principal: Principal
    outbox: Outbox
    reads_every_account: bool
    # Optional channels currently receiving live events.
    live: set[Channel] = field(default_factory=set)
    # Channels subscribed but not yet delivered: channel -> resume seq or None.
    pending: dict[Channel, int | None] = field(default_factory=dict)


class Fanout:
    """Channels, seqs, resume buffers and delivery to subscribers.

    Call ``add`` once a connection is authenticated and ``remove`` when it is
    closed; ``publish`` with the engine's drained events; ``start`` with the
    gateway's task group (heartbeat and exposure timer) and ``stop`` on
    shutdown. Nothing here awaits except ``stop``: every method only pushes
    frames to outboxes, which write them at once or queue them.
    """

    def __init__(
        self,
        risk: RiskReader,
        *,
        heartbeat_s: float,
        clock: Callable[[], int],
        buffer_size: int = 1024,
        coalesce_ms: int = 100,
        history: int = 100,
    ) -> None:
        self.risk = risk
        self.heartbeat_s = heartbeat_s
        self.coalesce_ms = coalesce_ms
        self._clock = clock
        self._logs = {channel: ChannelLog(channel, buffer_size) for channel in SEQ_CHANNELS}
        # How many alerts a snapshot holds; the alerts and decisions are the
        # risk state's history, which survives a restart.
        self.history = history
        self._members: dict[int, _Member] = {}
        self._live: dict[Channel, dict[int, _Member]] = {c: {} for c in _OPTIONAL}
        self._exposure = ExposureCoalescer(coalesce_ms)
        #: The last 15 minutes of exposure and decisions (``history.get``).
        self.charts = ChartHistory()
        self._exposure_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._evicted: list[_Member] = []
        self._depth = 0
        self.evictions = 0
        #: Give it to every subscriber's ``Outbox``: broadcasts are written in slices.
        self.flusher = Flusher()

    # -------------------------------------------------------- connections

    def add(self, sub: Subscriber) -> None:
        """Put a just-authenticated connection on ``emergency`` and ``heartbeat``.

        Queues the emergency snapshot at once, stamped with the current
        emergency seq. Calling it again for the same connection does nothing.
        Raises ``ValueError`` for a connection with no principal yet.
        """
        if sub.conn_id in self._members:
            return
        principal = sub.principal
        if principal is None:
            raise ValueError(f"connection {sub.conn_id} is not authenticated")
        member = _Member(sub.conn_id, principal, sub.outbox, principal.reads_every_account)
        self._members[sub.conn_id] = member
        sub.outbox.add_evict_callback(lambda _box: self._on_evicted(member))
        self._depth += 1
        try:
            self._send_snapshot(member, Channel.EMERGENCY)
        finally:
            self._leave()

    def remove(self, sub: Subscriber) -> None:
        """Forget a closed connection (idempotent)."""
        member = self._members.get(sub.conn_id)
        if member is not None:
            self._drop(member)

    def subscribe(self, sub: Subscriber, req: Subscribe) -> dict[str, Any]:
        """Record a subscription; returns ``{"channels": {NAME: {"seq": current}}}``.

        Pushes nothing: push the response with ``Delivery.ANSWER`` and then
        call ``deliver_subscription(sub)`` with no ``await`` in between, which
        sends per channel the events after ``resume[CHANNEL]`` or a snapshot.
        The ``heartbeat`` entry has ``"seq": null`` (heartbeats have no seq).
        Raises ``ProtocolError(FORBIDDEN)`` when a trader asks for
        ``decisions``; then nothing is recorded.
        """
        member = self._member(sub)
        principal = member.principal
        if Channel.DECISIONS in req.channels and principal.role is Role.TRADER:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"{principal.name} (trader) may not subscribe to decisions "
                "(viewers and admins only)",
            )
        result: dict[str, dict[str, int | None]] = {}
        for channel in req.channels:
            if channel is Channel.HEARTBEAT:
                result[channel.value] = {"seq": None}
                continue
            member.pending[channel] = req.resume.get(channel)
            if channel in self._live:
                # Off live delivery until deliver_subscription, so a catch-up
                # and a live event can never both carry the same seq.
                self._live[channel].pop(sub.conn_id, None)
                member.live.discard(channel)
            result[channel.value] = {"seq": self._logs[channel].seq}
        return {"channels": result}

    def deliver_subscription(self, sub: Subscriber) -> None:
        """Send what ``subscribe`` recorded, then deliver those channels live.

        Per channel: the events after ``resume[CHANNEL]`` when the resume
        buffer still holds all of them, else a snapshot stamped with the
        current seq. Live events follow with no gap and no duplicate.
        """
        member = self._members.get(sub.conn_id)
        if member is None or not member.pending:
            return
        pending, member.pending = member.pending, {}
        self._depth += 1
        try:
            for channel, resume in pending.items():
                if resume is None or not self._replay(member, channel, resume):
                    self._send_snapshot(member, channel)
                if channel in self._live:
                    self._live[channel][sub.conn_id] = member
                    member.live.add(channel)
        finally:
            self._leave()

    def unsubscribe(self, sub: Subscriber, req: Unsubscribe) -> dict[str, Any]:
        """Stop ``req.channels``; returns ``{"channels": [channels still subscribed]}``.

        Raises ``ProtocolError(BAD_REQUEST)`` naming the channel for
        ``emergency`` or ``heartbeat``, which every connection receives.
        """
        member = self._member(sub)
        for channel in req.channels:
            if channel in _PERMANENT:
                raise bad_request(
                    f"channel {channel.value} cannot be unsubscribed: every connection receives it"
                )
        for channel in req.channels:
            member.pending.pop(channel, None)
            member.live.discard(channel)
            self._live[channel].pop(sub.conn_id, None)
        names = set(_PERMANENT) | member.live | set(member.pending)
        return {"channels": [channel.value for channel in Channel if channel in names]}

    # ------------------------------------------------------------- events

    def publish(self, events: Iterable[Event]) -> None:
        """Queue the pushes for the engine's events, in order. Never awaits.

        ``ModeChanged`` goes to every added connection (never dropped
        while it is connected), ``AlertRaised`` to ``alerts``,
        ``DecisionMade`` to ``decisions``, ``ExposureChanged`` to ``exposure``
        (coalesced, trader-filtered).
        """
        self._depth += 1
        try:
            for event in events:
                if isinstance(event, ModeChanged):
                    self._emit(Channel.EMERGENCY, event.view)
                elif isinstance(event, AlertRaised):
                    alert = event.alert
                    audience = alert.get("account") if event.for_traders else STAFF_ONLY
                    self._emit(Channel.ALERTS, alert, audience)
                elif isinstance(event, DecisionMade):
                    self.charts.decision(event.data, self._clock())
                    self._emit(Channel.DECISIONS, event.data)
                elif isinstance(event, ExposureChanged):
                    self._exposure_changed(event.account)
        finally:
            self._leave()

    def flush_exposure(self, now_ms: int) -> int | None:
        """Push every coalesced exposure change due at ``now_ms``.

        Returns when the next one is due (ms), or None when none is waiting.
        The timer started by ``start`` calls this; tests call it with a pinned
        clock.
        """
        self._depth += 1
        try:
            for account in self._exposure.take_due(now_ms):
                self._push_exposure(account, now_ms)
        finally:
            self._leave()
        return self._exposure.next_due()

    def heartbeat(self) -> None:
        """Push one heartbeat to every added connection (the heartbeat task's tick)."""
        frame = encode_push(
            Channel.HEARTBEAT.value,
            None,
            {
                "ts": format_time_ms(self._clock()),
                "seqs": {channel.value: self._logs[channel].seq for channel in SEQ_CHANNELS},
            },
        )
        self._depth += 1
        try:
            for member in list(self._members.values()):
                member.outbox.push(frame, Delivery.BROADCAST)
        finally:
            self._leave()

    # ----------------------------------------------------------- lifecycle

    def start(self, tasks: asyncio.TaskGroup) -> None:
        """Start the heartbeat and the exposure timer in ``tasks`` (once).

        Neither task lets an error out into the group: a failing tick is
        logged and the next one runs.
        """
        if self._tasks:
            return
        self._tasks = [
            tasks.create_task(
                _every(self.heartbeat_s, self.heartbeat, "heartbeat"), name="fanout-heartbeat"
            ),
            tasks.create_task(self._exposure_timer(), name="fanout-exposure"),
        ]

    async def stop(self) -> None:
        """End the tasks ``start`` started; exposure changes still waiting are pushed."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        last = self._exposure.last_due()
        if last is not None:
            self.flush_exposure(last)

    def stats(self) -> dict[str, Any]:
        """``{"connections", "subscribers": {CHANNEL: n}, "queued_bytes", "evictions"}``."""
        members = self._members.values()
        subscribers = {channel.value: len(self._members) for channel in _PERMANENT}
        subscribers.update({channel.value: len(live) for channel, live in self._live.items()})
        return {
            "connections": len(self._members),
            "subscribers": subscribers,
            "queued_bytes": sum(m.outbox.queued_bytes for m in members),
            "evictions": self.evictions,
        }

    def seq(self, channel: Channel) -> int:
        """The seq of the channel's last event (0 before the first)."""
        return self._logs[channel].seq

    # ------------------------------------------------------------ internals

    def _member(self, sub: Subscriber) -> _Member:
        member = self._members.get(sub.conn_id)
        if member is None:
            raise RuntimeError(f"connection {sub.conn_id} is not added: call Fanout.add first")
        return member

    def _drop(self, member: _Member) -> None:
        del self._members[member.conn_id]
        for channel in member.live:
            self._live[channel].pop(member.conn_id, None)

    def _emit(self, channel: Channel, data: Mapping[str, Any], audience: str | None = None) -> None:
        channel_log = self._logs[channel]
        if channel is not Channel.EMERGENCY and not self._live[channel]:
            channel_log.append(data, audience, encode=False)
            return
        event = channel_log.append(data, audience, encode=True)
        frame = channel_log.frame(event)
        if channel is Channel.EMERGENCY:
            # Each trader's document lists only its own accounts: one frame
            # per set of accounts, and the shared one for everyone else.
            filtered: dict[frozenset[str], bytes] = {}
            for member in list(self._members.values()):
                wire = frame
                if not member.reads_every_account and data["accounts"]:
                    wire = _emergency_frame(member, event.seq, data, filtered)
                member.outbox.push(wire, Delivery.EMERGENCY_BROADCAST)
            return
        for member in list(self._live[channel].values()):
            if audience is None or _may_see(member, audience):
                member.outbox.push(frame, Delivery.BROADCAST)

    def _replay(self, member: _Member, channel: Channel, resume: int) -> bool:
        """Queue the events after ``resume``; False when the buffer lacks some."""
        channel_log = self._logs[channel]
        events = channel_log.since(resume)
        if events is None:
            return False
        emergency = channel is Channel.EMERGENCY
        # Never dropped: the client asked for exactly these.
        delivery = Delivery.EMERGENCY_CATCH_UP if emergency else Delivery.CATCH_UP
        for event in events:
            if event.audience is None or _may_see(member, event.audience):
                frame = channel_log.frame(event)
                if emergency and not member.reads_every_account and event.data["accounts"]:
                    frame = _emergency_frame(member, event.seq, event.data)
                member.outbox.push(frame, delivery)
        return True

    def _send_snapshot(self, member: _Member, channel: Channel) -> None:
        data: Mapping[str, Any]
        delivery = Delivery.CATCH_UP
        if channel is Channel.EMERGENCY:
            data = self.risk.emergency_view(member.principal.readable)
            delivery = Delivery.EMERGENCY_CATCH_UP
        elif channel is Channel.ALERTS:
            data = {"alerts": _visible_alerts(self.risk.history.alerts, member, self.history)}
        elif channel is Channel.DECISIONS:
            data = {"decisions": self.risk.history.decisions()}
        else:
            data = _exposure_snapshot(self.risk, member)
        frame = encode_push(channel.value, self._logs[channel].seq, data, snapshot=True)
        member.outbox.push(frame, delivery)

    def _exposure_changed(self, account: str) -> None:
        coalescer = self._exposure
        if coalescer.is_scheduled(account):
            return  # the scheduled push reads the values at send time
        now = self._clock()
        if coalescer.schedule(account, now):
            self._exposure_wake.set()
        else:
            self._push_exposure(account, now)

    def _push_exposure(self, account: str, now_ms: int) -> None:
        data = self.risk.exposure_of(account)
        if self._exposure.record(account, data, now_ms):
            self.charts.exposure(data, now_ms)
            self._emit(Channel.EXPOSURE, data, account)

    def _on_evicted(self, member: _Member) -> None:
        self._evicted.append(member)
        if self._depth == 0:
            self._depth += 1
            self._leave()

    def _leave(self) -> None:
        """End a fan-out operation; at the outermost, handle evictions it caused.

        Evictions happen inside loops over the subscribers, so they are
        handled after those loops: removing the connection and publishing the
        ``SLOW_CONSUMER`` alert (which may evict more connections in turn).
        """
        try:
            if self._depth == 1:
                while self._evicted:
                    member = self._evicted.pop(0)
                    if self._members.get(member.conn_id) is not member:
                        continue
                    self._drop(member)
                    self.evictions += 1
                    now = self._clock()
                    alert = _eviction_alert(member, now)
                    log.warning("%s", alert["message"])
                    # About a connection: staff only, never a trader.
                    self.risk.note_alert(alert, now, for_traders=False)
                    self._emit(Channel.ALERTS, alert, STAFF_ONLY)
        finally:
            self._depth -= 1

    async def _exposure_timer(self) -> None:
        while True:
            await self._exposure_wake.wait()
            self._exposure_wake.clear()
            while True:
                try:
                    due = self.flush_exposure(self._clock())
                except Exception:
                    log.exception("exposure flush failed")
                    due = None
                if due is None:
                    break
                # Bounded by the window, so a clock step cannot stall pushes.
                wait_ms = min(max(due - self._clock(), 1), self.coalesce_ms)
                await asyncio.sleep(wait_ms / 1000)


async def _every(period_s: float, tick: Callable[[], None], what: str) -> None:
    """Call ``tick`` every ``period_s``, for ever; a failing tick is logged as ``what``."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        due += period_s
        delay = due - loop.time()
        if delay < 0:
            # Fell behind (a stalled loop): skip the missed ticks instead of
            # running them in a burst.
            due = loop.time()
            delay = 0
        await asyncio.sleep(delay)
        try:
            tick()
        except Exception:
            log.exception("%s failed", what)


def _may_see(member: _Member, audience: str) -> bool:
    """Whether ``member`` may see an event for ``audience`` (not None)."""
    if audience == STAFF_ONLY:
        return member.principal.role is not Role.TRADER
    return member.reads_every_account or member.principal.may_read_account(audience)


def _emergency_frame(
    member: _Member,
    seq: int,
    data: Mapping[str, Any],
    cache: dict[frozenset[str], bytes] | None = None,
) -> bytes:
    """The EMERGENCY push ``data`` as a trader sees it: its own accounts only."""
    principal = member.principal
    key = principal.accounts
    if cache is not None and key in cache:
        return cache[key]
    view = filter_emergency(cast(EmergencyView, data), principal.may_read_account)
    wire = encode_push(Channel.EMERGENCY.value, seq, view)
    if cache is not None:
        cache[key] = wire
    return wire


def _visible_alerts(
    alerts: Sequence[tuple[AlertView, bool]], member: _Member, history: int
) -> list[AlertView]:
    """The last ``history`` of ``alerts`` (``(alert, for_traders)``) that
    ``member`` may see, oldest first."""
    visible: list[AlertView] = []
    for alert, for_traders in reversed(alerts):
        audience = alert.get("account") if for_traders else STAFF_ONLY
        if audience is None or _may_see(member, audience):
            visible.append(alert)
            if len(visible) == history:
                break
    visible.reverse()
    return visible


def _exposure_snapshot(risk: RiskReader, member: _Member) -> dict[str, Any]:
    if member.reads_every_account:
        accounts = sorted(risk.accounts)
    else:
        # A trader's own accounts, also those with no position yet (gross 0).
        accounts = sorted(member.principal.accounts)
    return {
        "accounts": {account: risk.exposure_of(account) for account in accounts},
        "global": format_decimal(risk.global_exposure),
        "global_limit": format_decimal(risk.limits.max_exposure),
    }


def _eviction_alert(member: _Member, now_ms: int) -> AlertView:
    """The ``SLOW_CONSUMER`` alert about ``member``, just evicted."""
    outbox = member.outbox
    message = (
        f"connection {member.conn_id} ({member.principal.name}) "
        f"closed 4003 as a slow consumer: {outbox.eviction_queued_bytes} bytes queued, "
        f"limit {outbox.max_queued_bytes}, none taken for "
        f"{round(outbox.slow_consumer_s * 1000)} ms"
    )
    return {
        "level": AlertLevel.WARNING.value,
        "code": AlertCode.SLOW_CONSUMER.value,
        "message": message,
        "ts": format_time_ms(now_ms),
    }
