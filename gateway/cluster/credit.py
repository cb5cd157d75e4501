"""The member's credit: its share of the cluster's ``max_exposure``.

Orders are checked against the credit in the engine's synchronous step
(``LimitShare.allowance``), so the hot path never waits for the shared
state. Only an order that does not fit waits for ``borrow`` (one round trip);
in the background ``keep`` holds the headroom between ``credit_low`` and
``credit_high`` and gives the excess back.

Journaling order (protocol section 10), so that a crash always leaves the
shared state counting at least what the member uses:

- a larger credit is used, and journaled (a ``crd`` record), only after the
  shared state granted it; the records of what it pays for follow it in the
  journal, so they are never durable without it;
- a smaller credit is used at once, journaled, made durable, and only then
  is the shared state told;
- after a restart the member re-asserts its journaled credit.

The arithmetic (units, plans, sequences) is ``gateway.cluster.ledger``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Protocol

from gateway.cluster.ledger import CreditLedger, CreditRecord, CreditRequest
from gateway.cluster.shared import CreditAnswer, SharedState, SharedStateUnavailable
from gateway.core.engine import RiskEngine
from gateway.core.share import LimitShare

log = logging.getLogger("gateway.cluster")

#: How often the headroom is looked at when nothing wakes the keeper.
KEEP_PERIOD_S = 0.1


class Journal(Protocol):
    """What the keeper needs of the service: the engine, commit, durability."""

    engine: RiskEngine

    def commit(self) -> int: ...

    async def synced(self, seq: int) -> None: ...


class CreditKeeper:
    """Borrows, refills, gives back and re-asserts this member's credit."""

    def __init__(
        self,
        name: str,
        shared: SharedState,
        ledger: CreditLedger,
        journal: Journal,
        share: LimitShare,
        on_answer: Callable[[CreditAnswer], None],
    ) -> None:
        self.name = name
        self.shared = shared
        self.ledger = ledger
        self.journal = journal
        self.share = share
        self._on_answer = on_answer
        #: One credit request in flight at a time: sequences stay in order.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    # ----------------------------------------------------------- reading

    @property
    def credit(self) -> Decimal:
        return self.ledger.credit

    def wake(self) -> None:
        """Look at the headroom now (an order came near the credit)."""
        self._wake.set()

    # ---------------------------------------------------------- requests

    async def borrow(self, exposure_after: Decimal) -> None:
        """Ask for enough credit that ``exposure_after`` fits (plus headroom).
        Returns when answered; raises ``SharedStateUnavailable``."""
        async with self._lock:
            request = self.ledger.plan_borrow(exposure_after)
            if request is None:
                return
            await self._increase(request)

    async def reassert(self) -> None:
        """After a restart or a data loss of the shared state: tell it the
        credit this member's journal holds."""
        async with self._lock:
            request = self.ledger.reassert()
            answer = await self.shared.credit(self.name, request.seq, request.units, request.kind)
            self._answered(request, answer)

    async def keep(self) -> None:
        """Hold the headroom between credit_low and credit_high, forever."""
        while True:
            try:
                async with asyncio.timeout(KEEP_PERIOD_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.adjust()
            except SharedStateUnavailable as error:
                log.debug("credit not adjusted: %s", error)

    async def adjust(self) -> None:
        """One look at the headroom: refill below credit_low, give back above
        credit_high."""
        async with self._lock:
            exposure = self.journal.engine.gross_exposure
            request = self.ledger.plan_refill(exposure)
            if request is not None:
                await self._increase(request)
                return
            request = self.ledger.plan_give_back(exposure)
            if request is not None:
                await self._decrease(request)

    async def _increase(self, request: CreditRequest) -> None:
        answer = await self.shared.credit(self.name, request.seq, request.units, request.kind)
        self._answered(request, answer)

    async def _decrease(self, request: CreditRequest) -> None:
        record = self.ledger.begin_decrease(request)
        self._sync_share()
        seq = self._journal(record)
        await self.journal.synced(seq)
        answer = await self.shared.credit(self.name, request.seq, request.units, request.kind)
        self._answered(request, answer)

    def _answered(self, request: CreditRequest, answer: CreditAnswer) -> None:
        record = self.ledger.answered(request, answer)
        if record is not None:
            self._journal(record)
        self._sync_share()
        self._on_answer(answer)

    def _journal(self, record: CreditRecord) -> int:
        self.journal.engine.sharing.record_credit(record["u"], record["seq"])
        return self.journal.commit()

    def _sync_share(self) -> None:
        self.share.allowance = self.ledger.credit
