"""The flags every client-side command shares (`--address`'s TLS companions), declared once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cellstream.client import TLS

# flag dest -> (flag, environment variable, help)
TLS_FLAGS = {
    "tls_ca": ("--tls-ca", "CELLSTREAM_TLS_CA", "trust roots (PEM) for a TLS server (default: the system's)"),
    "tls_cert": ("--tls-cert", "CELLSTREAM_TLS_CLIENT_CERT", "client certificate (PEM) for an mTLS server"),
    "tls_key": ("--tls-key", "CELLSTREAM_TLS_CLIENT_KEY", "the client certificate's key (PEM)"),
}


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tls-ca`, `--tls-cert`, `--tls-key`; giving any of them (or its variable) turns TLS on."""
    for dest, (flag, env, text) in TLS_FLAGS.items():
        parser.add_argument(flag, dest=dest, default=None, help=f"{text} (env {env})")


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
    tls = TLS(ca=paths["tls_ca"], cert=paths["tls_cert"], key=paths["tls_key"])
    tls.credentials()  # read and checked now: a bad file is said before any call is made
    return tls
