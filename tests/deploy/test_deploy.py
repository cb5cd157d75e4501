"""The deployable pieces in ``deploy/``, checked by the tools that run them:
``promtool`` on the alert rules, ``systemd-analyze verify`` on the unit, every
metric the rules and the Grafana dashboard name on a running gateway's
``/metrics``, and a real nginx terminating TLS in front of a gateway
(``wss://``), with ``server.trusted_proxies`` deciding whether
``X-Forwarded-For`` names the client."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.cluster.redisproc import free_port
from tests.conftest import ADMIN, TRADER, GatewayFactory, RunningGateway
from tests.wsclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "risk-gateway-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "risk-gateway.json"
UNIT = DEPLOY / "risk-gateway.service"
NGINX_CONF = DEPLOY / "nginx" / "risk-gateway.conf"


def tool(path: str, package: str) -> str:
    """The tool's path; skipped without it, except in CI (which installs it)."""
    found = shutil.which(Path(path).name) or (path if os.path.exists(path) else None)
    if found is None:
        message = f"{path} is missing (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_alert_rules_pass_promtool() -> None:
    promtool = tool("/usr/bin/promtool", "prometheus")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert b"SUCCESS" in done.stdout


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    unit = tmp_path / "risk-gateway.service"
    # The unit names the production install path; point it at this checkout's.
    binary = Path(sys.executable).parent / "risk-gateway"
    unit.write_text(
        UNIT.read_text().replace("/opt/risk-gateway/.venv/bin/risk-gateway", str(binary))
    )
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, check=False, timeout=60
    )
    output = (done.stdout + done.stderr).decode()
    # Only findings about this unit count (a container has no running systemd).
    findings = [line for line in output.splitlines() if "risk-gateway.service" in line]
    assert not findings, output


def metric_names() -> set[str]:
    names = set(re.findall(r"\briskgw_[a-z_]+", RULES.read_text()))
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\briskgw_[a-z_]+", target["expr"]))
    return names


def family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


async def test_every_metric_the_rules_and_the_dashboard_name_exists(gw: RunningGateway) -> None:
    names = metric_names()
    assert len(names) >= 8
    client = await TestClient.open(gw.url, TRADER)
    try:
        order = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "price": "50000"}
        await client.ok("order.validate", {**order, "qty": "1"})
        await client.ok("order.validate", {**order, "qty": "999999999"})
    finally:
        await client.close()
    base = gw.url.split("/v1/")[0].replace("ws://", "http://")
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    )
    declared = set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
    missing = sorted(n for n in names if family(n) not in declared and n not in declared)
    assert not missing, missing


# ------------------------------------------------------------------ nginx


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    openssl = tool("/usr/bin/openssl", "openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        check=True,
    )  # fmt: skip
    yield cert, key


def nginx_config(tmp_path: Path, port: int, upstream: int, cert: Path, key: Path) -> Path:
    """``deploy/nginx/risk-gateway.conf`` with this test's ports, certificate and paths."""
    site = NGINX_CONF.read_text()
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    site = site.replace("server 127.0.0.1:8765;", f"server 127.0.0.1:{upstream};")
    site = site.replace("/etc/ssl/risk.example.com/fullchain.pem", str(cert))
    site = site.replace("/etc/ssl/risk.example.com/privkey.pem", str(key))
    site = site.replace("allow 10.0.0.0/8;", "allow 127.0.0.1;")
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log {tmp_path}/nginx-access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{site}
}}
"""
    )
    return conf


async def start_nginx(conf: Path, tmp_path: Path, port: int) -> asyncio.subprocess.Process:
    nginx = tool("/usr/sbin/nginx", "nginx")
    proc = await asyncio.create_subprocess_exec(
        nginx, "-c", str(conf), "-p", str(tmp_path), stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(10):
        while True:
            if proc.returncode is not None:
                raise RuntimeError((tmp_path / "nginx-error.log").read_text())
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return proc
            except OSError:
                await asyncio.sleep(0.05)


async def through_nginx(
    make_gateway: GatewayFactory,
    tmp_path: Path,
    certificate: tuple[Path, Path],
    trusted: list[str],
) -> tuple[RunningGateway, str, ssl.SSLContext, asyncio.subprocess.Process]:
    gw = await make_gateway(
        server={
            "trusted_proxies": tuple(ipaddress.ip_network(t) for t in trusted),
            "max_connections_per_ip": 1,
        }
    )
    upstream = int(gw.url.split(":")[2].split("/")[0])
    port = free_port()
    cert, key = certificate
    conf = nginx_config(tmp_path, port, upstream, cert, key)
    proc = await start_nginx(conf, tmp_path, port)
    context = ssl.create_default_context(cafile=str(cert))
    return gw, f"wss://127.0.0.1:{port}/v1/ws", context, proc


def gateway_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The gateway's own log lines (its loggers are ``gateway.*``)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("gateway")]


async def open_as(url: str, context: ssl.SSLContext, client_ip: str) -> TestClient:
    headers = {"Authorization": f"Bearer {ADMIN}", "X-Forwarded-For": client_ip}
    return TestClient(await connect(url, ssl=context, additional_headers=headers, compression=None))


async def test_wss_through_nginx_counts_clients_by_forwarded_address_when_trusted(
    make_gateway: GatewayFactory,
    tmp_path: Path,
    certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw, url, context, proc = await through_nginx(make_gateway, tmp_path, certificate, ["127.0.0.1"])
    try:
        # Two clients, one connection each: under a cap of 1 per address both
        # are served, since each is counted under its own forwarded address.
        first = await open_as(url, context, "203.0.113.7")
        second = await open_as(url, context, "203.0.113.8")
        assert (await first.ok("ping"))["ts"] and (await second.ok("ping"))["ts"]
        # A third from the first one's address is over its cap.
        with pytest.raises(InvalidStatus) as refused:
            await connect(
                url,
                ssl=context,
                additional_headers={
                    "Authorization": f"Bearer {ADMIN}",
                    "X-Forwarded-For": "203.0.113.7",
                },
            )
        assert refused.value.response.status_code == 503
        # A wrong token from a third client.
        with pytest.raises(InvalidStatus) as wrong:
            await connect(
                url,
                ssl=context,
                additional_headers={
                    "Authorization": "Bearer not-a-token",
                    "X-Forwarded-For": "203.0.113.9",
                },
            )
        assert wrong.value.response.status_code == 401
        await first.close()
        await second.close()
        assert gw.gateway.per_ip == {} or "127.0.0.1" not in gw.gateway.per_ip
        # The log names each client by its forwarded address, never the proxy's.
        lines = gateway_log(caplog)
        assert "refused handshake from 203.0.113.7: over max_connections_per_ip (1)" in lines
        assert "refused handshake from 203.0.113.9: wrong token" in lines
        assert not [line for line in lines if "127.0.0.1" in line], lines
    finally:
        proc.terminate()
        await proc.wait()


async def test_wss_through_nginx_ignores_forwarded_for_from_an_untrusted_peer(
    make_gateway: GatewayFactory,
    tmp_path: Path,
    certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw, url, context, proc = await through_nginx(make_gateway, tmp_path, certificate, [])
    try:
        first = await open_as(url, context, "203.0.113.7")
        assert (await first.ok("ping"))["ts"]
        # Every client is the proxy's address: the second is over the cap.
        with pytest.raises(InvalidStatus) as refused:
            await open_as(url, context, "203.0.113.8")
        assert refused.value.response.status_code == 503
        assert set(gw.gateway.per_ip) == {"127.0.0.1"}
        await first.close()
        # The log names the proxy, the only address it may believe.
        lines = gateway_log(caplog)
        assert "refused handshake from 127.0.0.1: over max_connections_per_ip (1)" in lines
        assert not [line for line in lines if "203.0.113" in line], lines
    finally:
        proc.terminate()
        await proc.wait()


class _Peer:
    def __init__(self, address: str) -> None:
        self.remote_address = (address, 40000)
        self.request = None


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("127.0.0.1", "203.0.113.7", "203.0.113.7"),
        # The client's own claim (left) is not believed; nginx appended the real one.
        ("127.0.0.1", "10.9.9.9, 203.0.113.7", "203.0.113.7"),
        # A chain of trusted proxies: the right-most address that is not one.
        ("127.0.0.1", "203.0.113.7, 10.0.0.2, 10.0.0.3", "203.0.113.7"),
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
        ("127.0.0.1", "10.0.0.2", "127.0.0.1"),
        # From an untrusted peer the header is ignored.
        ("198.51.100.1", "203.0.113.7", "198.51.100.1"),
    ],
)
def test_client_host_takes_the_right_most_untrusted_forwarded_address(
    peer: str, header: str, expected: str
) -> None:
    from websockets.datastructures import Headers

    from gateway.net.server import client_host

    trusted = [ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("10.0.0.0/24")]
    headers = Headers({"X-Forwarded-For": header})
    assert client_host(_Peer(peer), trusted, headers) == expected  # type: ignore[arg-type]
    assert client_host(_Peer(peer), [], headers) == peer  # type: ignore[arg-type]


def test_trusted_proxies_config_is_parsed_and_a_bad_entry_named(tmp_path: Path) -> None:
    from gateway.config import ConfigError, load_config

    good = tmp_path / "good.toml"
    good.write_text('[server]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/24", "::1"]\n')
    networks = load_config(good).server.trusted_proxies
    assert [str(n) for n in networks] == ["127.0.0.1/32", "10.0.0.0/24", "::1/128"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\ntrusted_proxies = ["127.0.0.1", "proxy-1"]\n')
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies\[1\].*IP address"):
        load_config(bad)
