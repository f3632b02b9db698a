"""Structured logs for `talkative serve`: request ids on every line, keys scrubbed, control characters escaped.

Every line carries the id of the request it was written for (`REQUEST_ID`, set by the request-context middleware,
`-` outside requests); `LOG_FORMAT=json` writes one JSON object per line. Every line goes through
`auth.policy.scrub`, so an API key never reaches a log, whatever wrote the line (uvicorn logs WebSocket paths with
their `api_key` query parameter, for one), and through `escape_controls`, so a client's input cannot forge a line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from ..auth.policy import KeyRing, SecurityConfigError, scrub

if TYPE_CHECKING:
    from ..settings import Settings

#: the id of the request being handled (None outside requests); set by `RequestContext`, read by the formatters
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("talkative_request_id", default=None)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "color_message"}
#: what could end a log line early or drive a terminal: C0 and C1 controls, DEL, line and paragraph separators,
#: and the bidirectional overrides that make text read differently from how it is stored
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as `\\xNN` / `\\uNNNN`.

    Log lines carry strings that clients chose (paths, headers, ids, messages quoting their input); a newline in
    one would let a client forge a whole log line (`/x%0a2026-12-02 10:37:30,000 CRITICAL ...`) and an escape
    sequence would drive the operator's terminal. Escaping in the formatters covers every line, whoever wrote it.
    """
    return _CONTROLS.sub(_escape_char, text)


class RequestIdFilter(logging.Filter):
    """Gives every record the current request's id, for the text format's `[%(request_id)s]`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
        self.secrets = secrets

    def formatMessage(self, record: logging.LogRecord) -> str:
        # one record, one line: the message (with whatever a client put in it) is escaped; a traceback that
        # format() appends after it keeps its own lines
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        # a traceback keeps its line breaks, indented, so that an exception message quoting client input can
        # neither start a line that looks like a log record nor carry terminal escapes
        return "\n".join("  " + escape_controls(line) for line in super().formatException(ei).split("\n"))

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get() or "-"
        return scrub(super().format(record), self.secrets)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the record's extra fields, exception."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(escape_controls(record.getMessage()), self.secrets),
            "request_id": rid if rid and rid != "-" else None,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = scrub(escape_controls(value), self.secrets) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = scrub(self.formatException(record.exc_info), self.secrets)
        return json.dumps(out, default=str, ensure_ascii=False)


def log_secrets(settings: Settings) -> tuple[str, ...]:
    """The configured keys, for the formatters to scrub by their text."""
    try:
        return KeyRing.from_settings(settings).secrets
    except SecurityConfigError:
        return ()  # create_app reports the bad configuration; the patterns still scrub what looks like a key


def configure_logging(settings: Settings) -> None:
    """Root logging for `talkative serve` (uvicorn's loggers included): one stderr handler, request ids, keys
    scrubbed, `LOG_FORMAT` text or json, `LOG_LEVEL`."""
    secrets = log_secrets(settings)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
