"""HTTP errors the app raises on purpose (all 4xx, with a message a user can act on).

MONAI Label's endpoints turn any other exception into HTTP 500 and have no handler
for its own MONAILabelException, so input problems are raised as FastAPI
``HTTPException`` subclasses from the app, datastore and tasks.
"""

from __future__ import annotations

import re

from fastapi import HTTPException

# Image / label ids become file names inside the datastore: no path separators, no control
# characters, no leading dot or space, no "..". Spaces and other punctuation are fine.
_ID_RE = re.compile(r"^[^/\\\x00-\x1f.\s][^/\\\x00-\x1f]{0,199}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ClientError(HTTPException):
    def __init__(self, status_code: int, detail: str):
        super().__init__(status_code=status_code, detail=detail)


class BadInput(ClientError):
    """422: the request's content cannot be used (corrupt image, wrong size, bad label)."""

    def __init__(self, detail: str):
        super().__init__(422, detail)


class UnsupportedType(ClientError):
    """415: a file type the app does not accept."""

    def __init__(self, detail: str):
        super().__init__(415, detail)


class NotFound(ClientError):
    def __init__(self, detail: str):
        super().__init__(404, detail)


class InvalidId(ClientError):
    def __init__(self, detail: str):
        super().__init__(400, detail)


class ModelNotTrained(ClientError):
    """409: the model exists but has no weights to serve (never serve random weights)."""

    def __init__(self, detail: str):
        super().__init__(409, detail)


class Conflict(ClientError):
    def __init__(self, detail: str):
        super().__init__(409, detail)


def is_valid_id(value: str) -> bool:
    return bool(value) and bool(_ID_RE.match(value)) and ".." not in value


def check_id(value: str | None, what: str = "image") -> str:
    if value is None or not is_valid_id(str(value)):
        raise InvalidId(
            f"invalid {what} id {value!r}: 1-200 characters, no '/' or '\\', no '..', "
            f"not starting with '.' or a space"
        )
    return str(value)


def check_tag(value: str) -> str:
    if not value or not _TAG_RE.match(value):
        raise InvalidId(f"invalid label tag {value!r}: use letters, digits, '_' or '-'")
    return value


def find_cause(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    """The first exception of ``types`` in ``exc``'s cause/context chain (MONAI wraps transform errors)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, types):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
