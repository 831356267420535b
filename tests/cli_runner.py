"""Run the `medidiff` command line in a subprocess, as users do, and check its user-error contract."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-m", "medidiff.cli"]

# A pipeline stage that sleeps, and waits until a file exists if given one, so tests can hold or
# catch a run mid-batch (import it via PYTHONPATH as slowstage.Sleep).
SLOW_STAGE = '''
import os
import time


class Sleep:
    def __init__(self, seconds: float = 0.0, until_exists: str = ""):
        self.seconds, self.until_exists = seconds, until_exists

    def __call__(self, item):
        time.sleep(self.seconds)
        while self.until_exists and not os.path.exists(self.until_exists):
            time.sleep(0.05)
        return item
'''


def medidiff(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """Exit ``code``, no traceback, and every fragment in the output."""
    text = result.stdout + result.stderr
    assert result.returncode == code, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text
