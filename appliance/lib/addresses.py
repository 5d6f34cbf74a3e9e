"""What a per-address limit counts against: a client's IPv4 address, or the IPv6 network its address lies in.

The appliance's limits on refusals (sign-in attempts, unknown API keys, paced refusals) count per client address.
One IPv4 address is about what one client controls. An IPv6 client usually controls a whole /64 (SLAAC, privacy
addresses): counted per address, it could send each attempt from a new one of 2**64 addresses and never reach a
limit, and fill the limiters' tables with keys that push out the ones that matter. So an IPv6 address counts as its
network (``server.limit_ipv6_prefix`` bits, 64 unless set), and an IPv4 address seen through a dual-stack socket
(``::ffff:a.b.c.d``) as that IPv4 address. Clients that share a /64 share its limits, as clients behind one IPv4
NAT share theirs. Anything that is not an IP address (a Unix socket's peer, a test client's name) counts as is.

Only the limits use this: audit records keep the client's full address."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPV4_BITS, IPV6_BITS = 32, 128


class ClientNetworks:
    """``networks.of(address)``: the key a per-address limit counts ``address`` under."""

    def __init__(self, ipv6_prefix: int = 64) -> None:
        if not 1 <= ipv6_prefix <= IPV6_BITS:
            raise ValueError(f"an IPv6 prefix is 1 to {IPV6_BITS} bits, not {ipv6_prefix}")
        self.ipv6_prefix = ipv6_prefix
        # Bounded: the addresses are the clients'. A flood of new ones costs a recomputation each, no memory.
        self.of = lru_cache(maxsize=4096)(self._network)

    def _network(self, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])  # without an IPv6 zone ("fe80::1%eth0")
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv4Address):
            return str(ip)
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip), self.ipv6_prefix), strict=False))
