"""What a per-address limit counts a client as (issue #21): an IPv6 client holds a /64, and must not get a fresh
limit with each of its 2**64 addresses."""

from __future__ import annotations

import pytest

from appliance.lib.addresses import ClientNetworks


def test_an_ipv6_address_counts_as_its_network() -> None:
    networks = ClientNetworks()
    assert networks.of("2001:db8:1:2::1") == networks.of("2001:db8:1:2:ffff:ffff:ffff:fffe") == "2001:db8:1:2::/64"
    assert networks.of("2001:db8:1:3::1") == "2001:db8:1:3::/64", "the next network is someone else"
    assert networks.of("fe80::1%eth0") == "fe80::/64", "a zone does not make a new key"
    assert ClientNetworks(56).of("2001:db8:1:2ff::9") == "2001:db8:1:200::/56"
    assert ClientNetworks(128).of("2001:db8::7") == "2001:db8::7/128"


def test_ipv4_counts_per_address_also_through_a_dual_stack_socket() -> None:
    networks = ClientNetworks()
    assert networks.of("203.0.113.9") == "203.0.113.9"
    assert networks.of("::ffff:203.0.113.9") == "203.0.113.9", "not every IPv4 client in one ::ffff:0:0/64"
    assert networks.of("::ffff:203.0.113.10") == "203.0.113.10"


def test_what_is_not_an_address_counts_as_is() -> None:
    networks = ClientNetworks()
    assert networks.of("testclient") == "testclient"
    assert networks.of("-") == "-"
    assert networks.of("") == ""


@pytest.mark.parametrize("bits", [0, 129])
def test_a_prefix_outside_ipv6_is_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="IPv6 prefix"):
        ClientNetworks(bits)
