"""Writes models/bone_suppression/MODEL_CARD.md from the exported JSON configs and eval results."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HEADER = "# BS-LDM bone suppression (medidiff)\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model_card(folder: Path) -> Path:
    """(Re)write ``MODEL_CARD.md``: hand-written ``card_notes.md`` + training records + metrics + hashes."""
    folder = Path(folder)
    parts = [HEADER]
    notes = folder / "card_notes.md"
    if notes.exists():
        parts.append(notes.read_text())
    parts.append("\n## Training runs\n\n| model | config | steps | minutes | threads | final metrics |\n|---|---|---|---|---|---|\n")
    for cfg_path in sorted(folder.glob("*.json")):
        if cfg_path.name.startswith("eval_"):
            continue
        tr = json.loads(cfg_path.read_text()).get("training", {})
        fm = ", ".join(f"{k}={v:.4g}" for k, v in tr.get("final_metrics", {}).items()
                       if k not in ("step", "minutes") and isinstance(v, float))
        parts.append(f"| {cfg_path.stem} | `{tr.get('config')}` | {tr.get('steps')} | {tr.get('minutes')} | "
                     f"{tr.get('threads')} | {fm} |\n")
    for results in sorted(folder.glob("eval_*.md")):
        parts.append("\n" + results.read_text())
    parts.append("\n## Files (sha256)\n\n")
    for w in sorted(folder.glob("*.safetensors")):
        parts.append(f"- `{w.name}` ({w.stat().st_size / 1e6:.2f} MB): `{_sha256(w)}`\n")
    card = folder / "MODEL_CARD.md"
    card.write_text("".join(parts))
    return card
