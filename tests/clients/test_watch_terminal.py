"""``riskctl watch`` on a real terminal (a pty) while its connection drops and
comes back: the screen stays the view, with no log line or traceback written
over it, and the view says it is reconnecting, then shows the new state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import sys
from pathlib import Path

from tests.cluster.tcpproxy import TcpProxy
from tests.conftest import ADMIN, VIEWER, RunningGateway

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")


class Terminal:
    """What a program wrote to the pty, escape sequences taken out."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.raw = bytearray()
        self.grew = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.raw += chunk
        self.grew.set()

    @property
    def text(self) -> str:
        return ANSI.sub(b"", bytes(self.raw)).decode(errors="replace")

    async def shows(self, *needles: str, after: int = 0, timeout: float = 20) -> int:
        """Wait until the text after offset ``after`` holds every needle;
        returns the text's length then."""
        async with asyncio.timeout(timeout):
            while True:
                text = self.text
                if all(n in text[after:] for n in needles):
                    return len(text)
                self.grew.clear()
                await self.grew.wait()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


async def test_watch_when_connection_drops_and_returns_then_screen_stays_the_view(
    gw: RunningGateway,
) -> None:
    port = int(gw.url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = await TcpProxy(port).start()
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("RISKGW_URL", None)
    env.pop("RISKGW_TOKEN", None)
    url = f"ws://127.0.0.1:{proxy.port}/v1/ws"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "clients.riskctl", "--url", url, "--token", VIEWER, "watch"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    terminal = Terminal(master)
    try:
        seen = await terminal.shows("NORMAL", "last alerts", "exposure")
        proxy.reset()  # the connection is reset, and new ones refused for a while
        # The view says so, with the client's word on its reconnect attempts.
        seen = await terminal.shows("DISCONNECTED", "client: ", "reconnect attempt", after=seen)
        proxy.pass_()
        admin = await gw.client(ADMIN)
        await admin.ok("emergency.set", {"mode": "halted", "reason": "after the drop"})
        await terminal.shows("HALTED", "after the drop", after=seen)
    finally:
        proc.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        terminal.close()
        await proxy.close()
    text = terminal.text
    # Nothing but the view: no traceback, and the client's lines only inside
    # the view (its footer, or the banner's note), never written over it.
    assert "Traceback" not in text, text[-3000:]
    for line in text.splitlines():
        if any(word in line for word in ("lost (", "reconnect", "WARNING")):
            inside = line.lstrip().startswith("client: ") or "DISCONNECTED: reconnecting" in line
            assert inside, f"{line!r} written over the view:\n{text[-3000:]}"
