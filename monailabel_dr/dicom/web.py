"""A DICOMweb client for the fundus datastore: a ``dicomweb_client.DICOMwebClient`` (or the subclass
the caller gives: the app passes MONAI Label's ``DICOMwebClientX``, which copes with Orthanc's multipart
content types) with time-outs and one retry policy for every call.

Connection failures, time-outs and HTTP 429/502/503/504 are retried with exponential back-off;
when the server stays away, :class:`DicomWebUnavailable` (``status_code`` 503, a message naming the
server and what was being done) is raised instead of a stack trace; a refusal is :class:`DicomWebError`
(502). This module knows nothing of the app's HTTP layer: ``lib/dicomweb.py`` turns both into HTTP errors.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pydicom
import requests
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_STATUS = (408, 429, 502, 503, 504)


class DicomWebUnavailable(Exception):
    """The DICOMweb server cannot be reached (or keeps answering 5xx) after the retries (HTTP 503 to a client)."""

    status_code = 503

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class DicomWebError(Exception):
    """The DICOMweb server answered, but refused or failed the request (HTTP 502 to a client)."""

    status_code = 502

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class _TimeoutSession(requests.Session):
    def __init__(self, timeout: float):
        super().__init__()
        self._timeout = timeout

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        return super().request(*args, **kwargs)


class DicomWeb:
    def __init__(self, url: str, *, username: str = "", password: str = "", retries: int = 3, backoff_s: float = 0.5,
                 timeout_s: float = 30.0, qido_prefix: str | None = None, wado_prefix: str | None = None,
                 stow_prefix: str | None = None, client_class=None):
        from dicomweb_client import DICOMwebClient

        self.url = url.rstrip("/")
        self.retries = max(1, int(retries))
        self.backoff_s = float(backoff_s)
        session = _TimeoutSession(timeout_s)
        if username and password:
            session.auth = (username, password)
        self.client = (client_class or DICOMwebClient)(url=self.url, session=session, qido_url_prefix=qido_prefix,
                                                       wado_url_prefix=wado_prefix, stow_url_prefix=stow_prefix)
        self.client.set_http_retry_params(retry=False)   # one retry policy: ours
        # dicomweb-client's `retrying` decorator logs a traceback per refused connection even with retries off
        logging.getLogger("retrying").setLevel(logging.ERROR)

    # ------------------------------------------------------------------ retries
    def call(self, what: str, fn: Callable[..., T], *args, retries: int | None = None, **kwargs) -> T:
        attempts = self.retries if retries is None else max(1, int(retries))
        last: BaseException | None = None
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = e
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status not in RETRY_STATUS:
                    body = (e.response.text[:300] if e.response is not None else "").strip()
                    raise DicomWebError(f"DICOMweb server {self.url} refused {what}: HTTP {status} {body}") from e
                last = e
            if attempt + 1 < attempts:
                delay = self.backoff_s * (2 ** attempt)
                logger.warning(f"DICOMweb {what} failed ({_short(last)}); retry {attempt + 2}/{attempts} in {delay:.1f} s")
                time.sleep(delay)
        raise DicomWebUnavailable(
            f"DICOMweb server {self.url} is unreachable ({what}; {attempts} attempt(s)): {_short(last)}"
        ) from last

    # ------------------------------------------------------------------ operations
    def search_series(self, filters: dict[str, Any] | None = None, retries: int | None = None) -> list[Dataset]:
        res = self.call("searching series", self.client.search_for_series, search_filters=dict(filters or {}),
                        get_remaining=True, retries=retries)
        return [Dataset.from_json(r) for r in res]

    def series_metadata(self, study: str, series: str, retries: int | None = None) -> list[Dataset]:
        res = self.call(f"reading metadata of series {series}", self.client.retrieve_series_metadata, study, series,
                        retries=retries)
        return [Dataset.from_json(r) for r in res]

    def retrieve_series(self, study: str, series: str, retries: int | None = None) -> list[Dataset]:
        return self.call(f"retrieving series {series}", self.client.retrieve_series, study, series, retries=retries)

    def store(self, datasets: Sequence[Dataset], retries: int | None = None) -> Dataset:
        what = f"storing {len(datasets)} instance(s)"
        res = self.call(what, self.client.store_instances, [as_part10(d) for d in datasets], retries=retries)
        failed = res.get("FailedSOPSequence") if res is not None else None
        if failed:
            reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
            raise DicomWebError(f"DICOMweb server {self.url} did not store {len(failed)} instance(s) (failure reasons {reasons})")
        return res


def as_part10(ds: Dataset) -> Dataset:
    """A dataset as a DICOM file (preamble, 'DICM', file meta): dicomweb-client writes what it is given as is,
    and an in-memory dataset without a preamble comes back from Orthanc unreadable."""
    if getattr(ds, "preamble", None) and getattr(ds, "file_meta", None):
        return ds
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _short(e: BaseException | None) -> str:
    if e is None:
        return "no answer"
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code}"
    text = str(e)
    if "Connection refused" in text:
        return "connection refused"
    return f"{type(e).__name__}: {text[:200]}"
