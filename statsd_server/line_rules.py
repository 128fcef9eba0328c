"""The exact, one-line-at-a-time grammar for text and JSON log lines.

The vectorised parser in `parse.py` accepts the common shape of line on its own and hands
every other line here, so this module is the single definition of what a valid line is and
of the reason a bad one is rejected.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import unicodedata
from typing import NamedTuple

import msgspec

MAX_LINE_BYTES = 4096
MAX_CUSTOMER_ID_BYTES = 128
SECONDS_PER_DAY = 86400

# Reasons a line is rejected, as they appear in ingest summaries.
REASONS = (
    "too_long",
    "encoding",
    "json",
    "fields",
    "date",
    "time",
    "timestamp",
    "customer_id",
    "path",
    "status",
    "duration",
    "future",
    "expired",
)

_SEPARATORS = re.compile(r"[ \t]+")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?")
_STATUS = re.compile(r"[0-9]{3}")
_DURATION = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_EPOCH = dt.date(1970, 1, 1)
_FIRST_SECOND = (dt.date(1, 1, 1) - _EPOCH).days * SECONDS_PER_DAY


class Request(NamedTuple):
    """One accepted log line."""

    customer_id: str
    day: int  # days since 1970-01-01, UTC
    second: int  # seconds since the epoch, UTC
    status: int
    duration: float  # seconds


class JsonRecord(msgspec.Struct):
    """A JSON log line; unknown fields are ignored."""

    timestamp: dt.datetime
    customer_id: str
    request_path: str
    status_code: int
    duration: float


_json_decoder = msgspec.json.Decoder(JsonRecord)
_JSON_FIELDS = ("timestamp", "customer_id", "request_path", "status_code", "duration")


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def customer_id_problem(customer_id: str) -> str | None:
    """Why a string is not a valid customer id, or None when it is one."""
    # The common case, quickly: printable ASCII has no control character, and its only
    # whitespace is the space.
    if (
        customer_id.isascii()
        and customer_id.isprintable()
        and " " not in customer_id
        and 0 < len(customer_id) <= MAX_CUSTOMER_ID_BYTES
    ):
        return None
    try:
        size = len(customer_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid UTF-8"
    if size == 0 or size > MAX_CUSTOMER_ID_BYTES:
        return f"must be 1-{MAX_CUSTOMER_ID_BYTES} bytes of UTF-8, got {size}"
    if any(ch.isspace() for ch in customer_id) or _has_control(customer_id):
        return "must not contain whitespace or control characters"
    return None


def _valid_path(path: str) -> bool:
    return path.startswith("/") and not _has_control(path)


def parse_line(raw: bytes) -> Request | str | None:
    """Parse one line (without its newline): a Request, a rejection reason, or None if blank."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if len(raw) > MAX_LINE_BYTES:
        return "too_long"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "encoding"
    text = text.strip(" \t")
    if not text:
        return None
    if text[0] == "{":
        return _parse_json(raw)
    fields = _SEPARATORS.split(text)
    if len(fields) != 6:
        return "fields"
    date_s, time_s, customer_id, path, status_s, duration_s = fields

    m = _DATE.fullmatch(date_s)
    if m is None:
        return "date"
    try:
        day = (dt.date(int(m[1]), int(m[2]), int(m[3])) - _EPOCH).days
    except ValueError:
        return "date"
    m = _TIME.fullmatch(time_s)
    if m is None:
        return "time"
    hour, minute, sec = int(m[1]), int(m[2]), int(m[3])
    if hour > 23 or minute > 59 or sec > 59:
        return "time"
    if customer_id_problem(customer_id) is not None:
        return "customer_id"
    if not _valid_path(path):
        return "path"
    if _STATUS.fullmatch(status_s) is None or not 100 <= int(status_s) <= 599:
        return "status"
    if _DURATION.fullmatch(duration_s) is None:
        return "duration"
    duration = float(duration_s)
    if not math.isfinite(duration):
        return "duration"
    second = day * SECONDS_PER_DAY + hour * 3600 + minute * 60 + sec
    return Request(customer_id, day, second, int(status_s), duration)


def _parse_json(raw: bytes) -> Request | str:
    try:
        record = _json_decoder.decode(raw)
    except msgspec.ValidationError:
        return _json_rejection(raw)
    except msgspec.DecodeError:
        return "json"
    ts = record.timestamp
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    try:
        second = math.floor(ts.timestamp())
    except (OverflowError, ValueError):
        return "timestamp"
    if second < _FIRST_SECOND:  # an offset moved it before 0001-01-01 UTC
        return "timestamp"
    if customer_id_problem(record.customer_id) is not None:
        return "customer_id"
    if not _valid_path(record.request_path):
        return "path"
    if not 100 <= record.status_code <= 599:
        return "status"
    duration = record.duration
    if not (math.isfinite(duration) and duration >= 0):
        return "duration"
    return Request(
        record.customer_id, second // SECONDS_PER_DAY, second, record.status_code, duration
    )


def _json_rejection(raw: bytes) -> str:
    """The reason a syntactically valid JSON line failed the record schema."""
    try:
        obj = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "json"
    for name in _JSON_FIELDS:
        if name not in obj or bytes(obj[name]) == b"null":
            return "fields"
    for name, typ, reason in _JSON_FIELD_TYPES:
        try:
            msgspec.json.decode(obj[name], type=typ)
        except msgspec.ValidationError:
            return reason
    return "json"


_JSON_FIELD_TYPES = (
    ("timestamp", dt.datetime, "timestamp"),
    ("customer_id", str, "customer_id"),
    ("request_path", str, "path"),
    ("status_code", int, "status"),
    ("duration", float, "duration"),
)
