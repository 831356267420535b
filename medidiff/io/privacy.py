"""Pseudonymisation of identifiers: salted SHA-256, so raw PatientID/UIDs never reach logs or reports.

The salt is a secret that makes hashes stable (the same study gets the same folder on every run) yet
not reversible by guessing. It comes from, in order: the salt stored with an output folder
(``OUT/.medidiff/salt``, so re-runs into that folder never rename anything), ``$MEDIDIFF_SALT``,
and ``~/.config/medidiff/salt`` (created 0600 on first use). Batch jobs under service accounts
without a writable HOME set ``MEDIDIFF_SALT`` or rely on the salt kept in the output folder.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from medidiff.errors import MedidiffError, OutputError

SALT_ENV = "MEDIDIFF_SALT"
SALT_FILE = Path("~/.config/medidiff/salt")
OUTPUT_SALT = "salt"  # inside OUT/.medidiff/
_active_salt: str | None = None


def _read_salt(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def _create_salt(path: Path, salt: str) -> str:
    """Write ``salt`` to ``path`` (0600) unless it exists; return the salt the file holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its salt
        return _read_salt(path) or salt
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(salt + "\n")
    return salt


@lru_cache(maxsize=1)
def _installation_salt() -> str | None:
    """$MEDIDIFF_SALT, else ~/.config/medidiff/salt (created on first use), else None."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = SALT_FILE.expanduser()
    salt = _read_salt(path)
    if salt:
        return salt
    try:
        return _create_salt(path, secrets.token_hex(16))
    except OSError:
        return None


def current_salt() -> str:
    """The salt in force: the output folder's (see :func:`output_salt`) or the installation's."""
    salt = _active_salt or _installation_salt()
    if salt is None:
        raise MedidiffError(
            f"no salt for pseudonymising identifiers: {SALT_FILE} cannot be created (HOME not writable?). "
            f"Set {SALT_ENV} to a secret string (e.g. the output of `openssl rand -hex 16`) and keep it "
            "the same for every run"
        )
    return salt


@contextmanager
def output_salt(state_dir: Path) -> Iterator[str]:
    """Put the salt stored in ``state_dir`` (an output's ``.medidiff``) in force; create it if new.

    A new output folder takes the installation salt when there is one, else a fresh random one, so
    re-runs into the folder hash identically whatever HOME or the environment say later.
    """
    global _active_salt
    path = Path(state_dir) / OUTPUT_SALT
    salt = _read_salt(path)
    if salt is None:
        try:
            salt = _create_salt(path, _installation_salt() or secrets.token_hex(16))
        except OSError as exc:
            raise OutputError(f"cannot store the pseudonymisation salt in {path}: {exc.strerror}; "
                              "make the output folder writable or choose another with -o") from None
    elif os.environ.get(SALT_ENV) and os.environ[SALT_ENV] != salt:
        raise OutputError(f"{SALT_ENV} differs from the salt this output folder was written with ({path}); "
                          f"unset {SALT_ENV}, or choose a new output folder with -o")
    previous, _active_salt = _active_salt, salt
    try:
        yield salt
    finally:
        _active_salt = previous


def hash_identifier(value: str, salt: str | None = None) -> str:
    """Salted SHA-256 of ``value``, first 12 hex characters (safe to log)."""
    salt = current_salt() if salt is None else salt
    return hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:12]
