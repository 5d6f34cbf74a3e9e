"""What a per-address limit counts: each client address, and an IPv6 address's network too.

The appliance's limits on refusals (sign-in attempts, unknown API keys, paced refusals) count per client address.
One IPv4 address is about what one client controls. An IPv6 client usually controls a whole /64 (SLAAC, privacy
addresses): counted per address only, it could send each attempt from a new one of 2**64 addresses and never reach
a limit, and fill the limiters' tables with keys that push out the ones that matter. Counted per /64 only, one
host of a LAN segment (where an appliance's users usually sit, each with an address of one /64) could use up the
limit of every other host of it.

So each limit counts twice (:class:`ClientCounts`): per address, as before, and per network
(``server.limit_ipv6_prefix`` bits, 64 unless set), ``server.limit_network_factor`` times as high (4 unless set).
One host reaches its own limit first and holds up only itself; a client rotating through its network reaches the
network's after factor x limit attempts, and then holds up its network, which is what a flood from it costs. An
IPv4 address seen through a dual-stack socket (``::ffff:a.b.c.d``) counts as that IPv4 address, and so does one that
reaches the node translated into IPv6: through NAT64 / SIIT (RFC 6052's well-known prefix ``64:ff9b::/96``, or
the site's own prefixes, ``server.limit_nat64_prefixes``, of any of RFC 6052's lengths: a network-specific prefix,
or one of the local-use ``64:ff9b:1::/48`` of RFC 8215), where every IPv4 client is an address of one /64
(counted per /64, one of them could hold up all the others), and through 6to4 (``2002:a.b.c.d::/48``: one IPv4
host's 65,536 networks). Only a global IPv4 address is taken out (a translator carries no other): ``64:ff9b::7f00:1``
is not 127.0.0.1. Anything that is not an IP address (a Unix socket's peer, a test client's name) counts as is.

Only the limits use this: audit records keep the client's full address."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

from appliance.lib.recent import RecentCounts

IPV6_BITS = 128
NAT64_WELL_KNOWN = "64:ff9b::/96"  # RFC 6052 section 2.1


class ClientNetworks:
    """``networks.keys(address)``: what the limits count ``address`` as: the client (the address, normalized; an
    IPv4 one mapped or translated into IPv6 as IPv4), and its network where that is wider than the address (IPv6),
    else None."""

    def __init__(
        self, ipv6_prefix: int = 64, factor: int = 4, nat64_prefixes: Sequence[str] = (NAT64_WELL_KNOWN,)
    ) -> None:
        if not 1 <= ipv6_prefix <= IPV6_BITS:
            raise ValueError(f"an IPv6 prefix is 1 to {IPV6_BITS} bits, not {ipv6_prefix}")
        if factor < 1:
            raise ValueError(f"a network's limit is at least its addresses' (factor >= 1), not {factor}")
        self.ipv6_prefix = ipv6_prefix
        self.factor = factor
        # Longest first: an address of a /96 named inside a /48 is read as the /96's.
        self._nat64 = sorted((nat64_prefix(prefix) for prefix in nat64_prefixes), key=lambda n: -n.prefixlen)
        # Bounded: the addresses are the clients'. A flood of new ones costs a recomputation each, no memory.
        self.keys: Callable[[str], tuple[str, str | None]] = lru_cache(maxsize=4096)(self._keys)

    def _keys(self, address: str) -> tuple[str, str | None]:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])  # without an IPv6 zone ("fe80::1%eth0")
        except ValueError:
            return address, None
        if isinstance(ip, ipaddress.IPv4Address):
            return str(ip), None
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped), None
        ipv4 = ip.sixtofour or next(
            (embedded_ipv4(ip, prefix.prefixlen) for prefix in self._nat64 if ip in prefix), None
        )  # (the longest prefix holding it decides: one whose address is not a translation is not tried further)
        if ipv4 is not None and ipv4.is_global:  # a translator carries only global IPv4 (RFC 6052 section 3.1)
            return str(ipv4), None
        if self.ipv6_prefix == IPV6_BITS:
            return str(ip), None
        return str(ip), str(ipaddress.IPv6Network((int(ip), self.ipv6_prefix), strict=False))


NAT64_LENGTHS = (32, 40, 48, 56, 64, 96)  # RFC 6052 section 2.2: where a prefix of each length puts the IPv4 address


def nat64_prefix(prefix: str) -> ipaddress.IPv6Network:
    """A NAT64 / SIIT translator's prefix, of one of RFC 6052's lengths (``NAT64_LENGTHS``); any other is refused,
    not guessed at."""
    network = ipaddress.IPv6Network(prefix)
    if network.prefixlen not in NAT64_LENGTHS:
        lengths = ", ".join(f"/{length}" for length in NAT64_LENGTHS)
        raise ValueError(f"a NAT64 prefix is a {lengths} (RFC 6052), not {prefix}")
    return network


def embedded_ipv4(ip: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address | None:
    """The IPv4 address an address of a NAT64 prefix of ``prefix_length`` bits carries (RFC 6052 section 2.2): the
    32 bits after the prefix, leaving out bits 64-71 (the "u" octet); in a /96, the last 32 bits. None where the u
    octet or the suffix after the address is not zero: no translator makes such an address (a host of a prefix
    listed by mistake, choosing its own bits, then counts in its /64 as any IPv6 host)."""
    packed = ip.packed
    if prefix_length == 96:
        return ipaddress.IPv4Address(packed[12:])
    start = prefix_length // 8
    unspaced = packed[:8] + packed[9:]
    if packed[8] or any(unspaced[start + 4 :]):
        return None
    return ipaddress.IPv4Address(unspaced[start : start + 4])


class ClientCounts:
    """At most ``limit`` events per client address in any ``window_s`` seconds, and at most ``factor`` x
    ``limit`` per IPv6 network (:class:`ClientNetworks`). Bounded memory, as :class:`RecentCounts`."""

    def __init__(
        self,
        limit: int,
        window_s: float,
        networks: ClientNetworks | None = None,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        networks = networks or ClientNetworks()
        self._keys = networks.keys
        self._by_address: RecentCounts[str] = RecentCounts(limit, window_s, max_entries=max_entries, clock=clock)
        self._by_network: RecentCounts[str] = RecentCounts(
            limit * networks.factor, window_s, max_entries=max_entries, clock=clock
        )

    def wait(self, address: str) -> int:
        """Whole seconds before ``address`` is under its limits again (0: it is). Counts nothing."""
        own, network = self._keys(address)
        wait = self._by_address.wait(own)
        return wait if network is None else max(wait, self._by_network.wait(network))

    def add(self, address: str) -> None:
        """Count one event of ``address`` now."""
        own, network = self._keys(address)
        self._by_address.add(own)
        if network is not None:
            self._by_network.add(network)

    def take_back(self, address: str) -> None:
        """Uncount ``address``'s latest event (see :meth:`RecentCounts.take_back`)."""
        own, network = self._keys(address)
        self._by_address.take_back(own)
        if network is not None:
            self._by_network.take_back(network)

    def __len__(self) -> int:
        return len(self._by_address) + len(self._by_network)
