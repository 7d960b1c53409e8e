"""Logging set-up: one format for every role, the current request id on every line written during an
RPC, and every line scrubbed of registered secrets."""

from __future__ import annotations

import contextvars
import logging
import sys

from mbs_csi import secrets

FORMAT = "%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s"

# Set by the server's interceptor for the duration of each call.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class ScrubbingFormatter(logging.Formatter):
    """Adds the request id, formats as usual, then masks every registered secret (tracebacks too)."""

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
