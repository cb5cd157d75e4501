"""Properties of ``RiskEngine`` under random sequences of requests.

A hypothesis state machine drives one engine, the time passed explicitly, through
position updates and snapshots, price updates, validations with and without
reservations, releases, disconnects, time passing (expiry), limit changes and
emergency changes, and checks after every step that:

- the cached gross exposure (gateway and per account) equals a recomputation;
- an accepted order never takes the gateway or its account over a limit (orders
  are priced at the symbol's mark, so the check's figures are the book's);
- replaying every journal record, or loading a snapshot, into a fresh engine
  reproduces ``state_view()`` exactly.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from gateway.core.engine import RiskEngine
from gateway.core.limits import Limits
from protocol.codes import ErrorCode, Mode
from protocol.errors import ProtocolError
from protocol.messages import (
    EmergencySet,
    OrderValidate,
    PositionEntry,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
)
from tests.builders import T0, Clock

ACCOUNTS = ("A", "B", "C")
SYMBOLS = ("X", "Y")
PRICES = tuple(Decimal(p) for p in ("1", "2", "5", "10", "0.5"))
POSITION_QTYS = tuple(Decimal(q) for q in ("-6", "-3", "-1.5", "0", "1", "2.5", "4", "9"))
ORDER_QTYS = tuple(Decimal(q) for q in ("0.5", "1", "2", "3", "7"))
INITIAL_LIMITS: dict[str, Any] = {
    "max_exposure": "100",
    "max_account_exposure": "60",
    "max_position": "8",
    # Orders are priced at the mark, which may differ from the reference price
    # another account's update set; a wide collar keeps those orders in play.
    "price_collar": "100",
    "reservation_ttl_ms": 1000,
}


def fresh_engine() -> RiskEngine:
    return RiskEngine(limits=Limits.from_mapping(INITIAL_LIMITS), now_ms=T0)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(T0)
        self.manager = RiskEngine(limits=Limits.from_mapping(INITIAL_LIMITS), now_ms=T0)
        self.records: list[dict[str, Any]] = []
        self.accepted = 0

    def _drain(self) -> None:
        self.records.extend(self.manager.drain_records())
        self.manager.drain_events()

    # ------------------------------------------------------------- facts

    @rule(
        account=st.sampled_from(ACCOUNTS),
        symbol=st.sampled_from(SYMBOLS),
        qty=st.sampled_from(POSITION_QTYS),
        price=st.sampled_from(PRICES),
        release=st.booleans(),
        data=st.data(),
    )
    def update_position(
        self,
        account: str,
        symbol: str,
        qty: Decimal,
        price: Decimal,
        release: bool,
        data: st.DataObject,
    ) -> None:
        rid = None
        # A fill may name only a live reservation of its own account and symbol.
        own = sorted(
            r.id
            for r in self.manager.reservations.values()
            if r.account == account and r.symbol == symbol
        )
        if release and own:
            rid = data.draw(st.sampled_from(own))
        result = self.manager.update_position(
            PositionUpdate(account=account, symbol=symbol, qty=qty, price=price, release=rid),
            self.clock.now,
        )
        assert result["exposure"] == self._state()["accounts"][account]["gross_exposure"]
        if rid is not None:
            assert rid not in self.manager.reservations
        self._drain()

    @rule(
        account=st.sampled_from(ACCOUNTS),
        entries=st.dictionaries(
            st.sampled_from(SYMBOLS),
            st.tuples(st.sampled_from(POSITION_QTYS), st.sampled_from(PRICES)),
            max_size=2,
        ),
    )
    def snapshot_positions(self, account: str, entries: dict[str, tuple[Decimal, Decimal]]) -> None:
        self.manager.snapshot_positions(
            PositionSnapshot(
                account=account,
                positions=tuple(
                    PositionEntry(symbol=s, qty=q, price=p) for s, (q, p) in entries.items()
                ),
            ),
            self.clock.now,
        )
        positions = self._state()["accounts"][account]["positions"]
        assert set(entries) <= set(positions)
        for symbol, (qty, price) in entries.items():
            assert Decimal(positions[symbol]["qty"]) == qty
            assert Decimal(positions[symbol]["price"]) == price
        self._drain()

    @rule(symbol=st.sampled_from(SYMBOLS), price=st.sampled_from(PRICES))
    def update_price(self, symbol: str, price: Decimal) -> None:
        self.manager.update_price(PriceUpdate(symbol=symbol, price=price), self.clock.now)
        self._drain()

    # -------------------------------------------------------- validations

    def _order_price(self, account: str, symbol: str, drawn: Decimal) -> Decimal:
        """The price the book will value this order at, so the check is exact."""
        book = self.manager.accounts.get(account)
        sym = None if book is None else book.positions.get(symbol)
        if sym is not None and sym.mark is not None:
            return sym.mark
        return self.manager.reference_prices.get(symbol, drawn)

    @rule(
        account=st.sampled_from(ACCOUNTS),
        symbol=st.sampled_from(SYMBOLS),
        side=st.sampled_from(("buy", "sell")),
        qty=st.sampled_from(ORDER_QTYS),
        drawn_price=st.sampled_from(PRICES),
        reserve=st.booleans(),
        client_order_id=st.none() | st.sampled_from(("c1", "c2")),
        connection=st.none() | st.sampled_from((1, 2)),
        cancel_on_disconnect=st.booleans(),
    )
    def validate(
        self,
        account: str,
        symbol: str,
        side: str,
        qty: Decimal,
        drawn_price: Decimal,
        reserve: bool,
        client_order_id: str | None,
        connection: int | None,
        cancel_on_disconnect: bool,
    ) -> None:
        m = self.manager
        now = self.clock.now
        m.expire_reservations(now)  # so "before" is what validate itself starts from
        self._drain()
        price = self._order_price(account, symbol, drawn_price)
        before = self._state()
        before_gw = m.gross_exposure
        book = m.accounts.get(account)
        before_acct = book.gross if book is not None else Decimal(0)
        sym = None if book is None else book.positions.get(symbol)
        p = sym.qty if sym is not None else Decimal(0)
        b = sym.reserved_buy if sym is not None else Decimal(0)
        s = sym.reserved_sell if sym is not None else Decimal(0)
        retry = None
        live = None
        if client_order_id is not None:
            live = next(
                (
                    r
                    for r in m.reservations.values()
                    if r.account == account and r.client_order_id == client_order_id
                ),
                None,
            )
        if live is not None:
            same = (live.symbol, live.side, live.qty, live.price) == (symbol, side, qty, price)
            if same and reserve:
                retry = live.id
        request = OrderValidate(
            account=account,
            symbol=symbol,
            side=side,  # type: ignore[arg-type]
            qty=qty,
            price=price,
            reserve=reserve,
            client_order_id=client_order_id,
        )
        if live is not None and retry is None:
            # Another order under a live client_order_id: refused, nothing changes.
            snapshot = m.snapshot()
            try:
                m.validate(request, now, connection=connection)
            except ProtocolError as exc:
                assert exc.code is ErrorCode.CONFLICT
            else:
                raise AssertionError("another order under a live client_order_id was answered")
            assert m.snapshot() == snapshot
            assert not m.drain_records()
            return
        decision = m.validate(
            request,
            now,
            connection=connection,
            cancel_on_disconnect=cancel_on_disconnect,
        )
        self._drain()
        after = self._state()
        after_gw = m.gross_exposure
        after_acct = m.accounts[account].gross
        assert decision.exposure["global"] == after["gross_exposure"]
        # An account known only from validations is not shown: its exposure is 0.
        shown = after["accounts"].get(account, {"gross_exposure": "0"})
        assert decision.exposure["account"] == shown["gross_exposure"]
        if retry is not None:
            # An idempotent retry: the same reservation, nothing new held.
            assert decision.reservation_id == retry
            assert after_gw == before_gw
            return
        if decision.decision != "accept":
            assert decision.reasons
            assert decision.reservation_id is None
            assert after_gw == before_gw
            return
        self.accepted += 1
        if not reserve:
            assert decision.reservation_id is None
            kept = {a: v for a, v in after["accounts"].items() if a in before["accounts"]}
            assert kept == before["accounts"]
            assert after["emergency"] == before["emergency"]
            assert after_gw == before_gw
            return
        assert decision.reservation_id in m.reservations
        limits = m.limits
        reduces = (p < 0 and qty + b <= -p) if side == "buy" else (p > 0 and qty + s <= p)
        if reduces:
            assert after_gw <= before_gw
            assert after_acct <= before_acct
        else:
            assert after_gw <= limits.max_exposure, (after_gw, limits.max_exposure)
            assert after_acct <= limits.max_account_exposure
            worst = m.accounts[account].positions[symbol].worst()
            assert worst <= limits.for_symbol(symbol).max_position
            assert m.mode_of(None) is Mode.NORMAL
            assert m.mode_of(account) is Mode.NORMAL

    # ----------------------------------------------------- reservations

    @rule(data=st.data(), bogus=st.booleans())
    def release(self, data: st.DataObject, bogus: bool) -> None:
        m = self.manager
        live = sorted(m.reservations)
        if bogus or not live:
            assert m.release_reservation("R-none", "released", self.clock.now) is None
        else:
            rid = data.draw(st.sampled_from(live))
            expires = m.reservations[rid].expires_ms
            released = m.release_reservation(rid, "released", self.clock.now)
            # Gone either way: released now, or expired just before.
            assert (released is not None) == (expires > self.clock.now)
            assert rid not in m.reservations
        self._drain()

    @rule(connection=st.sampled_from((1, 2)))
    def disconnect(self, connection: int) -> None:
        m = self.manager
        m.release_connection(connection, self.clock.now)
        assert not any(
            r.connection == connection and r.cancel_on_disconnect for r in m.reservations.values()
        )
        self._drain()

    @rule(ms=st.sampled_from((0, 1, 400, 999, 1000, 5000)))
    def advance_time(self, ms: int) -> None:
        self.clock.now += ms
        self.manager.expire_reservations(self.clock.now)
        assert all(r.expires_ms > self.clock.now for r in self.manager.reservations.values())
        self._drain()

    # --------------------------------------------------- limits, modes

    @rule(
        changes=st.fixed_dictionaries(
            {},
            optional={
                "max_exposure": st.sampled_from(("40", "100", "250")),
                "max_account_exposure": st.sampled_from(("25", "60", "150")),
                "max_position": st.sampled_from(("3", "8", "20")),
                "auto_reduce_on_breach": st.booleans(),
                "symbols": st.sampled_from(({}, {"X": {"max_position": "2"}}, {"X": {}})),
            },
        ),
        stale=st.booleans(),
    )
    def change_limits(self, changes: dict[str, Any], stale: bool) -> None:
        m = self.manager
        version = m.limits_version
        if stale:
            try:
                m.prepare_limits(version - 1, changes, "ops", self.clock.now)
            except ProtocolError as exc:
                assert exc.code is ErrorCode.CONFLICT
            else:
                raise AssertionError("a stale version must conflict")
            return
        mode_before = m.mode_of(None)
        rec = m.prepare_limits(version, changes, "ops", self.clock.now)
        if rec is not None:
            m.apply_record(rec)
            assert m.limits_version == version + 1
        # A limits change never loosens the emergency mode.
        assert m.mode_of(None) is mode_before
        self._drain()

    @rule(
        mode=st.sampled_from((Mode.NORMAL, Mode.NORMAL, Mode.REDUCING, Mode.HALTED)),
        account=st.none() | st.sampled_from(ACCOUNTS),
    )
    def set_emergency(self, mode: Mode, account: str | None) -> None:
        m = self.manager
        version = m.emergency_version
        changed = m.mode_of(account) is not mode
        view = m.set_emergency(
            EmergencySet(mode=mode, reason="" if mode is Mode.NORMAL else "r", account=account),
            "ops",
            self.clock.now,
        )
        assert view["version"] == version + (1 if changed else 0)
        assert m.mode_of(account) is mode
        self._drain()

    # ------------------------------------------------------- invariants

    def _state(self) -> dict[str, Any]:
        return self.manager.state_view()

    @invariant()
    def exposure_cache_equals_recompute(self) -> None:
        m = self.manager
        total, per_account = m.recompute_exposure()
        assert m.gross_exposure == total
        assert {a: b.gross for a, b in m.accounts.items()} == per_account
        reserved = {
            a: sum(
                (s.exposure - abs(s.qty) * s.mark for s in b.positions.values() if s.mark),
                Decimal(0),
            )
            for a, b in m.accounts.items()
        }
        assert {a: b.reserved for a, b in m.accounts.items()} == reserved

    @invariant()
    def replay_reproduces_state(self) -> None:
        replayed = fresh_engine()
        replayed.replay(self.records)
        assert replayed.state_view() == self._state()
        assert replayed.limits_view() == self.manager.limits_view()

    @invariant()
    def snapshot_reproduces_state(self) -> None:
        loaded = fresh_engine()
        loaded.load_snapshot(self.manager.snapshot())
        assert loaded.state_view() == self._state()
        assert loaded.gross_exposure == self.manager.gross_exposure


def test_engine_when_random_requests_then_exposure_limits_and_recovery_hold() -> None:
    run_state_machine_as_test(
        ManagerMachine,
        settings=settings(
            max_examples=200,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
