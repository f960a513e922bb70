"""The webhook sender's own HTTP/1.1 over real sockets (webhook_sender.py): TLS with the URL's
host as server name and certificate identity, kept-alive connections reused and replaced when
the receiver closed them, the per-host limit, the response cap, and an attempt that times out
leaving nothing behind (the leak that made the httpx-based sender lose a host for good).

Receivers are real uvicorn servers on 127.0.0.1, HTTPS with a CA made here (cryptography).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskcast.webhook_sender import WebhookSender
from taskcast.webhook_targets import TargetPolicy
from tests.servers import free_port

BOUND_S = 20.0


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca_and_server(tmp: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) files; the server certificate names
    `names` (DNS names, or IP addresses)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("taskcast test CA"))
          .issuer_name(_name("taskcast test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    server = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class Seen:
    """What the receiver saw: requests (host header, body) and connections opened."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.bodies: list[bytes] = []
        self.peers: set[tuple[str, int]] = set()
        self.concurrent = 0
        self.most_concurrent = 0
        self.delay_s = 0.0
        self.body_size = 0


@asynccontextmanager
async def receiver(seen: Seen, *, cert: Path | None = None, key: Path | None = None,
                   keep_alive_s: int = 5) -> AsyncIterator[int]:
    async def hook(request: Request) -> Response:
        seen.concurrent += 1
        seen.most_concurrent = max(seen.most_concurrent, seen.concurrent)
        try:
            seen.hosts.append(request.headers["host"])
            seen.bodies.append(await request.body())
            client = request.client
            assert client is not None
            seen.peers.add((client.host, client.port))
            if seen.delay_s:
                await asyncio.sleep(seen.delay_s)
            return Response(b"x" * seen.body_size, status_code=200)
        finally:
            seen.concurrent -= 1

    port = free_port()
    config = uvicorn.Config(Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])]),
                            host="127.0.0.1", port=port, log_level="warning",
                            timeout_keep_alive=keep_alive_s,
                            ssl_certfile=str(cert) if cert else None,
                            ssl_keyfile=str(key) if key else None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(BOUND_S):
        while not server.started:
            await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def test_https_uses_the_urls_host_for_sni_and_the_certificate(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server(tmp_path, ["localhost"])
    seen = Seen()
    async with receiver(seen, cert=cert, key=key) as port:
        sender = WebhookSender(TargetPolicy("localhost"), timeout_s=5,
                               ssl_context=trusting(ca))
        attempt = await sender.post(f"https://localhost:{port}/hook?x=1", b'{"a":1}', {})
        # The same receiver by address: the certificate does not name 127.0.0.1.
        by_address = await WebhookSender(TargetPolicy("127.0.0.1"), timeout_s=5,
                                         ssl_context=trusting(ca)).post(
            f"https://127.0.0.1:{port}/hook", b"{}", {})
        # Default trust (certifi's CAs) does not know the test CA.
        untrusted = await WebhookSender(TargetPolicy("localhost"), timeout_s=5).post(
            f"https://localhost:{port}/hook", b"{}", {})
        await sender.close()
    assert (attempt.outcome, attempt.status) == ("delivered", 200), attempt
    assert seen.hosts == [f"localhost:{port}"]
    assert seen.bodies == [b'{"a":1}']
    assert by_address.outcome == "retry" and "SSL" in by_address.error, by_address
    assert untrusted.outcome == "retry" and "SSL" in untrusted.error, untrusted


async def test_kept_alive_connections_are_reused_and_replaced_once_closed() -> None:
    seen = Seen()
    async with receiver(seen, keep_alive_s=1) as port:
        sender = WebhookSender(TargetPolicy("127.0.0.1"), timeout_s=5)
        url = f"http://127.0.0.1:{port}/hook"
        first = [await sender.post(url, b"{}", {}) for _ in range(5)]
        assert len(seen.peers) == 1, seen.peers  # one connection, reused
        await asyncio.sleep(1.5)  # the receiver closes the idle connection
        after = await sender.post(url, b"{}", {})
        await sender.close()
    assert [a.outcome for a in first] == ["delivered"] * 5
    assert after.outcome == "delivered", after
    assert len(seen.peers) == 2, seen.peers
    assert seen.hosts == [f"127.0.0.1:{port}"] * 6


async def test_per_host_limit_and_the_response_cap() -> None:
    seen = Seen()
    seen.delay_s, seen.body_size = 0.2, 1 << 20
    async with receiver(seen) as port:
        sender = WebhookSender(TargetPolicy("127.0.0.1"), timeout_s=10, per_host=3,
                               max_response_bytes=1024)
        attempts = await asyncio.gather(*(sender.post(f"http://127.0.0.1:{port}/h", b"{}", {})
                                          for _ in range(12)))
        await sender.close()
    assert [a.outcome for a in attempts] == ["delivered"] * 12
    assert seen.most_concurrent == 3
    # A body read only up to the cap leaves its connection closed, never reused.
    assert len(seen.peers) == 12


@pytest.mark.parametrize("rounds", [4])
async def test_timed_out_attempts_leave_the_host_usable(rounds: int) -> None:
    """Bursts of attempts that time out (the receiver answers after the timeout), then a
    fast one: it is delivered, and no connection of a timed-out attempt is reused. (The
    httpx-based sender's leak needed cancellations at particular moments inside httpcore;
    `bench/webhooks.py --sender-bursts` reproduces it, see bench/README.md.)"""
    seen = Seen()
    async with receiver(seen) as port:
        sender = WebhookSender(TargetPolicy("127.0.0.1"), timeout_s=0.3, per_host=2)
        url = f"http://127.0.0.1:{port}/slow"
        for _ in range(rounds):
            seen.delay_s = 1.0
            timed_out = await asyncio.gather(*(sender.post(url, b"{}", {}) for _ in range(6)))
            assert {a.outcome for a in timed_out} == {"retry"}, timed_out
        seen.delay_s = 0.0
        slow_peers = set(seen.peers)
        fine = await sender.post(url, b"{}", {})
        await sender.close()
    assert fine.outcome == "delivered", fine
    assert len(seen.peers) == len(slow_peers) + 1  # a new connection: none timed out is reused
