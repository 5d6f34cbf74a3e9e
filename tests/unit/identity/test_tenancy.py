"""No tenant, no tenant data: only platform administrators and operators act without a tenant; a tenant-less
`user` is refused on /v1 and /v1/rag, or bound to the configured default tenant."""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlmodel import Session

from appliance.asgi import create_app
from appliance.db.engine import create_schema, make_engine
from appliance.identity.models import Tenant
from appliance.identity.setup import embedded_issuer
from appliance.identity.tenancy import DefaultTenant, DefaultTenantMissingError, check_default_tenant
from appliance.lib.errors import PermissionDeniedError
from appliance.lib.principal import NO_TENANT, Principal, bind_default_tenant
from appliance.settings import IdentitySettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import fake_settings


def principal(*roles: str, tenant: str | None = None, kind: Any = "token") -> Principal:
    return Principal(kind=kind, subject="s", roles=frozenset(roles), tenant_id=tenant)


@pytest.mark.parametrize(
    ("roles", "tenant", "allowed"),
    [
        (("user",), None, False),  # a token without a tenant claim
        (("user", "auditor"), None, False),
        (("auditor",), None, False),  # auditors run no models
        (("auditor",), "t1", False),
        (("user",), "t1", True),
        (("operator",), "t1", True),
        (("admin",), None, True),  # platform admin
        (("operator",), None, True),  # platform operator
        (("user", "admin"), "t1", True),  # an admin-scoped key of a tenant
    ],
)
def test_who_may_use_the_inference_api(roles: tuple[str, ...], tenant: str | None, allowed: bool) -> None:
    if allowed:
        principal(*roles, tenant=tenant).require_inference()
    else:
        with pytest.raises(PermissionDeniedError):
            principal(*roles, tenant=tenant).require_inference()


def test_a_tenantless_user_is_told_why() -> None:
    with pytest.raises(PermissionDeniedError) as refused:
        principal("user", kind="session").require_inference()
    assert refused.value.message == NO_TENANT and refused.value.status_code == 403


def test_tenant_data_without_a_tenant_is_for_platform_principals_only() -> None:
    operator, admin, user = principal("operator"), principal("admin"), principal("user", tenant="t1")
    operator.require_tenant_data()  # lists collections and documents (the console's read-only view)
    for write, content in ((True, False), (False, True)):
        with pytest.raises(PermissionDeniedError):
            operator.require_tenant_data(write=write, content=content)
        admin.require_tenant_data(write=write, content=content)
        user.require_tenant_data(write=write, content=content)
    with pytest.raises(PermissionDeniedError):
        principal("user").require_tenant_data()


def test_only_tenantless_users_are_bound_to_the_default_tenant() -> None:
    assert bind_default_tenant(principal("user"), "ten_d").tenant_id == "ten_d"
    assert bind_default_tenant(principal("user"), None).tenant_id is None
    for unchanged in (
        principal("user", tenant="t1"),
        principal("admin"),
        principal("operator"),
        principal("auditor"),
        principal("user", "admin"),
    ):
        assert bind_default_tenant(unchanged, "ten_d") is unchanged


async def test_a_deleted_default_tenant_binds_nobody(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    with Session(engine) as session:
        session.add(Tenant(id="ten_d", name="default"))
        session.commit()
    now = [0.0]
    default = DefaultTenant(engine, "default", clock=lambda: now[0])  # named by name
    assert (await default.bind(principal("user"))).tenant_id == "ten_d"
    assert check_default_tenant(engine, "ten_d") == "ten_d"
    with Session(engine) as session:
        session.delete(session.get(Tenant, "ten_d"))
        session.commit()
    now[0] += 2.0
    assert (await default.bind(principal("user"))).tenant_id is None, "fails closed: refused, not unbudgeted"
    with pytest.raises(DefaultTenantMissingError):
        check_default_tenant(engine, "default")


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    return fake_settings(tmp_path, fake_engine, identity=IdentitySettings(default_tenant="walk-ins"))


async def test_the_app_refuses_to_start_with_a_default_tenant_that_does_not_exist(settings: Settings) -> None:
    with pytest.raises(BaseException) as refused:  # raised through the lifespan (in an exception group)
        async with AsyncTestClient(app=create_app(settings)):
            pass
    text = "".join(traceback.format_exception(refused.value))
    assert DefaultTenantMissingError.__name__ in text and "'walk-ins', which names no tenant" in text


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    with Session(engine) as session:
        session.add(Tenant(id="ten_walkins", name="walk-ins"))
        session.commit()
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


async def test_a_tenantless_user_is_served_as_the_default_tenant(
    client: AsyncTestClient[Any], settings: Settings
) -> None:
    issuer = embedded_issuer(settings)
    user = {"Authorization": f"Bearer {issuer.mint('walker', client_id='c', roles=['user'])}"}
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/chat/completions", json=body, headers=user)
    assert response.status_code == 200, response.text
    auditor = {"Authorization": f"Bearer {issuer.mint('a', client_id='c', roles=['auditor'])}"}
    found = await client.get("/admin/audit/", params={"event_type": "inference.completions"}, headers=auditor)
    [record] = found.json()["data"]
    assert (record["tenant_id"], record["subject"]) == ("ten_walkins", "walker")
