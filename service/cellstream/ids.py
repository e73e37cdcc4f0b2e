"""The one stream-id rule, shared by the server's validation and the client's early checks.

A stream id is 1 to 256 bytes of UTF-8 with no control character: snapshot files join ids with
newlines, and ids show up in log lines and error messages.

Inside the server a stream is known by its key: the id itself for the anonymous tenant (a server
without --auth-file, and every snapshot written before tenants), `tenant + SEP + id` for a named
one. SEP is a control character, so no id can contain it and a key splits one way only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_ID_BYTES = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SEP = "\x1f"  # (ASCII unit separator) between a key's tenant and its id
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def local_id(key: str) -> str:
    """The id of a stream key, as its tenant knows it."""
    return key.rpartition(SEP)[2]


def tenant_of(key: str) -> str:
    """The tenant of a stream key ("" = anonymous)."""
    return key.rpartition(SEP)[0]


def id_problem(stream_id: str, where: str = "stream_id") -> str | None:
    """What is wrong with one id, as a message naming `where`; None when it is valid."""
    if not stream_id:
        return f"{where} is empty: every reading needs a stream id"
    # A character is at most 4 bytes: only long ids need encoding to be measured.
    if len(stream_id) * 4 > MAX_ID_BYTES and len(stream_id.encode()) > MAX_ID_BYTES:
        return f"{where} is {len(stream_id.encode())} bytes long; the limit is {MAX_ID_BYTES}"
    if _CONTROL.search(stream_id):
        return f"{where} {stream_id!r} holds a control character"
    return None


def first_id_problem(
    stream_ids: Sequence[str], positions: Sequence[int] | None = None
) -> tuple[int, str] | None:
    """(index, message) of the first bad id, or None. The whole-list checks run in C (join, max,
    one regex); the loop only runs to name the bad index. `positions`: the ids' request indexes."""
    if not stream_ids:
        return None
    if (
        min(map(len, stream_ids))
        and max(map(len, stream_ids)) * 4 <= MAX_ID_BYTES
        and not _CONTROL.search("".join(stream_ids))
    ):
        return None
    for i, stream_id in enumerate(stream_ids):
        index = i if positions is None else positions[i]
        problem = id_problem(stream_id, f"stream_ids[{index}]")
        if problem is not None:
            return index, problem
    return None


def key_problem(key: str, where: str = "stream") -> str | None:
    """What is wrong with a stream key read from a file (a tenant's name, its separator, a valid id)."""
    tenant, sep, stream_id = key.rpartition(SEP)
    if sep and not TENANT_NAME.fullmatch(tenant):
        return f"{where} {key!r} names no valid tenant"
    return id_problem(stream_id, where)


def first_key_problem(keys: Sequence[str]) -> tuple[int, str] | None:
    """(index, message) of the first bad key, or None; keys of no tenant take the fast path."""
    if SEP not in "".join(keys):  # (in C)
        return first_id_problem(keys)
    for i, key in enumerate(keys):
        problem = key_problem(key, f"stream {i}")
        if problem is not None:
            return i, problem
    return None
