"""The console's page and assets: served by the appliance itself, under a policy that forbids other origins,
and referring only to this appliance's own files."""

from __future__ import annotations

import re
from typing import Any

from litestar.testing import AsyncTestClient

from appliance.console.auth_routes import STATIC_DIR

Client = AsyncTestClient[Any]


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(client: Client) -> None:
    for path, kind in (
        ("/console/", "text/html"),
        ("/console/assets/app.js", "javascript"),
        ("/console/assets/pages.js", "javascript"),
        ("/console/assets/console.css", "text/css"),
    ):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert kind in response.headers["content-type"]
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert (await client.get("/console/assets/nothing.js")).status_code == 404


def test_no_asset_names_another_origin() -> None:
    """Every script, style and font is written here: no URL with a host, no @import, no web font."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        urls = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.IGNORECASE)
        assert set(urls) <= {"http://www.w3.org"}, (path.name, urls)  # the SVG namespace name, never fetched
        assert "@import" not in text and "@font-face" not in text, path.name
