"""The naive baseline: the server a team writes first.

A dict of numpy states, one `session.run` per request on the event loop, no batching across
requests; StepBatch runs its streams as one batch but keeps one numpy array per stream.

    python -m bench.baseline --ready-file F --models models --model gru
"""

# mypy: disallow-untyped-calls=False
# (the generated *_pb2_grpc module is untyped)

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.model import CellModel, find_model_file

from .servers import serve_until_signal

Context = grpc.aio.ServicerContext[Any, Any]


class NaiveServicer(pb_grpc.CellStreamServicer):
    def __init__(self, model: CellModel) -> None:
        self.model = model
        self.states: dict[str, list[np.ndarray]] = {}
        self.steps: dict[str, int] = {}

    def _state(self, stream_id: str) -> list[np.ndarray]:
        return self.states.get(stream_id) or [spec.initial for spec in self.model.states]

    def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        x = np.asarray(request.input, np.float32)
        if x.shape != (self.model.input_size,) or not np.isfinite(x).all():
            raise ValueError(f"input must be {self.model.input_size} finite values")
        y, new = self.model.run(x[None], [s[None] for s in self._state(request.stream_id)])
        self.states[request.stream_id] = [s[0] for s in new]
        step = self.steps[request.stream_id] = self.steps.get(request.stream_id, 0) + 1
        state = (
            {}
            if request.omit_state
            else {
                spec.name: pb.Tensor(shape=spec.shape, data=s[0].ravel().tolist())
                for spec, s in zip(self.model.states, new, strict=True)
            }
        )
        return pb.StepResponse(
            stream_id=request.stream_id,
            output=y[0].tolist(),
            state=state,
            step=step,
            request_id=request.request_id,
        )

    async def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        try:
            return self._step(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise

    async def StepStream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse]:
        async for request in request_iterator:
            try:
                yield self._step(request)
            except ValueError as exc:
                yield pb.StepResponse(stream_id=request.stream_id, error=pb.Error(code=3, message=str(exc)))

    async def StepBatch(self, request: pb.StepBatchRequest, context: Context) -> pb.StepBatchResponse:
        ids = list(request.stream_ids)
        n = len(ids)
        x = np.frombuffer(request.inputs, "<f4").reshape(n, self.model.input_size)
        if len(set(ids)) != n:  # repeated streams: one at a time, in order
            parts = [self._batch(ids[i : i + 1], x[i : i + 1], request.omit_state) for i in range(n)]
            outputs = np.concatenate([p[0] for p in parts])
            states = [np.concatenate([p[1][k] for p in parts]) for k in range(len(self.model.states))]
            steps = [s for p in parts for s in p[2]]
        else:
            outputs, states, steps = self._batch(ids, x, request.omit_state)
        return pb.StepBatchResponse(
            outputs=outputs.astype("<f4").tobytes(),
            states={}
            if request.omit_state
            else {
                spec.name: s.astype("<f4").tobytes()
                for spec, s in zip(self.model.states, states, strict=True)
            },
            steps=steps,
        )

    def _batch(
        self, ids: list[str], x: np.ndarray, omit_state: bool
    ) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
        current = [self._state(stream_id) for stream_id in ids]
        stacked = [np.stack([c[k] for c in current]) for k in range(len(self.model.states))]
        y, new = self.model.run(x, stacked)
        steps = []
        for i, stream_id in enumerate(ids):
            self.states[stream_id] = [s[i].copy() for s in new]
            steps.append(self.steps.get(stream_id, 0) + 1)
            self.steps[stream_id] = steps[-1]
        return y, new, steps

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        m = self.model
        states = [pb.StateInfo(name=s.name, shape=s.shape) for s in m.states]
        info = pb.ModelInfo(
            name=m.name,
            version=m.version,
            input_size=m.input_size,
            output_size=m.output_size,
            states=states,
            is_default=True,
            streams=len(self.states),
            max_batch=1 << 30,
        )
        return pb.ListModelsResponse(models=[info])


async def serve(args: argparse.Namespace) -> None:
    path, version = find_model_file(Path(args.models) / args.model)
    model = CellModel(path, name=args.model, version=version)
    await serve_until_signal(
        lambda server: pb_grpc.add_CellStreamServicer_to_server(NaiveServicer(model), server),
        args.address,
        args.ready_file,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--models", default=str(Path(__file__).resolve().parent.parent / "models"))
    parser.add_argument("--model", default="gru")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
