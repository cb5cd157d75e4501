"""A trading client of the risk gateway, end to end (docs/client.md).

Run it against a gateway with a trader token for account A1:

    RISKGW_URL=ws://127.0.0.1:8765/v1/ws RISKGW_TOKEN=<trader token> \\
        python -m clients.examples.client_example
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal

from clients import GatewayClient
from clients.client import GatewayError


async def main() -> None:
    url = os.environ.get("RISKGW_URL", "ws://127.0.0.1:8765/v1/ws")
    token = os.environ["RISKGW_TOKEN"]
    async with GatewayClient(url, token, subscribe=["exposure"]) as gw:
        print("mode", gw.emergency["mode"] if gw.emergency else None)

        # Positions are absolute: re-sending one after a lost answer is harmless.
        await gw.update_position("A1", "BTC-USD", "2", "50000")

        # Quantities and prices are strings or Decimal, never floats.
        decision = await gw.validate("A1", "BTC-USD", "buy", Decimal("0.5"), "50000")
        print("decision", decision["decision"], [r["code"] for r in decision["reasons"]])

        # A reservation holds the order's exposure until filled or released.
        held = await gw.validate(
            "A1", "BTC-USD", "buy", "1", "50000", reserve=True, client_order_id="ord-1"
        )
        print("reserved", held["decision"], held["reservation_id"] is not None)
        if held["reservation_id"]:
            print("released", await gw.release(held["reservation_id"]))

        # A rejection is a result; a refused request raises GatewayError.
        try:
            await gw.validate("Z9", "BTC-USD", "buy", "1", "50000")
        except GatewayError as error:
            print("error", error.code)

        # Pushes arrive in order; the first one of a channel is its snapshot.
        async with gw.pushes("exposure") as pushes:
            await gw.update_position("A1", "BTC-USD", "3", "50000")
            async for push in pushes:
                # A snapshot holds every account; an event, one account.
                if not push.snapshot and push.data["account"] == "A1":
                    print("exposure push", push.data["gross"])
                    break


if __name__ == "__main__":
    asyncio.run(main())
