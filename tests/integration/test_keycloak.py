"""Against a real Keycloak, only when one is given: KEYCLOAK_URL, KEYCLOAK_ADMIN_USER, KEYCLOAK_ADMIN_PASSWORD.

No Keycloak server can be installed on the machines this project is built on (it is a Java distribution
that no reachable registry ships); the playbooks install it from the offline media. Here these tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from appliance.identity.setup import authenticator
from appliance.settings import IdentitySettings, Settings

KEYCLOAK_URL = os.environ.get("KEYCLOAK_URL", "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not KEYCLOAK_URL, reason="no Keycloak here: set KEYCLOAK_URL and admin credentials"),
]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True)


async def test_bootstrap_is_idempotent_and_service_account_tokens_validate(tmp_path: Path) -> None:
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(tmp_path))
    key = cli(env, "admin", "create-key", "--tenant", "acme", "--workflow", "support", "--create")
    assert key.returncode == 0, key.stderr
    workflow_id, tenant_id = json.loads(key.stdout)["workflow_id"], json.loads(key.stdout)["tenant_id"]
    args = ["identity", "bootstrap-keycloak", "--url", KEYCLOAK_URL, "--admin-user", os.environ["KEYCLOAK_ADMIN_USER"]]
    first = cli(env, *args)
    assert first.returncode == 0, first.stderr
    second = cli(env, *args)
    assert second.returncode == 0 and json.loads(second.stdout) == {"changed": False, "changes": []}

    from keycloak import KeycloakAdmin

    admin = KeycloakAdmin(
        server_url=KEYCLOAK_URL + "/",
        username=os.environ["KEYCLOAK_ADMIN_USER"],
        password=os.environ["KEYCLOAK_ADMIN_PASSWORD"],
        realm_name="master",
        user_realm_name="master",
    )
    admin.change_current_realm("appliance")
    internal = admin.get_client_id(f"wf-{workflow_id}")
    secret = admin.get_client_secrets(internal)["value"]
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{KEYCLOAK_URL}/realms/appliance/protocol/openid-connect/token",
            data={"grant_type": "client_credentials", "client_id": f"wf-{workflow_id}", "client_secret": secret},
        ) as response:
            token = (await response.json())["access_token"]

    settings = Settings(data_dir=tmp_path, identity=IdentitySettings(keycloak_url=KEYCLOAK_URL))
    from appliance.db.engine import make_engine
    from appliance.identity.setup import key_hasher
    from appliance.lib.addresses import ClientNetworks
    from appliance.lib.tarpit import Tarpit

    tarpit = Tarpit(settings.identity.refusal_delay_s)
    networks = ClientNetworks(settings.server.limit_ipv6_prefix, settings.server.limit_network_factor)
    auth = authenticator(settings, make_engine(settings.database_url), None, key_hasher(settings), tarpit, networks)
    principal = await auth.authenticate(f"Bearer {token}")
    assert (principal.tenant_id, principal.workflow_id) == (tenant_id, workflow_id)
    assert "user" in principal.roles
    assert (tmp_path / "identity" / "jwks-cache.json").exists(), "keys are cached on disk for restarts"
