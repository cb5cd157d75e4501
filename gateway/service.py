"""``RiskService``: the one place that orders things around a decision.

The network shell hands it a typed request and the connection it came on; it
answers with an ``Outcome`` that says what to send and when. Everything about
ordering lives here and nowhere else:

- who may call what: the ``ACCESS`` table (role, account scope, and whether
  the method writes, so it is refused once persistence has failed);
- apply in the engine, hand its records to the store, then its events to the
  fan-out (commit then publish), so a push never describes a change the
  journal has not been handed;
- durable before the answer where the contract says so: an update is
  answered once its record is durable (``ReplyWhenDurable``); an emergency or
  limits change is staged, fsynced in every fsync mode, published, pushed to
  every subscriber that keeps up, and only then answered (``ReplyLater``);
  towards safety such a change is enforced at once, away from it only once
  durable (the engine's mode table decides which);
- what an answer waits for, and what may follow it (``Reply.after``: the
  audit record of a plain validation is written after its answer is on its
  way, off the client's round trip).

The engine decides (``gateway.core``); the store persists; the fan-out
delivers. The service never touches a socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any, Protocol

from gateway import metrics
from gateway.admin import AdminChanges
from gateway.auth import Principal, TokenStore
from gateway.cluster.member import ClusterMember
from gateway.cluster.shared import SharedStateError
from gateway.config import GatewayConfig
from gateway.core.engine import RiskEngine
from gateway.core.events import Decision, ModeChanged
from gateway.core.modes import GATEWAY_ACTOR
from gateway.fanout import Fanout, Subscriber
from gateway.persistence import PersistenceError, RecordStore
from protocol.codes import PROTOCOL_VERSION, AlertCode, AlertLevel, ErrorCode, Role
from protocol.errors import ProtocolError
from protocol.messages import (
    ClusterForget,
    ClusterGet,
    EmergencySet,
    HistoryGet,
    LimitsSet,
    OrderValidate,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
    Request,
    ReservationRelease,
    SessionAuth,
    SessionHello,
    StateGet,
    Subscribe,
    Unsubscribe,
)
from protocol.values import format_time_ms

log = logging.getLogger("gateway.service")

SERVER_NAME = "risk-gateway/0.1.0"

#: A wire document: what the codec encodes as a ``result``.
Result = Mapping[str, Any]


# ------------------------------------------------------------------ outcomes


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer ``result`` now; then call ``after`` (bookkeeping that must
    follow the answer in order but not delay it), if any."""

    result: Result
    after: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class ReplyWhenDurable:
    """Answer ``result`` once journal record ``seq`` is durable (per the
    fsync policy), or UNAVAILABLE if the journal fails first. Keep reading
    meanwhile: one fsync serves every answer waiting on it."""

    seq: int
    result: Result


@dataclass(frozen=True, slots=True)
class ReplyLater:
    """Answer with what ``result`` gives (an emergency or limits change: it
    waits for its fsync and for the fan-out). Keep reading meanwhile."""

    result: Awaitable[Result]


@dataclass(frozen=True, slots=True)
class Authenticated:
    """``session.auth`` succeeded: answer ``result``, then register the
    connection as ``principal`` (which pushes its emergency snapshot)."""

    principal: Principal
    result: Result


Outcome = Reply | ReplyWhenDurable | ReplyLater | Authenticated


class Caller(Subscriber, Protocol):
    """What the service needs to know about the connection a request came on."""

    conn_id: int
    peer: str
    principal: Principal | None
    cancel_on_disconnect: bool


# ------------------------------------------------------------- authorization


class Scope(Enum):
    """Which account a method's ``params.account`` must be open to the caller for."""

    NONE = "none"
    TRADE = "trade"  # the caller may trade params.account


ALL_ROLES = frozenset(Role)


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call a method: ``roles`` (else FORBIDDEN "may not call"),
    ``scope`` (else FORBIDDEN "may not trade account"), and whether it
    changes state (then UNAVAILABLE once persistence has failed)."""

    roles: frozenset[Role] = ALL_ROLES
    scope: Scope = Scope.NONE
    writes: bool = False


#: Method -> who may call it. ``state.get``, ``emergency.get`` and the
#: subscriptions are open to every role and scoped in what they show.
ACCESS: dict[str, Access] = {
    "session.auth": Access(),
    "session.hello": Access(),
    "ping": Access(),
    "order.validate": Access(scope=Scope.TRADE),  # writes only with reserve (see _validate)
    "position.update": Access(scope=Scope.TRADE, writes=True),
    "position.snapshot": Access(scope=Scope.TRADE, writes=True),
    "price.update": Access(roles=frozenset({Role.FEED, Role.ADMIN}), writes=True),
    "reservation.release": Access(roles=frozenset({Role.TRADER, Role.ADMIN}), writes=True),
    "emergency.get": Access(),
    "emergency.set": Access(roles=frozenset({Role.ADMIN}), writes=True),
    "limits.get": Access(),
    "limits.set": Access(roles=frozenset({Role.ADMIN}), writes=True),
    "state.get": Access(),
    "subscribe": Access(),
    "unsubscribe": Access(),
    "cluster.get": Access(),
    "cluster.forget": Access(roles=frozenset({Role.ADMIN})),
    "history.get": Access(),
}


def forbidden(principal: Principal, method: str) -> ProtocolError:
    return ProtocolError(
        ErrorCode.FORBIDDEN, f"{principal.name} ({principal.role.value}) may not call {method}"
    )


def unavailable_message(error: BaseException) -> str:
    return f"state cannot be made durable ({error}); the gateway has halted itself"


# ------------------------------------------------------------------- service


class RiskService:
    """Authorization, commit then publish, and durability ordering around a
    ``RiskEngine``. One per gateway; every call runs on the event loop."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokens: TokenStore,
        engine: RiskEngine,
        store: RecordStore,
        fanout: Fanout,
        clock: Callable[[], int],
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.engine = engine
        self.store = store
        self.fanout = fanout
        self.clock = clock
        self.epoch = clock()
        #: Emergency and limits changes (``gateway.admin``).
        self.admin = AdminChanges(
            engine=engine,
            store=store,
            fanout=fanout,
            clock=clock,
            commit=self.commit,
            publish=self.publish,
        )
        store.on_failure = self._persistence_failed(store.on_failure)
        # A staged emergency or limits change is pushed once published.
        store.on_published = self.publish

    @property
    def cluster(self) -> ClusterMember | None:
        """This gateway as a member of a cluster (section 10), once joined."""
        return self.admin.cluster

    @cluster.setter
    def cluster(self, member: ClusterMember | None) -> None:
        self.admin.cluster = member

    # ---------------------------------------------------------------- requests

    def handle(self, caller: Caller, request: Request, now_ms: int) -> Outcome:
        """Run one decoded request for ``caller``.

        Raises ``ProtocolError`` for a request refused as a whole (its code and
        message are the answer). Before authentication only ``session.auth``
        may be called; the shell answers anything else UNAUTHENTICATED before
        decoding it.
        """
        method = request.method
        access = ACCESS.get(method)
        if access is None:
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"unknown method {method}")
        principal = caller.principal
        if principal is None:
            if method != "session.auth":
                raise ProtocolError(
                    ErrorCode.UNAUTHENTICATED, "authenticate first with session.auth"
                )
            assert isinstance(request.params, SessionAuth)
            return self._authenticate(caller, request.params)
        self._authorize(principal, method, access, request.params)
        params = request.params
        member = self.cluster
        if member is not None:
            self._require_owned(member, params)
        if isinstance(params, OrderValidate):
            return self._validate(caller, params, now_ms)
        if isinstance(params, PositionUpdate | PositionSnapshot | PriceUpdate):
            return self._update(params, now_ms)
        if isinstance(params, ReservationRelease):
            return self._release(principal, params, now_ms)
        if isinstance(params, SessionHello):
            return self._hello(caller, principal, params, now_ms)
        if isinstance(params, EmergencySet):
            return ReplyLater(self.admin.set_emergency(params, principal.name))
        if isinstance(params, LimitsSet):
            return ReplyLater(self.admin.set_limits(params, principal.name))
        if isinstance(params, StateGet):
            return Reply(self._state(principal, params, now_ms))
        if isinstance(params, Subscribe):
            result = self.fanout.subscribe(caller, params)
            return Reply(result, after=lambda: self.fanout.deliver_subscription(caller))
        if isinstance(params, Unsubscribe):
            return Reply(self.fanout.unsubscribe(caller, params))
        if isinstance(params, ClusterGet | ClusterForget):
            return self._cluster(principal, params)
        if isinstance(params, HistoryGet):
            return Reply(
                self.fanout.charts.view(
                    now_ms,
                    readable=principal.readable,
                    decisions=principal.role is not Role.TRADER,
                )
            )
        if isinstance(params, SessionAuth):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this connection is already authenticated")
        if method == "ping":
            return Reply({"ts": format_time_ms(now_ms)})
        if method == "emergency.get":
            return Reply(self.engine.emergency_view(principal.readable))
        if method == "limits.get":
            return Reply(self.engine.limits_view())
        raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"unknown method {method}")

    def _authorize(self, principal: Principal, method: str, access: Access, params: object) -> None:
        if principal.role not in access.roles:
            raise forbidden(principal, method)
        if access.scope is Scope.TRADE:
            assert isinstance(params, OrderValidate | PositionUpdate | PositionSnapshot)
            account = params.account
            if not principal.may_trade_account(account):
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"{principal.name} ({principal.role.value}) may not trade account {account}",
                )
        if access.writes or (isinstance(params, OrderValidate) and params.reserve):
            self.require_writable()

    @staticmethod
    def _require_owned(member: ClusterMember, params: object) -> None:
        """WRONG_GATEWAY, naming the owner, for another member's account."""
        error = None
        account = getattr(params, "account", None)
        if isinstance(params, OrderValidate | PositionUpdate | PositionSnapshot | StateGet):
            if account is not None:
                error = member.directory.owner_error(account)
        elif isinstance(params, ReservationRelease):
            error = member.directory.reservation_owner_error(params.reservation_id)
        if error is not None:
            raise error

    def _cluster(self, principal: Principal, params: ClusterGet | ClusterForget) -> Outcome:
        member = self.cluster
        if member is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "this gateway is not a member of a cluster")
        if isinstance(params, ClusterForget):
            return ReplyLater(member.directory.forget(params.name))
        return Reply(member.directory.view(with_figures=principal.role is not Role.TRADER))

    def require_writable(self) -> None:
        """Raise UNAVAILABLE once persistence has failed (state changes refused)."""
        failed = self.store.failed
        if failed is not None:
            raise ProtocolError(ErrorCode.UNAVAILABLE, unavailable_message(failed))

    def _authenticate(self, caller: Caller, params: SessionAuth) -> Outcome:
        found = self.tokens.authenticate(params.token)
        if found is None:
            metrics.AUTH_FAILURES.labels(reason="bad_token").inc()
            log.warning("session.auth from %s: wrong token", caller.peer)
            raise ProtocolError(ErrorCode.UNAUTHENTICATED, "invalid token")
        return Authenticated(found, found.to_wire())

    def _validate(self, caller: Caller, params: OrderValidate, now_ms: int) -> Outcome:
        member = self.cluster
        if member is not None:
            member.check_fence()
            share = member.share
            if (
                share.unavailable is None
                and self.engine.gross_exposure + params.qty * params.price > share.allowance
            ):
                # Near the credit: only an order that does not fit waits for more.
                exposure_after = self.engine.sharing.exposure_after(params)
                if member.needs_credit(exposure_after):
                    assert exposure_after is not None
                    return ReplyLater(self._validate_with_credit(caller, params, exposure_after))
        return self._validate_now(caller, params, now_ms)

    async def _validate_with_credit(
        self, caller: Caller, params: OrderValidate, exposure_after: Decimal
    ) -> Result:
        """An order that does not fit this member's credit: borrow, then
        decide (the check itself is as synchronous as ever). The wait ends
        at the latest ``S`` after the member would fence itself: an order
        never waits on a Redis that stopped answering for longer than that."""
        member = self.cluster
        assert member is not None
        staleness_ms = member.config.max_staleness_ms
        wait_s = (max(member.fence.remaining_ms(), 0) + staleness_ms) / 1000
        try:
            async with asyncio.timeout(wait_s):
                await member.credit.borrow(exposure_after)
        except (SharedStateError, TimeoutError) as error:
            log.info(
                "credit for %s %s not borrowed: %s",
                params.account,
                params.symbol,
                error or f"no answer within {wait_s * 1000:.0f} ms",
            )
        outcome = self._validate_now(caller, params, self.clock())
        if isinstance(outcome, ReplyWhenDurable):
            await self.store.durable(outcome.seq)
            return outcome.result
        assert isinstance(outcome, Reply)
        if outcome.after is not None:
            outcome.after()
        return outcome.result

    def _validate_now(self, caller: Caller, params: OrderValidate, now_ms: int) -> Outcome:
        started = time.perf_counter()
        decision = self.engine.validate(
            params,
            now_ms,
            connection=caller.conn_id,
            cancel_on_disconnect=caller.cancel_on_disconnect,
        )
        took = time.perf_counter() - started
        result = decision.to_wire()
        if not params.reserve:
            # Nothing to wait for: the answer goes out first; the audit record,
            # the metrics and the decision push follow, off the client's round
            # trip. Records and pushes keep their order: the next request's
            # are queued after these.

            def bookkeeping() -> None:
                self._validated(caller, params, decision, took)

            return Reply(result, after=bookkeeping)
        seq = self._validated(caller, params, decision, took)
        if decision.reservation_id is not None:
            # A repeat of a client_order_id writes no record, but answers with
            # a reservation whose own record may not be durable yet: wait for
            # everything appended so far.
            seq = seq or self.store.last_seq
            if seq:
                return ReplyWhenDurable(seq, result)
        return Reply(result)

    def _validated(
        self, caller: Caller, params: OrderValidate, decision: Decision, took: float
    ) -> int:
        """After a validation: metrics, the journal record(s), the decision
        push. Returns the seq of the last record appended (0: none)."""
        metrics.VALIDATION_LATENCY.observe(took)
        metrics.count_validation(decision.decision, decision.reasons)
        if decision.reasons and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "connection %d: order.validate %s %s %s rejected: %s",
                caller.conn_id,
                params.account,
                params.symbol,
                params.side,
                ", ".join(reason["code"] for reason in decision.reasons),
            )
        return self.commit_and_publish()

    def _update(
        self, params: PositionUpdate | PositionSnapshot | PriceUpdate, now_ms: int
    ) -> Outcome:
        engine = self.engine
        result: Result
        if isinstance(params, PositionUpdate):
            result = engine.update_position(params, now_ms)
        elif isinstance(params, PositionSnapshot):
            result = engine.snapshot_positions(params, now_ms)
        else:
            result = engine.update_price(params, now_ms)
        outcome = self._after_write(result)
        if self.cluster is not None:
            self.cluster.after_update()
        return outcome

    def _release(self, principal: Principal, params: ReservationRelease, now_ms: int) -> Outcome:
        engine = self.engine
        reservation = engine.reservations.get(params.reservation_id)
        if reservation is not None and not principal.may_trade_account(reservation.account):
            # Answered as an unknown id: the caller learns nothing about
            # another account's reservations.
            return self._after_write({"released": False})
        released = engine.release_reservation(params.reservation_id, "released", now_ms)
        return self._after_write({"released": released is not None})

    def _after_write(self, result: Result) -> Outcome:
        seq = self.commit_and_publish()
        return ReplyWhenDurable(seq, result) if seq else Reply(result)

    def _hello(
        self, caller: Caller, principal: Principal, params: SessionHello, now_ms: int
    ) -> Outcome:
        caller.cancel_on_disconnect = params.cancel_on_disconnect
        result = {
            "protocol": PROTOCOL_VERSION,
            "server": SERVER_NAME,
            "epoch": self.epoch,
            **principal.to_wire(),
            "heartbeat_s": self.config.server.heartbeat_s,
            "emergency": self.engine.emergency_view(principal.readable),
        }
        # Also for the reservations this connection made before the hello.
        if self.engine.set_cancel_on_disconnect(
            caller.conn_id, params.cancel_on_disconnect, now_ms
        ):
            seq = self.commit()
            if seq:
                return ReplyWhenDurable(seq, result)
        return Reply(result)

    def _state(self, principal: Principal, params: StateGet, now_ms: int) -> Result:
        engine = self.engine
        self.expire(now_ms)
        if params.account is not None:
            if not principal.may_read_account(params.account):
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"{principal.name} may not read account {params.account}",
                )
            return engine.state_view([params.account], principal.readable)
        if not principal.reads_every_account:
            return engine.state_view(principal.accounts, principal.readable)
        return engine.state_view()

    # ------------------------------------------------ connections and time

    def connection_closed(self, caller: Caller, now_ms: int) -> None:
        """A connection went away: release its reservations when it asked for
        ``cancel_on_disconnect``, with an alert for staff."""
        principal = caller.principal
        if not (caller.cancel_on_disconnect and principal is not None):
            return
        released = self.engine.release_connection(caller.conn_id, now_ms)
        self.engine.raise_alert(
            AlertLevel.WARNING,
            AlertCode.CLIENT_DISCONNECTED,
            f"connection {caller.conn_id} of {principal.name} closed; "
            f"released {released} reservation(s)",
            now_ms=now_ms,
            for_traders=False,
        )
        self.commit_and_publish()

    def expire(self, now_ms: int) -> None:
        """Expire the reservations due by ``now_ms`` (also when no request comes)."""
        self.engine.expire_reservations(now_ms)
        self.commit_and_publish()

    # ------------------------------------------------------ commit, publish

    def commit(self) -> int:
        """Hand the engine's records to the store; the seq to wait on (0: none).

        Once persistence has failed nothing more can be written: the records
        are dropped (the gateway is halted and refuses writes), so the events
        that go with them are still published."""
        if self.store.failed is not None:
            self.engine.drain_records()
            return 0
        return self.store.commit()

    def commit_and_publish(self) -> int:
        seq = self.commit()
        self.publish()
        return seq

    def publish(self) -> None:
        """Hand the engine's events to the fan-out.

        An emergency change is among them only once its record is durable (the
        engine publishes staged changes then), so nothing is pushed about a
        change a crash could still undo.
        """
        events = self.engine.drain_events()
        if events:
            for event in events:
                if type(event) is ModeChanged and event.actor == GATEWAY_ACTOR:
                    view = event.view
                    log.warning(
                        "emergency change by %s: gateway %s (%s), version %d",
                        event.actor,
                        view["mode"],
                        view["reason"],
                        view["version"],
                    )
            self.fanout.publish(events)

    def _persistence_failed(
        self, then: Callable[[PersistenceError], None] | None
    ) -> Callable[[PersistenceError], None]:
        def failed(error: PersistenceError) -> None:
            # The halt and its alert go out at once, not with the next
            # request's events (that request's answer would come first).
            self.publish()
            if then is not None:
                then(error)

        return failed
