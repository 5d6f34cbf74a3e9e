"""Logging set-up (called by entry points, never at import)."""

from __future__ import annotations

import logging


def configure_logging(level: str = "info") -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("appliance").setLevel(level.upper())
