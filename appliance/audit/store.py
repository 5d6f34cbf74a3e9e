"""The audit chain in the database: append (hash-chained, checkpointed), verify, search, export, prune."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import Table, delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from appliance.audit.chain import FIELDS, GENESIS, NoteKey, open_checkpoint, record_hash, sign_checkpoint, ts_text
from appliance.audit.models import AuditCheckpoint, AuditContent, AuditHead, AuditRecord
from appliance.audit.redact import redact
from appliance.lib.bounded import bounded, bounded_detail
from appliance.lib.times import as_utc

RECORDS: Table = AuditRecord.__table__  # type: ignore[attr-defined]
HEAD: Table = AuditHead.__table__  # type: ignore[attr-defined]
CHECKPOINTS: Table = AuditCheckpoint.__table__  # type: ignore[attr-defined]
CONTENT: Table = AuditContent.__table__  # type: ignore[attr-defined]


@dataclass(slots=True)
class AuditEvent:
    event_type: str
    outcome: str
    component: str = "gateway"
    subject: str | None = None
    subject_kind: str | None = None
    tenant_id: str | None = None
    object_type: str | None = None
    object_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    content: tuple[str, str] | None = None  # (prompt, answer) of a tenant with content capture; not chained

    def __post_init__(self) -> None:
        """Every text field fits its column (cut with a marker and a hash of the whole value) and the detail is
        bounded: what a client sends can make a record neither unwritable nor megabytes long."""
        for name, limit in _TEXT_LIMITS.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, bounded(value if isinstance(value, str) else str(value), limit))
        self.detail = bounded_detail(self.detail)


@dataclass
class VerifyResult:
    ok: bool
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_bad_seq: int | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditStore:
    def __init__(
        self,
        engine: Engine,
        key: NoteKey,
        *,
        latest_checkpoint_file: Path,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        node: str | None = None,
    ) -> None:
        self._engine = engine  # made with serialized_writes=True
        self.key = key
        self._latest_file = latest_checkpoint_file
        self._every = checkpoint_every
        self._interval = timedelta(seconds=checkpoint_interval_s)
        self.node = node or socket.gethostname()

    # -- append ------------------------------------------------------------------------------------

    def append(self, events: list[AuditEvent]) -> list[int]:
        """Append ``events`` to the chain in one transaction; returns their sequence numbers."""
        if not events:
            return []
        with self._engine.begin() as connection:
            head = connection.execute(select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1).with_for_update()).first()
            seq, prev = (head[0], head[1]) if head is not None else (0, GENESIS)
            rows, contents = [], []
            for event in events:
                seq += 1
                values = {**asdict(event), "seq": seq, "node": self.node, "prev_hash": prev}
                values["detail"] = dict(event.detail)
                del values["content"]
                if event.content is not None:
                    contents.append(_content_row(event))
                prev = record_hash(values)
                rows.append({**values, "hash": prev})
            connection.execute(insert(RECORDS), rows)
            if contents:
                connection.execute(insert(CONTENT), contents)
            if head is None:
                connection.execute(insert(HEAD).values(id=1, seq=seq, hash=prev))
            else:
                connection.execute(update(HEAD).where(HEAD.c.id == 1).values(seq=seq, hash=prev))
            note = self._maybe_checkpoint(connection, seq, prev)
        if note is not None:
            self._write_latest(note)
        return [row["seq"] for row in rows]

    def _maybe_checkpoint(self, connection: Connection, seq: int, head_hash: str, *, force: bool = False) -> str | None:
        last = connection.execute(
            select(CHECKPOINTS.c.tree_size, CHECKPOINTS.c.created_at).order_by(CHECKPOINTS.c.tree_size.desc()).limit(1)
        ).first()
        now = datetime.now(UTC)
        due = last is None or seq - last[0] >= self._every
        stale = last is not None and seq > last[0] and now - as_utc(last[1]) >= self._interval
        if not (force or due or stale) or seq == 0:
            return None
        note = sign_checkpoint(self.key, seq, head_hash, now)
        connection.execute(insert(CHECKPOINTS).values(tree_size=seq, head_hash=head_hash, created_at=now, note=note))
        return note

    def checkpoint(self) -> None:
        """Sign a checkpoint of the current head now (on shutdown, and every interval from the writer)."""
        with self._engine.begin() as connection:
            head = connection.execute(select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1)).first()
            if head is None:
                return
            last = connection.execute(select(func.max(CHECKPOINTS.c.tree_size))).scalar_one()
            note = None if last == head[0] else self._maybe_checkpoint(connection, head[0], head[1], force=True)
        if note is not None:
            self._write_latest(note)

    def _write_latest(self, note: str) -> None:
        """The latest checkpoint also lives outside the database, so a rollback of the database shows."""
        self._latest_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._latest_file.with_suffix(".tmp")
        tmp.write_text(note, encoding="utf-8")
        tmp.replace(self._latest_file)

    # -- verify ------------------------------------------------------------------------------------

    def verify(self, batch: int = 20_000) -> VerifyResult:
        result = VerifyResult(ok=True)
        with self._engine.connect() as connection:
            checkpoints = {}
            anchor_sizes = set()
            for row in connection.execute(select(CHECKPOINTS)).mappings():
                opened = open_checkpoint(self.key, row["note"])
                if opened is None or opened.tree_size != row["tree_size"] or opened.head_hash != row["head_hash"]:
                    return _bad(result, row["tree_size"], "a checkpoint's signature or content does not verify")
                checkpoints[opened.tree_size] = opened.head_hash
                if row["anchor"]:
                    anchor_sizes.add(opened.tree_size)
            result.checkpoints = len(checkpoints)
            head = connection.execute(select(HEAD.c.seq, HEAD.c.hash)).first()

            prev_hash: str | None = None
            expected_seq: int | None = None
            names = ("seq", *_VALUE_FIELDS, "hash")
            # Raw driver values (no per-row type processing): verification reads every record there is.
            columns = ", ".join(names)  # constant field names, not input
            query = text(f"SELECT {columns} FROM audit_records WHERE seq > :after ORDER BY seq LIMIT :n")  # noqa: S608
            last_seq = 0
            while True:
                rows = connection.execute(query, {"after": last_seq, "n": batch}).all()
                if not rows:
                    break
                for record in rows:
                    values: dict[str, Any] = dict(zip(names, record, strict=True))
                    values["ts"], values["detail"] = _raw_ts(values["ts"]), _raw_detail(values["detail"])
                    seq = values["seq"]
                    if expected_seq is None:
                        result.first_seq = seq
                        start = seq - 1
                        if seq == 1:
                            if values["prev_hash"] != GENESIS:
                                return _bad(result, seq, "the first record does not start from the genesis hash")
                        elif start not in anchor_sizes or checkpoints[start] != values["prev_hash"]:
                            return _bad(result, seq, "records before this one are missing and no anchor covers them")
                    elif seq != expected_seq:
                        return _bad(result, expected_seq, "record missing (sequence gap)")
                    elif values["prev_hash"] != prev_hash:
                        return _bad(result, seq, "does not chain to the record before it")
                    digest = record_hash({k: v for k, v in values.items() if k != "hash"})
                    if digest != values["hash"]:
                        return _bad(result, seq, "its content was altered (hash mismatch)")
                    if seq in checkpoints and checkpoints[seq] != digest:
                        return _bad(result, seq, "differs from what a signed checkpoint recorded")
                    prev_hash, expected_seq, last_seq = digest, seq + 1, seq
                    result.records += 1
            result.last_seq = last_seq or None
        newest = max(checkpoints, default=0)
        if newest > last_seq:
            return _bad(result, last_seq + 1, f"truncated: a signed checkpoint covers {newest} records")
        if head is not None and (head[0] != last_seq or (last_seq and head[1] != prev_hash)):
            return _bad(result, min(head[0], last_seq) + 1, "truncated or rolled back: the head records more")
        latest = self._latest_on_disk()
        if latest is not None and (
            latest.tree_size > last_seq
            or (latest.tree_size in checkpoints and checkpoints[latest.tree_size] != latest.head_hash)
        ):
            return _bad(
                result, min(latest.tree_size, last_seq + 1), "the database was rolled back behind the last checkpoint"
            )
        return result

    def _latest_on_disk(self) -> Any:
        try:
            return open_checkpoint(self.key, self._latest_file.read_text(encoding="utf-8"))
        except OSError:
            return None

    # -- read --------------------------------------------------------------------------------------

    def search(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        subject: str | None = None,
        event_type: str | None = None,
        outcome: str | None = None,
        tenant_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        filters = {"subject": subject, "event_type": event_type, "outcome": outcome, "tenant_id": tenant_id}
        conditions = [RECORDS.c[column] == value for column, value in filters.items() if value is not None]
        if since is not None:
            conditions.append(RECORDS.c.ts >= since)
        if until is not None:
            conditions.append(RECORDS.c.ts < until)
        with self._engine.connect() as connection:
            total = connection.execute(select(func.count()).select_from(RECORDS).where(*conditions)).scalar_one()
            rows = (
                connection.execute(
                    select(RECORDS).where(*conditions).order_by(RECORDS.c.seq.desc()).offset(offset).limit(limit)
                )
                .mappings()
                .all()
            )
        data = [{**row, "ts": ts_text(row["ts"])} for row in rows]
        return {"object": "list", "data": data, "total": total, "limit": limit, "offset": offset}

    def export(self, since: datetime | None = None) -> Iterator[dict[str, Any]]:
        last = 0
        with self._engine.connect() as connection:
            while True:
                query = select(RECORDS).where(RECORDS.c.seq > last)
                if since is not None:
                    query = query.where(RECORDS.c.ts >= since)
                rows = connection.execute(query.order_by(RECORDS.c.seq).limit(5000)).mappings().all()
                if not rows:
                    return
                for row in rows:
                    last = row["seq"]
                    yield {**row, "ts": ts_text(row["ts"])}

    # -- retention ---------------------------------------------------------------------------------

    def prune(self, older_than: datetime, archive: Path) -> int:
        """Archive (JSON lines) and delete the records older than ``older_than``, leaving a signed anchor
        checkpoint at the last pruned record so that what remains still verifies."""
        with self._engine.begin() as connection:
            last = connection.execute(select(func.max(RECORDS.c.seq)).where(RECORDS.c.ts < older_than)).scalar_one()
            if last is None:
                return 0
            last_hash = connection.execute(select(RECORDS.c.hash).where(RECORDS.c.seq == last)).scalar_one()
            archive.parent.mkdir(parents=True, exist_ok=True)
            with archive.open("a", encoding="utf-8") as handle:
                for row in connection.execute(
                    select(RECORDS).where(RECORDS.c.seq <= last).order_by(RECORDS.c.seq)
                ).mappings():
                    handle.write(json.dumps({**row, "ts": ts_text(row["ts"])}, default=str) + "\n")
                handle.flush()
            now = datetime.now(UTC)
            note = sign_checkpoint(self.key, last, last_hash, now)
            connection.execute(
                insert(CHECKPOINTS).values(tree_size=last, head_hash=last_hash, created_at=now, note=note, anchor=True)
            )
            count = connection.execute(delete(RECORDS).where(RECORDS.c.seq <= last)).rowcount
        return int(count or 0)

    def prune_content(self, older_than: datetime) -> int:
        """Delete captured prompts and answers older than ``older_than`` (they are not chained: the chain stays
        whole); the number deleted."""
        with self._engine.begin() as connection:
            count = connection.execute(delete(CONTENT).where(CONTENT.c.created_at < older_than)).rowcount
        return int(count or 0)

    def forget_tenant_content(self, tenant_id: str) -> int:
        """Delete every captured prompt and answer of a tenant (when the tenant is deleted)."""
        with self._engine.begin() as connection:
            count = connection.execute(delete(CONTENT).where(CONTENT.c.tenant_id == tenant_id)).rowcount
        return int(count or 0)


_TEXT_LIMITS = {
    column.name: int(column.type.length)  # type: ignore[attr-defined]
    for column in RECORDS.columns
    if column.name in AuditEvent.__dataclass_fields__ and getattr(column.type, "length", None)
}
_VALUE_FIELDS = tuple(name for name in FIELDS if name != "seq")  # the chained fields, in canonical order


def _raw_ts(value: Any) -> str:
    """A timestamp as canonical text, from what the driver returns: SQLite's text (UTC, as SQLAlchemy stored
    it, always with microseconds) without parsing it, or PostgreSQL's datetime."""
    if isinstance(value, datetime):
        return ts_text(value)
    return f"{value[:10]}T{value[11:]}Z"


def _raw_detail(value: Any) -> Any:
    return msgspec.json.decode(value) if isinstance(value, str | bytes) else value


def _content_row(event: AuditEvent) -> dict[str, Any]:
    assert event.content is not None
    prompt, prompt_hits = redact(event.content[0])
    answer, answer_hits = redact(event.content[1])
    return {
        "request_id": event.request_id,
        "tenant_id": event.tenant_id,
        "created_at": event.ts,
        "prompt": prompt,
        "answer": answer,
        "redactions": prompt_hits + answer_hits,
    }


def _bad(result: VerifyResult, seq: int | None, reason: str) -> VerifyResult:
    result.ok, result.first_bad_seq, result.reason = False, seq, reason
    return result
