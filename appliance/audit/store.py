"""The audit log in the database: append (hash-chained), the Merkle tree and its signed checkpoints, proofs,
verify, search, export, prune."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from appliance.audit import tree
from appliance.audit.chain import (
    GENESIS,
    Checkpoint,
    NoteKey,
    check_name,
    leaf_data,
    open_checkpoint,
    open_legacy_checkpoint,
    record_hash,
    sign_checkpoint,
    sign_legacy_checkpoint,
    ts_text,
)
from appliance.audit.merkle import leaf_hash
from appliance.audit.models import AuditCheckpoint, AuditContent, AuditHead, AuditRecord
from appliance.audit.redact import redact
from appliance.db.engine import reading, writing
from appliance.db.marks import claim_mark, drop_mark, mark_of, set_mark, unmarked
from appliance.lib.bounded import bounded, bounded_detail
from appliance.lib.rows import row_of
from appliance.lib.times import as_utc

RECORDS: Table = AuditRecord.__table__  # type: ignore[attr-defined]
HEAD: Table = AuditHead.__table__  # type: ignore[attr-defined]
CHECKPOINTS: Table = AuditCheckpoint.__table__  # type: ignore[attr-defined]
CONTENT: Table = AuditContent.__table__  # type: ignore[attr-defined]
log = logging.getLogger(__name__)
T = TypeVar("T")


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
        legacy_key_name: str | None = None,
    ) -> None:
        """``key`` signs checkpoints under its name, which is the log's origin; ``legacy_key_name``: the name
        under which the same key signed checkpoints before the Merkle tree (they still verify)."""
        self._engine = engine  # made with serialized_writes=True
        self.key = key
        self.origin = check_name(key.name)
        self._legacy_key = key.renamed(legacy_key_name or key.name)
        self._latest_file = latest_checkpoint_file
        self._every = checkpoint_every
        self._interval = timedelta(seconds=checkpoint_interval_s)
        self.node = node or socket.gethostname()
        self._background: threading.Thread | None = None
        self._background_lock = threading.Lock()

    # -- append ------------------------------------------------------------------------------------

    def append(
        self, events: list[AuditEvent], journal: str | None = None, entries: list[int | None] | None = None
    ) -> list[int]:
        """Append ``events`` to the chain in one transaction; returns their sequence numbers (0 for one skipped).
        ``journal``, ``entries``: the journal the events come from and their numbers in it; those its mark says are
        in the chain already are skipped, and the new mark is committed with the rest (``appliance/db/marks.py``).
        When a checkpoint is due, a thread of its own grows the tree over the stored records and signs it: the
        append (and the request waiting on it) does not wait for that."""
        if not events:
            return []
        with writing(self._engine) as connection:
            head = _locked_head(connection)
            keep, mark = unmarked(connection, journal, entries or [None] * len(events))
            numbers, seq = self._chain(connection, head, events, keep)
            if journal is not None and mark is not None:
                set_mark(connection, journal, mark)
            due = self._checkpoint_due(connection, seq)
        if due:
            self.checkpoint_in_background()
        return numbers

    def append_made_of(
        self, journal: str, entries: list[tuple[int, T]], make: Callable[[list[tuple[int, T]]], list[AuditEvent]]
    ) -> int:
        """Append the records ``make`` draws from ``entries`` (number, entry) of ``journal``, in one transaction
        with the journal's new mark; entries the mark says are in the chain already are left out before ``make``
        sees them (records that each account for several entries: none is counted twice, whatever committed
        meanwhile). Returns how many records were appended."""
        with writing(self._engine) as connection:
            head = _locked_head(connection)  # (first, as in append: every writer takes the locks in one order)
            done = claim_mark(connection, journal)
            new = [(number, entry) for number, entry in entries if number > done]
            if not new:
                return 0
            events = make(new)
            _, seq = self._chain(connection, head, events, [True] * len(events))
            set_mark(connection, journal, max(number for number, _ in new))
            due = self._checkpoint_due(connection, seq)
        if due:
            self.checkpoint_in_background()
        return len(events)

    def _chain(
        self, connection: Connection, head: tuple[int, str], events: list[AuditEvent], keep: list[bool]
    ) -> tuple[list[int], int]:
        """Within the caller's transaction, past the locked ``head``: the kept ``events`` chained and stored, the
        head moved; their sequence numbers (0 for one not kept) and the new head's."""
        seq, prev = head
        rows, contents = [], []
        numbers = []
        for event, kept in zip(events, keep, strict=True):
            if not kept:
                numbers.append(0)
                continue
            seq += 1
            numbers.append(seq)
            values = {**row_of(event), "seq": seq, "node": self.node, "prev_hash": prev}
            values["detail"] = dict(event.detail)
            del values["content"]
            if event.content is not None:
                contents.append(_content_row(event))
            prev = record_hash(values)
            rows.append({**values, "hash": prev})
        if rows:
            connection.execute(insert(RECORDS), rows)
        if contents:
            connection.execute(insert(CONTENT), contents)
        connection.execute(update(HEAD).where(HEAD.c.id == 1).values(seq=seq, hash=prev))
        return numbers, seq

    def journal_mark(self, journal: str) -> int:
        """How far ``journal`` is appended (0: not at all)."""
        with reading(self._engine) as connection:
            return mark_of(connection, journal)

    def forget_journal(self, journal: str) -> None:
        with writing(self._engine) as connection:
            drop_mark(connection, journal)

    def checkpoint_in_background(self) -> None:
        """Sign a checkpoint on a thread of its own (when one is due after an append, and every interval from
        the writer), unless one is being signed already."""
        with self._background_lock:
            if self._background is not None and self._background.is_alive():
                return  # records it does not take in are taken in by the next checkpoint
            self._background = threading.Thread(target=self._checkpoint_logged, name="audit-checkpoint", daemon=True)
            self._background.start()

    def _checkpoint_logged(self) -> None:
        try:
            self.checkpoint()
        except Exception:
            log.exception("signing an audit checkpoint failed; the next one covers these records")

    def settle(self) -> None:
        """Wait for the checkpoint being signed in the background, if any."""
        with self._background_lock:
            background = self._background
        if background is not None:
            background.join()

    def _checkpoint_due(self, connection: Connection, seq: int) -> bool:
        last = connection.execute(
            select(CHECKPOINTS.c.tree_size, CHECKPOINTS.c.created_at).order_by(CHECKPOINTS.c.tree_size.desc()).limit(1)
        ).first()
        if last is None:
            return seq > 0
        stale = seq > last[0] and datetime.now(UTC) - as_utc(last[1]) >= self._interval
        return seq - last[0] >= self._every or stale

    def checkpoint(self) -> str | None:
        """Grow the tree over every stored record and sign a checkpoint of it, unless one of that size exists
        (on shutdown, every interval from the writer, and when one is due after an append). The signed note,
        or None. The tree grows a thousand records at a time, each hashed from a snapshot and stored in a short
        transaction, so appends wait little for it.

        A node that pruned records before it had a tree cannot build one (its first leaves are gone): it goes on
        signing the chain's head in the legacy format, as it did before, and says so in its log."""
        with reading(self._engine) as connection:
            target = connection.execute(select(HEAD.c.seq).where(HEAD.c.id == 1)).scalar_one_or_none() or 0
        try:
            while True:  # up to the head as it was: under a load it cannot catch up with, it still signs
                grown, size = self._grow_tree()
                if not grown or size >= target:
                    break
        except tree.TreeError as exc:
            log.warning("no Merkle tree: %s; the chain's head is signed instead", exc)
            return self._legacy_checkpoint()
        with writing(self._engine) as connection:
            size = tree.size_of(connection)
            signed = connection.execute(
                select(CHECKPOINTS.c.id).where(CHECKPOINTS.c.tree_size == size, CHECKPOINTS.c.root_hash.is_not(None))
            ).first()
            if size == 0 or signed is not None:
                return None
            note = self._sign(connection, size)
        self._write_latest(note)
        return note

    def _grow_tree(self) -> tuple[bool, int]:
        """One step of the tree's growth: whether it grew, and the size planned to."""
        try:
            with reading(self._engine) as connection:  # hashing a thousand records holds no lock
                growth = tree.plan(connection, tree.size_of(connection))
        except tree.TreeError:
            # On PostgreSQL each read sees what is committed when it runs: another process's prune may have
            # grown the tree and deleted the records past the size just read. Under the tree's lock nothing
            # moves; a node that truly lacks its first leaves raises again there.
            with writing(self._engine) as connection:
                before, after = tree.grow(connection)
            return after > before, after
        if growth.rows:
            with writing(self._engine) as connection:
                tree.extend(connection, growth)  # or another grower took it further: plan from there
        return bool(growth.rows), growth.size

    def _legacy_checkpoint(self) -> str | None:
        """The chain's head, signed as before the tree (for a node that cannot build one)."""
        with writing(self._engine) as connection:
            row = connection.execute(select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1)).first()
            known = connection.execute(select(func.max(CHECKPOINTS.c.tree_size))).scalar_one()
            if row is None or known == row[0]:
                return None
            now = datetime.now(UTC)
            note = sign_legacy_checkpoint(self._legacy_key, row[0], row[1], now)
            connection.execute(
                insert(CHECKPOINTS).values(tree_size=row[0], head_hash=row[1], created_at=now, note=note)
            )
        self._write_latest(note)
        return note

    def _sign(self, connection: Connection, size: int, *, anchor: bool = False) -> str:
        root = tree.root(connection, size)
        head_hash = connection.execute(select(RECORDS.c.hash).where(RECORDS.c.seq == size)).scalar_one()
        note = sign_checkpoint(self.key, self.origin, size, root)
        connection.execute(
            insert(CHECKPOINTS).values(
                tree_size=size,
                head_hash=head_hash,
                root_hash=root.hex(),
                created_at=datetime.now(UTC),
                note=note,
                anchor=anchor,
            )
        )
        return note

    def _write_latest(self, note: str) -> None:
        """The latest checkpoint also lives outside the database, so a rollback of the database shows. Written
        under a name of its own then renamed; never replaced by a smaller tree's (checkpoints are signed by a
        background thread, the writer's interval and other processes alike)."""
        self._latest_file.parent.mkdir(parents=True, exist_ok=True)
        with self._background_lock:
            try:
                current = self._latest_file.read_text(encoding="utf-8").split("\n")
                if int(current[1]) > int(note.split("\n")[1]):
                    return
            except (OSError, IndexError, ValueError):
                pass
            tmp = self._latest_file.with_name(f".{self._latest_file.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(note, encoding="utf-8")
            tmp.replace(self._latest_file)

    # -- verify ------------------------------------------------------------------------------------

    def _open(self, note: str) -> Checkpoint | None:
        """A Merkle checkpoint signed by this log's key, under whatever origin it had then (key name = origin)."""
        origin = note.partition("\n")[0]
        try:
            return open_checkpoint(self.key.renamed(check_name(origin)), origin, note)
        except ValueError:
            return None

    def verify(self, batch: int = 20_000) -> VerifyResult:
        """Check every record's link to the one before it and its leaf in the Merkle tree, the tree's every
        node, and every signed checkpoint (a Merkle root, or a legacy chain head) against them."""
        result = VerifyResult(ok=True)
        latest = self._latest_on_disk()  # first: the tree may grow, and this file move on, while we read
        with reading(self._engine) as connection:
            heads: dict[int, str] = {}  # tree size -> the chain's hash of that record
            roots: dict[int, str] = {}  # tree size -> signed Merkle root
            anchor_sizes = set()
            for row in connection.execute(select(CHECKPOINTS)).mappings():
                if row["root_hash"] is None:
                    legacy = open_legacy_checkpoint(self._legacy_key, row["note"])
                    if legacy is None or legacy.tree_size != row["tree_size"] or legacy.hash != row["head_hash"]:
                        return _bad(result, row["tree_size"], "a checkpoint's signature or content does not verify")
                    heads[legacy.tree_size] = legacy.hash
                else:
                    opened = self._open(row["note"])
                    if opened is None or opened.tree_size != row["tree_size"] or opened.hash != row["root_hash"]:
                        return _bad(result, row["tree_size"], "a checkpoint's signature or content does not verify")
                    roots[opened.tree_size] = opened.hash
                    heads[opened.tree_size] = row["head_hash"]  # proven by the root: the record is a leaf
                if row["anchor"]:
                    anchor_sizes.add(row["tree_size"])
            result.checkpoints = len(heads)
            head = connection.execute(select(HEAD.c.seq, HEAD.c.hash)).first()
            tree_size = tree.size_of(connection)

            prev_hash: str | None = None
            expected_seq: int | None = None
            last_seq = 0
            at_head: str | None = None  # the hash of the record the head names (records may be appended meanwhile)
            for records in tree.records_after(connection, 0, batch):
                stored_leaves = tree.leaves(connection, records[0]["seq"], records[-1]["seq"])
                for values in records:
                    seq = values["seq"]
                    if expected_seq is None:
                        result.first_seq = seq
                        start = seq - 1
                        if seq == 1:
                            if values["prev_hash"] != GENESIS:
                                return _bad(result, seq, "the first record does not start from the genesis hash")
                        elif start not in anchor_sizes or heads[start] != values["prev_hash"]:
                            return _bad(result, seq, "records before this one are missing and no anchor covers them")
                    elif seq != expected_seq:
                        return _bad(result, expected_seq, "record missing (sequence gap)")
                    elif values["prev_hash"] != prev_hash:
                        return _bad(result, seq, "does not chain to the record before it")
                    digest = record_hash({k: v for k, v in values.items() if k != "hash"})
                    if digest != values["hash"]:
                        return _bad(result, seq, "its content was altered (hash mismatch)")
                    if seq in heads and heads[seq] != digest:
                        return _bad(result, seq, "differs from what a signed checkpoint recorded")
                    if seq <= tree_size and stored_leaves.get(seq) != leaf_hash(leaf_data(values)):
                        return _bad(result, seq, "differs from its leaf in the Merkle tree")
                    prev_hash, expected_seq, last_seq = digest, seq + 1, seq
                    if head is not None and seq == head[0]:
                        at_head = digest
                    result.records += 1
            result.last_seq = last_seq or None
            if tree_size > last_seq:
                return _bad(result, last_seq + 1, f"truncated: the Merkle tree holds {tree_size} records")
            newest_root = max(roots, default=0)
            if newest_root > tree_size:
                return _bad(result, tree_size + 1, f"the tree lacks records a signed checkpoint ({newest_root}) covers")
            reason = tree.check_structure(connection, tree_size)
            if reason is not None:
                return _bad(result, None, reason)
            for size, signed_root in sorted(roots.items()):
                if tree.root(connection, size).hex() != signed_root:
                    return _bad(result, size, "the Merkle tree differs from what a signed checkpoint recorded")
            if (
                latest is not None
                and latest.timestamp is None
                and (latest.tree_size > tree_size or tree.root(connection, latest.tree_size).hex() != latest.hash)
            ):
                return _bad(
                    result,
                    min(latest.tree_size, tree_size + 1),
                    "the database was rolled back behind the last checkpoint",
                )
        newest = max(heads, default=0)
        if newest > last_seq:
            return _bad(result, last_seq + 1, f"truncated: a signed checkpoint covers {newest} records")
        if head is not None and (head[0] > last_seq or (last_seq and head[1] != at_head)):
            return _bad(result, min(head[0], last_seq) + 1, "truncated or rolled back: the head records more")
        if latest is not None and (
            latest.tree_size > last_seq
            or (latest.timestamp is not None and latest.tree_size in heads and heads[latest.tree_size] != latest.hash)
        ):
            return _bad(
                result, min(latest.tree_size, last_seq + 1), "the database was rolled back behind the last checkpoint"
            )
        return result

    def _latest_on_disk(self) -> Checkpoint | None:
        try:
            note = self._latest_file.read_text(encoding="utf-8")
        except OSError:
            return None
        return self._open(note) or open_legacy_checkpoint(self._legacy_key, note)

    # -- proofs for outside auditors -----------------------------------------------------------------

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest signed Merkle checkpoint: its note, size and root, and the verifier key."""
        with reading(self._engine) as connection:
            row = (
                connection.execute(
                    select(CHECKPOINTS)
                    .where(CHECKPOINTS.c.root_hash.is_not(None))
                    .order_by(CHECKPOINTS.c.tree_size.desc(), CHECKPOINTS.c.id.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        return {
            "origin": row["note"].partition("\n")[0],
            "tree_size": row["tree_size"],
            "root_hash": _b64(bytes.fromhex(row["root_hash"])),
            "created_at": ts_text(row["created_at"]),
            "note": row["note"],
            "vkey": self.key.vkey(),
        }

    def _proof_size(self, size: int | None) -> tuple[int, str | None]:
        """The tree size a proof is made against (default: the newest checkpoint's), and its signed note."""
        with reading(self._engine) as connection:
            query = select(CHECKPOINTS.c.tree_size, CHECKPOINTS.c.note).where(CHECKPOINTS.c.root_hash.is_not(None))
            if size is not None:
                query = query.where(CHECKPOINTS.c.tree_size == size)
            row = connection.execute(query.order_by(CHECKPOINTS.c.tree_size.desc()).limit(1)).first()
        if row is None:
            if size is None:
                raise tree.TreeError("no checkpoint is signed yet")
            return size, None
        return int(row[0]), str(row[1])

    def prove_inclusion(self, seq: int, size: int | None = None) -> dict[str, Any]:
        """That record ``seq`` is leaf ``seq - 1`` of the tree of ``size`` records (default: the newest
        checkpoint), with the record itself (None if pruned: its leaf hash is still proven)."""
        size, note = self._proof_size(size)
        with reading(self._engine) as connection:
            if not 0 < seq <= size:
                raise tree.TreeError(f"record {seq} is not in a tree of {size} records")
            proof = tree.inclusion(connection, seq - 1, size)
            digest = tree.leaves(connection, seq, seq)[seq]
            root = tree.root(connection, size)
            records = tree.read_records(connection, seq - 1, 1)
        record = records[0] if records and records[0]["seq"] == seq else None
        return {
            "seq": seq,
            "leaf_index": seq - 1,
            "tree_size": size,
            "leaf_hash": _b64(digest),
            "root_hash": _b64(root),
            "inclusion_proof": [_b64(h) for h in proof],
            "record": record,
            "checkpoint": note,
        }

    def prove_consistency(self, old: int, size: int | None = None) -> dict[str, Any]:
        """That the tree of ``size`` records (default: the newest checkpoint) extends the tree of ``old``."""
        size, note = self._proof_size(size)
        with reading(self._engine) as connection:
            proof = tree.consistency(connection, old, size)
            old_root, root = tree.root(connection, old), tree.root(connection, size)
        return {
            "old_size": old,
            "old_root_hash": _b64(old_root),
            "tree_size": size,
            "root_hash": _b64(root),
            "consistency_proof": [_b64(h) for h in proof],
            "checkpoint": note,
        }

    def witness_request(self, old: int) -> str:
        """The body of a C2SP tlog-witness ``add-checkpoint`` request for the newest checkpoint: the size the
        witness last co-signed, the consistency proof from it, and the checkpoint."""
        latest = self.latest_checkpoint()
        if latest is None:
            raise tree.TreeError("no checkpoint is signed yet")
        proof: list[str] = []
        if 0 < old < latest["tree_size"]:
            proof = self.prove_consistency(old, latest["tree_size"])["consistency_proof"]
        elif old > latest["tree_size"]:
            raise tree.TreeError(f"the newest checkpoint is of {latest['tree_size']} records, fewer than {old}")
        return "".join(f"{line}\n" for line in [f"old {old}", *proof]) + "\n" + str(latest["note"])

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
        with reading(self._engine) as connection:
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
        with reading(self._engine) as connection:
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
        checkpoint at the last pruned record so that what remains still verifies. The Merkle tree first takes
        in every record: its leaves outlive the records, so proofs still reach them."""
        self.checkpoint()
        merkle = self._has_tree()
        with writing(self._engine) as connection:
            last = connection.execute(select(func.max(RECORDS.c.seq)).where(RECORDS.c.ts < older_than)).scalar_one()
            if last is None:
                return 0
            while merkle and tree.size_of(connection) < last:  # records appended since the checkpoint above
                tree.grow(connection)
            archive.parent.mkdir(parents=True, exist_ok=True)
            with archive.open("a", encoding="utf-8") as handle:
                for row in connection.execute(
                    select(RECORDS).where(RECORDS.c.seq <= last).order_by(RECORDS.c.seq)
                ).mappings():
                    handle.write(json.dumps({**row, "ts": ts_text(row["ts"])}, default=str) + "\n")
                handle.flush()
            if merkle:
                self._sign(connection, last, anchor=True)
            else:  # a node without a tree (see checkpoint): the legacy anchor, the chain's hash of ``last``
                last_hash = connection.execute(select(RECORDS.c.hash).where(RECORDS.c.seq == last)).scalar_one()
                note = sign_legacy_checkpoint(self._legacy_key, last, last_hash, datetime.now(UTC))
                connection.execute(
                    insert(CHECKPOINTS).values(
                        tree_size=last, head_hash=last_hash, created_at=datetime.now(UTC), note=note, anchor=True
                    )
                )
            count = connection.execute(delete(RECORDS).where(RECORDS.c.seq <= last)).rowcount
        return int(count or 0)

    def _has_tree(self) -> bool:
        """Whether the tree holds every record from the first (false on a node that pruned before it had one)."""
        with reading(self._engine) as connection:
            first = connection.execute(select(func.min(RECORDS.c.seq))).scalar_one()
            return first is None or first == 1 or tree.size_of(connection) >= first

    def prune_content(self, older_than: datetime) -> int:
        """Delete captured prompts and answers older than ``older_than`` (they are not chained: the chain stays
        whole); the number deleted."""
        with writing(self._engine) as connection:
            count = connection.execute(delete(CONTENT).where(CONTENT.c.created_at < older_than)).rowcount
        return int(count or 0)

    def forget_tenant_content(self, tenant_id: str) -> int:
        """Delete every captured prompt and answer of a tenant (when the tenant is deleted)."""
        with writing(self._engine) as connection:
            count = connection.execute(delete(CONTENT).where(CONTENT.c.tenant_id == tenant_id)).rowcount
        return int(count or 0)


_TEXT_LIMITS = {
    column.name: int(column.type.length)  # type: ignore[attr-defined]
    for column in RECORDS.columns
    if column.name in AuditEvent.__dataclass_fields__ and getattr(column.type, "length", None)
}


def _locked_head(connection: Connection) -> tuple[int, str]:
    """The chain's head (sequence number, hash), locked until the transaction ends. Before the first record there
    is no row to lock (``FOR UPDATE`` of nothing waits for nobody): the row is made first, at the genesis, by an
    insert that waits for another transaction making it and then does nothing, so two processes appending the
    first records at once take turns instead of both writing record 1. (SQLite's writers are serialised by
    ``BEGIN IMMEDIATE`` already.)"""
    query = select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1).with_for_update()
    head = connection.execute(query).first()
    if head is None:
        genesis = {"id": 1, "seq": 0, "hash": GENESIS}
        if connection.dialect.name == "postgresql":
            connection.execute(postgresql.insert(HEAD).values(**genesis).on_conflict_do_nothing())
        else:
            connection.execute(sqlite.insert(HEAD).values(**genesis).on_conflict_do_nothing())
        head = connection.execute(query).one()
    return int(head[0]), str(head[1])


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


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _bad(result: VerifyResult, seq: int | None, reason: str) -> VerifyResult:
    result.ok, result.first_bad_seq, result.reason = False, seq, reason
    return result
