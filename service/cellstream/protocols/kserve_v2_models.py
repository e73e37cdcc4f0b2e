"""What the v2 protocol says of a model: its metadata, its Triton model configuration, its entry
in the repository index. A cellstream model is stateful, so its configuration has a
`sequence_batching` section (how perf_analyzer tells a stateful model) naming each state the
server keeps, as Triton's implicit state does.
"""

from __future__ import annotations

from cellstream._proto.inference import grpc_service_pb2 as pb
from cellstream._proto.inference import model_config_pb2 as config_pb
from cellstream.engine import ModelView
from cellstream.protocols.kserve_v2_request import FP32, Signature, TensorSpec

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
BATCH = -1  # the batch axis in metadata shapes: any number of sequences run together
READY = "READY"


def _metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=FP32, shape=[BATCH, *spec.dims])


def model_metadata(signature: Signature, versions: list[str]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=signature.model,
        versions=versions,
        platform=PLATFORM,
        inputs=[_metadata(spec) for spec in signature.inputs],
        outputs=[_metadata(spec) for spec in signature.outputs],
    )


def model_config(signature: Signature, view: ModelView, stream_ttl: float) -> config_pb.ModelConfig:
    """The Triton configuration of the current version: dims without the batch axis
    (max_batch_size > 0), state inputs optional, each state as a sequence-batching state."""
    fp32 = config_pb.TYPE_FP32
    states = []
    for spec, state in zip(view.model.states, signature.states, strict=True):
        zero = not spec.initial.any()
        initial = (
            [
                config_pb.ModelSequenceBatching.InitialState(
                    data_type=fp32, dims=state.dims, zero_data=True, name="zero"
                )
            ]
            if zero
            else []  # (a start value from the model's config.json: not expressible as Triton's)
        )
        states.append(
            config_pb.ModelSequenceBatching.State(
                input_name=spec.name,
                output_name=spec.output,
                data_type=fp32,
                dims=state.dims,
                initial_state=initial,
            )
        )
    return config_pb.ModelConfig(
        name=signature.model,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=view.max_batch,
        input=[
            config_pb.ModelInput(
                name=spec.name, data_type=fp32, dims=spec.dims, optional=spec is not signature.reading
            )
            for spec in signature.inputs
        ],
        output=[
            config_pb.ModelOutput(name=spec.name, data_type=fp32, dims=spec.dims)
            for spec in signature.outputs
        ],
        sequence_batching=config_pb.ModelSequenceBatching(
            max_sequence_idle_microseconds=int(stream_ttl * 1e6), state=states
        ),
    )


def index_entry(view: ModelView, views: list[ModelView]) -> pb.RepositoryIndexResponse.ModelIndex:
    """A loaded version; an older one serves only the sequences that started on it."""
    reason = ""
    if not view.current:
        current = [v.model.version for v in views if v.current and v.model.name == view.model.name]
        where = f"start on version {current[0]}" if current else "are not taken"
        reason = f"serves its existing sequences only; new sequences {where}"
    return pb.RepositoryIndexResponse.ModelIndex(
        name=view.model.name, version=view.model.version, state=READY, reason=reason
    )
