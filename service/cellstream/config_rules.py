"""The rules Settings fields obey: how a setting's text becomes a value, and which values it allows.

Kept apart from config.py so that the Settings table there reads as a table. The PEM checks are
also what TLS rotation runs on a new certificate before it takes it (protocols/tls.py).
"""

from __future__ import annotations

import importlib.util
import math
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

C_INT_MAX = 2**31 - 1  # gRPC channel arguments are C ints ...
C_INT_SECONDS = C_INT_MAX // 1000  # ... and its timeouts are milliseconds
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SWITCH_WORDS = {
    **dict.fromkeys(("true", "1", "yes", "on"), True),
    **dict.fromkeys(("false", "0", "no", "off"), False),
}


def _any_value(value: object) -> None:
    pass


@dataclass(frozen=True)
class Rule:
    """A setting's text to its value (`parse`) and the values it allows (`check`, run on defaults
    too); both raise ValueError whose text says what is allowed."""

    metavar: str
    parse: Callable[[str], object]
    check: Callable[[Any], None] = _any_value
    switch: bool = False  # a boolean: `--name` alone is true, `--no-name` false


def integer(least: int, most: int | None = None) -> Rule:
    allowed = f"must be an integer >= {least}" if most is None else f"must be an integer {least}-{most}"

    def parse(raw: str) -> int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(allowed) from None

    def check(value: object) -> None:
        if type(value) is not int or value < least or (most is not None and value > most):
            raise ValueError(allowed)

    return Rule("N", parse, check)


def seconds(*, most: int | None = None, positive: bool = False) -> Rule:
    """A duration; `positive` for the ones where 0 has no meaning (a handshake timeout)."""
    allowed = "must be a number of seconds " + ("> 0" if positive else ">= 0")
    allowed += "" if most is None else f" and <= {most}"

    def parse(raw: str) -> float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(allowed) from None

    def check(value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(allowed)
        if value < 0 or (positive and value == 0) or (most is not None and value > most):
            raise ValueError(allowed)

    return Rule("SECONDS", parse, check)


def _listed(options: tuple[str, ...]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def choice(*options: str, needs: Callable[[str], None] = _any_value) -> Rule:
    """One of a few words; `needs` checks what the chosen one requires (e.g. its package)."""

    def check(value: object) -> None:
        if value not in options:
            raise ValueError(f"choose {_listed(options)}")
        needs(str(value))

    return Rule("{" + ",".join(options) + "}", str, check)


def _uvloop_installed(loop: str) -> None:
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("uvloop is not installed (pip install 'cellstream[uvloop]'); or choose asyncio")


def _check_otlp_endpoint(value: object) -> None:
    _check_text(value)
    if value and importlib.util.find_spec("opentelemetry.exporter.otlp") is None:
        raise ValueError("tracing needs the [otel] extra: pip install 'cellstream[otel]'")


def _check_log_level(value: object) -> None:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError(f"choose {_listed(LOG_LEVELS)}, in any case")


def _switch(raw: str) -> bool:
    try:
        return SWITCH_WORDS[raw.strip().lower()]
    except KeyError:
        raise ValueError("must be true/false, yes/no, on/off or 1/0") from None


def _check_switch(value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")


def _check_text(value: object) -> None:
    if not isinstance(value, str):
        raise ValueError("must be text")


def host_port(*, optional: bool) -> Rule:
    """HOST:PORT with an IPv6 host in brackets; `optional`: '' turns that listener off."""
    allowed = "must be HOST:PORT with a port 0-65535" + (", or '' for off" if optional else "")

    def check(value: object) -> None:
        if optional and value == "":
            return
        if not isinstance(value, str):
            raise ValueError(allowed)
        host, _, port = value.rpartition(":")
        if not host or any(c.isspace() for c in host):
            raise ValueError(allowed)
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(allowed + "; an IPv6 host goes in brackets, [::1]:50051")
        if not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise ValueError(allowed)

    return Rule("HOST:PORT", str, check)


def _path(raw: str) -> Path:
    if not raw:
        raise ValueError("must name a directory")
    return Path(raw)


def _path_or_none(raw: str) -> Path | None:
    return Path(raw) if raw else None


def _check_readable_dir(value: object) -> None:
    if not isinstance(value, Path):
        raise ValueError("must be a directory")
    if not value.exists():
        raise ValueError("no such directory")
    if not value.is_dir():
        raise ValueError("is not a directory")
    if not os.access(value, os.R_OK | os.X_OK):
        raise ValueError("cannot be read by this user")


def _check_writable_dir(value: object) -> None:
    """The directory, or the nearest existing one above it that it would be created in, is writable."""
    if value is None:
        return
    if not isinstance(value, Path):
        raise ValueError("must be a directory")
    found = next(p for p in (value, *value.parents) if p.exists() or p == p.parent)
    if not found.is_dir():
        raise ValueError("is not a directory" if found == value else f"cannot be created: {found} is a file")
    if not os.access(found, os.W_OK | os.X_OK):
        raise ValueError(
            "cannot be written by this user" if found == value else f"cannot be created in {found}"
        )


def _check_file_to_write(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, Path):
        raise ValueError("must be a file name")
    if value.is_dir():
        raise ValueError("is a directory")
    if not value.parent.is_dir():
        raise ValueError(f"its directory {value.parent} does not exist")
    if not os.access(value.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot be written in {value.parent} by this user")


# --- PEM files (TLS) ---------------------------------------------------------------------------


def _pem_text(path: Path) -> str:
    """The file's text; ValueError (not OSError) when it cannot be read, so every caller reports
    it like any other bad file."""
    if not path.exists():
        raise ValueError("no such file")
    if not path.is_file():
        raise ValueError("is not a file")
    try:
        return path.read_bytes().decode("latin-1")  # PEM is ASCII; a binary file still decodes
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None


def check_certificates(path: Path) -> None:
    """A PEM file of one or more certificates OpenSSL can parse (a chain, or a CA bundle)."""
    text = _pem_text(path)
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError("holds no PEM certificate (no -----BEGIN CERTIFICATE----- line)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):
        raise ValueError("holds a PEM certificate OpenSSL cannot parse") from None


def check_private_key(path: Path) -> None:
    """A PEM private key without a passphrase: gRPC has no way to ask for one."""
    text = _pem_text(path)
    if "ENCRYPTED PRIVATE KEY-----" in text or "Proc-Type: 4,ENCRYPTED" in text:
        raise ValueError("is encrypted: give the key without a passphrase (openssl pkey -in KEY -out PLAIN)")
    if "PRIVATE KEY-----" not in text:
        raise ValueError("holds no PEM private key (no -----BEGIN ... PRIVATE KEY----- line)")


def _no_passphrase() -> bytes:
    raise ValueError("is encrypted: give the key without a passphrase")


def check_key_pair(cert: Path, key: Path) -> None:
    """The key is the certificate's own; the error text is about the key."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"is not the key of the certificate in {cert}") from None
        raise ValueError(f"cannot be read as a private key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None


def pem_file(content: Callable[[Path], None]) -> Rule:
    """A PEM file whose content passes `content`; '' (the default) for none."""

    def check(value: object) -> None:
        if value is None:
            return
        if not isinstance(value, Path):
            raise ValueError("must be a file name")
        content(value)

    return Rule("PEM", _path_or_none, check)


def _check_auth_file(value: object) -> None:
    """An auth file the server can use: its tenants are read now, so a typo fails the start."""
    if value is None:
        return
    if not isinstance(value, Path):
        raise ValueError("must be a file name")
    from cellstream.tenants import parse_auth_file  # noqa: PLC0415 - keep `--help` fast

    try:
        data = value.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    parse_auth_file(data)


def _check_cluster_map(value: object) -> None:
    """A cluster map the server can use, read now so that a bad one fails the start."""
    if value is None:
        return
    if not isinstance(value, Path):
        raise ValueError("must be a file name")
    from cellstream.cluster.cluster_map import ClusterMap  # noqa: PLC0415 - keep `--help` fast

    try:
        ClusterMap.from_json(value.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None


COUNT = integer(1)  # sizes and counts where 0 would mean nothing works
LIMIT = integer(0)  # 0 means no limit (for --inline-batch: never inline)
C_INT_COUNT = integer(1, C_INT_MAX)
INTERVAL = seconds()  # the README gives 0 a meaning: off, never, no wait
GRPC_TIMEOUT = seconds(most=C_INT_SECONDS)
HANDSHAKE_TIMEOUT = seconds(most=C_INT_SECONDS, positive=True)
SWITCH = Rule("BOOL", _switch, _check_switch, switch=True)
TEXT = Rule("TEXT", str, _check_text)
READABLE_DIR = Rule("DIR", _path, _check_readable_dir)
WRITABLE_DIR = Rule("DIR", _path_or_none, _check_writable_dir)
FILE_TO_WRITE = Rule("FILE", _path_or_none, _check_file_to_write)
EVICT = choice("none", "lru")
EVENT_LOOP = choice("asyncio", "uvloop", needs=_uvloop_installed)
LOG_LEVEL = Rule("LEVEL", str.upper, _check_log_level)
LOG_FORMAT = choice("text", "json")
OTLP_ENDPOINT = Rule("HOST:PORT", str, _check_otlp_endpoint)
CERTIFICATES = pem_file(check_certificates)
PRIVATE_KEY = pem_file(check_private_key)
AUTH_FILE = Rule("FILE", _path_or_none, _check_auth_file)
CLUSTER_MAP = Rule("FILE", _path_or_none, _check_cluster_map)
