"""Pseudonymisation of identifiers: salted SHA-256, so raw PatientID/UIDs never reach logs or reports."""

from __future__ import annotations

import hashlib
import os
import secrets
from functools import lru_cache
from pathlib import Path

SALT_ENV = "MEDIDIFF_SALT"
SALT_FILE = Path("~/.config/medidiff/salt")


@lru_cache(maxsize=1)
def _installation_salt() -> str:
    """The salt from $MEDIDIFF_SALT, else ~/.config/medidiff/salt (created 0600), else a process-random one."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = SALT_FILE.expanduser()
    try:
        salt = path.read_text(encoding="ascii").strip()
        if salt:
            return salt
    except OSError:
        pass
    salt = secrets.token_hex(16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(salt + "\n")
    except FileExistsError:  # another process won the race: use its salt
        return path.read_text(encoding="ascii").strip() or salt
    except OSError:
        pass  # not writable: hashes are stable for this process only
    return salt


def hash_identifier(value: str, salt: str | None = None) -> str:
    """Salted SHA-256 of ``value``, first 12 hex characters (safe to log)."""
    salt = _installation_salt() if salt is None else salt
    return hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:12]
