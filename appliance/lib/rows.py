"""A dataclass record as the row a group commit inserts."""

from __future__ import annotations

import dataclasses
from typing import Any

_NAMES: dict[type, tuple[str, ...]] = {}  # each record class's field names, found once


def row_of(record: Any) -> dict[str, Any]:
    """``record``'s fields by name, values as they are. ``dataclasses.asdict`` deep-copies every value (the audit
    detail's nested dicts, each datetime) and recurses into each; on the ledger's and the audit log's group
    commits that copy took about a fifth of their CPU, for rows inserted and then dropped. Unlike ``asdict`` it
    does not turn a nested record into a dict: for records whose fields are column values."""
    cls = type(record)
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(field.name for field in dataclasses.fields(cls))
    return {name: getattr(record, name) for name in names}
