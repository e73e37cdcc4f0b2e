"""The access log: one line per RPC, and one per StepStream call at its end with its counts."""

from __future__ import annotations

import logging
from typing import Any

import grpc

log = logging.getLogger("cellstream.access")


class AccessLog:
    """Writes access lines (logger `cellstream.access`, at INFO) when --access-log is on."""

    def record(
        self,
        method: str,
        model: str | None,
        code: grpc.StatusCode,
        seconds: float,
        peer: str,
        **more: Any,
    ) -> None:
        fields: dict[str, Any] = {
            "method": method,
            "model": model,
            "code": code.name,
            "duration_ms": round(seconds * 1000, 3),
            "peer": peer,
        }
        fields.update((key, value) for key, value in more.items() if value not in (None, 0, ""))
        log.info("%s %s %.3f ms", method, code.name, seconds * 1000, extra={"fields": fields})
