"""The node's appliance.toml as the playbooks write it (rendered from the role's template with the roles' own
defaults) is a configuration the appliance accepts, with what the installer means:
systemd units, the registry where the engines' group reads it, spans only inside the site's networks. The booted
node (tests/node) converges the same template; this catches a broken template in seconds."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from appliance.settings import REPO_ROOT, Settings

ROLES = REPO_ROOT / "playbooks" / "roles"


def defaults(*roles: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for role in roles:
        merged.update(yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {})
    return merged


def ansible_bool(value: Any) -> bool:
    """Ansible's ``bool`` filter."""
    return value.lower() in ("yes", "true", "on", "1") if isinstance(value, str) else bool(value)


def render(**overrides: Any) -> dict[str, Any]:
    variables = {
        **defaults("vllm", "appliance", "egress_lockdown"),
        "ansible_managed": "managed",
        "pki_hostnames": ["node1.test"],
        "appliance_subnet": "10.23.0.0/24",
        "vllm_models": [{"name": "smollm2-135m-instruct"}, {"name": "minilm-l6-v2"}],
        "appliance_with_qdrant": False,
        "appliance_with_keycloak": False,
        **overrides,
    }
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["bool"] = ansible_bool
    template = env.from_string((ROLES / "appliance" / "templates" / "appliance.toml.j2").read_text())
    # Role defaults are templates themselves (e.g. appliance_public_url): render them the way Ansible would.
    for _ in range(3):
        variables = {
            k: env.from_string(v).render(**variables) if isinstance(v, str) and "{{" in v else v
            for k, v in variables.items()
        }
    return tomllib.loads(template.render(**variables))


def test_the_node_configuration_is_one_the_appliance_accepts(tmp_path: Path) -> None:
    config = render()
    settings = Settings.model_validate(config)
    assert settings.server.service_manager == "systemd"
    assert settings.registry.dir == Path("/var/lib/appliance-registry")
    assert (settings.registry.port_base, settings.registry.port_count) == (8201, 64)
    assert settings.engines.port_base + len(settings.engines.models) <= settings.registry.port_base
    assert settings.tracing.site_networks == ["10.23.0.0/24"] and not settings.tracing.otlp_enabled


def test_a_collector_is_configured_only_with_its_endpoint() -> None:
    config = render(
        appliance_otlp_endpoint="http://10.23.0.9:4318/v1/traces", egress_lockdown_extra_allowed=["10.9.0.0/16"]
    )
    settings = Settings.model_validate(config)
    assert settings.tracing.otlp_enabled and settings.tracing.otlp_endpoint == "http://10.23.0.9:4318/v1/traces"
    assert settings.tracing.site_networks == ["10.23.0.0/24", "10.9.0.0/16"]


@pytest.mark.parametrize("template", ["vllm-registry@.service.j2"])
def test_the_registry_unit_runs_the_engines_user_and_verifies_before_starting(template: str) -> None:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    text = env.from_string((ROLES / "vllm" / "templates" / template).read_text()).render(
        **defaults("vllm"), ansible_managed="managed"
    )
    assert "User=vllm" in text and "ExecStart=/opt/appliance/venv/bin/appliance models units exec %i" in text
