"""What the front and a backend worker say to each other over their socketpair, and how it is framed.

Each message is a pickled object prefixed by its length (both ends are this project's code):

- front -> worker: a :class:`~mbs_csi.controller.records.WorkerConfig`, then :class:`Request` after
  :class:`Request`, the next one only once the previous one is answered;
- worker -> front: :class:`Ready` or :class:`Fatal` once, then one :class:`Reply` per request, carrying
  the request's ``call_id`` so that an answer can never be taken for another call's.

A send raises on a peer that is gone (``BrokenPipeError``) rather than retrying, and a receive raises
``EOFError`` at the end of the stream: under eventlet too, where the worker's socket is a green one.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from mbs_csi import errors

_LENGTH = struct.Struct("!Q")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Ready:
    """The worker is up; ``backend_errors``: backend name -> why it failed to initialise, or None."""

    backend_errors: dict[str, str | None]


@dataclass(frozen=True)
class Fatal:
    """The worker could not start, and why."""

    message: str


@dataclass(frozen=True)
class Request:
    call_id: int  # unique per worker: its reply carries it back
    request_id: str  # the CSI call's, for the worker's log lines
    operation: str  # a method of operations.BackendOperations
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    call_id: int
    result: Any = None
    error: errors.CSIError | None = None  # raised in the front when set


def send(sock: socket.socket, message: object, deadline: float | None = None) -> None:
    """Send ``message`` whole; ``TimeoutError`` when the peer does not take it before ``deadline``."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.settimeout(_left(deadline))
    sock.sendall(_LENGTH.pack(len(data)) + data)


def receive(sock: socket.socket, deadline: float | None = None) -> Any:
    """The next message; ``TimeoutError`` once ``deadline`` (``time.monotonic()``) passes."""
    (length,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size, deadline))
    return pickle.loads(_exactly(sock, length, deadline))


def _exactly(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    data = bytearray()
    while len(data) < size:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(min(size - len(data), _CHUNK))
        if not chunk:
            raise EOFError("the other end closed the connection")
        data += chunk
    return bytes(data)


def _left(deadline: float | None) -> float | None:
    """Seconds to ``deadline`` for ``settimeout`` (None: no deadline); ``TimeoutError`` once it passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
