"""Building the identity domain's parts from settings (used by the app factory and the CLI)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy.engine import Engine

from appliance.db.engine import create_schema, make_engine
from appliance.identity.accounts import AccountCheck, bootstrap_admin
from appliance.identity.apikeys import ApiKeyAuthenticator, KeyHasher
from appliance.identity.auth import Authenticator
from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.sessions import SessionStore
from appliance.identity.signing import SigningKey
from appliance.identity.tenancy import DefaultTenant, TenantCheck
from appliance.identity.tokens import FetchJwks, JwksCache, TokenValidator
from appliance.identity.users import UserMirror
from appliance.lib.addresses import ClientNetworks
from appliance.lib.tarpit import Tarpit
from appliance.settings import Settings


def embedded_issuer(settings: Settings) -> EmbeddedIssuer:
    key = SigningKey.load_or_create(settings.secrets_dir / "issuer-key.pem")
    return EmbeddedIssuer(
        key,
        issuer=settings.issuer_url,
        audience=settings.identity.audience,
        default_ttl_s=settings.identity.token_ttl_s,
    )


def key_hasher(settings: Settings) -> KeyHasher:
    return KeyHasher.load_or_create(settings.secrets_dir / "api-key-pepper")


def _remote_jwks(url: str) -> FetchJwks:
    async def fetch() -> dict[str, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(url) as response:
                response.raise_for_status()
                data: dict[str, Any] = await response.json()
                return data

    return fetch


def authenticator(
    settings: Settings,
    engine: Engine,
    issuer: EmbeddedIssuer | None,
    hasher: KeyHasher,
    tarpit: Tarpit,
    networks: ClientNetworks,
) -> Authenticator:
    """``tarpit``: where refusals of unknown API keys past their limit wait, ``networks``: what their limit counts
    a client address as (the app shares both among its limits)."""
    identity = settings.identity
    if identity.keycloak_url:
        fetch = _remote_jwks(f"{settings.issuer_url}/protocol/openid-connect/certs")
        cache_file = settings.data_dir / "identity" / "jwks-cache.json"
    else:
        assert issuer is not None
        local = issuer.key.jwks()

        async def fetch() -> dict[str, Any]:
            return local

        cache_file = None
    validator = TokenValidator(
        JwksCache(fetch, cache_file, identity.jwks_min_refresh_s),
        issuer=settings.issuer_url,
        audience=identity.audience,
        api_client_id=identity.api_client_id,
        allowed_clients=identity.allowed_clients or None,
        leeway_s=identity.leeway_s,
    )
    sessions = SessionStore(engine, timedelta(seconds=identity.console_session_s))
    return Authenticator(
        validator,
        ApiKeyAuthenticator(engine, hasher, tarpit=tarpit, networks=networks),
        UserMirror(engine, settings.issuer_url),
        sessions,
        DefaultTenant(engine, identity.default_tenant) if identity.default_tenant else None,
        TenantCheck(engine),
        AccountCheck(engine) if issuer is not None else None,
    )


def bootstrap_password_file(settings: Settings) -> Path:
    return settings.secrets_dir / "bootstrap-admin-password"


def bootstrap(settings: Settings) -> bool:
    """First start of an embedded-issuer appliance: create the schema and the bootstrap admin.
    Returns whether a bootstrap admin was created (its one-time password is in a 0600 file)."""
    if settings.identity.keycloak_url:
        return False
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
        return bootstrap_admin(engine, bootstrap_password_file(settings))
    finally:
        engine.dispose()
