"""Protobuf messages to and from numpy: what the clients send and the replies they hand back."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client.errors import InvalidArgument, error_for, status_code

ArrayLike = Sequence[float] | np.ndarray
# What step_stream takes: a request, a (stream_id, reading) pair, or a dict of step_request's
# arguments with the reading under "input" (the proto's field name).
StepItem = pb.StepRequest | tuple[str, ArrayLike] | Mapping[str, Any]
_OPTIONS = ("model", "state", "reset", "end", "seq", "omit_state", "request_id")
S = TypeVar("S")
T = TypeVar("T")


@dataclass(frozen=True)
class StepReply:
    """One reading's result. On StepStream a refused message gets a reply with `error` set to
    (code, message) instead of ending the call; `raise_for_error()` turns it into the exception."""

    stream_id: str
    output: np.ndarray
    state: dict[str, np.ndarray]
    step: int
    replayed: bool = False
    request_id: int = 0
    error: tuple[grpc.StatusCode, str] | None = None

    def raise_for_error(self) -> StepReply:
        """This reply, or its in-band error raised as a CellStreamError."""
        if self.error is not None:
            raise error_for(*self.error)
        return self


@dataclass(frozen=True)
class BatchReply:
    """Row i answers reading i."""

    outputs: np.ndarray
    states: dict[str, np.ndarray]
    steps: np.ndarray


@dataclass(frozen=True)
class StreamState:
    stream_id: str
    model: str
    state: dict[str, np.ndarray]
    step: int


def as_floats(value: object, what: str) -> np.ndarray:
    """`value` as float32, or InvalidArgument saying why it is not numbers."""
    try:
        return np.asarray(value, np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not an array of numbers: {exc}") from None


def tensor(value: ArrayLike) -> pb.Tensor:
    array = as_floats(value, "a state")
    return pb.Tensor(shape=array.shape, data=array.ravel().tolist())


def from_tensors(state: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    return {name: np.asarray(t.data, np.float32).reshape(tuple(t.shape)) for name, t in state.items()}


def step_request(
    stream_id: str,
    reading: ArrayLike,
    *,
    model: str = "",
    state: Mapping[str, ArrayLike] | None = None,
    reset: bool = False,
    end: bool = False,
    seq: int = 0,
    omit_state: bool = False,
    request_id: int = 0,
) -> pb.StepRequest:
    """The StepRequest for one reading (what Step and StepStream send): a scalar or a vector."""
    x = as_floats(reading, "reading")
    if x.ndim > 1:
        raise InvalidArgument(
            f"reading has shape {x.shape}: a step takes one reading, a vector of the model's "
            "input_size values; send several readings with step_batch or step_stream"
        )
    try:
        return pb.StepRequest(
            stream_id=stream_id,
            model=model,
            input=x.ravel().tolist(),
            state={name: tensor(v) for name, v in (state or {}).items()},
            reset=reset,
            end=end,
            seq=seq,
            omit_state=omit_state,
            request_id=request_id,
        )
    except (TypeError, ValueError) as exc:  # protobuf's: a field of the wrong type or range
        raise InvalidArgument(f"the step request cannot be encoded: {exc}") from None


def as_step_request(item: StepItem, position: int) -> pb.StepRequest:
    """One step_stream item as a request; InvalidArgument naming the item when it is not one."""
    if isinstance(item, pb.StepRequest):
        return item
    where = f"step_stream item {position}"
    if isinstance(item, Mapping):
        options = dict(item)
        missing = [key for key in ("stream_id", "input") if key not in options]
        unknown = sorted(set(options) - {"stream_id", "input", *_OPTIONS})
        if missing or unknown:
            raise InvalidArgument(
                f"{where}: a dict needs 'stream_id' and 'input' and may have {', '.join(_OPTIONS)}; "
                f"missing {missing}, unknown {unknown}"
            )
        stream_id, reading = options.pop("stream_id"), options.pop("input")
    elif isinstance(item, tuple | list) and len(item) == 2:
        (stream_id, reading), options = item, {}
    else:
        raise InvalidArgument(
            f"{where} is a {type(item).__name__}: expected a StepRequest, a (stream_id, reading) "
            "pair or a dict with 'stream_id' and 'input'"
        )
    try:
        return step_request(stream_id, reading, **options)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None


def step_reply(reply: pb.StepResponse) -> StepReply:
    error = None
    if reply.HasField("error"):
        error = (status_code(reply.error.code), reply.error.message)
    return StepReply(
        stream_id=reply.stream_id,
        output=np.asarray(reply.output, np.float32),
        state=from_tensors(reply.state),
        step=reply.step,
        replayed=reply.replayed,
        request_id=reply.request_id,
        error=error,
    )


def batch_request(
    stream_ids: Sequence[str], inputs: np.ndarray, *, model: str = "", omit_state: bool = False
) -> pb.StepBatchRequest:
    return pb.StepBatchRequest(
        model=model,
        stream_ids=stream_ids,
        inputs=np.ascontiguousarray(inputs, "<f4").tobytes(),
        omit_state=omit_state,
    )


def batch_reply(reply: pb.StepBatchResponse, n: int) -> BatchReply:
    return BatchReply(
        outputs=np.frombuffer(reply.outputs, "<f4").reshape(n, -1),
        states={name: np.frombuffer(data, "<f4").reshape(n, -1) for name, data in reply.states.items()},
        steps=np.asarray(reply.steps, np.uint64),
    )


def stream_state(reply: pb.StreamState) -> StreamState:
    return StreamState(reply.stream_id, reply.model, from_tensors(reply.state), reply.step)


class Feed(Generic[S, T]):
    """The requests of a client-streaming call, produced on grpc's own thread or task.

    A failure to produce one (a bad item, the caller's iterator raising) would make grpc cancel
    the call with a bare UNKNOWN. Instead the requests end there, the call answers what was
    sent, and `raise_failure()` raises the original exception to the caller after those replies.
    """

    def __init__(self, source: Iterable[S] | AsyncIterable[S], convert: Callable[[S, int], T]) -> None:
        self._source = source
        self._convert = convert
        self.failure: Exception | None = None

    def __iter__(self) -> Iterator[T]:
        assert isinstance(self._source, Iterable)
        try:
            for position, item in enumerate(self._source):
                yield self._convert(item, position)
        except Exception as exc:
            self.failure = exc

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            if isinstance(self._source, AsyncIterable):
                position = 0
                async for item in self._source:
                    yield self._convert(item, position)
                    position += 1
            else:
                for position, item in enumerate(self._source):
                    yield self._convert(item, position)
        except Exception as exc:
            self.failure = exc

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure
