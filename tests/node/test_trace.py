"""The connect() trace check of the node tests, on the lines strace writes (no node needed): what it must flag."""

from __future__ import annotations

from pathlib import Path

from tests.node.nodelib import outside_connects

LINES = """\
5643  connect(12, {sa_family=AF_INET, sin_port=htons(8101), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS
5643  connect(3, {sa_family=AF_UNIX, sun_path="/run/systemd/journal/socket"}, 30) = 0
5700  connect(9, {sa_family=AF_INET, sin_port=htons(8080), sin_addr=inet_addr("10.77.0.1")}, 16) = 0
5701  connect(9, {sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 0
5702  connect(9, {sa_family=AF_UNSPEC, sa_data="\\0\\0\\0\\0"}, 16) = 0
8337  connect(31, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("8.8.8.8")}, 16) = 0
8337  connect(32, {sa_family=AF_INET6, sin6_port=htons(80), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "2001:4860:4860::8888", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH
8338  connect(33, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::ffff:192.0.2.7", &sin6_addr), sin6_scope_id=0}, 28) = -1 EPERM
"""  # noqa: E501


def test_only_connects_outside_loopback_and_the_site_subnet_are_flagged(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text(LINES)
    flagged = outside_connects(trace, "10.77.0.0/24")
    assert [line.split()[0] for line in flagged] == ["8337", "8337", "8338"]
    assert outside_connects(trace, "10.78.0.0/24")[0].startswith("5700")
