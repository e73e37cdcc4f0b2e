"""The Python client: `Client` (blocking), `AsyncClient` (asyncio), the coalescing `Stepper`,
`ClusterClient` and `AsyncClusterClient` (each stream's work sent to its replica), and
`CellStreamError`, the one exception type they raise (a subclass per gRPC status).
Guide: docs/client.md."""

from cellstream.client.aio import AsyncClient
from cellstream.client.aio_cluster import AsyncClusterClient
from cellstream.client.client import CHANNEL_OPTIONS, MAX_MESSAGE, Client
from cellstream.client.cluster import ClusterClient
from cellstream.client.coalesce import StepError, Stepper, StepperStats
from cellstream.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    CellStreamError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PartialBatch,
    PermissionDenied,
    ResourceExhausted,
    ResumeError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from cellstream.client.messages import (
    ArrayLike,
    BatchReply,
    StepItem,
    StepReply,
    StreamState,
    batch_request,
    step_request,
)
from cellstream.client.tls import TLS

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE",
    "TLS",
    "Aborted",
    "AlreadyExists",
    "ArrayLike",
    "AsyncClient",
    "AsyncClusterClient",
    "BatchReply",
    "Cancelled",
    "CellStreamError",
    "Client",
    "ClusterClient",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PartialBatch",
    "PermissionDenied",
    "ResourceExhausted",
    "ResumeError",
    "StepError",
    "StepItem",
    "StepReply",
    "Stepper",
    "StepperStats",
    "StreamState",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "batch_request",
    "step_request",
]
