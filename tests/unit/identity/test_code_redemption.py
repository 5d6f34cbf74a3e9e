"""An authorization code is redeemed once, even by requests that race each other (issue #21)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.identity import oauth
from appliance.identity.accounts import hash_password
from appliance.identity.models import LocalAccount
from appliance.identity.setup import embedded_issuer
from appliance.settings import Settings

REDIRECT = "http://127.0.0.1:8080/console/callback"
RACERS = 4


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'codes.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"codes_{secrets.token_hex(6)}")
    engine = make_engine(url)
    create_schema(engine)
    with Session(engine) as session:
        session.add(LocalAccount(username="alice", password_hash=hash_password("a long passphrase"), roles=["user"]))
        session.commit()
    yield engine
    engine.dispose()


def new_code(engine: Engine) -> dict[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    with Session(engine) as session:
        code = oauth.issue_code(session, oauth.AuthorizeRequest("appliance-console", REDIRECT, challenge, ""), "alice")
    return {"code": code, "client_id": "appliance-console", "redirect_uri": REDIRECT, "code_verifier": verifier}


@pytest.mark.timeout(120)
def test_racing_redemptions_of_one_code_get_one_token(engine: Engine, tmp_path: Path) -> None:
    """Token requests for one code, released together (as the token endpoint's worker threads run them)."""
    issuer = embedded_issuer(Settings(data_dir=tmp_path))
    for _ in range(30):
        form = new_code(engine)
        start = threading.Barrier(RACERS)
        tokens: list[str] = []
        refused: list[str] = []

        def redeem(form: dict[str, str] = form, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                with Session(engine) as session:
                    tokens.append(oauth.exchange_code(session, issuer, form)["access_token"])
            except oauth.OAuthError as exc:
                refused.append(exc.error)

        threads = [threading.Thread(target=redeem) for _ in range(RACERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(tokens) == 1 and refused == ["invalid_grant"] * (RACERS - 1), (tokens, refused)
