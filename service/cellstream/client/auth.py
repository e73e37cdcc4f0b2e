"""The client's bearer token: checked once when a client is made, then sent as
`authorization: Bearer <token>` metadata on every call of its channel.

The channel adds it, not each call site, so no call goes without it: the resuming client's
retries, `health`, a stub made on the channel later. Not call credentials
(`grpc.metadata_call_credentials`): gRPC sends those over TLS only, and a plaintext channel on
loopback needs the token too. Not grpc's interceptors: against a real server each added 30-50 us
of client CPU to a Step (10-15%; the asyncio ones run every call behind an extra task), while
binding the metadata to each method adds about 1 us, and the metadata itself is in the noise.
So the calls are gRPC's own and behave exactly as without a token.
The token is a secret: no message, `repr` or log line shows it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

AUTHORIZATION = "authorization"
# gRPC refuses more than 8 KiB of metadata by default; a longer token could never get through.
MAX_TOKEN = 4096
# Printable ASCII (what an HTTP/2 header value may hold), not starting or ending with a space:
# proxies trim a header's surrounding whitespace, and the server would hash another token.
_HEADER_VALUE = re.compile(r"[!-~](?:[ -~]*[!-~])?")

Pairs = tuple[tuple[str, str], ...]


def token_problem(token: object) -> str | None:
    """Why `token` cannot be sent as a header value, or None. Says where, never what: a token
    is a secret, and the message may end up in a log."""
    if not isinstance(token, str):
        return f"the token must be a str, not {type(token).__name__}"
    if len(token) > MAX_TOKEN:
        return f"the token is longer than {MAX_TOKEN} characters (gRPC takes 8 KiB of metadata)"
    if _HEADER_VALUE.fullmatch(token):
        return None
    if not token:
        return "the token is empty"
    for position, char in enumerate(token, 1):
        if char in "\r\n":
            return f"the token holds a line break (character {position}): give the token alone, on one line"
        if not char.isascii():
            return (
                f"the token holds a non-ASCII character (character {position}): a header value is "
                "printable ASCII"
            )
        if not " " <= char <= "~":
            return f"the token holds a control character (character {position})"
    return "the token begins or ends with whitespace"


def bearer(token: str) -> Pairs:
    """The metadata that carries `token`; ValueError (naming the problem) if it cannot be sent."""
    problem = token_problem(token)
    if problem is not None:
        raise ValueError(problem)
    return ((AUTHORIZATION, f"Bearer {token}"),)


class _WithToken:
    """A multicallable (blocking or asyncio) whose calls carry the token after their own metadata."""

    __slots__ = ("_method", "_pairs")

    def __init__(self, method: Any, pairs: Pairs) -> None:
        self._method = method
        self._pairs = pairs

    def __repr__(self) -> str:
        return "<a gRPC method sending a token>"

    def _metadata(self, metadata: Any) -> Pairs:
        return self._pairs if metadata is None else (*metadata, *self._pairs)

    def __call__(self, request: Any, *, metadata: Any = None, **options: Any) -> Any:
        return self._method(request, metadata=self._metadata(metadata), **options)

    def with_call(self, request: Any, *, metadata: Any = None, **options: Any) -> Any:
        return self._method.with_call(request, metadata=self._metadata(metadata), **options)

    def future(self, request: Any, *, metadata: Any = None, **options: Any) -> Any:
        return self._method.future(request, metadata=self._metadata(metadata), **options)


class TokenChannel(grpc.Channel):
    """A blocking channel that sends the token on every call of every stub made on it."""

    def __init__(self, channel: grpc.Channel, pairs: Pairs) -> None:
        self._channel = channel
        self._pairs = pairs

    def __repr__(self) -> str:
        return "<a gRPC channel sending a token>"

    def __enter__(self) -> TokenChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._channel.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.unary_unary(method, *args, **options), self._pairs)

    def unary_stream(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.unary_stream(method, *args, **options), self._pairs)

    def stream_unary(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.stream_unary(method, *args, **options), self._pairs)

    def stream_stream(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.stream_stream(method, *args, **options), self._pairs)


class AioTokenChannel(grpc.aio.Channel):
    """An asyncio channel that sends the token on every call of every stub made on it."""

    def __init__(self, channel: grpc.aio.Channel, pairs: Pairs) -> None:
        self._channel = channel
        self._pairs = pairs

    def __repr__(self) -> str:
        return "<a gRPC asyncio channel sending a token>"

    async def __aenter__(self) -> AioTokenChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.unary_unary(method, *args, **options), self._pairs)

    def unary_stream(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.unary_stream(method, *args, **options), self._pairs)

    def stream_unary(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.stream_unary(method, *args, **options), self._pairs)

    def stream_stream(self, method: str, *args: Any, **options: Any) -> Any:
        return _WithToken(self._channel.stream_stream(method, *args, **options), self._pairs)
