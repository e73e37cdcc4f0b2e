"""TLS and token auth for the servers under test, and what the load generator needs to reach them.

`prepare` makes a throwaway CA and server certificate (trustme) and/or an auth file with one
tenant and a fresh token, inside a directory the caller deletes at the end of the run; nothing
is committed, printed or logged. `ClientSide` travels to the load processes inside each Job:
the CA certificate's file to trust and the token to send. The token goes as `metadata=` on each
call, not through an interceptor, because grpc.aio puts every intercepted call behind an extra
task: the client shares the 2 cores with the server, so its cost would show in the figures.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from cellstream.client import CHANNEL_OPTIONS
from cellstream.tenants import token_line

OPTIONS = ("tls", "auth")
TENANT = "bench"
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ClientSide:
    """How a client reaches one server: the CA file to trust (None: plaintext) and the bearer token."""

    ca_file: Path | None = None
    token: str | None = field(default=None, repr=False)  # (a secret: never in a repr or log)

    @property
    def label(self) -> str:
        """`plaintext`, `tls`, `auth` or `tls+auth`: what the figures of this server include."""
        parts = [name for name, on in (("tls", self.ca_file), ("auth", self.token)) if on]
        return "+".join(parts) or "plaintext"

    @property
    def metadata(self) -> Metadata | None:
        """What every call sends (None, the same as sending nothing, without a token)."""
        return None if self.token is None else (("authorization", f"Bearer {self.token}"),)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca_file is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


PLAINTEXT = ClientSide()


@dataclass(frozen=True)
class Secured:
    """The server flags that turn the options on, and the client side that goes with them."""

    flags: list[str]
    client: ClientSide


def _private(path: Path, data: bytes) -> Path:
    """Write a file only its owner can read (keys, the auth file): the temp dir may be shared."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def prepare(options: set[str], directory: Path) -> Secured:
    """Certificates and/or an auth file for one server under `directory` (made here, 0700)."""
    unknown = options - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown server options {sorted(unknown)}: choose from {', '.join(OPTIONS)}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags: list[str] = []
    ca_file: Path | None = None
    token: str | None = None
    if "tls" in options:
        try:
            import trustme  # noqa: PLC0415 - only +tls needs it (pip install trustme)
        except ImportError:
            raise SystemExit("+tls needs trustme for its throwaway CA: pip install trustme") from None
        ca = trustme.CA()
        # The ready file's address is 127.0.0.1:PORT, so the certificate must name that IP.
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        cert = directory / "server.crt"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key = _private(directory / "server.key", leaf.private_key_pem.bytes())
        flags += ["--tls-cert", str(cert), "--tls-key", str(key)]
        ca_file = directory / "ca.crt"
        ca.cert_pem.write_to_path(ca_file)
    if "auth" in options:
        token = secrets.token_urlsafe(32)
        document = {"tenants": {TENANT: {"tokens": [token_line(token)]}}}
        auth_file = _private(directory / "auth.json", json.dumps(document).encode())
        flags += ["--auth-file", str(auth_file)]
    return Secured(flags, ClientSide(ca_file, token))
