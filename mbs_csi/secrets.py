"""Sensitive values: a wrapper that never prints itself, and scrubbing of text that might hold one.

Every sensitive value the driver learns (a backend's ``driver_sensitive_options``, the password in a
database URL, CSI ``secrets`` maps) is wrapped in :class:`Secret` and registered here, so that the log
formatter and the error mapping can scrub it from any text on its way out, whatever path it took.

:func:`is_secret` is the one rule, for the whole driver, of whether an entry of a structure (connection
info, device info) is secret: its value came from a secrets map (a :class:`Secret`, whatever the
entry's name), its name says so, or its text holds a registered secret. :func:`holds_secret` applies
it at any depth.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Shorter values are not scrubbed from free text: masking every "a" or "42" in a log line would make
# logs unreadable while protecting nothing a guess would not find. Secret() still masks them in repr.
MIN_SCRUB_LENGTH = 4

_SECRET_NAME = re.compile(
    r"pass(word|wd|phrase)?$|password|keyring|token|credential|private|secret$|"
    r"_secret|secret_key|(^|_)key$",
    re.IGNORECASE,
)

_lock = threading.Lock()
_known: set[str] = set()
_ordered: tuple[str, ...] = ()  # longest first, so a secret containing another is masked whole


class Secret:
    """A sensitive string. ``str``/``repr``/formatting show ``***``; :meth:`reveal` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:  # pickling (worker processes) keeps the value and re-registers it
        return (Secret, (self._value,))


def is_secret_name(name: str) -> bool:
    """Whether an option, connection info entry or setting called ``name`` holds a secret by its name."""
    return bool(_SECRET_NAME.search(name))


def is_secret(key: str, value: object) -> bool:
    """Whether the entry ``key: value`` is secret by itself (see the module doc); ``key`` "" for a list item."""
    return isinstance(value, Secret) or is_secret_name(key) or (isinstance(value, str) and scrub(value) != value)


def holds_secret(value: object) -> bool:
    """Whether ``value`` is, or holds at any depth, an entry :func:`is_secret` calls secret."""
    if isinstance(value, Mapping):
        return any(is_secret(str(k), v) or holds_secret(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(holds_secret(v) for v in value)
    return is_secret("", value)


def revealed(value: Any) -> Any:
    """``value`` with every :class:`Secret` in it, at any depth, replaced by what it holds: for the one
    call that needs the real values (os-brick's connect)."""
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, Mapping):
        return {k: revealed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [revealed(v) for v in value]
    return value


def register(value: str) -> None:
    """Remember ``value`` so that :func:`scrub` masks it wherever it shows up."""
    global _ordered
    if len(value) < MIN_SCRUB_LENGTH:
        return
    with _lock:
        if value in _known:
            return
        _known.add(value)
        _ordered = tuple(sorted(_known, key=len, reverse=True))


def register_all(values: Iterable[str]) -> None:
    for value in values:
        register(value)


def file_secrets(path: str) -> list[str]:
    """The secret material in the file at ``path`` (a keyring, a private key), as it may show in a log:
    the content as written and as Python and JSON quote it inside a printed structure, and the value of
    each ``name = value`` line (a Ceph keyring's key). Nothing for an unreadable file: whoever needs it
    reports why."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return []
    found = [text, repr(text)[1:-1], json.dumps(text)[1:-1]]
    for line in text.splitlines():
        _, equals, value = line.partition("=")
        if equals:
            found.append(value.strip())
    return found


def scrub(text: str) -> str:
    """Return ``text`` with every registered secret replaced by ``***``."""
    for value in _ordered:
        if value in text:
            text = text.replace(value, MASK)
    return text


def masked(mapping: Mapping[str, Any]) -> dict[str, str]:
    """The keys of ``mapping`` with every value shown as ``***``."""
    return dict.fromkeys(mapping, MASK)


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: ``postgresql://u:***@host/db``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{netloc}"))


def url_password(url: str) -> str | None:
    """The password embedded in ``url``, if any."""
    return urlsplit(url).password
