"""The admin console end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
the running appliance: sign-in with PKCE through the embedded issuer, every page, the flow an admin goes
through, that no request leaves the appliance, and that the server refuses what a role may not do.

Screenshots of every page are saved under var/test-artifacts/console/."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from appliance.settings import REPO_ROOT
from tests.integration.conftest import Appliance

pytestmark = pytest.mark.integration

ARTIFACTS = REPO_ROOT / "var" / "test-artifacts" / "console"
RUN = uuid.uuid4().hex[:6]
PAGES = ["overview", "models", "identity", "budgets", "usage", "audit", "retrieval", "placement", "drift", "playground"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        yield browser
        browser.close()


def create_user(appliance: Appliance, name: str, *roles: str, tenant: str | None = None) -> dict[str, Any]:
    args = ["admin", "create-user", name, *[arg for role in roles for arg in ("--role", role)]]
    if tenant:
        args += ["--tenant", tenant]
    result = appliance.cli(*args)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


class Session:
    """One signed-in browser context, recording every URL it requests."""

    def __init__(self, browser: Browser, appliance: Appliance, user: dict[str, Any]) -> None:
        self.base = appliance.gateway_url
        self.context: BrowserContext = browser.new_context(base_url=self.base, viewport={"width": 1280, "height": 900})
        self.requested: list[str] = []
        self.context.on("request", lambda request: self.requested.append(request.url))
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        page = self.page
        page.goto("/console/")
        page.get_by_test_id("sign-in").click()
        page.get_by_label("Username").fill(user["username"])
        page.get_by_label("Password", exact=True).fill(user["one_time_password"])
        page.get_by_role("button", name="Sign in").click()
        page.get_by_label("Username").fill(user["username"])  # the one-time password must be replaced first
        page.get_by_label("Password", exact=True).fill(user["one_time_password"])
        page.get_by_label("New password").fill(f"a fresh passphrase {RUN}")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_contain_text(user["username"])

    def open(self, section: str) -> Page:
        self.page.goto(f"/console/#/{section}")
        self.page.wait_for_selector(f'[data-page="{section}"]')
        return self.page

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def csrf(self) -> str:
        return str(self.context.request.get(self.base + "/console/session").json()["csrf_token"])

    def close(self) -> None:
        self.context.close()


def test_an_admin_runs_the_appliance_from_the_console(appliance: Appliance, browser: Browser) -> None:
    platform = Session(browser, appliance, create_user(appliance, f"root-{RUN}", "admin"))
    page = platform.open("identity")
    tenant = f"acme-{RUN}"
    page.get_by_label("Tenant name").fill(tenant)
    page.get_by_role("button", name="Create tenant").click()
    expect(page.locator("[data-page=identity] table").first).to_contain_text(tenant)
    # a clear error next to the field: the same name again
    page.get_by_label("Tenant name").fill(tenant)
    page.get_by_role("button", name="Create tenant").click()
    expect(page.get_by_text("already exists")).to_be_visible()

    # The platform admin sets the tenant's budget (a tenant's own admins cannot).
    page = platform.open("budgets")
    page.get_by_label("Scope").select_option(label=f"tenant {tenant}")
    page.get_by_label("Kind").select_option("tokens")
    page.get_by_label("Limit", exact=True).fill("5000")
    page.get_by_role("button", name="Create budget").click()
    expect(page.get_by_text("0 used of 5,000").first).to_be_visible()  # the platform sees every tenant's

    # The tenant's own admin runs it: their playground calls are the tenant's, so its budget moves.
    manager = Session(browser, appliance, create_user(appliance, f"boss-{RUN}", "admin", tenant=tenant))
    page = manager.open("identity")
    page.get_by_label("Workflow name").fill("support")
    page.get_by_role("button", name="Create workflow").click()
    expect(page.get_by_role("cell", name="support", exact=True)).to_be_visible()
    page.get_by_label("Key name").fill("helpdesk")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_test_id("new-key")).to_have_text(re.compile(r"^\S{20,}$"))
    manager.shot("identity")

    page = manager.open("budgets")  # a budget on their workflow, within the platform's ceiling
    page.get_by_label("Scope").select_option(label="workflow support")
    page.get_by_label("Kind").select_option("tokens")
    page.get_by_label("Limit", exact=True).fill("4000")
    page.get_by_role("button", name="Create budget").click()
    expect(page.get_by_text("0 used of 4,000")).to_be_visible()

    page = manager.open("playground")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Message").fill("Name three colours.")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("answer-usage")).to_contain_text("completion tokens", timeout=120_000)
    expect(page.get_by_test_id("answer-usage")).not_to_contain_text("not recorded")
    assert page.get_by_test_id("answer").inner_text().strip()
    manager.shot("playground")

    page = manager.open("budgets")
    expect(page.get_by_text(re.compile(r"[1-9][0-9]* used of 5,000"))).to_be_visible()
    manager.shot("budgets")
    page = manager.open("usage")
    expect(page.get_by_role("cell", name=tenant)).to_be_visible()
    manager.shot("usage")

    page = platform.open("retrieval")
    page.locator("select[name=tenant_id]").select_option(label=tenant)
    page.get_by_label("Collection name").fill("handbook")
    page.get_by_role("button", name="Create collection").click()
    row = page.get_by_role("row").filter(has_text="handbook")
    row.get_by_label("Text, Markdown, HTML or PDF").set_input_files(
        files=[{"name": "leave.md", "mimeType": "text/markdown", "buffer": b"# Leave\n\nStaff get 30 days of leave."}]
    )
    row.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("row").filter(has_text="handbook").get_by_role("cell").nth(2)).to_have_text("1")
    platform.shot("retrieval")

    page = platform.open("audit")
    page.get_by_label("Subject").fill(f"local:boss-{RUN}")
    page.get_by_role("button", name="Search").click()
    results = page.locator("[data-page=audit] table")
    for event in ("admin.workflows.create", "admin.api-keys.create", "admin.budgets.create", "inference.completions"):
        expect(results).to_contain_text(event)
    page.get_by_role("button", name="Verify the chain").click()
    expect(page.get_by_test_id("verify-result")).to_contain_text("Chain intact")
    platform.shot("audit")

    for section in PAGES:
        page = platform.open(section)
        expect(page.locator(".error[role=alert]").filter(has_text=re.compile(r"\S"))).to_have_count(0)
        platform.shot(f"platform-{section}")
    own = (appliance.gateway_url + "/", "data:", "blob:")
    for session in (platform, manager):
        strangers = [url for url in session.requested if not url.startswith(own)]
        assert not strangers, f"requests left the appliance: {strangers}"
    platform.close()
    manager.close()


def test_pages_carry_a_policy_that_forbids_other_origins(appliance: Appliance, browser: Browser) -> None:
    context = browser.new_context(base_url=appliance.gateway_url)
    for path in ("/console/", "/console/assets/app.js", "/console/assets/console.css"):
        response = context.request.get(appliance.gateway_url + path)
        assert response.status == 200
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    context.close()


def test_the_server_refuses_what_a_role_may_not_do(appliance: Appliance, browser: Browser) -> None:
    auditor = Session(browser, appliance, create_user(appliance, f"auditor-{RUN}", "auditor"))
    nav = auditor.page.locator("#nav a")
    expect(nav).to_have_text(["Audit"])
    auditor.open("audit")
    auditor.shot("auditor-audit")
    request, csrf = auditor.context.request, auditor.csrf()
    base = appliance.gateway_url
    assert request.get(base + "/admin/tenants").status == 403
    assert request.get(base + "/admin/usage/").status == 403
    assert request.get(base + "/admin/budgets/").status == 403
    assert request.get(base + "/admin/audit/verify").status == 200
    chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}
    assert request.post(base + "/v1/chat/completions", data=chat, headers={"X-CSRF-Token": csrf}).status == 403
    auditor.page.goto("/console/#/identity")
    expect(auditor.page.get_by_role("heading", name="Not available")).to_be_visible()
    auditor.close()

    operator = Session(browser, appliance, create_user(appliance, f"operator-{RUN}", "operator"))
    request, csrf = operator.context.request, operator.csrf()
    assert request.get(base + "/admin/tenants").status == 200
    refused = request.post(base + "/admin/tenants", data={"name": f"nope-{RUN}"}, headers={"X-CSRF-Token": csrf})
    assert refused.status == 403
    assert request.get(base + "/admin/audit/").status == 403
    page = operator.open("identity")
    expect(page.get_by_role("button", name="Create tenant")).to_have_count(0)
    operator.shot("operator-identity")
    operator.close()


def test_an_admin_approves_retires_and_removes_a_version_from_the_console(
    appliance: Appliance, browser: Browser, tmp_path: Path
) -> None:
    """The registry's buttons, clicked in the browser, change the version's state through the admin API, each by the
    signed-in admin (its history says so). Deploy and roll back start engines and are exercised through the same
    API by tests/unit/registry/test_deploy.py and tests/integration/test_registry.py."""
    from tests.unit.registry.conftest import tiny_model

    name = f"console-{RUN}"
    imported = appliance.cli("models", "import", str(tiny_model(tmp_path / "model")), "--name", name, timeout=600)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    version_id = json.loads(imported.stdout)["id"]
    admin = Session(browser, appliance, create_user(appliance, f"registrar-{RUN}", "admin"))
    admin.page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of retire and remove
    page = admin.open("models")
    row = page.get_by_role("row").filter(has_text=name)
    expect(row).to_contain_text("imported")
    for button, shown in (("Approve", "approved"), ("Retire", "retired"), ("Remove files", "(files removed)")):
        row.get_by_role("button", name=button).click()
        expect(page.get_by_role("row").filter(has_text=name)).to_contain_text(shown)
        row = page.get_by_role("row").filter(has_text=name)
    expect(row.get_by_role("button", name=re.compile("Approve|Deploy|Retire|Remove"))).to_have_count(0)
    admin.shot("models-registry")
    admin.close()
    history = json.loads(appliance.cli("models", "show", str(version_id)).stdout)["transitions"]
    assert [t["action"] for t in history] == ["import", "approve", "retire", "remove"], history
    assert all(t["actor"].endswith(f"registrar-{RUN}") for t in history[1:]), history


def test_artifacts_hold_a_screenshot_of_every_page() -> None:
    saved = {path.stem for path in Path(ARTIFACTS).glob("*.png")}
    assert {f"platform-{section}" for section in PAGES} <= saved
