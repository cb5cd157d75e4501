"""RiskService without a socket: an in-memory store, a fan-out with no
subscriber, a connection reduced to what the service reads of it.

What is checked here is the order of things around a decision, which the
end-to-end tests see only through timing: who is refused before anything
changes, what an answer waits for, and what follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.auth import Principal, TokenStore
from gateway.config import GatewayConfig, PersistenceConfig, ServerConfig
from gateway.fanout import Fanout
from gateway.persistence import MemoryStore
from gateway.service import (
    Authenticated,
    Outcome,
    Reply,
    ReplyLater,
    ReplyWhenDurable,
    RiskService,
)
from protocol import codec
from protocol.codes import Channel, ErrorCode, Mode
from protocol.errors import ProtocolError
from tests.builders import Clock, engine
from tests.conftest import ADMIN, FEED, TRADER, VIEWER, token_configs


@dataclass(eq=False)
class Caller:
    conn_id: int
    peer: str
    principal: Principal | None
    cancel_on_disconnect: bool = False
    outbox: Any = None


@dataclass
class World:
    service: RiskService
    fanout: Fanout
    clock: Clock
    tokens: TokenStore

    def caller(self, token: str | None) -> Caller:
        principal = None if token is None else self.tokens.authenticate(token)
        return Caller(conn_id=1, peer="127.0.0.1", principal=principal)

    def handle(self, caller: Caller, method: str, params: dict[str, Any] | None = None) -> Outcome:
        frame = {"id": 1, "method": method, **({"params": params} if params else {})}
        return self.service.handle(caller, codec.decode(orjson.dumps(frame)), self.clock())

    def refused(
        self, caller: Caller, method: str, params: dict[str, Any] | None = None
    ) -> ProtocolError:
        with pytest.raises(ProtocolError) as info:
            self.handle(caller, method, params)
        return info.value


@pytest.fixture
def world(tmp_path: Path) -> World:
    clock = Clock()
    config = GatewayConfig(
        server=ServerConfig(host="127.0.0.1", port=0),
        persistence=PersistenceConfig(state_dir=tmp_path),
        tokens=token_configs(),
    )
    risk = engine({"max_exposure": "1000"}, now_ms=clock())
    fanout = Fanout(risk, heartbeat_s=60, clock=clock)
    tokens = TokenStore(config.tokens)
    service = RiskService(
        config, tokens=tokens, engine=risk, store=MemoryStore(risk), fanout=fanout, clock=clock
    )
    return World(service, fanout, clock, tokens)


UPDATE = {"account": "A1", "symbol": "X", "qty": "2", "price": "100"}
ORDER = {"account": "A1", "symbol": "X", "side": "buy", "qty": "1", "price": "100"}


def test_viewer_position_update_when_refused_then_nothing_changed(world: World) -> None:
    error = world.refused(world.caller(VIEWER), "position.update", UPDATE)
    assert error.code is ErrorCode.FORBIDDEN
    assert error.message == "viewer (viewer) may not trade account A1"
    assert world.service.engine.accounts == {}


def test_prices_when_set_by_role_then_only_feed_and_admin(world: World) -> None:
    price = {"symbol": "X", "price": "100"}
    error = world.refused(world.caller(TRADER), "price.update", price)
    assert (error.code, error.message) == (
        ErrorCode.FORBIDDEN,
        "desk-1 (trader) may not call price.update",
    )
    for token in (FEED, ADMIN):
        assert isinstance(world.handle(world.caller(token), "price.update", price), Reply)


def test_plain_validation_when_answered_then_its_push_follows_the_answer(world: World) -> None:
    outcome = world.handle(world.caller(TRADER), "order.validate", ORDER)
    assert isinstance(outcome, Reply)
    assert outcome.result["decision"] == "accept"
    # The decision is pushed by the bookkeeping that follows the answer.
    assert world.fanout.seq(Channel.DECISIONS) == 0
    assert outcome.after is not None
    outcome.after()
    assert world.fanout.seq(Channel.DECISIONS) == 1


def test_reserving_validation_when_store_keeps_nothing_then_answered_at_once(world: World) -> None:
    outcome = world.handle(world.caller(TRADER), "order.validate", {**ORDER, "reserve": True})
    # An in-memory store has nothing to wait for: no ReplyWhenDurable.
    assert isinstance(outcome, Reply) and not isinstance(outcome, ReplyWhenDurable)
    assert str(outcome.result["reservation_id"]).startswith("R")
    assert world.fanout.seq(Channel.DECISIONS) == 1


async def test_emergency_set_when_answered_then_applied_and_pushed_first(world: World) -> None:
    params = {"mode": "halted", "reason": "drill"}
    outcome = world.handle(world.caller(ADMIN), "emergency.set", params)
    assert isinstance(outcome, ReplyLater)
    view = await outcome.result
    assert view["mode"] == "halted"
    assert world.service.engine.gateway_mode.mode is Mode.HALTED
    assert world.fanout.seq(Channel.EMERGENCY) == 1
    error = world.refused(world.caller(TRADER), "emergency.set", params)
    assert error.message == "desk-1 (trader) may not call emergency.set"


def test_unauthenticated_when_calling_then_only_session_auth(world: World) -> None:
    anonymous = world.caller(None)
    assert world.refused(anonymous, "ping").code is ErrorCode.UNAUTHENTICATED
    assert world.refused(anonymous, "session.auth", {"token": "nope"}).code is (
        ErrorCode.UNAUTHENTICATED
    )
    outcome = world.handle(anonymous, "session.auth", {"token": TRADER})
    assert isinstance(outcome, Authenticated)
    assert outcome.principal.name == "desk-1"
    # The service does not register the connection itself: the shell does,
    # after the answer (then the emergency snapshot is pushed).
    assert anonymous.principal is None
