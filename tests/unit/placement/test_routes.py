"""`GET /admin/placement`: platform admins and operators only (the report covers the whole node)."""

from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import Settings


async def test_only_platform_admins_and_operators_read_the_report(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    issuer = embedded_issuer(settings)
    async with AsyncTestClient(app=create_app(settings)) as client:

        async def status(roles: list[str], tenant: str | None = None) -> int:
            token = issuer.mint("someone", client_id="appliance-console", roles=roles, tenant_id=tenant)
            response = await client.get("/admin/placement/", headers={"Authorization": f"Bearer {token}"})
            if response.status_code == 200:
                assert response.json()["verdict"] == "no-data"
            return response.status_code

        assert await status(["admin"]) == 200
        assert await status(["operator"]) == 200
        assert await status(["admin"], tenant="t1") == 403
        assert await status(["user"], tenant="t1") == 403
        assert (await client.get("/admin/placement/")).status_code == 401
