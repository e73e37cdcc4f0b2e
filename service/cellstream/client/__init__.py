"""The Python client: `Client` (blocking), `AsyncClient` (asyncio) and the coalescing `Stepper`."""

from cellstream.client.client import (
    CHANNEL_OPTIONS,
    MAX_MESSAGE,
    ArrayLike,
    AsyncClient,
    BatchReply,
    Client,
    ResumeError,
    StepReply,
    StreamState,
    batch_request,
    step_request,
)
from cellstream.client.coalesce import StepError, Stepper, StepperStats

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE",
    "ArrayLike",
    "AsyncClient",
    "BatchReply",
    "Client",
    "ResumeError",
    "StepError",
    "StepReply",
    "Stepper",
    "StepperStats",
    "StreamState",
    "batch_request",
    "step_request",
]
