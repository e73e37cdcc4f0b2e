"""Every Prometheus metric of cellstream, defined once. Labels are low-cardinality: never stream ids."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU, RSS, open fds against their limit), python_info and python_gc_*: what an
# operator reads first when a server misbehaves.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)
NO_MODEL = "none"  # the model label of RPCs that name no model (ListModels, DeleteStream, ...)

# A cell step is ~10 µs of compute and ~200 µs of gRPC: the interesting range starts well below 1 ms.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

REQUEST_DURATION = Histogram(
    "cellstream_request_duration_seconds",
    "Time from a request (or a StepStream message) arriving to its reply being ready.",
    ["method", "model", "code"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_DURATION = Histogram(
    "cellstream_queue_duration_seconds",
    "Time a reading waited in its model's queue before its batch started.",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_DURATION = Histogram(
    "cellstream_compute_duration_seconds",
    "One batched model run: gather, onnxruntime session.run, scatter.",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "cellstream_batch_size",
    "Readings (distinct streams) per model run.",
    ["model"],
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
STEPS = Counter("cellstream_steps", "Readings applied.", ["model"], registry=REGISTRY)
STREAMS = Gauge(
    "cellstream_streams",
    "Streams held in memory, per model version.",
    ["model", "version"],
    registry=REGISTRY,
)
MODEL_LOAD_FAILURES = Counter(
    "cellstream_model_load_failures",
    "Model versions refused at load, at start or on reload (an older version serves, if any).",
    ["model"],
    registry=REGISTRY,
)
MODELS_LOADED = Gauge(
    "cellstream_model_versions_loaded", "Model versions in memory.", ["model"], registry=REGISTRY
)
QUEUE_DEPTH = Gauge("cellstream_queue_depth", "Readings waiting to run.", ["model"], registry=REGISTRY)
MAX_QUEUE = Gauge("cellstream_max_queue", "The --max-queue setting (0 = unlimited).", registry=REGISTRY)
MAX_STREAMS = Gauge("cellstream_max_streams", "The --max-streams setting (0 = unlimited).", registry=REGISTRY)
REJECTIONS = Counter(
    "cellstream_rejections",
    "Requests refused before running, by reason.",
    ["model", "reason"],
    registry=REGISTRY,
)
STREAMS_DROPPED = Counter(
    "cellstream_streams_dropped",
    "Streams dropped by the server rather than by a client, by reason.",
    ["reason"],
    registry=REGISTRY,
)
RESTORED_OVER_LIMIT = Counter(
    "cellstream_restored_over_limit_streams",
    "Streams restored at start beyond --max-streams (kept; the limit then applies to new streams).",
    registry=REGISTRY,
)
SNAPSHOT_DURATION = Histogram(
    "cellstream_snapshot_duration_seconds",
    "Taking one snapshot: copying the streams and writing the file.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
SNAPSHOT_LAST_SUCCESS = Gauge(
    "cellstream_snapshot_last_success_timestamp_seconds",
    "Unix time of the last snapshot written (0 = none yet); alert on its age.",
    registry=REGISTRY,
)
SNAPSHOT_BYTES = Gauge("cellstream_snapshot_bytes", "Size of the last snapshot file.", registry=REGISTRY)
SNAPSHOT_STREAMS = Gauge(
    "cellstream_snapshot_streams", "Streams in the last snapshot file.", registry=REGISTRY
)
SNAPSHOT_FAILURES = Counter(
    "cellstream_snapshot_failures", "Snapshots that could not be written.", registry=REGISTRY
)

# Known reasons start at zero, so dashboards show 0 rather than "no data" before the first drop.
for _reason in ("lru", "ttl", "model_changed", "model_missing", "invalid"):
    STREAMS_DROPPED.labels(reason=_reason)

AUTH_REJECTIONS = Counter(
    "cellstream_auth_rejections",
    "Calls refused for who made them (no tenant label: tenants are not bounded), by reason.",
    ["reason"],
    registry=REGISTRY,
)
QUOTA_REJECTIONS = Counter(
    "cellstream_quota_rejections",
    "Work refused because its tenant was at a limit of the auth file, by limit.",
    ["limit"],
    registry=REGISTRY,
)
AUTH_RELOADS = Counter(
    "cellstream_auth_reloads",
    "Times a changed --auth-file was read: taken, or invalid (the previous tenants kept).",
    ["result"],
    registry=REGISTRY,
)
for _reason in ("missing_token", "unknown_token", "model_denied", "admin_only"):
    AUTH_REJECTIONS.labels(reason=_reason)
for _limit in ("max_streams", "max_steps_per_second", "max_stream_calls"):
    QUOTA_REJECTIONS.labels(limit=_limit)
for _result in ("ok", "invalid"):
    AUTH_RELOADS.labels(result=_result)

CLUSTER_MAP_EPOCH = Gauge(
    "cellstream_cluster_map_epoch",
    "Epoch of the cluster map this replica serves by (0 = no map, a cluster of one).",
    registry=REGISTRY,
)
SHARDS_OWNED = Gauge(
    "cellstream_shards_owned", "Shards the cluster map gives this replica.", registry=REGISTRY
)
SHARDS_MOVING = Gauge(
    "cellstream_shards_moving",
    "Shards this replica is handing to another (taking no work).",
    registry=REGISTRY,
)
MISROUTED = Counter(
    "cellstream_misrouted",
    "Requests for streams this replica does not serve now, by why (not_owner, moving).",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("not_owner", "moving"):
    MISROUTED.labels(reason=_reason)
