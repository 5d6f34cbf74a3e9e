"""The RFC 6962 Merkle tree over the audit records, kept in the database beside them.

The tree grows from the stored records, in sequence order, apart from their append (the request path never
waits on it): record ``seq`` is leaf ``seq - 1``. Every complete subtree's hash is kept (about two rows per
record), so the root at any size and any proof are read, not recomputed: a proof in a tree of a million records
names at most 20 hashes, each a stored node or, on the tree's right edge, folded from at most 20 of them; one
query reads them all. Leaf hashes stay when their records are pruned, so what remains still proves against
every checkpoint signed before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import Table, and_, func, insert, or_, select, text, update
from sqlalchemy.engine import Connection

from appliance.audit.chain import FIELDS, leaf_data, ts_text
from appliance.audit.merkle import (
    EMPTY_ROOT,
    Node,
    complete_nodes,
    consistency_ranges,
    fold,
    inclusion_ranges,
    leaf_hash,
    node_hash,
    nodes_for,
    resolve,
)
from appliance.audit.models import AuditTree, AuditTreeNode

NODES: Table = AuditTreeNode.__table__  # type: ignore[attr-defined]
TREE: Table = AuditTree.__table__  # type: ignore[attr-defined]
RECORD_COLUMNS = (*FIELDS, "hash")


class TreeError(RuntimeError):
    """The tree cannot grow (records missing before it) or does not match what it should hold."""


# -- records as stored ----------------------------------------------------------------------------------------


def read_records(connection: Connection, after: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` records after ``after`` in sequence order, as the values that were hashed. Raw driver
    values (no per-row type processing): verification and the tree read every record there is."""
    columns = ", ".join(RECORD_COLUMNS)  # constant field names, not input
    query = text(f"SELECT {columns} FROM audit_records WHERE seq > :after ORDER BY seq LIMIT :n")  # noqa: S608
    records = []
    for row in connection.execute(query, {"after": after, "n": limit}).all():
        values: dict[str, Any] = dict(zip(RECORD_COLUMNS, row, strict=True))
        values["ts"], values["detail"] = _raw_ts(values["ts"]), _raw_detail(values["detail"])
        records.append(values)
    return records


def _raw_ts(value: Any) -> str:
    """A timestamp as canonical text, from what the driver returns: SQLite's text (UTC, as SQLAlchemy stored
    it, always with microseconds) without parsing it, or PostgreSQL's datetime."""
    if isinstance(value, datetime):
        return ts_text(value)
    return f"{value[:10]}T{value[11:]}Z"


def _raw_detail(value: Any) -> Any:
    return msgspec.json.decode(value) if isinstance(value, str | bytes) else value


# -- growing ------------------------------------------------------------------------------------------------


def size_of(connection: Connection) -> int:
    return int(connection.execute(select(TREE.c.size).where(TREE.c.id == 1)).scalar_one_or_none() or 0)


@dataclass(frozen=True)
class Growth:
    """The nodes that take the tree from ``start`` to ``size`` records, computed from a snapshot."""

    start: int
    size: int
    rows: list[dict[str, Any]]


def grow(connection: Connection, limit: int = 1000) -> tuple[int, int]:
    """Add up to ``limit`` of the records the tree does not hold yet, in sequence order, within the caller's
    transaction (the tree's row is locked: one grower at a time). Returns (size before, size after)."""
    growth = plan(connection, _locked_size(connection), limit)
    _store(connection, growth)
    return growth.start, growth.size


def plan(connection: Connection, size: int, limit: int = 1000) -> Growth:
    """The growth over up to ``limit`` records past ``size``: reads only, so a snapshot will do and the hashing
    holds no lock (records are never changed once stored; ``extend`` checks the tree is still at ``size``)."""
    records = read_records(connection, size, limit)
    if not records:
        return Growth(size, size, [])
    if records[0]["seq"] != size + 1:
        raise TreeError(
            f"the tree holds {size} records but the next record stored is {records[0]['seq']}: records "
            "were deleted before the tree held them"
        )
    frontier = {node[0]: digest for node, digest in get_nodes(connection, _frontier(size)).items()}
    rows: list[dict[str, Any]] = []
    start = size
    for values in records:
        if values["seq"] != size + 1:
            raise TreeError(f"record {size + 1} is missing")
        digest = leaf_hash(leaf_data(values))
        rows.append({"level": 0, "idx": size, "hash": digest})
        level, idx = 0, size
        while idx & 1:
            digest = node_hash(frontier.pop(level), digest)
            level, idx = level + 1, idx >> 1
            rows.append({"level": level, "idx": idx, "hash": digest})
        frontier[level] = digest
        size += 1
    return Growth(start, size, rows)


def extend(connection: Connection, growth: Growth) -> bool:
    """Store ``growth`` within the caller's write transaction, if the tree still holds ``growth.start``
    records; False when another grower took it further meanwhile (plan again from where it is)."""
    if _locked_size(connection) != growth.start:
        return False
    _store(connection, growth)
    return True


def _locked_size(connection: Connection) -> int:
    row = connection.execute(select(TREE.c.size).where(TREE.c.id == 1).with_for_update()).first()
    if row is None:
        connection.execute(insert(TREE).values(id=1, size=0))
        return 0
    return int(row[0])


def _store(connection: Connection, growth: Growth) -> None:
    if not growth.rows:
        return
    connection.execute(insert(NODES), growth.rows)
    connection.execute(update(TREE).where(TREE.c.id == 1).values(size=growth.size))


def _frontier(size: int) -> set[Node]:
    """The complete subtrees on the right edge of a tree of ``size`` leaves (waiting for a right sibling)."""
    return {(level, (size >> level) - 1) for level in range(size.bit_length()) if size >> level & 1}


# -- reading ------------------------------------------------------------------------------------------------


def get_nodes(connection: Connection, nodes: set[Node]) -> dict[Node, bytes]:
    if not nodes:
        return {}
    by_level: dict[int, list[int]] = {}
    for level, idx in nodes:
        by_level.setdefault(level, []).append(idx)
    # one primary-key lookup per level (a row-value IN list is scanned, not looked up, by SQLite)
    condition = or_(*(and_(NODES.c.level == level, NODES.c.idx.in_(idxs)) for level, idxs in by_level.items()))
    query = select(NODES.c.level, NODES.c.idx, NODES.c.hash).where(condition)
    found = {(int(row[0]), int(row[1])): bytes(row[2]) for row in connection.execute(query)}
    missing = nodes - found.keys()
    if missing:
        raise TreeError(f"the tree lacks node(s) {sorted(missing)[:3]}")
    return found


def _check_size(connection: Connection, size: int) -> None:
    held = size_of(connection)
    if size > held:
        raise TreeError(f"the tree holds {held} records, not {size}")


def root(connection: Connection, size: int) -> bytes:
    if size == 0:
        return EMPTY_ROOT
    _check_size(connection, size)
    parts = complete_nodes(0, size)
    found = get_nodes(connection, set(parts))
    return fold([found[node] for node in parts])


def inclusion(connection: Connection, index: int, size: int) -> list[bytes]:
    """The inclusion proof of leaf ``index`` (record ``index + 1``) in the tree of ``size`` records."""
    _check_size(connection, size)
    ranges = inclusion_ranges(index, size)
    found = get_nodes(connection, nodes_for(ranges))
    return resolve(ranges, found.__getitem__)


def consistency(connection: Connection, old: int, new: int) -> list[bytes]:
    _check_size(connection, new)
    ranges = consistency_ranges(old, new)
    found = get_nodes(connection, nodes_for(ranges))
    return resolve(ranges, found.__getitem__)


def leaves(connection: Connection, first: int, last: int) -> dict[int, bytes]:
    """The leaf hashes of records ``first``..``last`` that the tree holds, by sequence number."""
    query = select(NODES.c.idx, NODES.c.hash).where(
        NODES.c.level == 0, NODES.c.idx >= first - 1, NODES.c.idx <= last - 1
    )
    return {int(row[0]) + 1: bytes(row[1]) for row in connection.execute(query)}


# -- verifying ----------------------------------------------------------------------------------------------


def check_structure(connection: Connection, size: int, batch: int = 20_000) -> str | None:
    """Why the stored tree is not the tree of its ``size`` leaves (each level complete, each node the hash of
    its two children), or None. The leaves themselves are checked against the records by the caller. Nodes past
    ``size`` (a tree growing meanwhile) are not looked at."""
    for level in range(size.bit_length() + 1):
        want = size >> level  # nodes past it: the tree growing since ``size`` was read
        count, low, high = connection.execute(
            select(func.count(), func.min(NODES.c.idx), func.max(NODES.c.idx)).where(
                NODES.c.level == level, NODES.c.idx < want
            )
        ).one()
        if count != want or (want and (low != 0 or high != want - 1)):
            return f"the tree's level {level} holds {count} nodes where a tree of {size} records has {want}"
    for level in range(1, size.bit_length()):
        for first in range(0, size >> level, batch):
            last = min(first + batch, size >> level)
            children = _level(connection, level - 1, 2 * first, 2 * last)
            parents = _level(connection, level, first, last)
            for idx in range(first, last):
                if parents[idx] != node_hash(children[2 * idx], children[2 * idx + 1]):
                    return f"the tree's node over records {(idx << level) + 1}..{(idx + 1) << level} was altered"
    return None


def _level(connection: Connection, level: int, first: int, last: int) -> dict[int, bytes]:
    query = select(NODES.c.idx, NODES.c.hash).where(
        and_(NODES.c.level == level, NODES.c.idx >= first, NODES.c.idx < last)
    )
    return {int(row[0]): bytes(row[1]) for row in connection.execute(query)}


def records_after(connection: Connection, after: int, batch: int) -> Iterator[list[dict[str, Any]]]:
    while True:
        records = read_records(connection, after, batch)
        if not records:
            return
        yield records
        after = records[-1]["seq"]
