"""Accounts, their positions per symbol, and the exposure cache.

Exposure follows PROTOCOL.md section 6: for each account and symbol, with
position ``p``, mark price ``m`` and live reserved buy/sell quantities ``B``
and ``S``, the worst case ``w = max(|p + B|, |p - S|)`` and the symbol's gross
exposure ``w * m``. Totals per account and for the gateway are kept
incrementally (``Book.reprice``), so a validation costs the same with ten
positions or a hundred thousand; ``Book.recompute`` checks the cache.

Everything here runs inside the engine's exact decimal context.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, NamedTuple

from gateway.core.limits import Limits
from protocol.codes import AlertCode, AlertLevel
from protocol.values import ZERO
from protocol.values import format_decimal as fmt

_WARNING_FRACTION: Final = Decimal("0.8")


@dataclass(slots=True)
class SymbolBook:
    """One account's position in one symbol, with its live reservations."""

    qty: Decimal = ZERO  # p, signed
    mark: Decimal | None = None  # m: mark price from position updates
    reserved_buy: Decimal = ZERO  # B
    reserved_sell: Decimal = ZERO  # S
    exposure: Decimal = ZERO  # w * m, kept in step with the fields above
    position_exposure: Decimal = ZERO  # |p| * m
    reported: bool = False  # a position update or snapshot named this symbol
    reprice_due: bool = False  # replay changed qty/mark; exposure not yet brought in step

    def worst(self) -> Decimal:
        """``w = max(|p + B|, |p - S|)``."""
        long_side = abs(self.qty + self.reserved_buy)
        short_side = abs(self.qty - self.reserved_sell)
        return long_side if long_side >= short_side else short_side


@dataclass(slots=True)
class AccountBook:
    """One account: its symbols, totals, position sequence and rate window."""

    positions: dict[str, SymbolBook] = field(default_factory=dict)
    gross: Decimal = ZERO  # sum of SymbolBook.exposure
    reserved: Decimal = ZERO  # sum of exposure - position_exposure
    seq: int | None = None
    stale: bool = False
    recent_orders: deque[int] = field(default_factory=deque)
    reservations: int = 0  # live reservations
    warned: bool = False  # EXPOSURE_WARNING raised and not yet cleared
    breached: bool = False  # EXPOSURE_BREACH raised and not yet cleared
    # Named by a position or a reservation. A book opened only by validations
    # (for its rate window) is not shown in STATE.
    known: bool = False


class Crossing(NamedTuple):
    """An exposure threshold crossed: the alert to raise."""

    level: AlertLevel
    code: AlertCode
    message: str
    account: str | None


class Book:
    """Every account's book, the gateway's gross exposure and the reference prices."""

    __slots__ = (
        "_warning_levels",
        "accounts",
        "deferred",
        "elsewhere",
        "gateway_breached",
        "gateway_warned",
        "gross_exposure",
        "reference_prices",
    )

    def __init__(self) -> None:
        self.accounts: dict[str, AccountBook] = {}
        self.gross_exposure = ZERO
        #: What other engines sharing max_exposure last published (0: alone).
        self.elsewhere = ZERO
        self.reference_prices: dict[str, Decimal] = {}
        self.gateway_breached = False
        self.gateway_warned = False
        #: Symbols whose position a replay changed: repriced once when the
        #: replay ends rather than once per record (a position is updated many
        #: times). ``set_position(deferred=True)`` adds to it.
        self.deferred: list[tuple[AccountBook, SymbolBook]] = []
        # (limits, 80% of max_account_exposure, 80% of max_exposure), computed
        # on first use after each limits change.
        self._warning_levels: tuple[Limits | None, Decimal, Decimal] = (None, ZERO, ZERO)

    def account(self, name: str) -> AccountBook:
        """The book of ``name``, opened if it has none."""
        book = self.accounts.get(name)
        if book is None:
            book = self.accounts[name] = AccountBook()
        return book

    def reprice(self, book: AccountBook, sym: SymbolBook) -> None:
        """Bring the cached exposures of one symbol and its totals in step."""
        mark = sym.mark
        if mark is None:
            exposure = position_exposure = ZERO
        else:
            # SymbolBook.worst(), inlined: this runs for every record replayed.
            qty = sym.qty
            long_side = abs(qty + sym.reserved_buy)
            short_side = abs(qty - sym.reserved_sell)
            exposure = (long_side if long_side >= short_side else short_side) * mark
            position_exposure = abs(qty) * mark
        delta = exposure - sym.exposure
        if delta:
            book.gross += delta
            self.gross_exposure += delta
        reserved_delta = (exposure - position_exposure) - (sym.exposure - sym.position_exposure)
        if reserved_delta:
            book.reserved += reserved_delta
        sym.exposure = exposure
        sym.position_exposure = position_exposure

    def reprice_to_zero(self, book: AccountBook, sym: SymbolBook) -> None:
        sym.qty = ZERO
        sym.mark = None
        self.reprice(book, sym)

    def set_position(
        self, book: AccountBook, symbol: str, qty: Decimal, mark: Decimal, *, deferred: bool
    ) -> None:
        """Set an absolute position. ``deferred`` (a replay): the cached
        exposure is brought in step by ``reprice_deferred`` when it ends."""
        book.known = True
        sym = book.positions.get(symbol)
        if sym is None:
            sym = book.positions[symbol] = SymbolBook()
        sym.qty = qty
        sym.mark = mark
        sym.reported = True
        if not deferred:
            self.reprice(book, sym)
        elif not sym.reprice_due:
            # Exposure is a function of the final qty, mark and reservations;
            # the cached exposure and the totals stay consistent with each other
            # until reprice_deferred brings them in step.
            sym.reprice_due = True
            self.deferred.append((book, sym))

    def reprice_deferred(self) -> None:
        """Reprice every symbol a replay changed."""
        due, self.deferred = self.deferred, []
        for book, sym in due:
            sym.reprice_due = False
            self.reprice(book, sym)

    def forget_deferred(self) -> None:
        self.deferred = []

    def replace_positions(
        self, book: AccountBook, entries: Iterable[tuple[str, Decimal, Decimal]]
    ) -> None:
        """Every position of the account (a snapshot): symbols left out drop,
        unless reservations hold them (then their position is 0)."""
        book.known = True
        named = set()
        positions = book.positions
        reprice = self.reprice
        for symbol, qty, price in entries:
            named.add(symbol)
            sym = positions.get(symbol)
            if sym is None:
                sym = positions[symbol] = SymbolBook()
            sym.qty = qty
            sym.mark = price
            sym.reported = True
            reprice(book, sym)
        for symbol, sym in list(positions.items()):
            if symbol in named:
                continue
            if sym.reserved_buy or sym.reserved_sell:
                sym.qty = ZERO
                reprice(book, sym)
            else:
                self.reprice_to_zero(book, sym)
                del positions[symbol]
        book.stale = False

    def reserve(
        self, book: AccountBook, symbol: str, side: str, qty: Decimal, price: Decimal
    ) -> None:
        """Hold ``qty`` on ``side``; a symbol without a mark is valued at the
        reference price if one exists, else at the order's own price."""
        book.known = True
        sym = book.positions.get(symbol)
        if sym is None:
            sym = book.positions[symbol] = SymbolBook()
        if sym.mark is None:
            sym.mark = self.reference_prices.get(symbol, price)
        if side == "buy":
            sym.reserved_buy += qty
        else:
            sym.reserved_sell += qty
        self.reprice(book, sym)
        book.reservations += 1

    def unreserve(self, book: AccountBook, symbol: str, side: str, qty: Decimal) -> None:
        """Release what ``reserve`` held; a symbol only reservations held drops."""
        book.reservations -= 1
        sym = book.positions[symbol]
        if side == "buy":
            sym.reserved_buy -= qty
        else:
            sym.reserved_sell -= qty
        if not sym.reported and not sym.reserved_buy and not sym.reserved_sell:
            self.reprice_to_zero(book, sym)
            del book.positions[symbol]
        else:
            self.reprice(book, sym)

    def reserved_only(self, account: str, named: set[str]) -> int:
        """Symbols of ``account`` outside ``named`` that only live reservations hold."""
        book = self.accounts.get(account)
        if book is None or not book.reservations:
            return 0
        return sum(
            1
            for symbol, sym in book.positions.items()
            if symbol not in named and (sym.reserved_buy or sym.reserved_sell)
        )

    def recompute(self) -> tuple[Decimal, dict[str, Decimal]]:
        """Gross exposure from scratch (gateway, per account): a check on the cache."""
        per_account: dict[str, Decimal] = {}
        for name, book in self.accounts.items():
            total = ZERO
            for sym in book.positions.values():
                if sym.mark is not None:
                    total += sym.worst() * sym.mark
            per_account[name] = total
        return sum(per_account.values(), ZERO), per_account

    @property
    def global_gross(self) -> Decimal:
        """The gateway-wide gross exposure: this engine's, plus what other
        engines sharing the limit last published."""
        return self.gross_exposure + self.elsewhere

    def crossings(self, account: str | None, limits: Limits) -> list[Crossing]:
        """The EXPOSURE_WARNING / EXPOSURE_BREACH alerts due for ``account``
        (None: every account) and the gateway: each raised once on crossing,
        again only after exposure fell back below the threshold."""
        warning = self._warning_levels
        if warning[0] is not limits:
            warning = self._warning_levels = (
                limits,
                limits.max_account_exposure * _WARNING_FRACTION,
                limits.max_exposure * _WARNING_FRACTION,
            )
        found: list[Crossing] = []
        names: Iterable[str] = self.accounts if account is None else (account,)
        limit = limits.max_account_exposure
        for name in names:
            book = self.accounts[name]
            over = book.gross > limit
            near = book.gross >= warning[1]
            if over and not book.breached:
                found.append(
                    Crossing(
                        AlertLevel.CRITICAL,
                        AlertCode.EXPOSURE_BREACH,
                        f"account {name} gross exposure {fmt(book.gross)} over limit {fmt(limit)}",
                        name,
                    )
                )
            elif near and not over and not book.warned:
                found.append(
                    Crossing(
                        AlertLevel.WARNING,
                        AlertCode.EXPOSURE_WARNING,
                        f"account {name} gross exposure {fmt(book.gross)} is 80% or more of "
                        f"limit {fmt(limit)}",
                        name,
                    )
                )
            book.breached = over
            book.warned = near
        limit = limits.max_exposure
        gross = self.global_gross
        over = gross > limit
        near = gross >= warning[2]
        if over and not self.gateway_breached:
            found.append(
                Crossing(
                    AlertLevel.CRITICAL,
                    AlertCode.EXPOSURE_BREACH,
                    f"gateway gross exposure {fmt(gross)} over max_exposure {fmt(limit)}",
                    None,
                )
            )
        elif near and not over and not self.gateway_warned:
            found.append(
                Crossing(
                    AlertLevel.WARNING,
                    AlertCode.EXPOSURE_WARNING,
                    f"gateway gross exposure {fmt(gross)} is 80% or more of max_exposure "
                    f"{fmt(limit)}",
                    None,
                )
            )
        self.gateway_breached = over
        self.gateway_warned = near
        return found

    def snapshot_accounts(self) -> dict[str, Any]:
        """The accounts as a snapshot holds them (``load_accounts`` reads it)."""
        return {
            name: {
                "known": book.known,
                "seq": book.seq,
                "stale": book.stale,
                "positions": [
                    [symbol, sym.qty, sym.mark]
                    for symbol, sym in book.positions.items()
                    if sym.reported and sym.mark is not None
                ],
                # Symbols held only by reservations keep the mark they were
                # valued at, which the reference price may since have left.
                "marks": {
                    symbol: sym.mark
                    for symbol, sym in book.positions.items()
                    if not sym.reported and sym.mark is not None
                },
            }
            for name, book in self.accounts.items()
        }

    def load(self, accounts: Mapping[str, Any], prices: Mapping[str, Any]) -> None:
        """Replace every account and price with a snapshot's (``snapshot_accounts``)."""
        self.accounts = {}
        self.gross_exposure = ZERO
        for name, data in accounts.items():
            book = self.account(name)
            book.known = data.get("known", True)
            book.seq = data["seq"]
            book.stale = data["stale"]
            for symbol, qty, price in data["positions"]:
                sym = book.positions[symbol] = SymbolBook(
                    qty=Decimal(qty), mark=Decimal(price), reported=True
                )
                self.reprice(book, sym)
            for symbol, mark in data.get("marks", {}).items():
                book.positions[symbol] = SymbolBook(mark=Decimal(mark))
        self.reference_prices = {s: Decimal(p) for s, p in prices.items()}
