"""A gRPC health check HAProxy 2.6 can run: one `grpc.health.v1.Health/Check` call, as raw bytes.

HAProxy's HTTP checks cannot send a gRPC request: a gRPC message starts with NUL bytes and an
`http-check send` body is a C string. So the check is a TCP one that speaks HTTP/2 itself: the
client preface, an empty SETTINGS frame, the call's HEADERS (HPACK literals, no Huffman, so the
bytes are plain to read) and one DATA frame holding an empty HealthCheckRequest (the server's
overall health). It passes when the reply holds the DATA frame of `status: SERVING` on stream 1,
so a draining replica (NOT_SERVING) fails it, as does one that answers but not with gRPC.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _SETTINGS = 0x0, 0x1, 0x4
_END_STREAM, _END_HEADERS = 0x1, 0x4
_STREAM = 1  # the first (and only) client stream of the check's connection
HEALTH_PATH = "/grpc.health.v1.Health/Check"
_EMPTY_MESSAGE = b"\x00" + struct.pack(">I", 0)  # not compressed, length 0: HealthCheckRequest{}
# HealthCheckResponse{status: SERVING}: field 1 varint 1, i.e. 08 01, after its 5-byte prefix.
_SERVING_MESSAGE = b"\x00" + struct.pack(">I", 2) + b"\x08\x01"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _string(text: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= 127:  # one length byte without the Huffman bit: 7-bit prefix, no continuation
        raise ValueError(f"header value {text!r} is too long for the check's one-byte HPACK length")
    return bytes([len(raw)]) + raw


def _headers(authority: str) -> bytes:
    """HPACK: two indexed static entries, then literals without indexing (RFC 7541)."""
    return (
        b"\x83"  # :method POST (static index 3)
        + b"\x86"  # :scheme http (static index 6)
        + b"\x04"
        + _string(HEALTH_PATH)  # :path, name from static index 4
        + b"\x01"
        + _string(authority)  # :authority, static index 1 (gRPC servers refuse a call without it)
        + b"\x0f\x10"
        + _string("application/grpc")  # content-type, static index 31 (15 + 16 in a 4-bit prefix)
        + b"\x00"
        + _string("te")
        + _string("trailers")  # te, a new name
    )


def request_bytes(authority: str = "cellstream") -> bytes:
    """Everything the check sends, in order."""
    return (
        PREFACE
        + _frame(_SETTINGS, 0, 0, b"")
        + _frame(_HEADERS, _END_HEADERS, _STREAM, _headers(authority))
        + _frame(_DATA, _END_STREAM, _STREAM, _EMPTY_MESSAGE)
    )


def serving_frame() -> bytes:
    """The DATA frame a SERVING reply carries on the check's stream."""
    return _frame(_DATA, 0, _STREAM, _SERVING_MESSAGE)


def tcp_check_lines(authority: str = "cellstream") -> list[str]:
    """The backend's check directives. `rbinary` and not `binary`: HAProxy matches `binary` only
    up to the first NUL of the reply, and HTTP/2 frame headers are full of them; `rbinary` runs
    the regex on the reply in hex. The `(..)*?` keeps the match on whole bytes."""
    return [
        "option tcp-check",
        f"tcp-check send-binary {request_bytes(authority).hex()}",
        f"tcp-check expect rbinary ^(..)*?{serving_frame().hex()}",
    ]
