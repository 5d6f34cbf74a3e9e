"""The lifecycle of a version: ``imported -> approved -> deployed -> retired``, who did what and when, in the
registry's tables and in the audit trail. Deployment itself is :mod:`appliance.registry.deploy`."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from appliance.audit.setup import audit_store_for_once
from appliance.audit.store import AuditEvent
from appliance.lib.errors import ConflictError, NotFoundError, PermissionDeniedError
from appliance.registry.models import (
    APPROVED,
    DEPLOYED,
    IMPORTED,
    RETIRED,
    ModelTransition,
    ModelVersion,
    ServedModel,
)
from appliance.settings import Settings

log = logging.getLogger(__name__)


def audit(
    settings: Settings, action: str, version: ModelVersion, actor: str, outcome: str = "success", **detail: Any
) -> None:
    """Every transition goes into the audit trail (the trail failing is logged, never hides the transition)."""
    try:
        event = AuditEvent(
            f"model.{action}",
            outcome,
            component="registry",
            subject=actor,
            subject_kind="admin",
            object_type="model_version",
            object_id=f"{version.served_name}:v{version.version}",
            detail={"version_id": version.id, "state": version.state, **detail},
        )
        with audit_store_for_once(settings) as store:
            store.append([event])
    except Exception:
        log.exception("recording model.%s in the audit trail failed", action)


ID_MAX = 2**63 - 1  # ids are 64-bit integers: a larger one names no version (and must not reach the database)


def get_version(session: Session, version_id: int) -> ModelVersion:
    version = session.get(ModelVersion, version_id) if 0 < version_id <= ID_MAX else None
    if version is None:
        raise NotFoundError(f"no model version {version_id}")
    return version


def find_version(session: Session, ref: str) -> ModelVersion:
    """A version by id (``12``) or by ``served-name:vN`` / ``served-name:N``."""
    if ref.isdigit():
        return get_version(session, int(ref))
    name, _, number = ref.rpartition(":")
    number = number.removeprefix("v")
    if name and number.isdigit():
        row = session.exec(
            select(ModelVersion).where(ModelVersion.served_name == name, ModelVersion.version == int(number))
        ).first()
        if row is not None:
            return row
    raise NotFoundError(f"no model version {ref!r} (an id, or served-name:vN)")


def record(
    session: Session, version: ModelVersion, action: str, to_state: str, actor: str, **detail: Any
) -> ModelTransition:
    """Move ``version`` to ``to_state`` (in the caller's transaction), stamping who and when."""
    now = datetime.now(UTC)
    transition = ModelTransition(
        version_id=version.id or 0,
        action=action,
        from_state=version.state,
        to_state=to_state,
        actor=actor,
        at=now,
        detail=detail,
    )
    version.state = to_state
    if action == "approve":
        version.approved_by, version.approved_at = actor, now
    elif to_state == DEPLOYED:
        version.deployed_by, version.deployed_at = actor, now
    elif to_state == RETIRED:
        version.retired_by, version.retired_at = actor, now
    session.add(version)
    session.add(transition)
    return transition


def approve(session: Session, settings: Settings, version_id: int, actor: str) -> ModelVersion:
    version = get_version(session, version_id)
    if version.state != IMPORTED:
        raise ConflictError(f"{version.served_name} v{version.version} is {version.state}, not imported")
    if settings.registry.require_distinct_approver and actor == version.imported_by:
        audit(settings, "approve", version, actor, "denied", reason="importer may not approve")
        raise PermissionDeniedError(
            f"{version.served_name} v{version.version} was imported by {actor}: another administrator must approve "
            "it (registry.require_distinct_approver)"
        )
    record(session, version, "approve", APPROVED, actor)
    session.commit()
    session.refresh(version)
    audit(settings, "approve", version, actor)
    return version


def _drafts_in_use(session: Session) -> set[int]:
    used: set[int] = set()
    for version in session.exec(select(ModelVersion).where(ModelVersion.state == DEPLOYED)).all():
        draft = (version.options.get("speculative") or {}).get("draft_version_id")
        if isinstance(draft, int):
            used.add(draft)
    return used


def retire(session: Session, settings: Settings, version_id: int, actor: str) -> ModelVersion:
    version = get_version(session, version_id)
    if version.state == RETIRED:
        raise ConflictError(f"{version.served_name} v{version.version} is already retired")
    if version.state == DEPLOYED:
        raise ConflictError(
            f"{version.served_name} v{version.version} is deployed: deploy another version (or roll back) first"
        )
    if version.id in _drafts_in_use(session):
        raise ConflictError(f"{version.served_name} v{version.version} is the draft model of a deployed version")
    record(session, version, "retire", RETIRED, actor)
    session.commit()
    session.refresh(version)
    audit(settings, "retire", version, actor)
    return version


def remove_files(session: Session, settings: Settings, version_id: int, actor: str) -> ModelVersion:
    """Delete a retired version's files (its record stays, with its checksums and history)."""
    version = get_version(session, version_id)
    if version.state != RETIRED:
        raise ConflictError(f"{version.served_name} v{version.version} is {version.state}: retire it first")
    if version.files_removed:
        raise ConflictError(f"{version.served_name} v{version.version}: its files are already removed")
    folder = Path(version.path)
    if folder.resolve().parent.parent != settings.registry_dir.resolve():
        raise ConflictError(f"{folder} is not a folder of the registry; not removed")
    shutil.rmtree(folder, ignore_errors=True)
    version.files_removed = True
    record(session, version, "remove", RETIRED, actor, path=str(folder))
    session.commit()
    session.refresh(version)
    audit(settings, "remove", version, actor, path=str(folder))
    return version


def version_view(version: ModelVersion, transitions: list[ModelTransition] | None = None) -> dict[str, Any]:
    view = version.model_dump(mode="json")
    view["size"] = sum(int(f["size"]) for f in version.files)
    if transitions is not None:
        view["transitions"] = [t.model_dump(mode="json", exclude={"version_id"}) for t in transitions]
    return view


def list_versions(session: Session, served_name: str | None = None) -> list[dict[str, Any]]:
    query = select(ModelVersion).order_by(col(ModelVersion.served_name), col(ModelVersion.version))
    if served_name:
        query = query.where(ModelVersion.served_name == served_name)
    current = {row.served_name: row for row in session.exec(select(ServedModel)).all()}
    views = []
    for version in session.exec(query).all():
        view = version_view(version)
        view.pop("files")
        served = current.get(version.served_name)
        view["serving"] = served is not None and served.version_id == version.id
        views.append(view)
    return views


def show(session: Session, version_id: int) -> dict[str, Any]:
    # Each read sees what is committed when it runs (SQLite outside a write, PostgreSQL's READ COMMITTED), so the
    # served mapping is read first: a switch commits it with the version's new state, and a view that says
    # "serving" then never shows the state from before the switch.
    query = select(ModelVersion.served_name).where(ModelVersion.id == version_id)
    served_name = session.exec(query).first() if 0 < version_id <= ID_MAX else None
    served = session.get(ServedModel, served_name) if served_name is not None else None
    version = get_version(session, version_id)
    transitions = list(
        session.exec(
            select(ModelTransition).where(ModelTransition.version_id == version_id).order_by(col(ModelTransition.id))
        ).all()
    )
    view = version_view(version, transitions)
    view["serving"] = served is not None and served.version_id == version.id
    if served is not None and view["serving"]:
        view["engines"] = served.engines
    return view


def served_models(session: Session) -> list[dict[str, Any]]:
    return [row.model_dump(mode="json") for row in session.exec(select(ServedModel)).all()]
