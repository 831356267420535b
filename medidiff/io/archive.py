"""Zip inputs: extraction under size and ratio caps into a temporary folder that never outlives its use.

Caps (module constants, each overridden by the environment variable named in ``LIMIT_ENV``):

- ``ZIP_MAX_BYTES`` (``MEDIDIFF_ZIP_MAX_BYTES``): total uncompressed size of the archive, in bytes;
- ``ZIP_MAX_MEMBER_BYTES`` (``MEDIDIFF_ZIP_MAX_MEMBER_BYTES``): uncompressed size of one member;
- ``ZIP_MAX_RATIO`` (``MEDIDIFF_ZIP_MAX_RATIO``): uncompressed/compressed size, of each member larger
  than ``RATIO_MIN_BYTES`` and of the whole archive (DICOM rarely compresses beyond 20x; bombs reach 1000x).

They are checked on the sizes the archive declares before anything is written; each member is then
inflated in chunks and never past its declared size, so a lying header cannot exceed them (it ends
in a CRC error instead). The extraction folder is named ``medidiff-zip-<pid>-*``
and removed on every exit path; one left by a killed process (its pid gone) is removed by the next
extraction.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zipfile
import zlib
from pathlib import Path

from medidiff.errors import InputError
from medidiff.io.text import clean_text

ZIP_MAX_BYTES = 64 * 2**30
ZIP_MAX_MEMBER_BYTES = 4 * 2**30
ZIP_MAX_RATIO = 200
RATIO_MIN_BYTES = 2**20  # small members may compress well (headers, blank images): no ratio check
LIMIT_ENV = {
    "ZIP_MAX_BYTES": "MEDIDIFF_ZIP_MAX_BYTES",
    "ZIP_MAX_MEMBER_BYTES": "MEDIDIFF_ZIP_MAX_MEMBER_BYTES",
    "ZIP_MAX_RATIO": "MEDIDIFF_ZIP_MAX_RATIO",
}
PREFIX = "medidiff-zip-"
CHUNK = 2**20


def zip_limits() -> dict[str, int]:
    """The caps in force: each module constant unless its environment variable sets a positive integer."""
    limits = {}
    for name, env in LIMIT_ENV.items():
        value = os.environ.get(env, "").strip()
        if value and not (value.isdigit() and int(value) > 0):
            raise InputError(f"{env}={value!r} is not a positive whole number; unset it or give one")
        limits[name] = int(value) if value else globals()[name]
    return limits


def is_zip(path: Path) -> bool:
    """True for a file that is a zip archive."""
    return path.is_file() and zipfile.is_zipfile(path)


class Extraction:
    """A zip extracted to a temporary folder; the folder is removed by ``close()``, when the object is
    garbage-collected, or at interpreter exit, whichever comes first."""

    def __init__(self, archive: Path):
        self.path = extract_zip(archive)
        self.close = weakref.finalize(self, shutil.rmtree, self.path, True)


def extract_zip(archive: Path) -> Path:
    """Extract ``archive`` within the caps into a new temporary folder (the caller removes it).

    Raises InputError naming the archive, the cap exceeded and its environment variable, for a bomb,
    an unsafe member name, a corrupt archive or too little temporary space.
    """
    remove_stale_extractions()
    limits = zip_limits()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            _check_declared(archive, members, limits)
            tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
            try:
                for member in members:
                    _extract_member(zf, member, tmp, archive)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, RuntimeError, zlib.error) as exc:
        raise InputError(f"zip {archive} cannot be read (corrupt, encrypted or an unsupported method): "
                         f"{clean_text(exc, 200)}") from None
    except OSError as exc:
        raise InputError(f"zip {archive} cannot be extracted into {tempfile.gettempdir()}: {exc.strerror}; "
                         "set TMPDIR to a writable folder with room, or extract it yourself") from None
    return tmp


def _too_big(archive: Path, what: str, size: int, cap_name: str, cap: int) -> InputError:
    return InputError(f"zip {archive}: {what} inflates to {size} bytes, over the {cap} byte cap "
                      f"({LIMIT_ENV[cap_name]}); if the archive is genuine, raise {LIMIT_ENV[cap_name]} "
                      "or extract it yourself and pass the folder")


def _too_compressed(archive: Path, what: str, ratio: float, cap: int) -> InputError:
    return InputError(f"zip {archive}: {what} expands {ratio:.0f}x, over the {cap}x ratio cap "
                      f"({LIMIT_ENV['ZIP_MAX_RATIO']}), refused as a possible zip bomb; if the archive is "
                      f"genuine, raise {LIMIT_ENV['ZIP_MAX_RATIO']} or extract it yourself and pass the folder")


def _check_declared(archive: Path, members: list[zipfile.ZipInfo], limits: dict[str, int]) -> None:
    """Refuse unsafe names and declared sizes over the caps, before anything is written."""
    for index, member in enumerate(members):
        name = member.filename.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
            raise InputError(f"zip {archive} holds an unsafe path {clean_text(member.filename)!r} "
                             "(absolute or with '..'); refused")
        if member.file_size > limits["ZIP_MAX_MEMBER_BYTES"]:
            raise _too_big(archive, f"member {index + 1}", member.file_size, "ZIP_MAX_MEMBER_BYTES",
                           limits["ZIP_MAX_MEMBER_BYTES"])
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > RATIO_MIN_BYTES and ratio > limits["ZIP_MAX_RATIO"]:
            raise _too_compressed(archive, f"member {index + 1}", ratio, limits["ZIP_MAX_RATIO"])
    total = sum(m.file_size for m in members)
    if total > limits["ZIP_MAX_BYTES"]:
        raise _too_big(archive, "the archive", total, "ZIP_MAX_BYTES", limits["ZIP_MAX_BYTES"])
    ratio = total / max(archive.stat().st_size, 1)  # catches members that overlap one compressed kernel
    if total > RATIO_MIN_BYTES and ratio > limits["ZIP_MAX_RATIO"]:
        raise _too_compressed(archive, "the archive", ratio, limits["ZIP_MAX_RATIO"])
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if total > free:
        raise InputError(f"zip {archive} needs {total} bytes of temporary space but {tempfile.gettempdir()} "
                         f"has {free} free; set TMPDIR to a larger disk or extract it yourself")


def _extract_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, tmp: Path, archive: Path) -> None:
    """Inflate one member in chunks, never past the size it declares (which the caps were checked on)."""
    target = tmp / member.filename
    if member.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(member) as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > member.file_size:  # zipfile stops at the declared size today; keep that true
                raise InputError(f"zip {archive}: a member inflates past the size it declares; refused "
                                 "as corrupt or hostile")
            dst.write(chunk)


def remove_stale_extractions() -> list[Path]:
    """Remove this user's ``medidiff-zip-<pid>-*`` folders whose process is gone; returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        pid = folder.name[len(PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
