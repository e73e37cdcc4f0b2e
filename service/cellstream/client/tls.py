"""`TLS`: what a client needs to reach a TLS (or mTLS) server, as PEM file paths.

The files are read and checked when a client is made, so a wrong path fails at once with the
file's name instead of as an opaque UNAVAILABLE on the first call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY = b"PRIVATE KEY-----"


@dataclass(frozen=True)
class TLS:
    """`ca`: trust roots (None: the system's); `cert` and `key`: a client certificate for mTLS
    (both or neither); `server_name`: the name to check the server's certificate against, when it
    differs from the address's host."""

    ca: Path | str | None = None
    cert: Path | str | None = None
    key: Path | str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a client certificate needs both cert and key: give both, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, from files read and checked now."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem("ca", self.ca, CERTIFICATE, "certificate"),
            private_key=_pem("key", self.key, PRIVATE_KEY, "private key"),
            certificate_chain=_pem("cert", self.cert, CERTIFICATE, "certificate"),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the server-name override, if any."""
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def _pem(field: str, path: Path | str | None, marker: bytes, kind: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"TLS {field} '{path}': no such file") from None
    except OSError as exc:
        raise ValueError(f"TLS {field} '{path}': cannot be read: {exc.strerror}") from None
    if marker not in data:
        raise ValueError(f"TLS {field} '{path}': holds no PEM {kind}")
    return data
