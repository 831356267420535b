"""DICOMweb with dicomweb-client: studies in by QIDO-RS search and WADO-RS retrieve, results out by STOW-RS.

``dicomweb://host:port/path`` means ``http://host:port/path`` (``dicomwebs://``: https); plain http(s)
URLs are taken as they are. :func:`retrieved_studies` writes the matching studies into a temporary folder
that is removed whatever happens (the pipeline reads it like any folder); :class:`StowDestination` is an
outbox destination (:mod:`medidiff.dicomnet.outbox`) that stores files by STOW-RS, a few per request.
Query values (which may name a patient) are never logged.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medidiff.dicomnet.outbox import FAILED, LOST, REFUSED, SENT
from medidiff.errors import InputError

STOW_BATCH = 20  # instances per STOW-RS request
TIMEOUT_SECONDS = 30
QUERY_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*|[0-9A-Fa-f]{8}")  # a DICOM keyword or an 8-hex-digit tag


def http_url(text: str, option: str) -> str:
    """The http(s) URL of a DICOMweb service given as ``dicomweb(s)://`` or ``http(s)://``."""
    match = re.fullmatch(r"(dicomwebs?|https?)://([^/\s]+)(/\S*)?", text)
    if not match:
        raise InputError(f"{text!r} is not a DICOMweb URL (dicomweb://host:port/dicom-web); fix {option}")
    scheme = {"dicomweb": "http", "dicomwebs": "https"}.get(match[1], match[1])
    return f"{scheme}://{match[2]}{(match[3] or '').rstrip('/')}"


def parse_query(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as QIDO-RS search filters (keywords such as PatientID, StudyDate, ModalitiesInStudy)."""
    query = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not QUERY_KEY.fullmatch(key) or not value:
            raise InputError(f"--query {item!r} is not KEY=VALUE with a DICOM keyword or tag as KEY "
                             "(e.g. --query ModalitiesInStudy=CT --query StudyDate=20240101-20241231)")
        query[key] = value
    return query


def _client(url: str):
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(url, timeout=TIMEOUT_SECONDS)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff and a durable queue
    return client


@contextmanager
def retrieved_studies(url: str, query: dict[str, str], option: str = "--from") -> Iterator[Path]:
    """A temporary folder holding every study that matches ``query`` on the server at ``url``, one subfolder
    per study; removed when the block ends, also on errors."""
    import requests

    with tempfile.TemporaryDirectory(prefix="medidiff-dicomweb-") as tmp:
        client = _client(url)
        try:
            studies = client.search_for_studies(search_filters=query, get_remaining=True)
            for number, study in enumerate(studies):
                uid = study.get("0020000D", {}).get("Value", [None])[0]
                if not uid:
                    continue
                folder = Path(tmp) / f"study{number:05d}"
                folder.mkdir()
                for index, dataset in enumerate(client.iter_study(uid)):
                    dataset.save_as(folder / f"{index:06d}.dcm", enforce_file_format=True)
        except requests.RequestException as exc:
            raise InputError(f"the DICOMweb server {url} did not answer ({_reason(exc)}); check {option} and that "
                             "the server is running") from None
        if not studies:
            raise InputError(f"no study on {url} matches the query; check --query (keys are DICOM keywords such as "
                             "PatientID, StudyDate, ModalitiesInStudy)")
        yield Path(tmp)


def _reason(exc) -> str:
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    return type(exc).__name__


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb service that derived files are stored to by STOW-RS."""

    url: str

    @classmethod
    def parse(cls, text: str, option: str) -> StowDestination:
        return cls(http_url(text, option))

    def __str__(self) -> str:
        return self.url

    def send(self, files: dict[int, Path]) -> dict[int, tuple[str, str]] | str:
        """STOW-RS ``files``, a few per request: an outcome and a detail per file, or why none could go."""
        import pydicom
        import requests

        outcomes, datasets = {}, {}
        for item, path in files.items():
            try:
                datasets[item] = pydicom.dcmread(path)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                outcomes[item] = (LOST, type(exc).__name__)
        client, items = _client(self.url), list(datasets)
        for start in range(0, len(items), STOW_BATCH):
            batch = items[start:start + STOW_BATCH]
            try:
                answer = client.store_instances([datasets[i] for i in batch])
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                outcomes |= {i: (FAILED if code >= 500 or code in (408, 429) else REFUSED, f"HTTP {code}") for i in batch}
                continue
            except requests.RequestException as exc:
                if not outcomes:
                    return f"the DICOMweb server did not answer ({_reason(exc)})"
                outcomes |= {i: (FAILED, _reason(exc)) for i in batch}
                continue
            failed = {str(ref.ReferencedSOPInstanceUID) for ref in answer.get("FailedSOPSequence", [])}
            outcomes |= {i: (REFUSED, "refused by the server") if datasets[i].SOPInstanceUID in failed else (SENT, "")
                         for i in batch}
        return outcomes
