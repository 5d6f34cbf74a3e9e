from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance.settings import Settings


def test_defaults_serve_on_loopback_8080_with_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.gateway_url == "http://127.0.0.1:8080"
    assert settings.database_url == f"sqlite:///{tmp_path / 'appliance.db'}"


def test_environment_with_prefix_and_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_SERVER__PORT", "9123")
    monkeypatch.setenv("APPLIANCE_DATABASE__URL", "postgresql://u:p@db/appliance")
    monkeypatch.setenv(
        "APPLIANCE_GATEWAY__ROUTES", '[{"model": "m", "url": "http://127.0.0.1:1/", "runner": "pooling"}]'
    )
    settings = Settings()
    assert settings.server.port == 9123
    assert settings.database_url == "postgresql://u:p@db/appliance"
    assert settings.gateway.routes[0].url == "http://127.0.0.1:1"
    assert settings.gateway.routes[0].runner == "pooling"


def test_toml_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\n[engines]\nkv_cache_gib = 4\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    monkeypatch.setenv("APPLIANCE_SERVER__PORT", "9002")
    settings = Settings()
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 9002
    assert settings.engines.kv_cache_gib == 4


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_SERVER__PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_unknown_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        Settings(no_such_setting=1)  # type: ignore[call-arg]


def test_a_node_config_is_found_without_the_environment_and_its_env_files_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI on a node sees what the services see: the TOML, then the APPLIANCE_* lines of the *.env files
    beside it (their other lines belong to other programs), the environment above both."""
    from appliance import settings as module

    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "appliance.toml").write_text('data_dir = "/var/lib/appliance"\n[server]\nport = 8443\n')
    (folder / "database.env").write_text("APPLIANCE_DATABASE__URL=postgresql://appliance@/appliance\nPGHOST=x\n")
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./appliance.toml here
    monkeypatch.setattr(module, "NODE_CONFIG", folder / "appliance.toml")
    assert module.config_file() == folder / "appliance.toml"
    settings = Settings()
    assert (settings.server.port, settings.database_url) == (8443, "postgresql://appliance@/appliance")
    assert settings.data_dir == Path("/var/lib/appliance")
    monkeypatch.setenv("APPLIANCE_DATABASE__URL", "sqlite:///x.db")
    assert Settings().database_url == "sqlite:///x.db"
    (tmp_path / "appliance.toml").write_text("[server]\nport = 9005\n")
    assert module.config_file() == Path("appliance.toml") and Settings().server.port == 9005


def test_tls_serves_https_and_needs_both_files(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        server={"host": "0.0.0.0", "port": 8443, "tls_certfile": tmp_path / "c.pem", "tls_keyfile": tmp_path / "k"},
    )
    assert settings.gateway_url == "https://127.0.0.1:8443"
    assert settings.issuer_url == "https://127.0.0.1:8443/oidc"
    with pytest.raises(ValidationError, match="go together"):
        Settings(server={"tls_certfile": tmp_path / "c.pem"})


def test_a_currency_a_header_cannot_carry_is_refused_at_start() -> None:
    """Every priced answer names its currency in a header: a sign such as € made each of them a 500, after it
    was charged."""
    for currency in ("€", "US D", ""):
        with pytest.raises(ValidationError, match="currency"):
            Settings(pricing={"currency": currency})
    assert Settings(pricing={"currency": "CHF"}).pricing.currency == "CHF"
