"""Logging set-up: one format for every role, the current request id on every line written during an
RPC, every message on one line (control characters escaped, so a newline in a client's volume id
cannot forge a log line), and every line scrubbed of registered secrets."""

from __future__ import annotations

import contextvars
import logging
import sys

from mbs_csi import secrets

FORMAT = "%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s"

# Set by the server's interceptor for the duration of each call.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


# Control characters other than tab, as escapes: "\n" for a newline, "\x1b" for an escape...
_ESCAPES = {code: repr(chr(code))[1:-1] for code in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029) if code != ord("\t")}


class ScrubbingFormatter(logging.Formatter):
    """Adds the request id, formats as usual with the message on one line (a traceback keeps its lines),
    then masks every registered secret (tracebacks too)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        rid = request_id.get()
        record.rid = f" [{rid}]" if rid else ""
        return secrets.scrub(super().format(record))


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ScrubbingFormatter(FORMAT))
    handler.setLevel(level)  # also holds back libraries that set their own loggers' levels (oslo, alembic)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
