"""Domain errors. Each type maps to exactly one gRPC status code in the protocol layer."""

from __future__ import annotations

from cellstream.ids import local_id

SHOWN_CHARS = 64  # of a client's string quoted in an error message


def quoted(value: str, limit: int = SHOWN_CHARS) -> str:
    """A user's string for a message: repr'd (one line: newlines are escaped), and cut when long
    (a message echoing a 50 MB model name would not fit the reply's metadata)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value.encode(errors='replace'))} bytes)"


class CellStreamError(Exception):
    """Base of every error a request can get; the message is meant for the user."""


class BadInput(CellStreamError):
    """The request itself is malformed (INVALID_ARGUMENT)."""


class UnknownModel(CellStreamError):
    """The named model is not served (NOT_FOUND)."""


class UnknownStream(CellStreamError):
    """The stream does not exist (NOT_FOUND)."""


class WrongModel(CellStreamError):
    """The stream is bound to another model (FAILED_PRECONDITION)."""


class StaleSequence(CellStreamError):
    """`seq` is neither the next step nor a retry of the last one (FAILED_PRECONDITION)."""

    def __init__(self, stream_id: str, seq: int, step: int, *, reset: bool = False) -> None:
        # With reset the stream starts over: its next reading is seq 1.
        following = "seq 1, as reset starts the stream over" if reset else f"seq {step + 1}"
        super().__init__(
            f"stream {quoted(local_id(stream_id))} is at step {step}: seq {seq} is neither the next reading "
            f"({following}) nor a retry of the last one (seq {step})"
        )
        self.step = step


class NotOwner(CellStreamError):
    """The stream's shard is served by another replica (FAILED_PRECONDITION); says which one."""

    def __init__(self, message: str, *, owner: str, address: str, epoch: int) -> None:
        super().__init__(message)
        self.owner, self.address, self.epoch = owner, address, epoch


class ClusterMapRefused(CellStreamError):
    """A cluster map this replica cannot adopt: not newer, or no cluster (FAILED_PRECONDITION)."""


class ShardMoving(CellStreamError):
    """The stream's shard is being handed to another replica; retry with seq (UNAVAILABLE)."""

    def __init__(self, message: str, *, shard: int) -> None:
        super().__init__(message)
        self.shard = shard


class Unauthenticated(CellStreamError):
    """No token, or one this server does not know (UNAUTHENTICATED)."""


class PermissionDenied(CellStreamError):
    """The caller's tenant may not use this model or operation (PERMISSION_DENIED)."""


class StepLimit(CellStreamError):
    """The stream is at the highest step a u64 holds; reset it or set its step (FAILED_PRECONDITION)."""


class TooManyStreams(CellStreamError):
    """No room for a new stream (RESOURCE_EXHAUSTED)."""


class TooLarge(CellStreamError):
    """A request, or the reply it would get, is over a size limit; nothing was applied
    (RESOURCE_EXHAUSTED)."""


class QuotaExceeded(CellStreamError):
    """The caller's tenant is at a limit of the auth file; nothing was applied (RESOURCE_EXHAUSTED)."""


class Overloaded(CellStreamError):
    """The model's queue is full; retry later (RESOURCE_EXHAUSTED)."""


class Draining(CellStreamError):
    """The server is shutting down and takes no new work (UNAVAILABLE)."""


class DeadlineExpired(CellStreamError):
    """The caller's deadline passed before the work ran; nothing was applied (DEADLINE_EXCEEDED)."""


class ModelFailure(CellStreamError):
    """onnxruntime failed on a validated batch; no state was changed (INTERNAL)."""


class ModelLoadError(Exception):
    """A model cannot be served; the message says what to change in the model or its config."""
