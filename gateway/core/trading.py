"""Trading requests: validations, positions, prices and reservations.

Each request is checked first (caps, ``release`` naming a live reservation,
a ``client_order_id`` repeated for another order): a refused request raises
``ProtocolError`` and changes nothing. Then it becomes its journal record,
applied by ``RiskState`` like a recovered one. ``RiskEngine`` exposes these
methods.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Literal

from gateway.core.book import AccountBook
from gateway.core.events import Decision, DecisionMade
from gateway.core.records import (
    CancelOnDisconnectRecord,
    DecisionRecord,
    PositionRecord,
    PositionSnapshotRecord,
    PriceRecord,
    release_record,
)
from gateway.core.reservations import Reservation, require_same_order
from gateway.core.rules import OrderCheck, Rule
from gateway.core.state import RiskState
from gateway.core.views import (
    DecisionPush,
    DecisionView,
    ExposureSummary,
    PositionResult,
    PositionsResult,
    PriceResult,
    ReasonView,
    positions_view,
)
from protocol.codes import Mode
from protocol.errors import ProtocolError, bad_request
from protocol.messages import OrderValidate, PositionSnapshot, PositionUpdate, PriceUpdate
from protocol.values import ZERO, format_time_ms
from protocol.values import format_decimal as fmt


class Trading:
    """Validations, positions and reservations over one ``RiskState``."""

    __slots__ = ("_max_reservations", "_max_symbols", "_new_reservation_id", "_rules", "_state")

    def __init__(
        self,
        state: RiskState,
        rules: tuple[Rule, ...],
        reservation_ids: Callable[[], str],
        max_symbols: int | None,
        max_reservations: int | None,
    ) -> None:
        self._state = state
        self._rules = rules
        self._new_reservation_id = reservation_ids
        self._max_symbols = max_symbols
        self._max_reservations = max_reservations

    # ------------------------------------------------------------- positions

    def update_position(self, u: PositionUpdate, now_ms: int) -> PositionResult:
        """``position.update``: set the absolute position. Never rejected for risk.

        Raises ``ProtocolError(BAD_REQUEST)`` when ``release`` does not name a
        live reservation of the same account and symbol (unknown, expired,
        another symbol's or another account's: one wording for all, so it
        tells nothing about other accounts), or naming the cap when the
        account would hold too many symbols; nothing changes then.
        """
        self.expire_due(now_ms)
        state = self._state
        if u.release is not None:
            res = state.reservations.live.get(u.release)
            if res is None or res.account != u.account or res.symbol != u.symbol:
                raise bad_request(
                    f"params.release {u.release} is not a live reservation of account "
                    f"{u.account} in {u.symbol}"
                )
        cap = self._max_symbols
        if cap is not None:
            book = state.book.accounts.get(u.account)
            if book is not None and u.symbol not in book.positions and len(book.positions) >= cap:
                raise _too_many_symbols(u.account, cap, u.symbol)
        rec: PositionRecord = {
            "t": "pos",
            "a": u.account,
            "s": u.symbol,
            "q": fmt(u.qty),
            "p": fmt(u.price),
            "ts": now_ms,
        }
        if u.seq is not None:
            rec["seq"] = u.seq
        if u.release is not None:
            rec["rel"] = u.release
        state.apply_position(rec, u.qty, u.price)
        result: PositionResult = {
            "account": u.account,
            "symbol": u.symbol,
            "qty": rec["q"],
            "price": rec["p"],
            "exposure": fmt(state.book.accounts[u.account].gross),
        }
        if u.release is not None:
            result["released"] = True
        state.check_thresholds(u.account, now_ms, allow_auto_reduce=True)
        return result

    def snapshot_positions(self, s: PositionSnapshot, now_ms: int) -> PositionsResult:
        """``position.snapshot``: replace every position of the account, clear stale.

        Raises ``ProtocolError(BAD_REQUEST)`` naming the cap when the account
        would hold more than ``max_symbols_per_account`` symbols (those named
        and those its live reservations hold); nothing changes then.
        """
        self.expire_due(now_ms)
        state = self._state
        cap = self._max_symbols
        if cap is not None and len(s.positions) > cap - state.book.reserved_only(
            s.account, {e.symbol for e in s.positions}
        ):
            raise bad_request(
                f"params.positions would give account {s.account} positions or reservations "
                f"in more than {cap} symbols, the limit (server.max_symbols_per_account)"
            )
        entries = [(e.symbol, e.qty, e.price) for e in s.positions]
        wire = [[symbol, fmt(qty), fmt(price)] for symbol, qty, price in entries]
        rec: PositionSnapshotRecord = {"t": "psnap", "a": s.account, "pos": wire, "ts": now_ms}
        if s.seq is not None:
            rec["seq"] = s.seq
        state.apply_position_snapshot(rec, entries)
        state.check_thresholds(s.account, now_ms, allow_auto_reduce=True)
        return positions_view(s.account, wire, fmt(state.book.accounts[s.account].gross))

    def update_price(self, u: PriceUpdate, now_ms: int) -> PriceResult:
        """``price.update``: the reference price of a symbol, used by the price collar."""
        rec: PriceRecord = {"t": "px", "s": u.symbol, "p": fmt(u.price), "ts": now_ms}
        self._state.book.reference_prices[u.symbol] = u.price
        self._state.record(rec)
        return {"symbol": u.symbol, "price": rec["p"]}

    # ---------------------------------------------------------- reservations

    def release_reservation(self, reservation_id: str, why: str, now_ms: int) -> Reservation | None:
        """Free a live reservation (``why``: the record's reason, e.g.
        ``released``); ``None`` if it does not exist (or already expired)."""
        self.expire_due(now_ms)
        res = self._state.reservations.live.get(reservation_id)
        if res is None:
            return None
        self._state.apply(release_record(reservation_id, why, now_ms))
        return res

    def set_cancel_on_disconnect(self, connection: int, enabled: bool, now_ms: int) -> int:
        """``session.hello``'s ``cancel_on_disconnect`` for a live connection: it
        applies to every reservation the connection made, before the hello too
        (journaled, so recovery releases them as well). Returns how many
        reservations changed."""
        ids = [
            r.id
            for r in self._state.reservations.live.values()
            if r.connection == connection and r.cancel_on_disconnect is not enabled
        ]
        if ids:
            rec: CancelOnDisconnectRecord = {"t": "cod", "ids": ids, "on": enabled, "ts": now_ms}
            self._state.apply(rec)
        return len(ids)

    def release_connection(self, connection: int, now_ms: int) -> int:
        """Release every reservation a closed connection made with
        cancel_on_disconnect; returns how many."""
        live = self._state.reservations.live
        return self._release(
            [r.id for r in live.values() if r.connection == connection and r.cancel_on_disconnect],
            now_ms,
        )

    def release_orphaned(self, now_ms: int) -> int:
        """After a restart, reservations made with cancel_on_disconnect have lost
        their connection: release them, as a disconnect would have."""
        live = self._state.reservations.live
        return self._release([r.id for r in live.values() if r.cancel_on_disconnect], now_ms)

    def _release(self, ids: list[str], now_ms: int) -> int:
        for rid in ids:
            self._state.apply(release_record(rid, "disconnect", now_ms))
        return len(ids)

    def expire_due(self, now_ms: int) -> None:
        """Release every reservation whose time is up (O(1) when none is)."""
        state = self._state
        heap = state.reservations.expiry
        if heap and heap[0][0] <= now_ms:
            for rid in state.reservations.due(now_ms):
                state.apply(release_record(rid, "expired", now_ms))

    def _check_reservation_caps(self, book: AccountBook, order: OrderValidate) -> None:
        """``BAD_REQUEST`` naming the cap when reserving would pass
        ``max_reservations_per_account`` or ``max_symbols_per_account``."""
        cap = self._max_reservations
        if cap is not None and book.reservations >= cap:
            raise bad_request(
                f"account {order.account} holds {book.reservations} live reservations, the "
                "limit (server.max_reservations_per_account); release some or wait for "
                "them to expire"
            )
        cap = self._max_symbols
        if cap is not None and order.symbol not in book.positions and len(book.positions) >= cap:
            raise _too_many_symbols(order.account, cap, order.symbol)

    # ------------------------------------------------------------ validation

    def validate(
        self,
        order: OrderValidate,
        now_ms: int,
        connection: int | None,
        cancel_on_disconnect: bool,
    ) -> Decision:
        """``order.validate``: the decision. Check and reservation are one step.

        ``connection`` owns the reservation (``release_connection``). Raises
        ``ProtocolError``: ``CONFLICT`` for another order under a live
        ``client_order_id``, ``BAD_REQUEST`` past a cap; nothing changes then.
        A repeat of a live reservation's order answers its decision again.
        """
        state = self._state
        reservations = state.reservations
        heap = reservations.expiry
        if heap and heap[0][0] <= now_ms:
            self.expire_due(now_ms)
        account = order.account
        if order.client_order_id is not None:
            rid = reservations.by_client_order.get((account, order.client_order_id))
            if rid is not None:
                live = reservations.live[rid]
                require_same_order(live, order)
                return live.decision.with_exposure(
                    self._exposure_summary(state.book.accounts[account])
                )
        ledger = state.book
        book = ledger.accounts.get(account)
        if book is None:
            book = ledger.account(account)
        elif order.reserve:
            # Before anything changes (a new account holds nothing: no cap to pass).
            self._check_reservation_caps(book, order)
        recent = book.recent_orders
        recent.append(now_ms)
        horizon = now_ms - 1000
        while recent[0] <= horizon:
            recent.popleft()
        sym = book.positions.get(order.symbol)
        reference = ledger.reference_prices.get(order.symbol)
        if sym is None:
            p = b = s = worst_now = ZERO
        else:
            p, b, s = sym.qty, sym.reserved_buy, sym.reserved_sell
            worst_now = sym.worst()
            if reference is None and sym.reported:
                # No feed price yet: the account's own mark is its reference
                # (and never another account's).
                reference = sym.mark
        qty = order.qty
        if order.side == "buy":
            long_side = abs(p + b + qty)
            short_side = abs(p - s)
            reduces = p < 0 and qty + b <= -p
        else:
            long_side = abs(p + b)
            short_side = abs(p - s - qty)
            reduces = p > 0 and qty + s <= p
        worst_after = long_side if long_side >= short_side else short_side
        delta = (worst_after - worst_now) * order.price
        limits = state.in_force.limits
        modes = state.modes
        check = OrderCheck(
            account=account,
            symbol=order.symbol,
            side=order.side,
            qty=qty,
            price=order.price,
            position=p,
            reserved_buy=b,
            reserved_sell=s,
            worst_after=worst_after,
            account_exposure_after=book.gross + delta,
            gateway_exposure_after=ledger.gross_exposure + delta,
            reduces=reduces,
            gateway_mode=modes.enforced_gateway,
            account_mode=modes.enforced_accounts.get(account, Mode.NORMAL),
            limits=limits,
            symbol_limits=limits.for_symbol(order.symbol),
            reference_price=reference,
            orders_last_second=len(recent),
            stale=book.stale,
            share=state.share,
        )
        reasons: list[ReasonView] = []
        for rule in self._rules:
            failed = rule(check)
            if failed is not None:
                reasons.append({"code": str(failed[0]), "message": failed[1]})
        verdict: Literal["accept", "reject"] = "reject" if reasons else "accept"
        rec: DecisionRecord = {
            "t": "dec",
            "a": account,
            "s": order.symbol,
            "side": order.side,
            "q": fmt(qty),
            "p": fmt(order.price),
            "d": verdict,
            "r": [r["code"] for r in reasons] if reasons else [],
            "ts": now_ms,
            "ev": modes.version,
            "lv": state.in_force.version,
        }
        if reasons:
            rec["m"] = [r["message"] for r in reasons]
        reservation_id: str | None = None
        expires_at: str | None = None
        if order.reserve:
            rec["reserve"] = True
            if order.client_order_id is not None:
                rec["coid"] = order.client_order_id
            if not reasons:
                reservation_id = self._new_reservation_id()
                while reservation_id in reservations.live:  # pragma: no cover - 2**-64
                    reservation_id = self._new_reservation_id()
                expires_ms = now_ms + limits.reservation_ttl_ms
                expires_at = format_time_ms(expires_ms)
                rec["rid"] = reservation_id
                rec["exp"] = expires_ms
                if cancel_on_disconnect:
                    rec["cod"] = True
        wire: DecisionView = {
            "decision": verdict,
            "reasons": reasons,
            "reservation_id": reservation_id,
            "expires_at": expires_at,
            "exposure": None,
            "emergency_version": modes.version,
            "limits_version": state.in_force.version,
        }
        if reservation_id is not None:
            # A copy before the figures are filled in: a retry answers the
            # decision again with the exposure of then.
            state.apply_decision(rec, Decision(wire.copy()), connection)
            # A reservation valued at its mark can cross 80% of a limit too.
            state.check_thresholds(account, now_ms, allow_auto_reduce=False)
        else:
            state.record(rec)
        wire["exposure"] = summary = self._exposure_summary(book)
        # Not yet encoded (that is the commit's): the record carries the
        # figures answered, so the decisions history comes back exactly.
        # (The limits are the ones of version ``lv``: replay has them.)
        rec["x"] = [summary["account"], summary["global"]]
        if not state.replaying:
            push: DecisionPush = {
                **wire,
                "account": account,
                "symbol": order.symbol,
                "side": order.side,
                "qty": rec["q"],
                "price": rec["p"],
                "ts": format_time_ms(now_ms),
            }
            state.history.add_decision(push)
            state.events.append(DecisionMade(push))
        return Decision(wire)

    def exposure_after(self, order: OrderValidate) -> Decimal | None:
        """This engine's gross exposure if ``order`` were accepted (its worst
        side valued at its price, as ``validate`` counts it), or None when
        it strictly reduces (no exposure limit applies to it). Changes nothing."""
        state = self._state
        ledger = state.book
        book = ledger.accounts.get(order.account)
        sym = None if book is None else book.positions.get(order.symbol)
        if sym is None:
            p = b = s = worst_now = ZERO
        else:
            p, b, s = sym.qty, sym.reserved_buy, sym.reserved_sell
            worst_now = sym.worst()
        qty = order.qty
        if order.side == "buy":
            long_side, short_side = abs(p + b + qty), abs(p - s)
            reduces = p < 0 and qty + b <= -p
        else:
            long_side, short_side = abs(p + b), abs(p - s - qty)
            reduces = p > 0 and qty + s <= p
        if reduces:
            return None
        worst_after = long_side if long_side >= short_side else short_side
        return ledger.gross_exposure + (worst_after - worst_now) * order.price

    def _exposure_summary(self, book: AccountBook) -> ExposureSummary:
        texts = self._state.in_force.texts
        return {
            "account": fmt(book.gross),
            "account_limit": texts[0],
            "global": fmt(self._state.book.global_gross),
            "global_limit": texts[1],
        }


def _too_many_symbols(account: str, cap: int, symbol: str) -> ProtocolError:
    return bad_request(
        f"account {account} holds positions or reservations in {cap} symbols, "
        f"the limit (server.max_symbols_per_account); params.symbol {symbol} "
        "would be one more"
    )
