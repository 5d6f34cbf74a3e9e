"""Console sign-in through the real app: PKCE with the embedded issuer, the session cookie, CSRF."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from litestar.testing import AsyncTestClient

from appliance.identity.setup import bootstrap, bootstrap_password_file
from appliance.settings import Settings

Client = AsyncTestClient[Any]


def cookie_value(set_cookie: list[str], name: str) -> tuple[str, str]:
    header = next(h for h in set_cookie if h.startswith(f"{name}="))
    return header.split(";", 1)[0].split("=", 1)[1], header


async def sign_in(client: Client, settings: Settings) -> tuple[str, str]:
    """(session cookie value, its Set-Cookie header). Secure cookies are handed over by hand: the test
    client speaks plain HTTP and would (rightly) not send them."""
    bootstrap(settings)
    password = bootstrap_password_file(settings).read_text().strip()
    login = await client.get("/console/login")
    assert login.status_code == 303
    login_cookie, login_header = cookie_value(login.headers.get_list("set-cookie"), "appliance_login")
    assert "HttpOnly" in login_header and "Secure" in login_header
    params = {k: v[0] for k, v in parse_qs(urlparse(login.headers["location"]).query).items()}
    form = {**params, "username": "admin", "password": password, "new_password": "console passphrase 1"}
    authorized = await client.post("/oidc/authorize", data=form)
    assert authorized.status_code == 303, authorized.text
    callback = urlparse(authorized.headers["location"])
    done = await client.get(f"{callback.path}?{callback.query}", headers={"Cookie": f"appliance_login={login_cookie}"})
    assert done.status_code == 200, done.text
    return cookie_value(done.headers.get_list("set-cookie"), "appliance_session")


async def test_sign_in_gives_a_strict_http_only_secure_session_cookie(client: Client, settings: Settings) -> None:
    _session, header = await sign_in(client, settings)
    assert "HttpOnly" in header and "Secure" in header and "samesite=strict" in header.lower()


async def test_session_reads_freely_but_changes_need_the_csrf_token(client: Client, settings: Settings) -> None:
    session, _ = await sign_in(client, settings)
    cookie = {"Cookie": f"appliance_session={session}"}
    me = await client.get("/console/session", headers=cookie)
    assert me.status_code == 200 and me.json()["username"] == "admin" and me.json()["roles"] == ["admin"]
    csrf = me.json()["csrf_token"]
    assert (await client.get("/admin/tenants", headers=cookie)).status_code == 200
    refused = await client.post("/admin/tenants", json={"name": "acme"}, headers=cookie)
    assert refused.status_code == 403
    wrong = await client.post("/admin/tenants", json={"name": "acme"}, headers={**cookie, "X-CSRF-Token": "nope"})
    assert wrong.status_code == 403
    created = await client.post("/admin/tenants", json={"name": "acme"}, headers={**cookie, "X-CSRF-Token": csrf})
    assert created.status_code == 201

    assert (await client.post("/console/logout", headers=cookie)).status_code == 403
    assert (await client.post("/console/logout", headers={**cookie, "X-CSRF-Token": csrf})).status_code == 200
    assert (await client.get("/admin/tenants", headers=cookie)).status_code == 401


async def test_callback_without_the_login_cookie_or_with_another_state_is_refused(client: Client) -> None:
    assert (await client.get("/console/callback?code=x&state=y")).status_code == 401
    response = await client.get("/console/callback?code=x&state=y", headers={"Cookie": "appliance_login=z.v"})
    assert response.status_code == 401


async def test_forged_session_cookie_is_refused(client: Client) -> None:
    response = await client.get("/admin/tenants", headers={"Cookie": "appliance_session=forged"})
    assert response.status_code == 401
