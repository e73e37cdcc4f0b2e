"""The one exception type of the client: `CellStreamError`, with a subclass per gRPC status.

Every failed Client, AsyncClient or Stepper call raises one, whether the server refused the
request, the transport failed, or the client refused it before sending. It is a
`grpc.RpcError` (and a `grpc.aio.AioRpcError`), so handlers written for plain gRPC keep
catching it, with `code()`, `details()` and `trailing_metadata()` as they know them.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
import grpc.aio
import numpy as np

from cellstream.protocols.cellstream_v1_wire import STEP_METADATA

if TYPE_CHECKING:
    from cellstream.client.messages import BatchReply


@dataclass(frozen=True)
class PartialBatch:
    """What a StepBatch split across replicas applied although a part failed: `applied[i]` says
    whether reading i was applied, and `reply` holds its row then (zeros otherwise)."""

    applied: np.ndarray
    reply: BatchReply


class CellStreamError(grpc.aio.AioRpcError):
    """A failed call: `code()` (a `grpc.StatusCode`, one subclass per code), `message` (what the
    server or the client said, also `str(error)` and `details()`), and `step`: the stream's
    current step where the server said it (a stale `seq`), else None. `partial` is None but for
    a `ClusterClient` StepBatch split across replicas of which some parts were applied (a
    `PartialBatch`): any other refused StepBatch applied nothing."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        trailing_metadata: grpc.aio.Metadata | None = None,
        debug_error_string: str | None = None,
    ) -> None:
        super().__init__(
            self.status,
            grpc.aio.Metadata(),
            trailing_metadata if trailing_metadata is not None else grpc.aio.Metadata(),
            message,
            debug_error_string,
        )
        self.message = message
        self.step = step
        self.partial: PartialBatch | None = None

    def details(self) -> str:
        return self.message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        step = "" if self.step is None else f", step={self.step}"
        return f"{type(self).__name__}({self.message!r}{step})"

    def __reduce__(self) -> tuple[Any, ...]:
        # AioRpcError pickles its own constructor's arguments; these are ours.
        return (_rebuild, (type(self), self.message, self.step))


def _rebuild(cls: type[CellStreamError], message: str, step: int | None) -> CellStreamError:
    return cls(message, step=step)


class Cancelled(CellStreamError):
    status = grpc.StatusCode.CANCELLED


class Unknown(CellStreamError):
    status = grpc.StatusCode.UNKNOWN


class InvalidArgument(CellStreamError):
    """The request is malformed: a bad id, size, shape, value; nothing was applied."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(CellStreamError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(CellStreamError):
    """An unknown model or stream."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CellStreamError):
    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(CellStreamError):
    """The token is known, but its tenant may not do this: a model it may not use, an
    admin-only operation, another tenant's streams in an import."""

    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(CellStreamError):
    """A server limit (streams, queue, message size); nothing was applied, retry later or smaller."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(CellStreamError):
    """The stream is bound to another model, or `seq` is stale (then `step` says where it is)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CellStreamError):
    status = grpc.StatusCode.ABORTED


class OutOfRange(CellStreamError):
    status = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(CellStreamError):
    status = grpc.StatusCode.UNIMPLEMENTED


class Internal(CellStreamError):
    status = grpc.StatusCode.INTERNAL


class Unavailable(CellStreamError):
    """The server cannot be reached or is shutting down."""

    status = grpc.StatusCode.UNAVAILABLE


class DataLoss(CellStreamError):
    status = grpc.StatusCode.DATA_LOSS


class Unauthenticated(CellStreamError):
    """The server wants a token (`token=`, `--token`) and got none, or one it does not know
    (revoked, or mistyped)."""

    status = grpc.StatusCode.UNAUTHENTICATED


class ResumeError(FailedPrecondition):
    """A resuming client cannot replay what the server lost: the readings are no longer kept."""


ERRORS: dict[grpc.StatusCode, type[CellStreamError]] = {
    cls.status: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a status number (as StepStream's in-band `Error.code` holds it)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_for(code: grpc.StatusCode | int, message: str, *, step: int | None = None) -> CellStreamError:
    """The subclass instance for a status code (a `grpc.StatusCode` or its number)."""
    if isinstance(code, int):
        code = status_code(code)
    return ERRORS.get(code, Unknown)(message, step=step)


def from_rpc(error: grpc.RpcError) -> CellStreamError:
    """A CellStreamError with what a grpc error says: code, details, the step it may carry."""
    if isinstance(error, CellStreamError):
        return error
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else None) or ""
    trailing = trailers_of(error)
    debug = getattr(error, "debug_error_string", None)
    return ERRORS.get(code, Unknown)(
        message or f"the call failed with {code.name} and no message",
        step=_step_of(trailing),
        trailing_metadata=trailing,
        debug_error_string=debug() if callable(debug) else None,
    )


def trailers_of(error: grpc.RpcError) -> grpc.aio.Metadata:
    """A call's trailing metadata, whether grpc's blocking or asyncio error holds it."""
    read = getattr(error, "trailing_metadata", None)
    pairs: Iterable[tuple[str, Any]] = (read() if callable(read) else None) or ()
    return grpc.aio.Metadata(*((key, value) for key, value in pairs))


def _step_of(metadata: grpc.aio.Metadata) -> int | None:
    value = metadata.get(STEP_METADATA)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


class _Translated:
    """A context that raises a grpc error of its block as a CellStreamError, so that grpc's own
    types (`grpc._channel._InactiveRpcError`, …) stay inside the client, not even chained.
    A class, not @contextmanager: it wraps every call, and this costs no generator per call."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, grpc.RpcError) and not isinstance(error, CellStreamError):
            raise from_rpc(error) from None


_TRANSLATED = _Translated()


def translated() -> AbstractContextManager[None]:
    return _TRANSLATED
