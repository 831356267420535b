"""Python blocks in docs/*.md whose fence reads ```` ```python runnable ```` run without error.

The convention: mark a block runnable when it needs nothing but medidiff and an empty working directory.
A document's runnable blocks run in order in one fresh interpreter (later blocks may use earlier
results), in an empty folder with no MLFLOW_TRACKING_URI, so they cannot touch the checkout or a server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
RUNNABLE = re.compile(r"^```python runnable\n(.*?)^```$", re.DOTALL | re.MULTILINE)
WITH_SNIPPETS = [path for path in DOCS if RUNNABLE.search(path.read_text(encoding="utf-8"))]


def test_some_documents_have_runnable_snippets():
    assert WITH_SNIPPETS


@pytest.mark.parametrize("path", WITH_SNIPPETS, ids=[p.name for p in WITH_SNIPPETS])
def test_runnable_snippets_run(path, tmp_path):
    blocks = RUNNABLE.findall(path.read_text(encoding="utf-8"))
    script = tmp_path / f"{path.stem}_snippets.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.parents[1]), env.get("PYTHONPATH")]))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{path.name} snippets failed:\n{done.stderr[-3000:]}"
