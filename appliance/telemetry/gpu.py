"""The node's GPU utilisation, where ``nvidia-smi`` is (the placement report's utilisation on a GPU node).

``nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits`` prints one percentage per GPU; the
reading is their mean as a fraction. On a node without ``nvidia-smi`` every reading is None, at no cost.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

log = logging.getLogger(__name__)

QUERY = ("--query-gpu=utilization.gpu", "--format=csv,noheader,nounits")


def parse_utilization(text: str) -> float | None:
    """The mean of nvidia-smi's per-GPU percentages, as 0..1; None when it printed no number."""
    values = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            values.append(min(100.0, max(0.0, float(line))) / 100.0)
        except ValueError:  # "[N/A]" or "[Not Supported]" on some boards
            continue
    return sum(values) / len(values) if values else None


class GpuUtilization:
    def __init__(self, interval_s: float = 10.0, binary: str | None = None) -> None:
        self._binary = binary if binary is not None else shutil.which("nvidia-smi")
        self.interval_s = interval_s

    @property
    def available(self) -> bool:
        return self._binary is not None

    async def read(self, timeout_s: float = 5.0) -> float | None:
        if self._binary is None:
            return None
        try:
            process = await asyncio.create_subprocess_exec(
                self._binary, *QUERY, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
        except (OSError, TimeoutError) as exc:
            log.warning("nvidia-smi failed: %s", exc)
            return None
        return parse_utilization(out.decode("ascii", "replace")) if process.returncode == 0 else None
