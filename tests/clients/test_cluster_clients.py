"""The clients against a cluster: ``GatewayClient`` routing each account to its
owner, ``riskctl cluster`` / ``cluster forget`` / ``replay`` with several
``--url``. Real Redis and real member processes (``tests.cluster.harness``);
a few scripted fake members for what a real cluster does not do on demand
(an endless chain of ``WRONG_GATEWAY`` answers)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.server import ServerConnection, serve

from clients.client import MAX_REDIRECTS, GatewayClient, GatewayError
from clients.riskctl import cluster_gross, main, parse_urls
from tests.cluster.harness import ADMIN, TRADER, Cluster
from tests.cluster.redisproc import free_port, require_redis
from tests.conftest import start_gateway
from tests.wsclient import TestClient

# One event loop for the module: one cluster serves most tests.
pytestmark = pytest.mark.asyncio(loop_scope="module")

MEMBERS = {"m1": ("A1", "A2"), "m2": ("B1",), "m3": ("C1",)}
EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "examples" / "example.ndjson"
#: The limits of every member of ``tests.cluster.harness`` (its default ``max_exposure``).
HARNESS_LIMITS: dict[str, Any] = {
    "max_exposure": "1000000",
    "max_account_exposure": "1000000",
    "max_order_notional": "1000000",
    "max_position": "1000000000",
    "max_order_qty": "1000000000",
    "max_orders_per_second": 1000000,
    "reservation_ttl_ms": 5000,
}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RISKGW_URL", raising=False)
    monkeypatch.delenv("RISKGW_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # whole URLs in riskctl's tables


async def until(check: Callable[[], Awaitable[bool]], what: str, *, timeout: float = 10.0) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def members_seen(cluster: Cluster, via: str) -> dict[str, bool]:
    """``cluster.get`` on member ``via``: member name -> alive."""
    client = await TestClient.open(cluster.members[via].url, ADMIN)
    try:
        view = await client.ok("cluster.get")
    finally:
        await client.close()
    return {m["name"]: m["alive"] for m in view["members"]}


async def wait_members(cluster: Cluster, alive: Iterable[str], dead: Iterable[str] = ()) -> None:
    """Until every running member sees exactly ``alive`` alive and ``dead`` not."""
    want = {name: True for name in alive} | {name: False for name in dead}
    for member in cluster.members.values():
        if not member.running:
            continue

        async def check(via: str = member.name) -> bool:
            return await members_seen(cluster, via) == want

        await until(check, f"member {member.name} to see {want}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    require_redis()
    running = Cluster(tmp_path_factory.mktemp("cluster"), dict(MEMBERS))
    try:
        await running.start()
        await wait_members(running, alive=MEMBERS)
        yield running
    finally:
        await running.stop()


def url(cluster: Cluster, name: str) -> str:
    return cluster.members[name].url


async def direct_state(cluster: Cluster, account: str) -> dict[str, Any]:
    """``state.get`` of ``account`` straight from its owner (no routing)."""
    client = await TestClient.open(cluster.owner_of(account).url, ADMIN)
    try:
        state: dict[str, Any] = await client.ok("state.get", {"account": account})
        return state
    finally:
        await client.close()


async def riskctl(token: str, *args: str) -> int:
    async with asyncio.timeout(60):
        return await asyncio.to_thread(main, ["--token", token, *args])


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def reason_codes(decision: dict[str, Any]) -> list[str]:
    return [r["code"] for r in decision["reasons"]]


def dead_url() -> str:
    return f"ws://127.0.0.1:{free_port()}/v1/ws"


# ------------------------------------------------------------------ routing


async def test_discovery_when_connected_then_each_account_goes_to_its_owner(
    cluster: Cluster,
) -> None:
    async with asyncio.timeout(20), GatewayClient(url(cluster, "m1"), TRADER) as client:
        assert client.in_cluster
        assert client.routes == {
            "A1": url(cluster, "m1"),
            "A2": url(cluster, "m1"),
            "B1": url(cluster, "m2"),
            "C1": url(cluster, "m3"),
        }
        for account in ("A1", "B1", "C1"):
            update = await client.update_position(account, "DISC-USD", 2, 100)
            assert (update["account"], update["qty"]) == (account, "2")
            decision = await client.validate(account, "DISC-USD", "sell", 1, 100)
            assert decision["decision"] == "accept", decision
            state = await client.state(account)
            assert state["accounts"][account]["positions"]["DISC-USD"]["qty"] == "2"
        # Each owner holds its own account's position.
        for account in ("A1", "B1", "C1"):
            state = await direct_state(cluster, account)
            assert state["accounts"][account]["positions"]["DISC-USD"] == {
                "qty": "2",
                "price": "100",
            }
        # Requests without an account go to the primary member.
        view = await client.cluster()
        assert view["name"] == "m1"
        assert "credit" not in view["members"][0]  # a trader's view
        assert (await client.emergency_get())["mode"] == "normal"


async def test_wrong_gateway_when_owner_unknown_then_followed_once_and_remembered(
    cluster: Cluster,
) -> None:
    async with (
        asyncio.timeout(20),
        GatewayClient(url(cluster, "m2"), ADMIN, reconnect=False, discover=False) as client,
    ):
        assert client.in_cluster
        assert client.routes == {}
        decision = await client.validate("C1", "FOLLOW-USD", "buy", 1, 100)
        assert decision["decision"] == "accept", decision
        assert client.routes == {"C1": url(cluster, "m3")}
        update = await client.update_position("C1", "FOLLOW-USD", 3, 100)
        assert update["qty"] == "3"
        assert (await direct_state(cluster, "C1"))["accounts"]["C1"]["positions"]["FOLLOW-USD"][
            "qty"
        ] == "3"
        # An account no member owns: WRONG_GATEWAY at once, its owner null.
        with pytest.raises(GatewayError) as info:
            await client.state("ZZ")
        assert info.value.code == "WRONG_GATEWAY"
        assert info.value.owner is None
        assert info.value.details == {"owner": None}
        assert "ZZ" in info.value.message
        assert "ZZ" not in client.routes


async def test_reservation_release_when_id_names_a_member_then_sent_there(
    cluster: Cluster,
) -> None:
    async with asyncio.timeout(20):
        async with GatewayClient(url(cluster, "m1"), TRADER, reconnect=False) as client:
            decision = await client.validate("B1", "RES-USD", "buy", 1, 100, reserve=True)
            assert decision["decision"] == "accept", decision
            on_m2 = decision["reservation_id"]
            assert on_m2.startswith("m2:")
            decision = await client.validate("C1", "RES-USD", "buy", 1, 100, reserve=True)
            on_m3 = decision["reservation_id"]
            assert on_m3.startswith("m3:")
            assert await client.release(on_m3) is True  # routed by the prefix
            assert await client.release(on_m3) is False
        # A client that knows no member: the primary's WRONG_GATEWAY is followed.
        async with GatewayClient(
            url(cluster, "m3"), TRADER, reconnect=False, discover=False
        ) as other:
            assert await other.release(on_m2) is True
            assert await other.release(on_m2) is False
        state = await direct_state(cluster, "B1")
        assert Decimal(state["accounts"]["B1"]["reserved_exposure"]) == 0


async def test_price_update_when_in_a_cluster_then_every_member_gets_it(
    cluster: Cluster,
) -> None:
    async with (
        asyncio.timeout(20),
        GatewayClient(url(cluster, "m1"), ADMIN, reconnect=False) as admin,
    ):
        assert await admin.update_price("COLLAR-USD", 100) == {
            "symbol": "COLLAR-USD",
            "price": "100",
        }
        for account in ("A1", "B1", "C1"):
            decision = await admin.validate(account, "COLLAR-USD", "buy", 1, 150)
            assert decision["decision"] == "reject", (account, decision)
            assert "PRICE_COLLAR" in reason_codes(decision), (account, decision)


async def test_url_list_when_first_member_unreachable_then_next_one_is_primary(
    cluster: Cluster,
) -> None:
    urls = [dead_url(), url(cluster, "m2")]
    async with asyncio.timeout(20), GatewayClient(urls, TRADER, reconnect=False) as client:
        assert client.url == url(cluster, "m2")
        assert (await client.cluster())["name"] == "m2"
        decision = await client.validate("A1", "LIST-USD", "buy", 1, 100)
        assert decision["decision"] == "accept", decision


async def test_single_gateway_when_not_in_a_cluster_then_no_routing(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "single")
    try:
        async with asyncio.timeout(20), GatewayClient(gw.url, ADMIN, reconnect=False) as client:
            assert not client.in_cluster
            assert client.routes == {}
            update = await client.update_position("B1", "ONE-USD", 1, 100)
            assert update["qty"] == "1"
            with pytest.raises(GatewayError) as info:
                await client.cluster()
            assert info.value.code == "NOT_FOUND"
            assert info.value.details == {}
    finally:
        await gw.stopped()


# -------------------------------------------------------------- riskctl


async def test_riskctl_cluster_json_when_positions_then_members_and_gross(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    async with GatewayClient(url(cluster, "m1"), ADMIN, reconnect=False) as admin:
        await admin.update_position("A2", "GROSS-USD", 3, 1000)
        await admin.update_position("C1", "GROSS-USD", -2, 1000)
    exact: dict[str, str] = {}
    for name in MEMBERS:
        client = await TestClient.open(url(cluster, name), ADMIN)
        try:
            exact[name] = (await client.ok("state.get"))["gross_exposure"]
        finally:
            await client.close()
    seen: dict[str, Any] = {}

    async def published() -> bool:
        # Other members' exposure is published at most every 100 ms.
        assert await riskctl(ADMIN, "--url", url(cluster, "m2"), "cluster", "--json") == 0
        seen.update(orjson.loads(capsys.readouterr().out))
        return {m["name"]: m["exposure"] for m in seen["members"]} == exact

    await until(published, f"the members' exposures to be published as {exact}")
    assert seen["name"] == "m2"
    members = {m["name"]: m for m in seen["members"]}
    assert {name: (m["url"], m["accounts"], m["alive"]) for name, m in members.items()} == {
        name: (url(cluster, name), sorted(accounts), True) for name, accounts in MEMBERS.items()
    }
    assert all(Decimal(m["credit"]) >= 0 for m in members.values())
    assert Decimal(seen["gross"]) == sum(Decimal(v) for v in exact.values())
    assert cluster_gross(seen) == seen["gross"]

    # The table: one row per member, the cluster's gross below.
    assert await riskctl(ADMIN, "--url", url(cluster, "m2"), "cluster") == 0
    out = capsys.readouterr().out
    for name, accounts in MEMBERS.items():
        assert name in out and url(cluster, name) in out
        assert ", ".join(sorted(accounts)) in out
    assert f"cluster gross exposure {seen['gross']}" in out


async def test_riskctl_cluster_when_trader_then_no_figures(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await riskctl(TRADER, "--url", url(cluster, "m3"), "cluster", "--json") == 0
    view = orjson.loads(capsys.readouterr().out)
    assert {m["name"] for m in view["members"]} == set(MEMBERS)
    assert all("credit" not in m and "exposure" not in m for m in view["members"])
    assert view["gross"] is None
    assert await riskctl(TRADER, "--url", url(cluster, "m3"), "cluster") == 0
    assert "cluster gross exposure -" in capsys.readouterr().out


async def test_riskctl_url_when_repeated_or_comma_separated_then_first_reachable_is_used(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_urls(["a,b", " b ,c", ""]) == ["a", "b", "c"]
    dead = dead_url()
    args = ("--url", dead, "--url", url(cluster, "m3"), "cluster", "--json")
    assert await riskctl(ADMIN, *args) == 0
    assert orjson.loads(capsys.readouterr().out)["name"] == "m3"
    assert await riskctl(ADMIN, "cluster", "--json", "--url", f"{dead},{url(cluster, 'm1')}") == 0
    assert orjson.loads(capsys.readouterr().out)["name"] == "m1"
    # Every member unreachable: one line, exit 1.
    assert await riskctl(ADMIN, "--url", f"{dead},{dead_url()}", "cluster") == 1
    assert "cannot connect" in one_error_line(capsys.readouterr().err)


async def test_riskctl_state_when_account_of_another_member_then_routed(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    async with GatewayClient(url(cluster, "m3"), ADMIN, reconnect=False) as admin:
        await admin.update_position("B1", "STATE-USD", 5, 10)
    args = ("--url", url(cluster, "m1"), "state", "--account", "B1", "--json")
    assert await riskctl(ADMIN, *args) == 0
    state = orjson.loads(capsys.readouterr().out)
    assert state["accounts"]["B1"]["positions"]["STATE-USD"] == {"qty": "5", "price": "10"}


async def test_riskctl_cluster_usage_errors_exit_2(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await riskctl(ADMIN, "--url", url(cluster, "m1"), "cluster", "forget") == 2
    assert "NAME" in one_error_line(capsys.readouterr().err)
    assert await riskctl(ADMIN, "--url", url(cluster, "m1"), "cluster", "show", "m2") == 2
    one_error_line(capsys.readouterr().err)


async def test_riskctl_cluster_when_not_a_cluster_then_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await start_gateway(tmp_path / "single")
    try:
        assert await riskctl(ADMIN, "--url", gw.url, "cluster") == 1
        line = one_error_line(capsys.readouterr().err)
        assert "NOT_FOUND" in line and "not a member of a cluster" in line
    finally:
        await gw.stopped()


async def test_riskctl_replay_when_cluster_then_each_request_reaches_its_owner(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sym = "REPLAY-USD"

    def order(account: str, side: str, price: str, **extra: Any) -> dict[str, Any]:
        return {
            "account": account,
            "symbol": sym,
            "side": side,
            "qty": "1",
            "price": price,
            **extra,
        }

    lines: list[tuple[str, dict[str, Any], str | None]] = [
        ("price.update", {"symbol": sym, "price": "100"}, None),
        ("position.update", {"account": "A1", "symbol": sym, "qty": "4", "price": "100"}, None),
        ("position.update", {"account": "B1", "symbol": sym, "qty": "5", "price": "100"}, None),
        ("position.update", {"account": "C1", "symbol": sym, "qty": "6", "price": "100"}, None),
        ("order.validate", order("A1", "buy", "101"), "accept"),
        ("order.validate", order("B1", "buy", "150"), "reject"),  # the collar, on m2
        ("order.validate", order("C1", "sell", "99"), "accept"),
        ("order.validate", order("A2", "sell", "50"), "reject"),
        ("order.validate", order("B1", "buy", "100", reserve=True), "accept"),
        ("state.get", {"account": "C1"}, None),
    ]
    requests = tmp_path / "cluster.ndjson"
    expect = tmp_path / "expect.ndjson"
    with requests.open("wb") as r, expect.open("wb") as e:
        for rid, (method, params, decision) in enumerate(lines, start=1):
            r.write(orjson.dumps({"id": rid, "method": method, "params": params}) + b"\n")
            if decision is not None:
                e.write(orjson.dumps({"id": rid, "decision": decision}) + b"\n")
    decisions = tmp_path / "decisions.ndjson"
    args = ("--url", url(cluster, "m3"), "replay", str(requests), "--max", "--json")
    code = await riskctl(
        ADMIN, *args, "--expect", str(expect), "--record-decisions", str(decisions)
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = orjson.loads(captured.out)
    assert (report["sent"], report["ok"], report["errors"]) == (len(lines), len(lines), {})
    assert report["decisions"] == {"accept": 3, "reject": 2}
    recorded = [orjson.loads(line) for line in decisions.read_bytes().splitlines()]
    assert [r["reasons"] for r in recorded if r["id"] in (6, 8)] == [
        ["PRICE_COLLAR"],
        ["PRICE_COLLAR"],
    ]
    for account, qty in (("A1", "4"), ("B1", "5"), ("C1", "6")):
        state = await direct_state(cluster, account)
        assert state["accounts"][account]["positions"][sym]["qty"] == qty
    assert Decimal((await direct_state(cluster, "B1"))["accounts"]["B1"]["reserved_exposure"]) > 0


async def test_riskctl_replay_when_example_on_two_members_then_decisions_as_one_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example flow (A1 and A2, prices, positions, orders) replayed on a
    cluster where A1 and A2 have different owners decides as one gateway with
    the same limits, except where the cluster's gateway-wide limit is
    stricter (credit held by the other member, or a member briefly fenced)."""
    require_redis()
    decided: dict[str, dict[Any, dict[str, Any]]] = {}

    async def run(name: str, urls: str) -> None:
        out = tmp_path / f"{name}.ndjson"
        args = ("--url", urls, "replay", str(EXAMPLE), "--max", "--json")
        assert await riskctl(ADMIN, *args, "--record-decisions", str(out)) == 0
        report = orjson.loads(capsys.readouterr().out)
        assert (report["sent"], report["errors"]) == (3000, {}), report
        lines = (orjson.loads(line) for line in out.read_bytes().splitlines())
        decided[name] = {d["id"]: d for d in lines}

    single = await start_gateway(tmp_path / "single", limits=HARNESS_LIMITS)
    try:
        await run("single", single.url)
    finally:
        await single.stopped()
    pair = Cluster(tmp_path / "pair", {"m1": ("A1",), "m2": ("A2",)})
    try:
        await pair.start()
        await wait_members(pair, alive=("m1", "m2"))
        await run("cluster", f"{pair.members['m2'].url},{pair.members['m1'].url}")
    finally:
        await pair.stop()

    one, many = decided["single"], decided["cluster"]
    assert set(one) == set(many) and len(one) == 1000
    stricter = {"MAX_EXPOSURE", "CLUSTER_UNAVAILABLE"}
    changed = []
    for rid, want in one.items():
        got = many[rid]
        if got["decision"] != want["decision"]:
            assert got["decision"] == "reject", (want, got)
            changed.append(rid)
        extra = set(got["reasons"]) - set(want["reasons"])
        missing = set(want["reasons"]) - set(got["reasons"])
        assert extra <= stricter and missing <= stricter, (want, got)
    assert len(changed) < 50, changed
    # Every price reached both members: the collar decides the same everywhere.
    collared = {rid for rid, d in one.items() if "PRICE_COLLAR" in d["reasons"]}
    assert collared
    assert collared == {rid for rid, d in many.items() if "PRICE_COLLAR" in d["reasons"]}


# ---------------------------------------------- a member dies and is forgotten


async def test_member_killed_then_client_falls_over_and_riskctl_forgets_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_redis()
    small = Cluster(tmp_path, {"m1": ("A1",), "m2": ("B1",)})
    try:
        async with asyncio.timeout(60):
            await small.start()
            await wait_members(small, alive=("m1", "m2"))
            m1, m2 = small.members["m1"].url, small.members["m2"].url
            client = GatewayClient([m2, m1], TRADER, backoff_base=0.05, backoff_cap=0.2)
            async with client:
                assert client.url == m2
                await client.update_position("B1", "GONE-USD", 1, 100)

                # Seen within max_staleness_ms, or itself, or unknown: refused.
                assert await riskctl(ADMIN, "--url", m1, "cluster", "forget", "m2") == 1
                line = one_error_line(capsys.readouterr().err)
                assert "CONFLICT" in line and "m2" in line
                assert await riskctl(ADMIN, "--url", m1, "cluster", "forget", "m1") == 1
                assert "CONFLICT" in one_error_line(capsys.readouterr().err)
                assert await riskctl(ADMIN, "--url", m1, "cluster", "forget", "m9") == 1
                assert "NOT_FOUND" in one_error_line(capsys.readouterr().err)
                assert await riskctl(TRADER, "--url", m1, "cluster", "forget", "m2") == 1
                assert "FORBIDDEN" in one_error_line(capsys.readouterr().err)

                await small.members["m2"].kill()

                # The primary connection falls over to the next member.
                async def on_m1() -> bool:
                    return client.connected and client.url == m1

                await until(on_m1, "the client to reconnect to m1")
                assert (await client.cluster())["name"] == "m1"
                # The dead member's account: a clear connection error.
                with pytest.raises(ConnectionError, match="owns account B1"):
                    await client.validate("B1", "GONE-USD", "buy", 1, 100)

                async def m2_down() -> bool:
                    assert await riskctl(ADMIN, "--url", m1, "cluster", "--json") == 0
                    view = orjson.loads(capsys.readouterr().out)
                    return {m["name"]: m["alive"] for m in view["members"]} == {
                        "m1": True,
                        "m2": False,
                    }

                await until(m2_down, "m1 to see m2 not alive")
                assert await riskctl(ADMIN, "--url", m2, "--url", m1, "cluster") == 0
                assert "not alive: m2" in capsys.readouterr().out

                assert await riskctl(ADMIN, "--url", m1, "cluster", "forget", "m2") == 0
                assert "member m2 forgotten" in capsys.readouterr().out
                assert await riskctl(ADMIN, "--url", m1, "cluster", "--json") == 0
                view = orjson.loads(capsys.readouterr().out)
                assert [m["name"] for m in view["members"]] == ["m1"]

                # Nobody owns B1 any more: WRONG_GATEWAY with a null owner.
                async def unowned() -> bool:
                    await client.cluster()
                    try:
                        await client.validate("B1", "GONE-USD", "buy", 1, 100)
                    except ConnectionError:
                        return False  # m1 still names m2 as the owner
                    except GatewayError as exc:
                        assert exc.code == "WRONG_GATEWAY" and exc.owner is None, exc
                        return True
                    pytest.fail("a validation for a forgotten member's account was answered")

                await until(unowned, "B1 to be owned by no member")
    finally:
        await small.stop()


# ---------------------------------------------------- scripted fake members


class FakeMember:
    """Answers the hello as a cluster member; every other request gets
    ``WRONG_GATEWAY`` naming ``owner`` (set once all fakes are listening)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.owner: dict[str, str] | None = None
        self.methods: list[str] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def handle(self, ws: ServerConnection) -> None:
        emergency = {
            "mode": "normal",
            "reason": "",
            "actor": "gateway",
            "since": "2026-01-01T00:00:00.000Z",
            "version": 0,
            "accounts": {},
            "cluster": {"reachable": True, "since": None},
        }
        frame = {"channel": "emergency", "seq": 1, "snapshot": True, "data": emergency}
        await ws.send(orjson.dumps(frame))
        with contextlib.suppress(Exception):
            async for raw in ws:
                request = orjson.loads(raw)
                if request["method"] == "session.hello":
                    result = {"protocol": 1, "epoch": 1, "role": "admin", "heartbeat_s": 1}
                    answer = {"id": request["id"], "status": "ok", "result": result}
                    answer["result"]["emergency"] = emergency
                else:
                    self.methods.append(request["method"])
                    error = {
                        "code": "WRONG_GATEWAY",
                        "message": f"account X1 is owned by member {self.owner}",
                        "owner": self.owner,
                    }
                    answer = {"id": request["id"], "status": "error", "error": error}
                await ws.send(orjson.dumps(answer))


@contextlib.asynccontextmanager
async def fake_members(*names: str) -> AsyncIterator[list[FakeMember]]:
    fakes = [FakeMember(name) for name in names]
    async with contextlib.AsyncExitStack() as stack:
        for fake in fakes:
            server = await stack.enter_async_context(serve(fake.handle, "127.0.0.1", 0))
            fake.port = next(iter(server.sockets)).getsockname()[1]
        yield fakes


async def test_wrong_gateway_when_owners_keep_redirecting_then_bounded() -> None:
    async with asyncio.timeout(20), fake_members("f0", "f1", "f2", "f3", "f4") as fakes:
        for fake, following in itertools.pairwise(fakes):
            fake.owner = {"name": following.name, "url": following.url}
        async with GatewayClient(fakes[0].url, "t", reconnect=False, discover=False) as client:
            with pytest.raises(GatewayError) as info:
                await client.validate("X1", "S", "buy", 1, 1)
        assert info.value.code == "WRONG_GATEWAY"
        # The last member asked names the next one; the client stops there.
        assert info.value.owner == {"name": f"f{MAX_REDIRECTS + 1}", "url": fakes[3].url}
        assert [len(f.methods) for f in fakes] == [1] * (MAX_REDIRECTS + 1) + [0, 0]


async def test_wrong_gateway_when_redirected_back_then_not_followed_again() -> None:
    async with asyncio.timeout(20), fake_members("f0", "f1") as (f0, f1):
        f0.owner = {"name": "f1", "url": f1.url}
        f1.owner = {"name": "f0", "url": f0.url}
        async with GatewayClient(f0.url, "t", reconnect=False, discover=False) as client:
            with pytest.raises(GatewayError) as info:
                await client.update_position("X1", "S", 1, 1)
            assert info.value.owner == {"name": "f0", "url": f0.url}
            assert "owned by member" in info.value.message
            with pytest.raises(GatewayError):
                await client.request("reservation.release", {"reservation_id": "f1:R1"})
        assert (f0.methods, f1.methods) == (
            ["position.update", "reservation.release"],
            ["position.update", "reservation.release"],
        )
