"""``appliance serve``'s app: what only a long-running server process does at start (``appliance.asgi``)."""

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import gc
from litestar.testing import TestClient
from appliance.asgi import create_served_app
app = create_served_app()
before = gc.get_freeze_count()
with TestClient(app) as client:
    assert client.get("/healthz").status_code == 200
    frozen = gc.get_freeze_count()
    gc.collect()
print(before, frozen, sum(len(gc.get_objects(generation)) for generation in (0, 1, 2)))
"""


def test_the_served_app_freezes_what_start_up_made_out_of_the_collectors_sight(tmp_path: Path) -> None:
    """A full collection no longer walks every object of the running app (156-227 ms with the loop stopped)."""
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(tmp_path / "data"), APPLIANCE_GATEWAY__ROUTES="[]")
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    before, frozen, tracked = (int(value) for value in result.stdout.split())
    assert before == 0
    assert frozen > 100_000  # the app, its libraries, its database engine...
    assert tracked < frozen // 10  # ... and a collection walks a small part of what it did
