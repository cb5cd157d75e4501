"""``risk-gateway tokens``: the tokens file edited without a text editor, and
applied by a running gateway at SIGHUP (revoked or rotated tokens' connections
closed with 4001)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth import ensure_default_tokens
from gateway.cli import main
from tests.gwprocess import GatewayProcess
from tests.wsclient import TestClient


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["tokens", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def state(tmp_path: Path) -> Path:
    ensure_default_tokens(tmp_path)
    return tmp_path


def test_list_add_rotate_revoke(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--state-dir", str(state), "list")
    assert code == 0
    assert [line.split("\t")[:2] for line in out.splitlines()] == [
        ["admin", "admin"],
        ["viewer", "viewer"],
        ["feed", "feed"],
        ["trader", "trader"],
    ]
    code, out, err = run(
        capsys,
        "--state-dir",
        str(state),
        "add",
        "desk-2",
        "--role",
        "trader",
        "--accounts",
        "B1,B2",
    )
    assert code == 0 and out.startswith("desk-2 ") and "shown once" in err
    token = out.split()[1]
    assert token not in (state / "tokens.toml").read_text()  # digests only
    code, out, _ = run(capsys, "--state-dir", str(state), "list")
    assert "desk-2\ttrader\tB1,B2" in out and token not in out
    code, out, _ = run(capsys, "--state-dir", str(state), "rotate", "desk-2")
    assert code == 0 and out.split()[1] != token
    code, out, _ = run(capsys, "--state-dir", str(state), "revoke", "desk-2")
    assert code == 0
    assert "desk-2" not in run(capsys, "--state-dir", str(state), "list")[1]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["add", "admin", "--role", "admin"], "a token named 'admin' exists"),
        (["add", "x", "--role", "boss"], "role 'boss': one of"),
        (["add", "x", "--role", "trader"], "a trader needs --accounts"),
        (["add", "x", "--role", "viewer", "--accounts", "A1"], "--accounts is for traders"),
        (["add", "bad name", "--role", "viewer"], "name 'bad name'"),
        (["rotate", "nobody"], "no token named 'nobody'"),
        (["revoke", "nobody"], "no token named 'nobody'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    state: Path, capsys: pytest.CaptureFixture[str], args: list[str], why: str
) -> None:
    before = (state / "tokens.toml").read_bytes()
    code, _out, err = run(capsys, "--state-dir", str(state), *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and why in err, err
    assert (state / "tokens.toml").read_bytes() == before


def test_the_last_token_cannot_be_revoked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensure_default_tokens(tmp_path)
    for name in ("viewer", "feed", "trader"):
        assert run(capsys, "--state-dir", str(tmp_path), "revoke", name)[0] == 0
    code, _, err = run(capsys, "--state-dir", str(tmp_path), "revoke", "admin")
    assert code == 2 and "last token" in err


def test_without_a_tokens_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--state-dir", str(tmp_path), "list")
    assert code == 2 and "no tokens file" in err


CONFIG = """
[server]
host = "127.0.0.1"
port = 0

[persistence]
state_dir = "{state}"
"""


async def test_sighup_applies_added_and_revoked_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    _tokens, plain = ensure_default_tokens(state)
    assert plain is not None
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(state=state))
    gateway = await GatewayProcess.start(config)
    try:
        trader = await TestClient.open(gateway.url, plain["trader"])
        viewer = await TestClient.open(gateway.url, plain["viewer"])
        await trader.ok("ping")
        assert main(["tokens", "--state-dir", str(state), "revoke", "trader"]) == 0
        capsys.readouterr()
        added = main(["tokens", "--state-dir", str(state), "add", "ops-2", "--role", "admin"])
        assert added == 0
        new_token = capsys.readouterr().out.split()[1]
        gateway.proc.send_signal(signal.SIGHUP)
        # The revoked token's connection is closed with 4001; the others stay.
        async with asyncio.timeout(10):
            with pytest.raises(ConnectionClosed) as closed:
                await trader.ws.wait_closed()
                await trader.ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        await viewer.ok("ping")
        with pytest.raises(InvalidStatus) as refused:
            await connect(
                gateway.url, additional_headers={"Authorization": f"Bearer {plain['trader']}"}
            )
        assert refused.value.response.status_code == 401
        ops = await TestClient.open(gateway.url, new_token)
        assert (await ops.ok("session.hello", {}))["role"] == "admin"
        await ops.close()
        await viewer.close()
    finally:
        gateway.terminate()
        await gateway.wait()
