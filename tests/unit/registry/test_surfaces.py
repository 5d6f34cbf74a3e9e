"""The registry's surfaces: the `appliance models` command (run as a user runs it) and /admin/models (admins
change, operators read, others are refused)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import Settings
from tests.support.gateway import admin_headers


def models_cli(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, APPLIANCE_DATA_DIR=str(data_dir), APPLIANCE_CONFIG=str(data_dir / "none.toml"))
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "models", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_models_command_imports_lists_shows_and_approves(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "data"
    imported = models_cli(data, "import", str(model_dir), "--name", "cli-chat", "--options", '{"replicas": 2}')
    assert imported.returncode == 0, imported.stderr
    version = json.loads(imported.stdout)
    assert (version["served_name"], version["version"], version["options"]["replicas"]) == ("cli-chat", 1, 2)
    assert version["imported_by"].startswith("os:")

    refused = models_cli(data, "approve", "cli-chat:v1", APPLIANCE_REGISTRY__REQUIRE_DISTINCT_APPROVER="true")
    assert refused.returncode == 1 and "another administrator must approve" in refused.stderr

    approved = models_cli(data, "approve", "cli-chat:v1")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["state"] == "approved"
    listing = json.loads(models_cli(data, "list").stdout)
    assert [(row["served_name"], row["version"], row["state"]) for row in listing] == [("cli-chat", 1, "approved")]
    shown = json.loads(models_cli(data, "show", str(version["id"])).stdout)
    assert [t["action"] for t in shown["transitions"]] == ["import", "approve"]
    assert {f["path"] for f in shown["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}

    connection = sqlite3.connect(data / "appliance.db")
    try:
        trail = connection.execute(
            "SELECT event_type, outcome, object_id FROM audit_records WHERE component = 'registry' ORDER BY seq"
        ).fetchall()
    finally:
        connection.close()
    assert trail == [
        ("model.import", "success", "cli-chat:v1"),
        ("model.approve", "denied", "cli-chat:v1"),
        ("model.approve", "success", "cli-chat:v1"),
    ]

    bad = models_cli(data, "import", str(model_dir), "--name", "x2", "--options", '{"speculative": {"method": "x"}}')
    assert bad.returncode == 1 and "invalid serving options" in bad.stderr
    missing = models_cli(data, "show", "cli-chat:v9")
    assert missing.returncode == 1 and "no model version" in missing.stderr


async def test_admin_models_routes_are_for_admins_and_readable_by_operators(tmp_path: Path, model_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    admin, operator, user = (admin_headers(settings, (role,)) for role in ("admin", "operator", "user"))
    async with AsyncTestClient(app=create_app(settings)) as client:
        body = {"source": str(model_dir), "served_name": "api-chat", "options": {"prefix_caching": True}}
        assert (await client.post("/admin/models/", json=body, headers=operator)).status_code == 403
        created = await client.post("/admin/models/", json=body, headers=admin)
        assert created.status_code == 201, created.text
        version_id = created.json()["id"]
        assert created.json()["imported_by"] == "root"

        assert (await client.get("/admin/models/", headers=operator)).status_code == 200
        assert (await client.get(f"/admin/models/{version_id}", headers=operator)).json()["state"] == "imported"
        assert (await client.get("/admin/models/", headers=user)).status_code == 403
        assert (await client.post(f"/admin/models/{version_id}/approve", headers=operator)).status_code == 403
        assert (await client.post(f"/admin/models/{version_id}/deploy", headers=admin)).status_code == 409
        approved = await client.post(f"/admin/models/{version_id}/approve", headers=admin)
        assert approved.status_code == 200 and approved.json()["approved_by"] == "root"
        assert (await client.post(f"/admin/models/{version_id}/retire", headers=admin)).json()["state"] == "retired"
        removed = await client.delete(f"/admin/models/{version_id}/files", headers=admin)
        assert removed.status_code == 200 and removed.json()["files_removed"]
        unknown = await client.post("/admin/models/", json={**body, "source": str(tmp_path / "none")}, headers=admin)
        assert unknown.status_code == 400 and "does not exist" in unknown.json()["error"]["message"]
        # An id past a 64-bit integer names no version: 404, never a 500 from the database.
        for huge in (f"/admin/models/{2**64}", f"/admin/models/{2**70}/approve"):
            method = client.get if huge.endswith(str(2**64)) else client.post
            assert (await method(huge, headers=admin)).status_code == 404, huge
        draft = {**body, "options": {"speculative": {"method": "draft_model", "draft_version_id": 2**64}}}
        assert (await client.post("/admin/models/", json=draft, headers=admin)).status_code == 400
