"""Where this node keeps what a backup holds, all from the settings (the same functions the domains use)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from appliance.audit.setup import audit_dir
from appliance.engines.runner import pid_alive
from appliance.engines.state import read_state
from appliance.retrieval.setup import qdrant_local_path
from appliance.settings import NODE_CONFIG, Settings, config_file

NODE_CONFIG_DIR = NODE_CONFIG.parent


@dataclass(frozen=True)
class Layout:
    data_dir: Path
    database_url: URL
    secrets_dir: Path
    audit_dir: Path
    qdrant_path: Path | None  # None: a Qdrant server, not backed up
    qdrant_url: str | None
    config_file: Path | None
    node: str

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        return cls(
            data_dir=settings.data_dir,
            database_url=make_url(settings.database_url),
            secrets_dir=settings.secrets_dir,
            audit_dir=audit_dir(settings),
            qdrant_path=qdrant_local_path(settings),
            qdrant_url=settings.retrieval.qdrant_url,
            config_file=config_file(),
            node=settings.audit.node or socket.gethostname(),
        )

    @property
    def database_kind(self) -> str:
        return self.database_url.get_backend_name()

    @property
    def sqlite_path(self) -> Path:
        database = self.database_url.database
        if self.database_kind != "sqlite" or not database or database == ":memory:":
            raise ValueError("the database is not a SQLite file")
        return Path(database)

    @property
    def database_user(self) -> str | None:
        """The OS user PostgreSQL's tools run as: as root, the data directory's owner (a node's database lets the
        appliance's user in by peer authentication, not root); otherwise this user (None)."""
        if os.geteuid() != 0 or not self.data_dir.exists():
            return None
        uid = self.data_dir.stat().st_uid
        if uid == 0:
            return None
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def config_files(self) -> list[Path]:
        """The configuration file and the ``*.env`` files beside it (the node keeps its database URL there)."""
        if self.config_file is None or not self.config_file.is_file():
            return []
        return [self.config_file, *sorted(p for p in self.config_file.parent.glob("*.env") if p.is_file())]


def running_reason(settings: Settings, layout: Layout) -> str | None:
    """Why the appliance counts as running (restore refuses then), or None when it is stopped."""
    state = read_state(settings.run_dir)
    if state is not None and pid_alive(state.supervisor_pid):
        return f"the appliance is running (supervisor pid {state.supervisor_pid}); stop it with `appliance down`"
    if settings.server.service_manager == "systemd" and shutil.which("systemctl"):
        active = subprocess.run(
            ["systemctl", "is-active", "--quiet", "appliance"], check=False, capture_output=True, timeout=30
        )
        if active.returncode == 0:
            return "the appliance service is active; stop it with `systemctl stop appliance`"
    if layout.qdrant_path is not None and _locked(layout.qdrant_path / ".lock"):
        return f"another process has the vector store open ({layout.qdrant_path}); stop the appliance first"
    return None


def _locked(lock_file: Path) -> bool:
    """Whether another process holds Qdrant local mode's lock (an exclusive flock on ``.lock``)."""
    import fcntl

    try:
        handle = lock_file.open("rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
