"""``appliance.lib.rows.row_of``: a record's fields as a row, without ``asdict``'s deep copy."""

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.lib.rows import row_of


@dataclass(slots=True)
class Record:
    name: str
    detail: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def test_a_row_holds_every_field_as_asdict_does_without_copying() -> None:
    record = Record("a", {"retrieval": {"chunks": 3}})
    row = row_of(record)
    assert row == asdict(record)
    assert row["detail"] is record.detail  # not copied: the row is inserted and dropped
