"""Local accounts of the embedded issuer are managed through the admin API (disable, enable, reset the password,
change the roles, sign out everywhere), and console sessions follow their account at their next request
(issue #21: sessions used to keep their roles for 8 hours and could not be revoked)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from litestar.testing import AsyncTestClient
from sqlmodel import Session

from appliance.asgi import create_app
from appliance.db.engine import create_schema, make_engine
from appliance.identity.accounts import hash_password
from appliance.identity.models import LocalAccount
from appliance.identity.setup import bootstrap, embedded_issuer
from appliance.settings import Settings

Client = AsyncTestClient[Any]
PASSWORD = "alice's long passphrase"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path)
    bootstrap(settings)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    with Session(engine) as session:
        session.add(LocalAccount(username="alice", password_hash=hash_password(PASSWORD), roles=["admin"]))
        session.commit()
    engine.dispose()
    return settings


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.follow_redirects = False
        yield test_client


def token(settings: Settings, *roles: str, tenant: str | None = None) -> dict[str, str]:
    minted = embedded_issuer(settings).mint("root", client_id="c", roles=list(roles), tenant_id=tenant)
    return {"Authorization": f"Bearer {minted}"}


def cookie_value(response: Any, name: str) -> str:
    header = next(h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}="))
    return str(header.split(";", 1)[0].split("=", 1)[1])


async def authorize(client: Client, username: str, password: str, **extra: str) -> tuple[Any, str]:
    login = await client.get("/console/login")
    params = {k: v[0] for k, v in parse_qs(urlparse(login.headers["location"]).query).items()}
    answer = await client.post("/oidc/authorize", data={**params, "username": username, "password": password, **extra})
    return answer, cookie_value(login, "appliance_login")


async def console_session(client: Client, username: str = "alice", password: str = PASSWORD) -> dict[str, str]:
    """A signed-in console session's cookie header."""
    authorized, login_cookie = await authorize(client, username, password)
    assert authorized.status_code == 303, authorized.text
    callback = urlparse(authorized.headers["location"])
    done = await client.get(f"{callback.path}?{callback.query}", headers={"Cookie": f"appliance_login={login_cookie}"})
    assert done.status_code == 200, done.text
    return {"Cookie": f"appliance_session={cookie_value(done, 'appliance_session')}"}


def change_account(settings: Settings, **values: Any) -> None:
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        account = session.get(LocalAccount, "alice")
        assert account is not None
        for name, value in values.items():
            setattr(account, name, value)
        session.add(account)
        session.commit()
    engine.dispose()


async def test_a_console_session_follows_its_account_at_its_next_request(client: Client, settings: Settings) -> None:
    session = await console_session(client)
    assert (await client.get("/admin/tenants", headers=session)).status_code == 200
    change_account(settings, roles=["auditor"])  # however the account changed (API, CLI, another gateway)
    assert (await client.get("/admin/tenants", headers=session)).status_code == 403
    assert (await client.get("/console/session", headers=session)).json()["roles"] == ["auditor"]


async def test_admins_change_roles_and_sessions_follow(client: Client, settings: Settings) -> None:
    session = await console_session(client)
    changed = await client.patch(
        "/admin/local-accounts/alice", json={"roles": ["operator"]}, headers=token(settings, "admin")
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["roles"] == ["operator"] and "password_hash" not in changed.json()
    assert (await client.post("/admin/tenants", json={"name": "x"}, headers=session)).status_code == 403
    assert (await client.get("/console/session", headers=session)).json()["roles"] == ["operator"]


async def test_a_disabled_account_is_signed_out_and_cannot_sign_in_until_enabled(
    client: Client, settings: Settings
) -> None:
    session = await console_session(client)
    admin = token(settings, "admin")
    assert (
        await client.patch("/admin/local-accounts/alice", json={"disabled": True}, headers=admin)
    ).status_code == 200
    assert (await client.get("/admin/tenants", headers=session)).status_code == 401
    refused, _ = await authorize(client, "alice", PASSWORD)
    assert refused.status_code == 401
    assert (
        await client.patch("/admin/local-accounts/alice", json={"disabled": False}, headers=admin)
    ).status_code == 200
    assert (await client.get("/admin/tenants", headers=await console_session(client))).status_code == 200


async def test_a_password_reset_gives_a_one_time_password_and_signs_out(client: Client, settings: Settings) -> None:
    session = await console_session(client)
    reset = await client.post("/admin/local-accounts/alice/reset-password", headers=token(settings, "admin"))
    assert reset.status_code == 200, reset.text
    one_time = reset.json()["one_time_password"]
    assert reset.json()["must_change_password"] is True
    assert (await client.get("/admin/tenants", headers=session)).status_code == 401
    old, _ = await authorize(client, "alice", PASSWORD)
    assert old.status_code == 401
    must_change, _ = await authorize(client, "alice", one_time)
    assert must_change.status_code == 200 and 'name="new_password"' in must_change.text
    done, _ = await authorize(client, "alice", one_time, new_password="alice's new passphrase")
    assert done.status_code == 303


async def test_sign_out_everywhere(client: Client, settings: Settings) -> None:
    first, second = await console_session(client), await console_session(client)
    out = await client.post("/admin/local-accounts/alice/sign-out", headers=token(settings, "admin"))
    assert out.status_code == 200 and out.json()["signed_out"] == 2
    for session in (first, second):
        assert (await client.get("/admin/tenants", headers=session)).status_code == 401


async def test_only_admins_manage_accounts_and_every_change_is_audited(client: Client, settings: Settings) -> None:
    for roles in (("operator",), ("auditor",), ("user",)):
        refused = await client.patch(
            "/admin/local-accounts/alice", json={"roles": ["admin"]}, headers=token(settings, *roles)
        )
        assert refused.status_code == 403
    tenant = (await client.post("/admin/tenants", json={"name": "acme"}, headers=token(settings, "admin"))).json()
    tenant_admin = token(settings, "admin", tenant=tenant["id"])
    hidden = await client.post("/admin/local-accounts/alice/reset-password", headers=tenant_admin)
    assert hidden.status_code == 404, "a tenant's admin does not reach platform accounts"
    admin = token(settings, "admin")
    await client.patch("/admin/local-accounts/alice", json={"roles": ["user", "admin"]}, headers=admin)
    await client.post("/admin/local-accounts/alice/reset-password", headers=admin)
    await client.post("/admin/local-accounts/alice/sign-out", headers=admin)
    found = await client.get("/admin/audit/", params={"subject": "root"}, headers=token(settings, "auditor"))
    events = {(r["event_type"], r["object_id"], r["outcome"]) for r in found.json()["data"]}
    assert {
        ("admin.local-accounts.update", "alice", "success"),
        ("admin.local-accounts.reset_password", "alice", "success"),
        ("admin.local-accounts.sign_out", "alice", "success"),
    } <= events
    assert all("one_time_password" not in str(r["detail"]) for r in found.json()["data"])
    listed = await client.get("/admin/local-accounts", headers=admin)
    assert {a["username"] for a in listed.json()["data"]} == {"admin", "alice"}


async def test_the_last_platform_admin_cannot_be_disabled_or_demoted(client: Client, settings: Settings) -> None:
    admin = token(settings, "admin")
    assert (
        await client.patch("/admin/local-accounts/alice", json={"roles": ["user"]}, headers=admin)
    ).status_code == 200
    for change in ({"disabled": True}, {"roles": ["operator"]}):
        refused = await client.patch("/admin/local-accounts/admin", json=change, headers=admin)
        assert refused.status_code == 409, refused.text


async def test_any_users_console_sessions_can_be_ended_by_user_id(client: Client, settings: Settings) -> None:
    """For every identity provider (a Keycloak user's session too): by the mirrored user's id."""
    session = await console_session(client)
    admin = token(settings, "admin")
    users = (await client.get("/admin/users", headers=admin)).json()["data"]
    alice = next(user for user in users if user["username"] == "alice")
    out = await client.post(f"/admin/users/{alice['id']}/sign-out", headers=admin)
    assert out.status_code == 200 and out.json()["signed_out"] == 1
    assert (await client.get("/admin/tenants", headers=session)).status_code == 401
    nobody = await client.post("/admin/users/usr_nope/sign-out", headers=admin)
    assert nobody.status_code == 404


async def test_a_local_accounts_access_tokens_follow_the_account_too(client: Client, settings: Settings) -> None:
    """Tokens of the embedded issuer live 10 minutes: a disabled or demoted account's are refused within a second."""
    bearer = {
        "Authorization": f"Bearer {embedded_issuer(settings).mint('local:alice', client_id='c', roles=['admin'])}"
    }
    assert (await client.get("/admin/tenants", headers=bearer)).status_code == 200
    change_account(settings, roles=["auditor"])
    await asyncio.sleep(1.1)
    assert (await client.get("/admin/tenants", headers=bearer)).status_code == 403
    change_account(settings, disabled=True)
    await asyncio.sleep(1.1)
    assert (await client.get("/admin/tenants", headers=bearer)).status_code == 401
