"""The ``appliance`` command's own behaviour on a node: bootstrap, and no silent database without configuration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import cli
from appliance import settings as settings_module


def test_admin_bootstrap_creates_the_admin_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | {
        "APPLIANCE_DATA_DIR": str(tmp_path)
    }
    command = [sys.executable, "-m", "appliance.cli", "admin", "bootstrap"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {
        "created": True,
        "password_file": str(tmp_path / "secrets/bootstrap-admin-password"),
    }
    assert (tmp_path / "secrets/bootstrap-admin-password").stat().st_mode & 0o777 == 0o600
    assert "alembic" not in first.stderr.lower(), "no migration log lines on every command"
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert json.loads(second.stdout)["created"] is False


def test_an_installed_cli_without_configuration_refuses_instead_of_opening_a_new_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("APPLIANCE_CONFIG", "APPLIANCE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(settings_module, "NODE_CONFIG", tmp_path / "absent.toml")
    monkeypatch.setattr(cli, "NODE_CONFIG", tmp_path / "absent.toml")
    monkeypatch.setattr(cli, "is_checkout", lambda: False)
    assert cli.main(["status"]) == 1
    assert "no configuration" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and node1.test (what the node's PKI role makes, minus the CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node1.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("node1.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, private = folder / "gateway.crt", folder / "gateway.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, private


def test_serve_speaks_https_with_the_configured_certificate_and_status_trusts_it(tmp_path: Path) -> None:
    import socket
    import ssl
    import time
    import urllib.request

    cert, key = _certificate(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[server]\nport = {port}\n'
        f'tls_certfile = "{cert}"\ntls_keyfile = "{key}"\ntls_cafile = "{cert}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | {"APPLIANCE_CONFIG": str(config)}
    server = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=2) as r:
                    answer = json.loads(r.read())
            except OSError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                time.sleep(0.5)
        assert answer == {"status": "ok"}
        with pytest.raises(OSError):  # plain HTTP is not served on that port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        server.terminate()
        server.wait(timeout=30)
