"""Bootstrapping the appliance's realm in the local Keycloak through its Admin REST API (python-keycloak).

Idempotent: every step looks first and changes only what is missing or different, so a second run
reports no change. What it sets up:
- realm ``appliance`` with the realm roles admin, operator, auditor, user;
- client ``appliance-api`` (the audience; no flows of its own);
- client ``appliance-console`` (public, authorization code + PKCE S256, the console's redirect URIs),
  with an audience mapper (access tokens carry ``aud=appliance-api``) and a ``tenant`` user-attribute mapper;
- one confidential service-account client per workflow (``wf-<workflow id>``), whose tokens carry the
  audience and hard-coded ``tenant``/``workflow`` claims, its service account holding the ``user`` role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.identity.models import ROLES


class KeycloakAdminApi(Protocol):
    """The part of ``keycloak.KeycloakAdmin`` this module uses."""

    def get_realms(self) -> list[Any]: ...
    def create_realm(self, payload: dict[str, Any], skip_exists: bool = False) -> Any: ...
    def change_current_realm(self, realm_name: str) -> None: ...
    def get_realm_roles(self, brief_representation: bool = True) -> list[Any]: ...
    def create_realm_role(self, payload: dict[str, Any], skip_exists: bool = False) -> Any: ...
    def get_realm_role(self, role_name: str) -> dict[str, Any]: ...
    def get_client_id(self, client_id: str) -> str | None: ...
    def get_client(self, client_id: str) -> dict[str, Any]: ...
    def create_client(self, payload: dict[str, Any], skip_exists: bool = False) -> Any: ...
    def update_client(self, client_id: str, payload: dict[str, Any]) -> Any: ...
    def get_mappers_from_client(self, client_id: str) -> list[Any]: ...
    def add_mapper_to_client(self, client_id: str, payload: dict[str, Any]) -> Any: ...
    def get_client_service_account_user(self, client_id: str) -> dict[str, Any]: ...
    def get_realm_roles_of_user(self, user_id: str) -> list[Any]: ...
    def assign_realm_roles(self, user_id: str, roles: list[Any]) -> Any: ...


@dataclass(frozen=True)
class WorkflowAccount:
    workflow_id: str
    tenant_id: str


@dataclass
class KeycloakBootstrap:
    admin: KeycloakAdminApi
    realm: str = "appliance"
    api_client_id: str = "appliance-api"
    console_client_id: str = "appliance-console"
    redirect_uris: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def run(self, workflows: list[WorkflowAccount]) -> list[str]:
        """Bring the realm to the desired state; returns what was changed (empty on a second run)."""
        self._realm()
        for role in ROLES:
            self._realm_role(role)
        self._client(
            self.api_client_id,
            {
                "publicClient": False,
                "standardFlowEnabled": False,
                "implicitFlowEnabled": False,
                "directAccessGrantsEnabled": False,
                "serviceAccountsEnabled": False,
            },
        )
        console = self._client(
            self.console_client_id,
            {
                "publicClient": True,
                "standardFlowEnabled": True,
                "implicitFlowEnabled": False,
                "directAccessGrantsEnabled": False,
                "redirectUris": sorted(self.redirect_uris),
                "webOrigins": ["+"],
                "attributes": {"pkce.code.challenge.method": "S256"},
            },
        )
        self._mapper(console, self._audience_mapper())
        self._mapper(
            console,
            {
                "name": "tenant",
                "protocol": "openid-connect",
                "protocolMapper": "oidc-usermodel-attribute-mapper",
                "config": {
                    "user.attribute": "tenant",
                    "claim.name": "tenant",
                    "jsonType.label": "String",
                    "access.token.claim": "true",
                    "id.token.claim": "false",
                    "userinfo.token.claim": "false",
                },
            },
        )
        for workflow in workflows:
            self._service_account(workflow)
        return self.changes

    def _realm(self) -> None:
        if not any(realm.get("realm") == self.realm for realm in self.admin.get_realms()):
            self.admin.create_realm({"realm": self.realm, "enabled": True}, skip_exists=True)
            self.changes.append(f"created realm {self.realm}")
        self.admin.change_current_realm(self.realm)

    def _realm_role(self, role: str) -> None:
        if not any(existing.get("name") == role for existing in self.admin.get_realm_roles()):
            self.admin.create_realm_role({"name": role, "description": f"appliance {role}"}, skip_exists=True)
            self.changes.append(f"created realm role {role}")

    def _client(self, client_id: str, desired: dict[str, Any]) -> str:
        """The client's internal id; created, or updated where it differs from ``desired``."""
        internal = self.admin.get_client_id(client_id)
        if internal is None:
            self.admin.create_client({"clientId": client_id, "protocol": "openid-connect", "enabled": True, **desired})
            self.changes.append(f"created client {client_id}")
            internal = self.admin.get_client_id(client_id)
            assert internal is not None
            return internal
        current = self.admin.get_client(internal)
        drift = {k: v for k, v in desired.items() if not _contains(current.get(k), v)}
        if drift:
            self.admin.update_client(internal, {**current, **drift})
            self.changes.append(f"updated client {client_id}: {', '.join(sorted(drift))}")
        return internal

    def _mapper(self, client_internal_id: str, mapper: dict[str, Any]) -> None:
        existing = {m.get("name") for m in self.admin.get_mappers_from_client(client_internal_id)}
        if mapper["name"] not in existing:
            self.admin.add_mapper_to_client(client_internal_id, mapper)
            self.changes.append(f"added mapper {mapper['name']}")

    def _audience_mapper(self) -> dict[str, Any]:
        return {
            "name": "audience",
            "protocol": "openid-connect",
            "protocolMapper": "oidc-audience-mapper",
            "config": {
                "included.client.audience": self.api_client_id,
                "access.token.claim": "true",
                "id.token.claim": "false",
            },
        }

    def _service_account(self, workflow: WorkflowAccount) -> None:
        client_id = f"wf-{workflow.workflow_id}"
        internal = self._client(
            client_id,
            {
                "publicClient": False,
                "serviceAccountsEnabled": True,
                "standardFlowEnabled": False,
                "implicitFlowEnabled": False,
                "directAccessGrantsEnabled": False,
            },
        )
        self._mapper(internal, self._audience_mapper())
        for claim, value in (("tenant", workflow.tenant_id), ("workflow", workflow.workflow_id)):
            self._mapper(
                internal,
                {
                    "name": claim,
                    "protocol": "openid-connect",
                    "protocolMapper": "oidc-hardcoded-claim-mapper",
                    "config": {
                        "claim.name": claim,
                        "claim.value": value,
                        "jsonType.label": "String",
                        "access.token.claim": "true",
                        "id.token.claim": "false",
                    },
                },
            )
        user = self.admin.get_client_service_account_user(internal)
        if not any(role.get("name") == "user" for role in self.admin.get_realm_roles_of_user(user["id"])):
            self.admin.assign_realm_roles(user["id"], [self.admin.get_realm_role("user")])
            self.changes.append(f"gave the service account of {client_id} the role user")


def _contains(current: Any, desired: Any) -> bool:
    """Whether ``current`` already holds ``desired`` (dicts compared key by key, lists as sets)."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(_contains(current.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(current, list) and sorted(map(str, current)) == sorted(map(str, desired))
    return bool(current == desired)
