"""``appliance admin ...``: local automation on the node (needs access to the data directory)."""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from typing import TypeVar

from sqlmodel import Session, select

from appliance.db.engine import create_schema, make_engine
from appliance.identity import service
from appliance.identity.accounts import hash_password
from appliance.identity.keycloak import KeycloakBootstrap, WorkflowAccount
from appliance.identity.models import ROLES, Agent, LocalAccount, Tenant, Workflow
from appliance.identity.schemas import AgentCreate, ApiKeyCreate, TenantCreate, WorkflowCreate
from appliance.identity.setup import bootstrap, bootstrap_password_file, embedded_issuer, key_hasher
from appliance.lib.errors import ApplianceError
from appliance.lib.principal import ADMIN, Principal
from appliance.lib.times import duration_s
from appliance.settings import Settings

LOCAL_ADMIN = Principal(kind="token", subject="local-cli", roles=frozenset({ADMIN}))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser("admin", help="local administration (tokens, API keys)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    token = admin_sub.add_parser("token", help="print a short-lived access token from the embedded issuer")
    token.add_argument("--role", choices=ROLES, action="append", required=True)
    token.add_argument("--tenant", help="bind the token to a tenant (id)")
    token.add_argument("--ttl", type=duration_s, default=600, help="lifetime, e.g. 10m (max 24h)")
    key = admin_sub.add_parser("create-key", help="create an API key; prints it once, as JSON")
    key.add_argument("--tenant", required=True, help="tenant id or name")
    key.add_argument("--workflow", required=True, help="workflow id or name (in the tenant)")
    key.add_argument("--agent", help="agent id or name (in the workflow)")
    key.add_argument("--name", default="")
    key.add_argument("--scope", choices=("inference", "admin"), action="append", help="default: inference")
    key.add_argument("--create", action="store_true", help="create the tenant, workflow and agent if missing")
    admin_sub.add_parser(
        "bootstrap",
        help="create the schema and the bootstrap admin `admin` if missing (a node's installer runs this); JSON",
    )
    user = admin_sub.add_parser(
        "create-user", help="a local account of the embedded issuer; prints its one-time password once, as JSON"
    )
    user.add_argument("username")
    user.add_argument("--role", choices=ROLES, action="append", required=True)
    user.add_argument("--tenant", help="bind the account to a tenant (id or name)")


def add_identity_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    identity = sub.add_parser("identity", help="identity provider set-up")
    identity_sub = identity.add_subparsers(dest="identity_command", required=True)
    boot = identity_sub.add_parser("bootstrap-keycloak", help="create/update the appliance realm in Keycloak")
    boot.add_argument("--url", required=True, help="Keycloak base URL, e.g. https://idp.node.local:8443")
    boot.add_argument("--admin-user", required=True, help="a Keycloak admin of the master realm")
    boot.add_argument(
        "--admin-password-file", help="file holding the admin password (default: $KEYCLOAK_ADMIN_PASSWORD)"
    )
    boot.add_argument("--realm", default=None, help="default: the configured realm (appliance)")
    boot.add_argument("--redirect-uri", action="append", help="console redirect URI (default: configured)")
    boot.add_argument("--ca-file", help="CA bundle for Keycloak's TLS certificate")


def run_identity(settings: Settings, args: argparse.Namespace) -> int:
    from keycloak import KeycloakAdmin
    from keycloak.exceptions import KeycloakError

    if args.admin_password_file:
        with open(args.admin_password_file, encoding="utf-8") as handle:
            password = handle.read().strip()
    else:
        password = os.environ.get("KEYCLOAK_ADMIN_PASSWORD", "")
    if not password:
        print("error: give --admin-password-file or set KEYCLOAK_ADMIN_PASSWORD", file=sys.stderr)
        return 1
    engine = make_engine(settings.database_url)
    create_schema(engine)
    with Session(engine) as session:
        workflows = [WorkflowAccount(w.id, w.tenant_id) for w in session.exec(select(Workflow)).all()]
    engine.dispose()
    try:
        admin = KeycloakAdmin(
            server_url=args.url.rstrip("/") + "/",
            username=args.admin_user,
            password=password,
            realm_name="master",
            user_realm_name="master",
            verify=args.ca_file or True,
        )
        changes = KeycloakBootstrap(
            admin,
            realm=args.realm or settings.identity.realm,
            api_client_id=settings.identity.api_client_id,
            console_client_id=settings.identity.console_client_id,
            redirect_uris=args.redirect_uri or settings.console_redirect_uris,
        ).run(workflows)
    except KeycloakError as exc:
        print(f"error: Keycloak refused: {exc.response_code} {type(exc).__name__}", file=sys.stderr)
        return 1
    print(json.dumps({"changed": bool(changes), "changes": changes}, indent=2))
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.admin_command == "token":
            return _token(settings, args)
        if args.admin_command == "create-user":
            return _create_user(settings, args)
        if args.admin_command == "bootstrap":
            created = bootstrap(settings)
            password_file = bootstrap_password_file(settings)
            shown = str(password_file) if password_file.exists() else None  # gone once the admin changed it
            print(json.dumps({"created": created, "password_file": shown}))
            return 0
        return _create_key(settings, args)
    except ApplianceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def _token(settings: Settings, args: argparse.Namespace) -> int:
    if settings.identity.keycloak_url:
        print("error: Keycloak issues tokens here; use a service-account client instead", file=sys.stderr)
        return 1
    if args.ttl > 86_400:
        print("error: --ttl is at most 24h", file=sys.stderr)
        return 1
    issuer = embedded_issuer(settings)
    print(
        issuer.mint(
            "local-cli",
            client_id=settings.identity.console_client_id,
            roles=args.role,
            tenant_id=args.tenant,
            ttl_s=args.ttl,
        )
    )
    return 0


def _create_user(settings: Settings, args: argparse.Namespace) -> int:
    """People sign in to Keycloak on an installed node; the embedded issuer's accounts are for `make run`."""
    if settings.identity.keycloak_url:
        print("error: Keycloak holds the accounts here; create the user there", file=sys.stderr)
        return 1
    if not re.fullmatch(r"[a-z0-9][a-z0-9._\-]{1,99}", args.username):
        print("error: a username is 2-100 lowercase letters, digits, dots, dashes or underscores", file=sys.stderr)
        return 1
    engine = make_engine(settings.database_url)
    create_schema(engine)
    password = secrets.token_urlsafe(18)
    with Session(engine) as session:
        tenant_id = None
        if args.tenant:
            tenant_id = _find(session, Tenant, args.tenant)
            if tenant_id is None:
                print(f"error: no tenant {args.tenant!r}", file=sys.stderr)
                return 1
        if session.get(LocalAccount, args.username) is not None:
            print(f"error: the account {args.username!r} exists", file=sys.stderr)
            return 1
        session.add(
            LocalAccount(
                username=args.username,
                password_hash=hash_password(password),
                roles=sorted(set(args.role)),
                tenant_id=tenant_id,
                must_change_password=True,
            )
        )
        session.commit()
    engine.dispose()
    print(json.dumps({"username": args.username, "roles": sorted(set(args.role)), "tenant_id": tenant_id,
                      "one_time_password": password}))  # fmt: skip
    return 0


ModelT = TypeVar("ModelT", Tenant, Workflow, Agent)


def _find(session: Session, model: type[ModelT], ref: str, **where: str) -> str | None:
    """The id of the row whose id or name is ``ref`` (names within ``where``)."""
    row = session.get(model, ref)
    if row is None:
        query = select(model).where(model.name == ref)
        for column, value in where.items():
            query = query.where(getattr(model, column) == value)
        row = session.exec(query).first()
    if row is None or any(getattr(row, column) != value for column, value in where.items()):
        return None
    return str(row.id)


def _create_key(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    with Session(engine) as session:
        tenant_id = _find(session, Tenant, args.tenant)
        if tenant_id is None and args.create:
            tenant_id = service.create_tenant(session, LOCAL_ADMIN, TenantCreate(name=args.tenant))["id"]
        if tenant_id is None:
            print(f"error: no tenant {args.tenant!r} (use --create)", file=sys.stderr)
            return 1
        workflow_id = _find(session, Workflow, args.workflow, tenant_id=tenant_id)
        if workflow_id is None and args.create:
            created = service.create_workflow(
                session, LOCAL_ADMIN, WorkflowCreate(tenant_id=tenant_id, name=args.workflow)
            )
            workflow_id = created["id"]
        if workflow_id is None:
            print(f"error: no workflow {args.workflow!r} in that tenant (use --create)", file=sys.stderr)
            return 1
        agent_id = None
        if args.agent:
            agent_id = _find(session, Agent, args.agent, workflow_id=workflow_id)
            if agent_id is None and args.create:
                agent_id = service.create_agent(
                    session, LOCAL_ADMIN, AgentCreate(workflow_id=workflow_id, name=args.agent)
                )["id"]
            if agent_id is None:
                print(f"error: no agent {args.agent!r} in that workflow (use --create)", file=sys.stderr)
                return 1
        record, secret = service.create_api_key(
            session,
            LOCAL_ADMIN,
            key_hasher(settings),
            ApiKeyCreate(
                workflow_id=workflow_id, agent_id=agent_id, name=args.name, scopes=args.scope or ["inference"]
            ),
        )
    engine.dispose()
    print(json.dumps({**record, "key": secret}, default=str))
    return 0
