"""gRPC calls that are expected to fail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def rpc_error(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The RpcError ``call`` raises (fails the test when it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} succeeded")
