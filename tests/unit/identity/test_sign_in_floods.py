"""A flood of sign-in attempts (or of made-up API keys) cannot stall the appliance (issue #21): limits per
address and overall are checked before any password is hashed, the limiter's memory is bounded, and password
hashing runs on its own small pool, so other requests are still answered while a flood runs."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity import oidc_routes
from appliance.identity.accounts import LoginLimiter, PasswordWork, hash_password
from appliance.identity.apikeys import ApiKeyAuthenticator
from appliance.identity.setup import bootstrap
from appliance.lib.addresses import ClientNetworks
from appliance.lib.errors import RateLimitedError
from appliance.lib.pacing import RefusalPacer
from appliance.lib.tarpit import Tarpit
from appliance.settings import Settings
from tests.support.fake_engine import free_port
from tests.support.gateway import admin_headers, tenant_with_key
from tests.unit.identity.test_oidc_flows import authorize_params, pkce


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limiters_memory_is_bounded_whatever_the_usernames_and_addresses() -> None:
    limiter = LoginLimiter(max_entries=500, per_address=10**9, global_rate_per_s=10**9, global_burst=10**9)
    for n in range(20_000):
        user, address = secrets.token_hex(8), f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
        assert limiter.admit(user, address) == 0
        limiter.failed(user, address)
    assert limiter.entries() <= 2 * 500


def test_one_address_is_limited_whatever_usernames_it_tries() -> None:
    clock = Clock()
    limiter = LoginLimiter(per_address=20, address_window_s=60, clock=clock)
    admitted = [limiter.admit(secrets.token_hex(6), "203.0.113.9") for _ in range(50)]
    assert admitted.count(0) == 20 and all(wait > 0 for wait in admitted[20:])
    assert limiter.admit("someone", "198.51.100.1") == 0, "other addresses are not held up"
    clock.now += 61
    assert limiter.admit("again", "203.0.113.9") == 0


def test_an_ipv6_client_cannot_escape_the_limits_by_rotating_through_its_network() -> None:
    """One client holds a /64: past factor x the per-address limit, every address of it is held, whatever the
    usernames; one host's failures with a username hold up only that host."""
    clock = Clock()
    limiter = LoginLimiter(
        per_address=10, address_window_s=60, global_burst=10**6, clock=clock, networks=ClientNetworks(64, factor=3)
    )
    admitted = [limiter.admit(secrets.token_hex(6), f"2001:db8:7:9::{n:x}") for n in range(1, 51)]
    assert admitted.count(0) == 30 and all(wait > 0 for wait in admitted[30:])
    assert limiter.admit("someone", "2001:db8:7:a::1") == 0, "the next network is not held up"
    for _ in range(5):
        limiter.failed("victim", "2001:db8:7:b::1")
    assert limiter.retry_after("victim", "2001:db8:7:b::1") > 0
    assert limiter.retry_after("victim", "2001:db8:7:b::2") == 0, "a neighbour's failures are not the victim's"


async def test_paced_refusals_count_an_ipv6_client_by_its_network_too() -> None:
    tarpit = Tarpit(delay_s=0.2)
    pacer = RefusalPacer(3, 10.0, tarpit, ClientNetworks(64, factor=2))
    for n in range(6):  # six addresses of one network, once each
        await pacer.pace(f"2001:db8:5::{n + 1}")
    started = time.perf_counter()
    await pacer.pace("2001:db8:5::ffff")  # a new address of the same network, past the network's 2 x 3: held
    assert time.perf_counter() - started >= 0.2
    started = time.perf_counter()
    await pacer.pace("2001:db8:6::1")
    assert time.perf_counter() - started < 0.15


def test_all_addresses_together_are_limited() -> None:
    clock = Clock()
    limiter = LoginLimiter(global_rate_per_s=5, global_burst=10, clock=clock)
    admitted = [limiter.admit("u", f"192.0.2.{n}") for n in range(30)]
    assert admitted.count(0) == 10 and all(wait >= 1 for wait in admitted[10:])
    clock.now += 1
    assert [limiter.admit("u", f"198.51.100.{n}") for n in range(6)].count(0) == 5


async def test_password_work_is_bounded_and_refused_at_once_when_full() -> None:
    work = PasswordWork(workers=1, queue=2)
    try:
        jobs = [asyncio.ensure_future(work.run(hash_password, "p" * 20)) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(RateLimitedError):
            await work.run(hash_password, "refused")
        assert all(digest.startswith("$argon2id$") for digest in await asyncio.gather(*jobs))
        # Database work (the default pool) is not queued behind password hashing.
        busy = [asyncio.ensure_future(work.run(hash_password, "p" * 20)) for _ in range(3)]
        started = time.perf_counter()
        await asyncio.to_thread(time.sleep, 0.01)
        assert time.perf_counter() - started < 0.5
        await asyncio.gather(*busy)
    finally:
        work.close()


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[str]:
    """The app behind a real HTTP server (the test client runs one request at a time: no flood)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.mark.timeout(240)
async def test_a_sign_in_flood_with_random_usernames_does_not_stall_other_requests(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert bootstrap(settings)
    admin = admin_headers(settings)
    _verifier, challenge = pkce()
    limits = httpx.Limits(max_connections=200)
    async with served(settings) as url, httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def attempt() -> int:
            form = {**authorize_params(challenge), "username": secrets.token_hex(8), "password": "guess-guess-guess"}
            return (await client.post("/oidc/authorize", data=form)).status_code

        async def cheap() -> float:
            """An audited admin change: its audit record is written (by a worker thread) before it is answered."""
            started = time.perf_counter()
            response = await client.post("/admin/tenants", json={"name": secrets.token_hex(4)}, headers=admin)
            assert response.status_code == 201, response.text
            return time.perf_counter() - started

        assert await cheap() < 2.0  # warm
        flood = [asyncio.ensure_future(attempt()) for _ in range(60)]
        await asyncio.sleep(0.5)  # the flood has reached the appliance
        latencies: list[float] = []
        for _ in range(5):
            latencies.append(await cheap())
            await asyncio.sleep(0.05)
        statuses: list[Any] = await asyncio.gather(*flood)
    # Generous: a cheap request normally takes milliseconds; before, it queued behind the flood's hashing.
    assert max(latencies) < 2.0, latencies
    assert statuses.count(429) >= 30, statuses
    assert set(statuses) <= {401, 429}


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The API keys looked up in the database, in order (a spy: the real lookup, counted)."""
    looked_up: list[str] = []
    real_check = ApiKeyAuthenticator._check

    def counted(self: ApiKeyAuthenticator, key_id: str, digest: str) -> Any:
        looked_up.append(key_id)
        return real_check(self, key_id, digest)

    monkeypatch.setattr(ApiKeyAuthenticator, "_check", counted)
    return looked_up


async def test_a_flood_of_made_up_api_keys_from_one_address_stops_costing_database_reads(
    tmp_path: Path, lookups: list[str]
) -> None:
    """Past 20 unknown keys in 10 s from one address, its keys not known valid are refused without a lookup; a
    key already known valid keeps working from that address, its fresh lookups included."""
    settings = Settings(data_dir=tmp_path, identity={"refusal_delay_s": 0.2})
    async with AsyncTestClient(app=create_app(settings)) as client:
        known = await tenant_with_key(client, admin_headers(settings), "acme")
        assert (await client.get("/v1/models", headers=known["headers"])).status_code == 200
        lookups.clear()
        refusals = []
        for _ in range(30):
            made_up = f"apk_{secrets.token_hex(10)}_{secrets.token_urlsafe(32)}"
            started = time.perf_counter()
            response = await client.get("/v1/models", headers={"Authorization": f"Bearer {made_up}"})
            refusals.append((response.status_code, response.json()["error"]["message"], time.perf_counter() - started))
        assert all(status == 401 for status, _, _ in refusals)
        assert len(lookups) == 20, "only the first 20 unknown keys of the window were looked up"
        assert all("Too many unknown credentials" in message for _, message, _ in refusals[20:])
        assert all(took >= 0.2 for _, _, took in refusals[20:]), "refusals past the limit are held (the tarpit)"
        await asyncio.sleep(1.1)  # the known key's answer is stale: it is looked up again, and still works
        assert (await client.get("/v1/models", headers=known["headers"])).status_code == 200
        assert lookups[-1] == known["key"]["id"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("server", "looked_up"), [({}, 80), ({"limit_network_factor": 2}, 40), ({"limit_ipv6_prefix": 128}, 100)]
)
async def test_made_up_api_keys_from_rotating_ipv6_addresses_are_limited_as_one_client(
    tmp_path: Path, lookups: list[str], server: dict[str, int], looked_up: int
) -> None:
    """Over the network, as a client behind the node's reverse proxy is seen (``X-Forwarded-For`` from a
    trusted local proxy): a flood of made-up keys, each from a new address of one /64, is limited at 4 x the
    per-address limit (the network's); a client of another network is still looked up as usual."""
    settings = Settings(data_dir=tmp_path, identity={"refusal_delay_s": 0.05}, server=server)

    def made_up() -> dict[str, str]:
        return {"Authorization": f"Bearer apk_{secrets.token_hex(10)}_{secrets.token_urlsafe(32)}"}

    async with served(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        messages = []
        for n in range(100):
            forwarded = {"X-Forwarded-For": f"2001:db8:42:7:{secrets.token_hex(2)}:{n:x}::1"}
            response = await client.get("/v1/models", headers={**made_up(), **forwarded})
            assert response.status_code == 401
            messages.append(response.json()["error"]["message"])
        # By default, only the first 4 x 20 unknown keys of the network's window are looked up; 128: per address.
        assert len(lookups) == looked_up
        assert all("Too many unknown credentials" in message for message in messages[looked_up:])
        other = await client.get("/v1/models", headers={**made_up(), "X-Forwarded-For": "2001:db8:42:8::1"})
        assert other.status_code == 401 and "Too many" not in other.json()["error"]["message"]
        assert len(lookups) == looked_up + 1


async def test_the_tarpit_holds_refusals_and_a_bounded_number_of_them() -> None:
    tarpit = Tarpit(delay_s=0.3, max_held=3)
    started = time.perf_counter()
    held = [asyncio.ensure_future(tarpit.hold()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert tarpit.held == 3
    await tarpit.hold()  # the fourth is answered at once
    assert time.perf_counter() - started < 0.2
    await asyncio.gather(*held)
    assert time.perf_counter() - started >= 0.3 and tarpit.held == 0


@pytest.mark.timeout(120)
async def test_a_flood_of_wrong_client_secrets_at_the_token_endpoint_stops_costing_database_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/oidc/token`` counts failed grants (client_credentials, authorization codes) per address and IPv6
    network: past the limit, the client is refused (429, held by the tarpit) before its form is read or the
    database asked; another network is not held up, and its client still gets its token."""
    settings = Settings(data_dir=tmp_path, identity={"refusal_delay_s": 0.05})
    granted: list[str] = []
    real_grant = oidc_routes._grant

    def counted(*args: Any) -> Any:
        granted.append(args[3].get("grant_type", ""))
        return real_grant(*args)

    monkeypatch.setattr(oidc_routes, "_grant", counted)
    async with served(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        admin = admin_headers(settings)
        tenant = (await client.post("/admin/tenants", json={"name": "acme"}, headers=admin)).json()
        workflow = (
            await client.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}, headers=admin)
        ).json()
        created = await client.post("/admin/service-clients", json={"workflow_id": workflow["id"]}, headers=admin)
        client_id, secret = created.json()["client_id"], created.json()["client_secret"]
        right = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        statuses = []
        for n in range(100):  # each from a new address of one /64, as a rotating IPv6 client
            forwarded = {"X-Forwarded-For": f"2001:db8:42:7::{n:x}"}
            wrong = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secrets.token_hex(8)}
            if n % 2:
                wrong = {"grant_type": "authorization_code", "code": secrets.token_urlsafe(32), "code_verifier": "x"}
            started = time.perf_counter()
            response = await client.post("/oidc/token", data=wrong, headers=forwarded)
            statuses.append((response.status_code, response.json()["error"], time.perf_counter() - started))
        assert len(granted) == 4 * 20, "the /64 is held at 4 x the per-address limit: the rest cost no lookup"
        assert {status for status, _, _ in statuses[:80]} <= {400, 401}
        assert all(status == 429 and error == "temporarily_unavailable" for status, error, _ in statuses[80:])
        assert all(took >= 0.05 for _, _, took in statuses[80:]), "refusals past the limit are held (the tarpit)"
        held = await client.post("/oidc/token", data=right, headers={"X-Forwarded-For": "2001:db8:42:7::ffff"})
        assert held.status_code == 429 and int(held.headers["retry-after"]) > 0
        assert len(granted) == 80
        other = await client.post("/oidc/token", data=right, headers={"X-Forwarded-For": "2001:db8:42:8::1"})
        assert other.status_code == 200, other.text


@pytest.mark.timeout(120)
async def test_a_concurrent_burst_at_the_token_endpoint_is_held_at_the_limit_and_nul_bytes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each grant counts as refused from its start until it succeeds: 60 wrong secrets sent at once from one
    address cost at most 20 lookups, not 60 (the burst's refusals would come too late to hold it). A NUL byte in a
    field (which PostgreSQL refuses as text: a 500 before) is refused as a bad request, and counted."""
    settings = Settings(data_dir=tmp_path, identity={"refusal_delay_s": 0.05})
    granted: list[str] = []
    real_grant = oidc_routes._grant

    def counted(*args: Any) -> Any:
        granted.append(args[3].get("grant_type", ""))
        time.sleep(0.02)  # a database read's time: the burst arrives while the first reads run
        return real_grant(*args)

    monkeypatch.setattr(oidc_routes, "_grant", counted)
    limits = httpx.Limits(max_connections=100)
    async with served(settings) as url, httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        nul = await client.post(
            "/oidc/token",
            data={"grant_type": "client_credentials", "client_id": "a\x00b", "client_secret": "x"},
            headers={"X-Forwarded-For": "198.51.100.7"},
        )
        assert nul.status_code == 400 and nul.json()["error"] == "invalid_request", nul.text
        assert granted == []
        forwarded = {"X-Forwarded-For": "203.0.113.9"}

        async def wrong() -> int:
            data = {"grant_type": "client_credentials", "client_id": "svc_x", "client_secret": secrets.token_hex(8)}
            return (await client.post("/oidc/token", data=data, headers=forwarded)).status_code

        statuses = await asyncio.gather(*(wrong() for _ in range(60)))
    assert len(granted) <= 20, len(granted)
    assert statuses.count(429) >= 40 and set(statuses) <= {401, 429}, statuses
