"""Model cards built from what is in a model folder: notes, training records, measured results, hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medidiff.io.atomic import atomic_write


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _title(folder: Path, records: dict[str, dict]) -> str:
    """The card's title: the one ``title`` the training configs agree on, else the folder name."""
    titles = {r["title"] for r in records.values() if r.get("title")}
    return titles.pop() if len(titles) == 1 else folder.name


def write_model_card(folder: Path, title: str | None = None) -> Path:
    """(Re)write ``MODEL_CARD.md``: ``title`` (default: the training configs' one title, else the
    folder name; none when the hand-written ``card_notes.md`` starts with its own), the notes, a row per exported network from its JSON's
    training record, the measured results (``eval_*.md``) and the sha256 of every weights file."""
    folder = Path(folder)
    records = {p.stem: json.loads(p.read_text()).get("training", {})
               for p in sorted(folder.glob("*.json")) if not p.name.startswith("eval_")}
    notes = folder / "card_notes.md"
    notes_text = notes.read_text() if notes.exists() else ""
    parts = [] if notes_text.startswith("# ") else [f"# {title or _title(folder, records)}\n"]
    parts.append(notes_text)
    parts.append("\n## Training runs\n\n| model | config | data | steps | minutes | device (threads) | final metrics |\n"
                 "|---|---|---|---|---|---|---|\n")
    for stem, tr in records.items():
        fm = ", ".join(f"{k}={v:.4g}" for k, v in tr.get("final_metrics", {}).items()
                       if k not in ("step", "minutes") and isinstance(v, float))
        data = tr.get("data", {})
        source = " + ".join(f"{s['generator']} x{s['n_train']}" + "".join(f", {k}: {v}" for k, v in s.items()
                                                                       if k not in ("generator", "n_train"))
                            for s in data.get("sources", [data] if "generator" in data else []))
        parts.append(f"| {stem} | `{tr.get('config')}` | {source} | {tr.get('steps')} | {tr.get('minutes')} | "
                     f"{tr.get('device', 'cpu')} ({tr.get('threads')}) | {fm} |\n")
    for results in sorted(folder.glob("eval_*.md")):
        parts.append("\n" + results.read_text())
    parts.append("\n## Files (sha256)\n\n")
    for w in sorted(folder.glob("*.safetensors")):
        parts.append(f"- `{w.name}` ({w.stat().st_size / 1e6:.2f} MB): `{_sha256(w)}`\n")
    card = folder / "MODEL_CARD.md"
    with atomic_write(card) as tmp:
        tmp.write_text("".join(parts))
    return card
