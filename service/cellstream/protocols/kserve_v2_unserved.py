"""The methods of inference.GRPCInferenceService that cellstream does not serve: each answers
UNIMPLEMENTED with what to use instead (a method missing from the proto would get grpc's bare
"Method not found!")."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc

from cellstream.config import names_of
from cellstream.protocols.status import Context, RequestMetrics

_NO_SHARED_MEMORY = (
    "shared memory is not served: cellstream takes tensors in the request (raw_input_contents; "
    "tritonclient: InferInput.set_data_from_numpy)"
)
UNSERVED = {
    "RepositoryModelLoad": (
        "cellstream loads every model of its --models directory at start and takes new versions on disk "
        f"by itself ({names_of('model_poll_interval')}): copy the model directory in; RepositoryIndex "
        "lists what is loaded"
    ),
    "RepositoryModelUnload": (
        "cellstream serves every model of its --models directory: move the model directory out and it is "
        f"unloaded once its streams end ({names_of('model_poll_interval')})"
    ),
    **{
        f"{kind}SharedMemory{verb}": _NO_SHARED_MEMORY
        for kind in ("System", "Cuda")
        for verb in ("Status", "Register", "Unregister")
    },
    "TraceSetting": f"cellstream traces with OpenTelemetry: start it with {names_of('otlp_endpoint')}",
    "LogSettings": (
        f"cellstream's logging is set at start: {names_of('log_level')}, and "
        f"{names_of('access_log')} for a line per call"
    ),
}


def unserved(
    request_metrics: RequestMetrics, method: str, message: str
) -> Callable[[bytes, Context], Awaitable[None]]:
    """A handler answering UNIMPLEMENTED (counted in the request metrics like any call)."""

    async def answer(request: bytes, context: Context) -> None:
        request_metrics.observe(method, None, grpc.StatusCode.UNIMPLEMENTED, time.perf_counter())
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served: {message}")

    return answer
