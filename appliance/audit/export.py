"""Export formats for a SIEM: JSON lines, and RFC 5424 syslog messages."""

from __future__ import annotations

import json
from typing import Any

FACILITY_LOG_AUDIT = 13
SD_ID = "audit@32473"  # 32473: the example enterprise number of RFC 5612, as no private one is assigned
_SEVERITY = {"success": 5, "failure": 4, "denied": 4}  # notice / warning
_SD_FIELDS = (
    "seq",
    "outcome",
    "subject",
    "subject_kind",
    "tenant_id",
    "object_type",
    "object_id",
    "source_ip",
    "request_id",
    "hash",
)


def jsonl(record: dict[str, Any]) -> str:
    return json.dumps(record, default=str, sort_keys=True)


def _sd_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _token(value: Any, limit: int) -> str:
    """A syslog header field: printable US-ASCII without spaces, or '-'."""
    text = "".join(ch for ch in str(value or "") if 33 <= ord(ch) <= 126)[:limit]
    return text or "-"


def syslog(record: dict[str, Any]) -> str:
    pri = FACILITY_LOG_AUDIT * 8 + _SEVERITY.get(record["outcome"], 4)
    params = " ".join(f'{name}="{_sd_value(record[name])}"' for name in _SD_FIELDS if record.get(name) is not None)
    message = json.dumps(record.get("detail") or {}, sort_keys=True, separators=(",", ":"))
    return (
        f"<{pri}>1 {record['ts']} {_token(record['node'], 255)} appliance {_token(record['component'], 128)} "
        f"{_token(record['event_type'], 32)} [{SD_ID} {params}] {message}"
    )
