"""Where a webhook may go: the SSRF guard (contract section 10).

A target's host is resolved at delivery time, and every address it resolves to must be a
public one, unless the host, or the address, is in TASKCAST_WEBHOOK_ALLOWED_HOSTS (hosts,
addresses or CIDRs). The request is then made to the address that was checked (the sender
pins it), so a name that resolves differently a moment later (DNS rebinding) cannot redirect
it. Refused: loopback, private, link-local (cloud metadata at 169.254.169.254), unspecified,
shared (100.64/10), multicast and reserved addresses: everything Python's `ipaddress` does not
call global.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(Exception):
    """The target is not one webhooks may reach; the message says why (no secrets in it)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked target: connect to `address`, speak to `host`."""

    scheme: str
    host: str
    port: int
    address: str


class TargetPolicy:
    """Decides, after resolving, whether a URL's host may be reached."""

    def __init__(self, allowed: str = "") -> None:
        self.hosts: set[str] = set()
        self.networks: list[IPNetwork] = []
        for entry in (part.strip() for part in allowed.split(",")):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    def describe(self) -> str:
        """For the start-up log line."""
        if not self.hosts and not self.networks:
            return "public addresses only"
        listed = sorted(self.hosts) + [str(net) for net in self.networks]
        return "public addresses, and " + ", ".join(listed)

    def allows_address(self, address: IPAddress) -> bool:
        """A public address, or one the allowlist names."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.networks):
            return True
        return address.is_global and not address.is_multicast

    async def check(self, scheme: str, host: str, port: int, *, timeout_s: float) -> Target:
        """Resolve `host` and return the address to connect to; TargetRefused otherwise."""
        name = host.lower().rstrip(".").strip("[]")
        listed = name in self.hosts
        try:
            literal: IPAddress | None = ipaddress.ip_address(name)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            addresses = await _resolve(name, port, timeout_s)
        if not listed:
            for address in addresses:
                if not self.allows_address(address):
                    raise TargetRefused(f"{host} resolves to {address}, which is not a public "
                                        "address (TASKCAST_WEBHOOK_ALLOWED_HOSTS can allow it)")
        return Target(scheme, host, port, str(addresses[0]))


async def _resolve(name: str, port: int, timeout_s: float) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"resolving {name} failed: {exc or 'timed out'}") from None
    addresses: list[IPAddress] = []
    for _family, _kind, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ConnectionError(f"resolving {name} gave no address")
    return addresses
