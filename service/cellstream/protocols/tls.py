"""TLS for the gRPC port (optionally mTLS) and the metrics endpoint, with certificates that can be
replaced on disk while the server runs.

grpc asks for the certificate configuration before every TLS handshake, on one of its own
threads while holding the GIL, so that question costs a few stat calls; the files are read and
checked again only when one of them changed. A new set that is broken (half-written, a key that
is not the certificate's) keeps the one in use and is logged once, not at every handshake.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc

from cellstream.config import SettingError, Settings, names_of
from cellstream.config_rules import check_certificates, check_key_pair, check_private_key

log = logging.getLogger(__name__)
T = TypeVar("T")
# What tells one version of a file from the next without reading it (None: the file is missing).
FileState = tuple[tuple[int, int, int, int] | None, ...]


def _file_state(paths: Sequence[Path]) -> FileState:
    states: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            states.append(None)
            continue
        states.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(states)


class Rotating(Generic[T]):
    """A value built from some files (a TLS configuration), built again when one of them changes.

    `refresh` may be called from any thread; while nothing changed it costs a stat per file.
    """

    def __init__(self, what: str, paths: Sequence[Path], build: Callable[[], T]) -> None:
        self._what, self._paths, self._build = what, tuple(paths), build
        self._lock = threading.Lock()  # one rebuild at a time; handshakes meanwhile keep the old value
        self._taken = _file_state(self._paths)
        self._refused: FileState | None = None
        self.value = build()  # ValueError at start: the caller turns it into a setting error

    def refresh(self) -> T | None:
        """The new value when the files changed and build, else None: keep using `value`."""
        state = _file_state(self._paths)
        if state in (self._taken, self._refused) or not self._lock.acquire(blocking=False):
            return None
        try:
            return self._rebuild(state)
        finally:
            self._lock.release()

    def current(self) -> T:
        self.refresh()
        return self.value

    def _rebuild(self, state: FileState) -> T | None:
        try:
            value = self._build()
        except ValueError as exc:
            if _file_state(self._paths) == state:  # (else still being written: look again next time)
                self._refused = state
                log.warning(
                    "%s: the new files are not used (%s); new connections keep the old ones", self._what, exc
                )
            return None
        if _file_state(self._paths) != state:
            return None  # changed while being read: take the finished files at the next connection
        self._taken, self._refused, self.value = state, None, value
        log.info("%s: new connections use the new files: %s", self._what, describe(self._paths))
        return value


def describe(paths: Sequence[Path]) -> str:
    """The files and the certificate's SHA-256 fingerprint, for the log line that says which one is on."""
    try:
        text = paths[0].read_text(errors="replace")
        start = text.index(ssl.PEM_HEADER)  # the first certificate of a chain is the server's
        end = text.index(ssl.PEM_FOOTER, start) + len(ssl.PEM_FOOTER)
        der = ssl.PEM_cert_to_DER_cert(text[start:end])
        fingerprint = "certificate sha256 " + hashlib.sha256(der).hexdigest()[:16]
    except (OSError, ValueError):
        fingerprint = "certificate fingerprint unknown"
    return f"{', '.join(map(str, paths))} ({fingerprint})"


@dataclass(frozen=True)
class PemFiles:
    """A certificate (chain), its key and, for mTLS, the CA certificates clients must be signed by."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _checked(path: Path, check: Callable[[Path], None]) -> None:
    try:
        check(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_pem_files(cert: Path, key: Path, client_ca: Path | None = None) -> PemFiles:
    """The files, checked as the settings check them at start; ValueError says which file and why."""
    _checked(cert, check_certificates)
    _checked(key, check_private_key)
    _checked(key, lambda k: check_key_pair(cert, k))
    if client_ca is not None:
        _checked(client_ca, check_certificates)
    try:
        return PemFiles(
            cert.read_bytes(), key.read_bytes(), None if client_ca is None else client_ca.read_bytes()
        )
    except OSError as exc:
        raise ValueError(f"{exc.filename}: cannot be read ({exc.strerror or exc})") from None


def _grpc_configuration(files: PemFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(files.key, files.cert)], files.client_ca)


class GrpcTls:
    """The gRPC port's server credentials; with a client CA, clients must show a certificate it signed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.mtls = client_ca is not None
        paths = (cert, key) if client_ca is None else (cert, key, client_ca)
        self._files = Rotating("gRPC TLS", paths, lambda: read_pem_files(cert, key, client_ca))

    @property
    def mode(self) -> str:
        return "mTLS" if self.mtls else "TLS"

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(self._files.value),
            self._fetch,  # type: ignore[arg-type]  # (grpc-stubs lack the None that means "no change")
            require_client_authentication=self.mtls,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's question before each handshake (on a grpc thread): None keeps the current files."""
        files = self._files.refresh()
        return None if files is None else _grpc_configuration(files)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """An https server context (TLS 1.2 or newer) for the metrics endpoint."""
    read_pem_files(cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{key}: {exc}") from None
    return context


def grpc_tls(settings: Settings) -> GrpcTls | None:
    """The gRPC port's TLS, None for plaintext; SettingError when the files broke since the check."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        return GrpcTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ValueError as exc:
        raise SettingError(f"{exc}: fix {names_of('tls_cert')} and {names_of('tls_key')}") from None


def metrics_tls(settings: Settings) -> Rotating[ssl.SSLContext] | None:
    """The metrics endpoint's https context, None for plain http."""
    if settings.metrics_tls_cert is None or settings.metrics_tls_key is None:
        return None
    cert, key = settings.metrics_tls_cert, settings.metrics_tls_key
    try:
        return Rotating("metrics TLS", (cert, key), lambda: server_context(cert, key))
    except ValueError as exc:
        raise SettingError(
            f"{exc}: fix {names_of('metrics_tls_cert')} and {names_of('metrics_tls_key')}"
        ) from None
