"""Which database failures pass (the server is down, the file is locked, the disk is full: retry the same
work later) and which do not (this data is refused: retrying it fails for ever)."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError, TimeoutError


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same write later may succeed. Anything else (a value too long, out of range, not
    serialisable, a constraint) is a property of the data: the record is refused however often it is tried."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | TimeoutError | OSError)
