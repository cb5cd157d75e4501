"""Write ``example.ndjson``: a deterministic replay file for ``riskctl replay``.

    python -m clients.examples.make_example [--out FILE] [--seed N]

About 3000 requests over accounts A1 and A2 and four symbols: position
updates, reference price updates and order validations, each with ``t``
(milliseconds since the start). The same seed always writes the same bytes.

It is built to give the same decisions on any gateway with the default limits
and a token that may trade A1 and A2 (the default ``trader`` token trades every
account), whatever that gateway held before and whatever the replay speed:

- it starts by setting the reference price of every symbol and the position of
  every account in every symbol (position updates are absolute);
- no ``seq`` (a sequence from an earlier run would look like a gap), no
  reservations (their expiry depends on time), and at most 500 validations per
  account, so the per-account rate limit (1000 a second) is never reached, not
  even by two runs back to back;
- positions stay small enough that gross exposure stays well under
  ``max_exposure``, so no breach puts the gateway into ``reducing``.

About one order in six is meant to be rejected: a price outside the 10 %
collar, a quantity over ``max_order_qty``, or a notional over
``max_order_notional`` (which also breaches the exposure limits).
"""

from __future__ import annotations

import argparse
import decimal
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

DEFAULT_OUT = Path(__file__).resolve().parent / "example.ndjson"
DEFAULT_SEED = 20261123
ACCOUNTS = ("A1", "A2")
# symbol: (base price, price step, max |position|, typical order qty, qty step)
SYMBOLS: dict[str, tuple[Decimal, Decimal, int, int, Decimal]] = {
    "BTC-USD": (Decimal("50000"), Decimal("0.5"), 3, 2, Decimal("0.01")),
    "ETH-USD": (Decimal("3000"), Decimal("0.05"), 30, 10, Decimal("0.1")),
    "SOL-USD": (Decimal("150"), Decimal("0.01"), 300, 50, Decimal("1")),
    "DOGE-USD": (Decimal("0.15"), Decimal("0.0001"), 300_000, 50_000, Decimal("100")),
}
VALIDATIONS_PER_ACCOUNT = 500
POSITION_UPDATES = 1700
PRICE_UPDATES = 288
# Reference prices stay within this fraction of their base (the collar is 0.10).
PRICE_BAND = Decimal("0.08")


def _text(value: Decimal) -> str:
    """Plain decimal digits, no exponent, no trailing zeros."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _round_to(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value() * step


class Market:
    """Reference prices that walk inside a band, and positions inside limits."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.prices = {symbol: spec[0] for symbol, spec in SYMBOLS.items()}
        self.positions = {(a, s): Decimal(0) for a in ACCOUNTS for s in SYMBOLS}

    def move_price(self, symbol: str) -> Decimal:
        base, step = SYMBOLS[symbol][0], SYMBOLS[symbol][1]
        drift = Decimal(self.rng.randint(-30, 30)) / Decimal(10_000)  # up to 0.3 %
        price = _round_to(self.prices[symbol] * (1 + drift), step)
        low, high = base * (1 - PRICE_BAND), base * (1 + PRICE_BAND)
        price = min(max(price, _round_to(low, step) + step), _round_to(high, step) - step)
        self.prices[symbol] = price
        return price

    def move_position(self, account: str, symbol: str) -> Decimal:
        _, _, limit, typical, step = SYMBOLS[symbol]
        units = int(typical / step)
        change = self.rng.randint(-units, units) * step
        qty = self.positions[(account, symbol)] + change
        qty = min(max(qty, Decimal(-limit)), Decimal(limit))
        self.positions[(account, symbol)] = qty
        return qty

    def order(self, account: str) -> dict[str, Any]:
        rng = self.rng
        symbol = rng.choice(list(SYMBOLS))
        _, step, _, typical, qty_step = SYMBOLS[symbol]
        ref = self.prices[symbol]
        side = rng.choice(("buy", "sell"))
        qty = rng.randint(1, int(typical / qty_step)) * qty_step
        offset = Decimal(rng.randint(-50, 50)) / Decimal(10_000)  # within 0.5 %
        price = _round_to(ref * (1 + offset), step)
        roll = rng.random()
        if roll < 0.08:
            # Outside the collar: 12 % to 20 % away from the reference price.
            away = Decimal(rng.randint(1200, 2000)) / Decimal(10_000)
            price = _round_to(ref * (1 + away if rng.random() < 0.5 else 1 - away), step)
        elif roll < 0.12:
            # Over max_order_qty (1000000), only reachable on the cheap symbol.
            symbol, price = "DOGE-USD", _round_to(self.prices["DOGE-USD"], Decimal("0.0001"))
            qty = Decimal(rng.randint(1_100_000, 1_500_000))
        elif roll < 0.16:
            # Over max_order_notional (1000000): 25 to 40 BTC.
            symbol, price = "BTC-USD", _round_to(self.prices["BTC-USD"], Decimal("0.5"))
            qty = Decimal(rng.randint(25, 40))
        return {
            "account": account,
            "symbol": symbol,
            "side": side,
            "qty": _text(qty),
            "price": _text(price),
        }


def generate(seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """The requests, in order, with ids 1.. and ``t`` in milliseconds."""
    # Exact whatever context the caller set: every value has few digits.
    with decimal.localcontext(decimal.Context(prec=50, traps=[decimal.Inexact])):
        return _generate(seed)


def _generate(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    market = Market(rng)
    requests: list[tuple[str, dict[str, Any]]] = []
    for symbol, price in market.prices.items():
        requests.append(("price.update", {"symbol": symbol, "price": _text(price)}))
    for account in ACCOUNTS:
        for symbol in SYMBOLS:
            price = market.prices[symbol]
            requests.append(
                (
                    "position.update",
                    {"account": account, "symbol": symbol, "qty": "0", "price": _text(price)},
                )
            )
    kinds = (
        ["validate:" + a for a in ACCOUNTS for _ in range(VALIDATIONS_PER_ACCOUNT)]
        + ["position"] * POSITION_UPDATES
        + ["price"] * PRICE_UPDATES
    )
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "price":
            symbol = rng.choice(list(SYMBOLS))
            price = market.move_price(symbol)
            requests.append(("price.update", {"symbol": symbol, "price": _text(price)}))
        elif kind == "position":
            account, symbol = rng.choice(ACCOUNTS), rng.choice(list(SYMBOLS))
            qty = market.move_position(account, symbol)
            params = {
                "account": account,
                "symbol": symbol,
                "qty": _text(qty),
                "price": _text(market.prices[symbol]),
            }
            requests.append(("position.update", params))
        else:
            requests.append(("order.validate", market.order(kind.split(":", 1)[1])))
    lines: list[dict[str, Any]] = []
    t = 0
    for rid, (method, params) in enumerate(requests, start=1):
        lines.append({"id": rid, "method": method, "params": params, "t": t})
        t += max(0, round(rng.expovariate(1 / 2)))  # about 2 ms apart on average
    return lines


def render(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="file to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args(argv)
    lines = generate(args.seed)
    args.out.write_bytes(render(lines))
    print(f"wrote {len(lines)} requests to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
