"""`cellstream auth new-token | hash`: a fresh token, and the `sha256:` line of a token, which is
what a server's `--auth-file` holds instead of the token itself.

The line is `sha256:` and the hex SHA-256 of the token's UTF-8 bytes: the server hashes the token
a call brings and looks the digest up, so it never needs (or keeps) a token.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import secrets
import sys
from typing import Any

EXIT_USAGE = 2
TOKEN_BYTES = 32  # 256 random bits: a digest in the auth file cannot be reversed by guessing


def digest(token: str) -> str:
    """The auth file's line for `token`."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def register(commands: Any) -> None:
    """Add `auth` to the top-level sub-commands (argparse's sub-parsers object)."""
    auth = commands.add_parser("auth", help="make tokens for a server with --auth-file")
    auth_commands = auth.add_subparsers(dest="auth_command", required=True)
    new = auth_commands.add_parser(
        "new-token",
        help="print a fresh random token and its sha256: line",
        description="Print a fresh random token (give it to the client: CELLSTREAM_TOKEN or "
        "--token-file) and its sha256: line (put it in a tenant's \"tokens\" in the server's "
        "--auth-file; the server never needs the token itself).",
    )
    new.set_defaults(func=_new_token)
    hashing = auth_commands.add_parser(
        "hash",
        help="print the sha256: line of a token read on stdin",
        description="Read a token (the first line of stdin; asked for without echo on a terminal) "
        "and print its sha256: line for the auth file, e.g. to move an existing token to another "
        "tenant or server: cellstream auth hash < token-file",
    )
    hashing.set_defaults(func=_hash)


def _new_token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(TOKEN_BYTES)
    print(f"token:  {token}")
    print(f"sha256: {digest(token)}")
    print(
        "the token goes to the client (CELLSTREAM_TOKEN or --token-file); the sha256: line goes in "
        "a tenant's \"tokens\" in the server's --auth-file",
        file=sys.stderr,
    )
    return 0


def _hash(args: argparse.Namespace) -> int:
    from cellstream.client.auth import token_problem  # noqa: PLC0415 - it imports grpc

    # On a terminal, not echoed: a token typed in stays off the screen and the scrollback.
    line = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    token = line.strip()
    if not token:
        print(
            "cellstream auth hash: no token on stdin: give it on the first line, "
            "e.g. cellstream auth hash < token-file",
            file=sys.stderr,
        )
        return EXIT_USAGE
    problem = token_problem(token)
    if problem is not None:  # a token no client can send: its line would never match
        print(f"cellstream auth hash: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(digest(token))
    return 0
