"""Structured logs of `medidiff listen`: one JSON object per line on stderr, hashed keys only."""

from __future__ import annotations

import json
import sys
import threading
import time

_lock = threading.Lock()


def emit(event: str, **fields) -> None:
    """Write ``{"time", "event", **fields}`` as one line; callers pass hashed keys, never patient data."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields})
    with _lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
