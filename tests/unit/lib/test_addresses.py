"""What a per-address limit counts a client as (issue #21): an IPv6 client holds a /64 and must not get a fresh
limit with each of its 2**64 addresses, nor may one host of a /64 use up the limit of every other host of it."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.lib.addresses import ClientCounts, ClientNetworks, embedded_ipv4, nat64_prefix
from appliance.settings import ServerSettings, Settings
from tests.unit.identity.test_sign_in_floods import Clock


def test_an_ipv6_address_counts_as_itself_and_as_its_network() -> None:
    networks = ClientNetworks()
    assert networks.keys("2001:db8:1:2::1") == ("2001:db8:1:2::1", "2001:db8:1:2::/64")
    assert networks.keys("2001:DB8:1:2:0::1") == ("2001:db8:1:2::1", "2001:db8:1:2::/64"), "one spelling"
    assert networks.keys("2001:db8:1:2:ffff:ffff:ffff:fffe")[1] == "2001:db8:1:2::/64"
    assert networks.keys("2001:db8:1:3::1")[1] == "2001:db8:1:3::/64", "the next network is someone else"
    assert networks.keys("fe80::1%eth0") == ("fe80::1", "fe80::/64"), "a zone does not make a new key"
    assert ClientNetworks(56).keys("2001:db8:1:2ff::9")[1] == "2001:db8:1:200::/56"
    assert ClientNetworks(128).keys("2001:db8::7") == ("2001:db8::7", None), "128: per address only"


def test_ipv4_counts_per_address_also_through_a_dual_stack_socket() -> None:
    networks = ClientNetworks()
    assert networks.keys("203.0.113.9") == ("203.0.113.9", None)
    assert networks.keys("::ffff:203.0.113.9") == ("203.0.113.9", None), "not every IPv4 client in ::ffff:0:0/64"
    assert networks.keys("::FFFF:203.0.113.10") == ("203.0.113.10", None)


def test_ipv4_translated_into_ipv6_counts_per_ipv4_address() -> None:
    """Behind NAT64 / SIIT every IPv4 client is an address of 64:ff9b::/96, so of one /64: counted per network, one of
    them could hold up every IPv4 client. A 6to4 host holds a /48 of its own: 65,536 networks."""
    networks = ClientNetworks()
    assert networks.keys("64:ff9b::93.184.216.34") == ("93.184.216.34", None)
    assert networks.keys("64:ff9b::5db8:d823") == ("93.184.216.35", None)
    assert networks.keys("2002:5db8:d822::1") == ("93.184.216.34", None)
    assert networks.keys("2002:5db8:d822:ffff::2") == ("93.184.216.34", None), "another network of the /48"
    assert networks.keys("64:ff9b:1::1")[1] == "64:ff9b:1::/64", "the local-use prefix: only as a site names it"
    assert networks.keys("64:ff9b::7f00:1") == ("64:ff9b::7f00:1", "64:ff9b::/64"), "127.0.0.1: never translated"
    assert networks.keys("2002:a00:1::1")[1] == "2002:a00:1::/64", "10.0.0.1: not a 6to4 host's"
    site = ClientNetworks(nat64_prefixes=["2001:db8:64::/96"])
    assert site.keys("2001:db8:64::93.184.216.34") == ("93.184.216.34", None), "the site's own translator"
    assert site.keys("64:ff9b::93.184.216.34")[1] == "64:ff9b::/64", "the prefixes named replace the well-known one"
    counts = ClientCounts(5, 60, ClientNetworks(64, factor=4), clock=Clock())
    for n in range(40):  # forty IPv4 clients through NAT64, five attempts each would be at their limit; one each here
        counts.add(f"64:ff9b::93.184.216.{n}")
    assert counts.wait("64:ff9b::93.184.216.200") == 0, "an IPv4 client is not held up by the others"


# RFC 6052 section 2.4: 192.0.2.33 embedded in a prefix of each length.
RFC6052_EXAMPLES = [
    ("2001:db8::/32", "2001:db8:c000:221::"),
    ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
    ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
    ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
    ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
    ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
    ("64:ff9b::/96", "64:ff9b::192.0.2.33"),
]


@pytest.mark.parametrize(("prefix", "address"), RFC6052_EXAMPLES)
def test_the_ipv4_address_is_found_where_rfc6052_puts_it_for_each_prefix_length(prefix: str, address: str) -> None:
    network = nat64_prefix(prefix)
    ip = ipaddress.IPv6Address(address)
    assert ip in network
    assert embedded_ipv4(ip, network.prefixlen) == ipaddress.IPv4Address("192.0.2.33")


def test_a_site_prefix_of_any_rfc6052_length_counts_its_clients_per_ipv4_address() -> None:
    """The local-use 64:ff9b:1::/48 (RFC 8215) is used with the length the site picks in it; 93.184.216.34 is a
    global address (192.0.2.33, the RFC's own example, is not: a translator carries no such address)."""
    site = ClientNetworks(nat64_prefixes=["64:ff9b:1::/48", "2001:db8:122:300::/56"])
    assert site.keys("64:ff9b:1:5db8:d8:2200::") == ("93.184.216.34", None)
    assert site.keys("2001:db8:122:35d:b8:d822::") == ("93.184.216.34", None)
    # Not made by a translator (a suffix, a u octet set): a host choosing its own bits in a prefix listed by mistake
    # (or its privacy addresses) counts in its /64, never as IPv4 clients of its choosing.
    assert site.keys("64:ff9b:1:5db8:d8:2201::")[1] == "64:ff9b:1:5db8::/64"
    assert site.keys("2001:db8:122:35d:ffb8:d822::")[1] == "2001:db8:122:35d::/64"
    nested = ClientNetworks(nat64_prefixes=["64:ff9b:1::/48", "64:ff9b:1:0:1::/96"])
    assert nested.keys("64:ff9b:1:0:1::5db8:d822") == ("93.184.216.34", None), "the longer prefix decides"
    assert site.keys("64:ff9b:1:7f00:0:100::")[1] == "64:ff9b:1:7f00::/64", "127.0.0.1: never translated"


def test_a_nat64_prefix_of_another_length_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="RFC 6052"):
        ClientNetworks(nat64_prefixes=["64:ff9b:1::/50"])
    with pytest.raises(ValueError, match="RFC 6052"):
        Settings(server=ServerSettings(limit_nat64_prefixes=["2001:db8:64::/80"]))
    assert ServerSettings(limit_nat64_prefixes=["2001:DB8:64::/96"]).limit_nat64_prefixes == ["2001:db8:64::/96"]
    assert ServerSettings(limit_nat64_prefixes=["64:ff9b:1::/48"]).limit_nat64_prefixes == ["64:ff9b:1::/48"]


def test_what_is_not_an_address_counts_as_is() -> None:
    networks = ClientNetworks()
    for name in ("testclient", "-", ""):
        assert networks.keys(name) == (name, None)


@pytest.mark.parametrize(("bits", "factor"), [(0, 4), (129, 4), (64, 0)])
def test_a_prefix_outside_ipv6_or_a_network_below_its_addresses_is_refused(bits: int, factor: int) -> None:
    with pytest.raises(ValueError, match=r"IPv6 prefix|factor"):
        ClientNetworks(bits, factor)


def test_a_client_rotating_through_its_network_reaches_the_networks_limit() -> None:
    clock = Clock()
    counts = ClientCounts(5, 60, ClientNetworks(64, factor=4), clock=clock)
    for n in range(20):  # twenty addresses of one /64, once each: under every address's limit
        assert counts.wait(f"2001:db8:9:9::{n + 1:x}") == 0
        counts.add(f"2001:db8:9:9::{n + 1:x}")
    assert counts.wait("2001:db8:9:9::ffff") > 0, "the network's limit: 4 x 5"
    assert counts.wait("2001:db8:9:a::1") == 0, "another network is not held up"
    clock.now += 61
    assert counts.wait("2001:db8:9:9::ffff") == 0


def test_one_host_reaches_its_own_limit_first_and_holds_up_only_itself() -> None:
    counts = ClientCounts(5, 60, ClientNetworks(64, factor=4), clock=Clock())
    for _ in range(5):
        counts.add("2001:db8:9:9::1")
    assert counts.wait("2001:db8:9:9::1") > 0
    assert counts.wait("2001:db8:9:9::2") == 0, "its neighbours on the segment go on"
    ipv4 = ClientCounts(5, 60, clock=Clock())
    for n in range(50):
        ipv4.add(f"198.51.100.{n}")
    assert ipv4.wait("198.51.100.200") == 0, "IPv4 addresses are not grouped"
    assert len(ipv4) == 50
