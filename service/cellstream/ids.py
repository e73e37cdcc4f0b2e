"""The one stream-id rule, shared by the server's validation and the client's early checks.

A stream id is 1 to 256 bytes of UTF-8 with no control character: snapshot files join ids with
newlines, and ids show up in log lines and error messages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_ID_BYTES = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
