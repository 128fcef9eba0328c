"""Logging setup, the same in every process; each line names its process."""

from __future__ import annotations

import logging
import sys


def configure(level: str, process: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s",
        force=True,
    )
