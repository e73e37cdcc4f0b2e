"""The flags every client-side command shares (`--address`'s TLS and token companions), declared
once, and the `Client` they make."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cellstream.client import TLS, Client

# flag dest -> (flag, environment variable, help)
TLS_FLAGS = {
    "tls_ca": ("--tls-ca", "CELLSTREAM_TLS_CA", "trust roots (PEM) for a TLS server (default: the system's)"),
    "tls_cert": ("--tls-cert", "CELLSTREAM_TLS_CLIENT_CERT", "client certificate (PEM) for an mTLS server"),
    "tls_key": ("--tls-key", "CELLSTREAM_TLS_CLIENT_KEY", "the client certificate's key (PEM)"),
    "tls_server_name": (
        "--tls-server-name",
        "CELLSTREAM_TLS_SERVER_NAME",
        "check the server's certificate against this name instead of --address's host (a probe "
        "dialling 127.0.0.1 with a certificate for the service's DNS name)",
    ),
}
# flag dest -> (flag, environment variable, metavar, help)
TOKEN_FLAGS = {
    "token": (
        "--token",
        "CELLSTREAM_TOKEN",
        "TOKEN",
        "the token for a server with --auth-file, sent as 'authorization: Bearer' on every call; "
        "a flag shows in `ps` to every user of the machine: prefer the variable or --token-file",
    ),
    "token_file": (
        "--token-file",
        "CELLSTREAM_TOKEN_FILE",
        "PATH",
        "read the token from the first line of this file (keeps it off command lines and out of "
        "the environment of child processes)",
    ),
}


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tls-ca`, `--tls-cert`, `--tls-key`; giving any of them (or its variable) turns TLS on."""
    for dest, (flag, env, text) in TLS_FLAGS.items():
        parser.add_argument(flag, dest=dest, default=None, help=f"{text} (env {env})")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The TLS flags and `--token` / `--token-file`: what every command that talks to a server takes."""
    add_tls_arguments(parser)
    for dest, (flag, env, metavar, text) in TOKEN_FLAGS.items():
        parser.add_argument(flag, dest=dest, default=None, metavar=metavar, help=f"{text} (env {env})")


def tls_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TLS | None:
    """The client's TLS from the flags (which win) and their variables; None: plaintext.

    Raises ValueError, one line naming the file, for files that are missing or not PEM."""
    from cellstream.client import TLS  # noqa: PLC0415 - keep `--help` fast

    env = os.environ if environ is None else environ
    paths = {
        dest: getattr(args, dest, None) or env.get(var) or None for dest, (_, var, _) in TLS_FLAGS.items()
    }
    if not any(paths.values()):
        return None
    tls = TLS(
        ca=paths["tls_ca"], cert=paths["tls_cert"], key=paths["tls_key"], server_name=paths["tls_server_name"]
    )
    tls.credentials()  # read and checked now: a bad file is said before any call is made
    return tls


def token_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str | None:
    """The token from `--token`, `--token-file` (flags win) or their variables; None: no token.

    Raises ValueError, one line that never shows the token, for both sources at once, a file
    that cannot be read or holds no token, or a token that cannot be sent."""
    from cellstream.client.auth import token_problem  # noqa: PLC0415 - keep `--help` fast

    env = os.environ if environ is None else environ
    # An empty flag is given (and refused as empty); an empty variable is one not set.
    given: dict[str, str | None] = {dest: getattr(args, dest, None) for dest in TOKEN_FLAGS}
    from_flags = any(value is not None for value in given.values())
    if not from_flags:
        given = {dest: env.get(var) or None for dest, (_, var, _, _) in TOKEN_FLAGS.items()}
    names = [flag if from_flags else var for flag, var, _, _ in TOKEN_FLAGS.values()]
    token, path = given["token"], given["token_file"]
    if token is not None and path is not None:
        raise ValueError(f"give {names[0]} or {names[1]}, not both")
    if path is not None:
        token = _first_line(Path(path))
        where = f"{names[1]} '{path}'"
    else:
        where = names[0]
    if token is None:
        return None
    problem = token_problem(token)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    return token


def _first_line(path: Path) -> str:
    """The file's first line, without its line break and surrounding blanks (as editors leave them)."""
    from cellstream.client.auth import MAX_TOKEN  # noqa: PLC0415

    try:
        with path.open("rb") as source:
            raw = source.readline(MAX_TOKEN + 3)  # enough to tell a token too long (and its CRLF)
    except FileNotFoundError:
        raise ValueError(f"token file '{path}': no such file") from None
    except OSError as exc:
        raise ValueError(f"token file '{path}': cannot be read: {exc.strerror}") from None
    try:
        line = raw.decode().strip()
    except UnicodeDecodeError:
        raise ValueError(f"token file '{path}': the first line is not UTF-8 text") from None
    if not line:
        raise ValueError(f"token file '{path}': the first line is empty (the token goes there)")
    return line


def client_from(args: argparse.Namespace) -> Client:
    """The command's client: `--address`, `--timeout`, the TLS and token flags. Raises
    ValueError (one line) for a TLS file or a token that cannot be used."""
    from cellstream.client import Client  # noqa: PLC0415

    return Client(args.address, timeout=args.timeout, tls=tls_from(args), token=token_from(args))


def call_failed(address: str, error: object) -> str:
    """A failed call as one line for a command's stderr: the server, the code, what it said."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    name = code().name if callable(code) else "UNKNOWN"
    return f"{address}: {name}: {details() if callable(details) else error}"
