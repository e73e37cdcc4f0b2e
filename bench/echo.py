"""The transport ceiling: a no-op CellStream server with replies of the model's sizes.

Same generated code, same RPCs, same message sizes as cellstream, but no model and no state:
whatever cellstream spends above this is its own. Replies are copies of prebuilt templates.

    python -m bench.echo --ready-file F --input-size 8 --output-size 1 --state h=64
"""

# mypy: disallow-untyped-calls=False
# (the generated *_pb2_grpc module is untyped)

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc

from .servers import serve_until_signal

Context = grpc.aio.ServicerContext[Any, Any]


def parse_states(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """`h=64` or `h=2x32` -> {"h": (64,)} / {"h": (2, 32)}."""
    states = {}
    for spec in specs:
        name, _, shape = spec.partition("=")
        states[name] = tuple(int(d) for d in shape.split("x"))
    return states


class EchoServicer(pb_grpc.CellStreamServicer):
    """Answers every RPC with a reply of the right size and does nothing else."""

    def __init__(
        self, model: str, input_size: int, output_size: int, states: dict[str, tuple[int, ...]]
    ) -> None:
        self.model = model
        self.input_size = input_size
        self.output_size = output_size
        self.states = states
        tensors = {
            name: pb.Tensor(shape=shape, data=[0.0] * math.prod(shape)) for name, shape in states.items()
        }
        self._full = pb.StepResponse(output=[0.0] * output_size, state=tensors, step=1)
        self._bare = pb.StepResponse(output=[0.0] * output_size, step=1)
        self._state = pb.StreamState(model=model, state=tensors, step=1)
        self._batches: dict[tuple[int, bool], pb.StepBatchResponse] = {}

    def _reply(self, request: pb.StepRequest) -> pb.StepResponse:
        reply = pb.StepResponse()
        reply.CopyFrom(self._bare if request.omit_state else self._full)
        reply.stream_id = request.stream_id
        reply.request_id = request.request_id
        return reply

    async def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        return self._reply(request)

    async def StepStream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse]:
        async for request in request_iterator:
            yield self._reply(request)

    async def StepBatch(self, request: pb.StepBatchRequest, context: Context) -> pb.StepBatchResponse:
        n = len(request.stream_ids)
        key = (n, request.omit_state)
        reply = self._batches.get(key)
        if reply is None:
            states = (
                {}
                if request.omit_state
                else {name: bytes(4 * n * math.prod(shape)) for name, shape in self.states.items()}
            )
            reply = pb.StepBatchResponse(
                outputs=bytes(4 * n * self.output_size), states=states, steps=[1] * n
            )
            if len(self._batches) > 64:
                self._batches.clear()
            self._batches[key] = reply
        return reply

    async def GetState(self, request: pb.GetStateRequest, context: Context) -> pb.StreamState:
        reply = pb.StreamState()
        reply.CopyFrom(self._state)
        reply.stream_id = request.stream_id
        return reply

    async def SetState(self, request: pb.SetStateRequest, context: Context) -> pb.StreamState:
        return await self.GetState(pb.GetStateRequest(stream_id=request.stream_id), context)

    async def DeleteStream(
        self, request: pb.DeleteStreamRequest, context: Context
    ) -> pb.DeleteStreamResponse:
        return pb.DeleteStreamResponse(existed=True)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        info = pb.ModelInfo(
            name=self.model,
            version="1",
            input_size=self.input_size,
            output_size=self.output_size,
            states=[pb.StateInfo(name=name, shape=shape) for name, shape in self.states.items()],
            is_default=True,
            max_batch=1 << 30,
        )
        return pb.ListModelsResponse(models=[info])


async def serve(args: argparse.Namespace) -> None:
    servicer = EchoServicer(args.model, args.input_size, args.output_size, parse_states(args.state))
    await serve_until_signal(
        lambda server: pb_grpc.add_CellStreamServicer_to_server(servicer, server),
        args.address,
        args.ready_file,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--model", default="gru")
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--output-size", type=int, default=1)
    parser.add_argument("--state", action="append", default=[], help="NAME=SHAPE, e.g. h=64 or h=2x32")
    args = parser.parse_args()
    if not args.state:
        args.state = ["h=64"]
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
