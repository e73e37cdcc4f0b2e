"""Who is calling: the bearer token in a call's metadata, looked up among the auth file's tenants.

Tokens are never compared with one another: the SHA-256 digest of the token a call presents is
looked up in a dict of the file's digests. The time that takes depends on the digest alone, never
on how much of a secret token matched (what a constant-time compare guards against), and it does
not grow with the number of tokens. The file itself holds only digests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cellstream import metrics
from cellstream.engine import Engine
from cellstream.errors import Unauthenticated
from cellstream.tenants import ANONYMOUS, Tenant, Tenants, parse_auth_file, token_digest

log = logging.getLogger(__name__)
SCHEME = "bearer "
FileState = tuple[int, int, int, int] | None


def _state(path: Path) -> FileState:
    try:
        st = path.stat()  # (follows symlinks: a Kubernetes Secret is replaced by a symlink swap)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_auth_file(path: Path, previous: Tenants | None = None) -> Tenants:
    """The tenants of an auth file; ValueError (naming the file) when it is missing or wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return parse_auth_file(data, previous)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; None when there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else ""
            if text[: len(SCHEME)].lower() == SCHEME:
                return text[len(SCHEME) :].strip() or None
            return None
    return None


class Authenticator:
    """Maps a call to its tenant; without an auth file every call is the anonymous tenant's."""

    def __init__(self, path: Path | None, engine: Engine) -> None:
        self.path = path
        self._engine = engine
        self.generation = 0  # bumped by each reload: long calls check their token again
        self.tenants: Tenants | None = None
        self._taken: FileState = None
        self._refused: FileState = None
        if path is not None:
            self._taken = _state(path)
            self._use(read_auth_file(path))  # (ValueError at start: the settings check said it first)

    @property
    def enabled(self) -> bool:
        return self.tenants is not None

    def _use(self, tenants: Tenants) -> None:
        self.tenants = tenants
        self.generation += 1
        self._engine.use_tenants(tenants)

    def digest_of(self, metadata: Iterable[Any] | None) -> bytes:
        """The digest of a call's token (UNAUTHENTICATED without one); b"" without an auth file."""
        if self.tenants is None:
            return b""
        token = bearer_token(metadata)
        if token is None:
            metrics.AUTH_REJECTIONS.labels(reason="missing_token").inc()
            raise Unauthenticated(
                "this server requires a token: send 'authorization: Bearer <token>' metadata "
                "(cellstream's client: token=...; its commands: --token-file or CELLSTREAM_TOKEN)"
            )
        return token_digest(token)

    def tenant_for(self, digest: bytes) -> Tenant:
        """The tenant of a token's digest, as the auth file says now (UNAUTHENTICATED if none)."""
        tenants = self.tenants
        if tenants is None:
            return ANONYMOUS
        tenant = tenants.by_digest.get(digest)
        if tenant is None:
            metrics.AUTH_REJECTIONS.labels(reason="unknown_token").inc()
            raise Unauthenticated(
                "the token is not known to this server (revoked, or a typo): ask its operator for one"
            )
        return tenant

    def tenant_of(self, context: Any) -> Tenant:
        """The tenant of a call (a grpc servicer context)."""
        if self.tenants is None:
            return ANONYMOUS
        return self.tenant_for(self.digest_of(context.invocation_metadata()))

    def reload(self) -> bool:
        """Read the auth file again if it changed (blocking: run it off the event loop). A file
        that does not parse keeps the tenants in use, logged once per version of the file."""
        if self.path is None:
            return False
        state = _state(self.path)
        if state in (self._taken, self._refused):
            return False
        try:
            tenants = read_auth_file(self.path, self.tenants)
        except ValueError as exc:
            if _state(self.path) == state:  # (else it is still being written: look again next time)
                self._refused = state
                metrics.AUTH_RELOADS.labels(result="invalid").inc()
                log.error("auth file not reloaded, the tenants in use are kept: %s", exc)
            return False
        self._taken, self._refused = state, None
        self._use(tenants)
        metrics.AUTH_RELOADS.labels(result="ok").inc()
        log.info(
            "auth file %s reloaded: %d tenants, %d tokens",
            self.path,
            len(tenants.by_name),
            len(tenants.by_digest),
        )
        return True
