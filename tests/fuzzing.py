"""Property-based fuzzing of every cellstream.v1.CellStream RPC against a real server (issue 13, §4).

hypothesis draws each message just before it is sent, so a message may depend on where the
reference streams are. After every message the invariants are checked:

* the server answers: health is SERVING, and every call ends before its deadline;
* every status code (and each in-band StepStream code) is one the message may get, and never
  UNKNOWN or INTERNAL; what a message may get is judged from the message and from the state of the
  streams it names, read just before it is sent;
* the reference streams of every tenant, stepped only through known readings, are byte for byte what
  they were, unless the message held valid readings of theirs: then state, step and reply equal the
  ONNX sequence operators over all their readings (tests/reference.py);
* a refused message changed nothing: the streams it names have the same state and step, or are
  still absent (so a refused import leaves no stream behind); a read-only one changes nothing at all;
* the server's RSS stays under a fixed bound over its RSS at the start.

`python tests/fuzzing.py --messages 100000` (`make fuzz`) starts its own server and prints counts by
status code and by message kind; tests/test_fuzz.py runs a short fixed-seed budget.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
import psutil
from google.protobuf import text_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from reference import reference_sequence
from support import MODELS, RunningServer, start_server

Code = grpc.StatusCode
OK, IA, NF, FP = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION
PD, RE, UA = Code.PERMISSION_DENIED, Code.RESOURCE_EXHAUSTED, Code.UNAUTHENTICATED
Codes = frozenset[grpc.StatusCode]
CODE_OF: Final = {code.value[0]: code for code in grpc.StatusCode}

SERVICE = "/cellstream.v1.CellStream/"
# (client streaming, server streaming) of each RPC.
METHODS: Final = {
    "Step": (False, False),
    "StepStream": (True, True),
    "StepBatch": (False, False),
    "GetState": (False, False),
    "SetState": (False, False),
    "DeleteStream": (False, False),
    "ListModels": (False, False),
    "ExportStates": (False, True),
    "ImportStates": (True, False),
}
REQUEST_TYPES: Final[dict[str, type[Message]]] = {
    "Step": pb.StepRequest,
    "StepStream": pb.StepRequest,
    "StepBatch": pb.StepBatchRequest,
    "GetState": pb.GetStateRequest,
    "SetState": pb.SetStateRequest,
    "DeleteStream": pb.DeleteStreamRequest,
    "ListModels": pb.ListModelsRequest,
    "ExportStates": pb.ExportStatesRequest,
    "ImportStates": pb.SnapshotChunk,
}

# The fuzzed server's limits: small, so that "beyond the limit" costs little to send.
MAX_MESSAGE = 4 << 20
MAX_BATCH_REQUEST = 20_000
MAX_IMPORT = 1 << 20
SERVER_FLAGS = (
    "--max-message-bytes",
    str(MAX_MESSAGE),
    "--max-batch-request",
    str(MAX_BATCH_REQUEST),
    "--max-import-bytes",
    str(MAX_IMPORT),
)
CALL_TIMEOUT = 30.0  # seconds: a call still running then means the server stopped answering
RSS_BOUND = 512 << 20  # bytes of RSS the server may grow by over the run
MAX_STEP = 2**64 - 2  # the highest step a stream may be set to (docs: the next reading must fit)
U64 = 2**64 - 1
MAX_REF_READINGS = 24  # a reference restarts (reset) after this many readings: the reference is O(T)
TOLERANCE = 1e-5  # server vs the ONNX sequence operators, as tests/test_fidelity.py (float32 sums differ)


@dataclass(frozen=True)
class Contract:
    """A bundled model as a client sees it (checked against ListModels at the start)."""

    input_size: int
    output_size: int
    states: dict[str, tuple[int, ...]]


CONTRACTS: Final = {
    "demo": Contract(1, 2, {"h": (32,), "mem": (3,)}),
    "gru": Contract(8, 1, {"h": (64,)}),
    "gru2": Contract(8, 1, {"h": (2, 32)}),
    "lstm": Contract(8, 1, {"cell": (32,), "hidden": (32,)}),
}
DEFAULT_MODEL = "gru"
UNKNOWN_MODELS = ("nope", "GRU", "gru ", "gru\x00", "../gru", "gru/1", "é" * 40, "m" * 300)


@dataclass(frozen=True)
class Policy:
    """A tenant of the auth file, as the oracle knows it."""

    models: frozenset[str] | None = None
    admin: bool = False
    max_streams: int = 0

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def usable(self) -> list[str]:
        return sorted(m for m in CONTRACTS if self.may_use(m))


TENANTS: Final = {
    "acme": Policy(frozenset({"gru", "lstm"}), max_streams=48),
    "globex": Policy(),
    "ops": Policy(admin=True),
}
# Reference streams: the same ids in every tenant, on different models (isolation shows as a mismatch).
REFERENCES: Final = (
    ("acme", "ref-a", "gru"),
    ("acme", "ref-b", "lstm"),
    ("globex", "ref-a", "lstm"),
    ("globex", "ref-b", "gru2"),
    ("ops", "ref-a", "gru"),
)
# Streams a base import file holds: (tenant, id, model, readings).
IMPORTED: Final = (
    ("acme", "imp-g", "gru", 2),
    ("acme", "imp-l", "lstm", 1),
    ("globex", "imp-g", "gru", 1),
    ("globex", "imp-2", "gru2", 3),
    ("globex", "imp-d", "demo", 1),
    ("ops", "imp-o", "gru", 1),
)
RESERVED = {"ref-a", "ref-b"} | {stream_id for _, stream_id, _, _ in IMPORTED}
# Ids fuzzed messages use: valid ones (a small pool, so the stream count stays bounded; at and near
# the 256-byte limit) and invalid ones (empty, too long, control characters, a forged tenant key).
POOL = (
    *(f"s{i}" for i in range(8)),
    *("ref-a ", "REF-A", "ü-1", "流-2", "a\u2028b", "🙂"),
    *("x" * 256, "é" * 128, "😀" * 64, "€" * 85 + "a"),
)
BAD_IDS = (
    *("", "x" * 257, "é" * 128 + "a", "😀" * 64 + "a"),
    *("\x00", "a\nb", "a\x1fb", "acme\x1fref-a", "globex\x1fs0", "\x7f", "x\x85", "ref-a\x00", "\t"),
)
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
F32_MAX = float(np.finfo(np.float32).max)
EXTREMES = (0.0, -0.0, 1.0, 1e38, -1e38, F32_MAX, -F32_MAX, 1.4e-45, -1.4e-45, 1.1754944e-38, 1e-40, 65504.0)
NON_FINITE = (math.nan, math.inf, -math.inf)
BAD_UTF8 = (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80", b"\xe2\x82", b"s0\xfe")


def valid_id(stream_id: str) -> bool:
    """The documented stream-id rule: 1 to 256 bytes of UTF-8, no control character."""
    return 0 < len(stream_id.encode()) <= 256 and not CONTROL.search(stream_id)


# --- wire bytes, by hand (so that they can be wrong on purpose) -------------------------------------


SMALL: Final = [bytes((i,)) for i in range(0x80)]


def varint(value: int) -> bytes:
    """A base-128 varint; a negative value is its 64-bit two's complement (as int64 fields are)."""
    if 0 <= value < 0x80:
        return SMALL[value]
    if value < 0:
        value &= U64
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def text(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def integer(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value) if value else b""


def floats(number: int, values: np.ndarray) -> bytes:
    return delimited(number, np.asarray(values, "<f4").tobytes()) if len(values) else b""


def tensor(shape: Sequence[int], data: np.ndarray) -> bytes:
    return delimited(1, b"".join(varint(d) for d in shape)) * bool(len(shape)) + floats(2, data)


StateArg = Mapping[str | bytes, tuple[Sequence[int], np.ndarray]]


def states(number: int, given: StateArg) -> bytes:
    entries = (delimited(1, text(name)) + delimited(2, tensor(*value)) for name, value in given.items())
    return b"".join(delimited(number, entry) for entry in entries)


def step_request(
    stream_id: str | bytes,
    model: str | bytes = "",
    x: np.ndarray | None = None,
    *,
    state: StateArg | None = None,
    reset: bool = False,
    end: bool = False,
    seq: int = 0,
    omit_state: bool = False,
    request_id: int = 0,
) -> bytes:
    return b"".join(
        (
            delimited(1, text(stream_id)),
            delimited(2, text(model)) if model else b"",
            floats(3, np.zeros(0) if x is None else x),
            states(4, state or {}),
            integer(5, reset),
            integer(6, end),
            integer(7, seq),
            integer(8, omit_state),
            integer(9, request_id),
        )
    )


def batch_request(model: str | bytes, ids: Sequence[str | bytes], inputs: bytes, omit_state: bool) -> bytes:
    head = delimited(1, text(model)) if model else b""
    return head + repeated_text(2, tuple(ids)) + delimited(3, inputs) + integer(4, omit_state)


@functools.lru_cache(maxsize=32)
def repeated_text(number: int, values: tuple[str | bytes, ...]) -> bytes:
    """A repeated string field (the long id and name lists recur: encoded once)."""
    return b"".join(delimited(number, text(v)) for v in values)


def get_request(stream_id: str | bytes) -> bytes:
    return delimited(1, text(stream_id))


def set_request(stream_id: str | bytes, model: str | bytes, state: StateArg, step: int) -> bytes:
    model_field = delimited(2, text(model)) if model else b""
    return delimited(1, text(stream_id)) + model_field + states(3, state) + integer(4, step)


def export_request(models: Sequence[str | bytes]) -> bytes:
    return repeated_text(1, tuple(models))


def chunk(data: bytes) -> bytes:
    return delimited(1, data)


def parse(method: str, payload: bytes) -> Any | None:
    """The request as protobuf reads it (the server uses the same library); None if it does not."""
    try:
        return REQUEST_TYPES[method].FromString(payload)
    except Exception:
        return None


# --- what a message may get -------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A stream as GetState shows it to its tenant."""

    model: str
    step: int
    raw: bytes


class Unread:
    """A stream the harness did not read before the message: any state is possible."""


UNREAD: Final = Unread()
Target = tuple[str, str]  # (tenant, stream id)
Before = Mapping[Target, Known | Unread | None]
AfterCheck = Callable[[Mapping[Target, Known | None], bytes], str | None]


class Verdict:
    """The codes a message may get: `refuse` when a defect makes success impossible."""

    def __init__(self) -> None:
        self.codes: set[grpc.StatusCode] = set()
        self.definite = False

    def refuse(self, *codes: grpc.StatusCode) -> None:
        self.codes.update(codes)
        self.definite = True

    def maybe(self, *codes: grpc.StatusCode) -> None:
        self.codes.update(codes)

    def model(self, name: str, policy: Policy) -> Contract | None:
        if name not in CONTRACTS:
            self.refuse(NF)
            return None
        if not policy.may_use(name):
            self.refuse(PD)
            return None
        return CONTRACTS[name]

    def expect(self, after: AfterCheck | None = None, *, read_only: bool = False) -> Expect:
        return Expect(frozenset(self.codes | (set() if self.definite else {OK})), after, read_only)


@dataclass(frozen=True)
class Expect:
    codes: Codes
    after: AfterCheck | None = None  # on OK: a problem with the reply or the streams' new state
    read_only: bool = False  # nothing may change, even on OK


@dataclass(frozen=True)
class RefReading:
    """A reading of a reference stream: applied when its part is answered OK."""

    ref: Reference
    x: np.ndarray
    reset: bool
    row: int = 0  # the reply's output row (StepBatch)


@dataclass(frozen=True)
class Part:
    """One request message (a Step, one of a StepStream call, a unary call) and its judge."""

    payload: bytes
    targets: tuple[Target, ...]
    judge: Callable[[Before], Expect]
    readings: tuple[RefReading, ...] = ()
    names: tuple[Target, ...] = ()  # streams it may change besides its targets (not read: too many)


@dataclass(frozen=True)
class Auth:
    tenant: str | None  # None: a refused credential
    metadata: tuple[tuple[str, str], ...]
    form: str


@dataclass(frozen=True)
class Call:
    """One message: an RPC with its parts (several for StepStream; chunks for ImportStates)."""

    kind: str
    method: str
    auth: Auth
    parts: tuple[Part, ...]
    chunks: tuple[bytes, ...] = ()  # ImportStates: the request messages; `parts[0]` judges the call
    cleanup: tuple[Target, ...] = ()  # streams deleted after an accepted import (not part of the fuzz)

    @property
    def payloads(self) -> tuple[bytes, ...]:
        return self.chunks or tuple(p.payload for p in self.parts)

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(dict.fromkeys(t for p in self.parts for t in p.targets))

    @property
    def names(self) -> set[Target]:
        return {t for p in self.parts for t in (*p.targets, *p.names)}


def fits(payload: bytes) -> bool:
    return len(payload) <= MAX_MESSAGE


def state_ok(given: Mapping[str, Any], contract: Contract) -> bool:
    """The documented state rule: known names, the exact (or flat) shape, finite values."""
    for name, value in given.items():
        spec = contract.states.get(name)
        if spec is None:
            return False
        shape = tuple(value.shape) or (len(value.data),)
        if shape not in (spec, (math.prod(spec),)) or len(value.data) != math.prod(shape):
            return False
        if not np.isfinite(np.asarray(value.data, np.float32)).all():
            return False
    return True


def finite_reply(reply: Any) -> bool:
    values = [reply.output, *(t.data for t in reply.state.values())]
    return all(np.isfinite(np.asarray(v, np.float32)).all() for v in values)


def step_part(tenant: str, payload: bytes, readings: tuple[RefReading, ...] = ()) -> Part:
    """A Step (or one StepStream request): who may get what, given the stream's state before."""
    if not fits(payload):
        return Part(payload, (), lambda before: Expect(frozenset({RE})), readings)
    req = parse("Step", payload)
    if req is None:
        return Part(payload, (), lambda before: Expect(frozenset({IA})), readings)
    policy = TENANTS[tenant]
    target = (tenant, req.stream_id)
    x = np.asarray(req.input, np.float32) if len(req.input) <= 64 else None

    def judge(before: Before) -> Expect:
        v = Verdict()
        if not valid_id(req.stream_id):
            v.refuse(IA)
            v.maybe(NF, PD)  # (the model is checked first)
            return v.expect()
        b = before.get(target, UNREAD)
        if isinstance(b, Unread):
            names = [req.model] if req.model else policy.usable
            v.maybe(IA, FP, *(RE,) * bool(policy.max_streams))
        else:
            names = [req.model or (b.model if b else DEFAULT_MODEL)]
        contracts = [c for c in (v.model(n, policy) for n in names) if c is not None]
        if not contracts:
            return v.expect()
        sizes = {c.input_size for c in contracts}
        if len(req.input) not in sizes or (x is not None and not np.isfinite(x).all()):
            v.refuse(IA)
        if req.state and not any(state_ok(req.state, c) for c in contracts):
            v.refuse(IA)
        if isinstance(b, Unread):
            return v.expect(check_step_reply)
        name = names[0]
        if b is not None and b.model != name:
            v.refuse(FP)  # a stream stays on its model (reset or not)
            return v.expect()
        step = b.step if b else 0
        retry = b is not None and req.seq == step
        if req.seq and req.seq != (1 if req.reset else step + 1):
            if retry:
                v.maybe(FP)  # answered again from the kept reply; stale if none is kept
            else:
                v.refuse(FP)
        if b is not None and b.step == U64 and not retry and not req.reset:
            v.refuse(FP, IA, Code.OUT_OF_RANGE)  # no next step fits in a u64
        if b is None and policy.max_streams:
            v.maybe(RE)
        return v.expect(lambda after, reply: check_step(req, target, b, after, reply))

    return Part(payload, (target,) if valid_id(req.stream_id) else (), judge, readings)


def check_step_reply(after: Mapping[Target, Known | None], reply: bytes) -> str | None:
    response = pb.StepResponse.FromString(reply)
    if response.HasField("error"):
        return None
    return None if finite_reply(response) else "an OK reply holds non-finite values"


def check_step(
    req: Any, target: Target, b: Known | None, after: Mapping[Target, Known | None], reply: bytes
) -> str | None:
    response = pb.StepResponse.FromString(reply)
    name = req.model or (b.model if b else DEFAULT_MODEL)
    a = after.get(target)
    if response.stream_id != req.stream_id or response.request_id != req.request_id:
        return f"the reply names stream {response.stream_id!r} / request {response.request_id}"
    if len(response.output) != CONTRACTS[name].output_size:
        return f"the reply has {len(response.output)} outputs"
    if not finite_reply(response):
        return f"a valid reading left non-finite values in the reply (step {response.step})"
    if response.replayed:
        if b is None or req.seq != b.step or a != b:
            return "a replayed reply, but the stream changed or was not at that step"
        return None
    expected = (0 if req.reset or b is None else b.step) + 1
    if req.end:
        return None if a is None else "a reading with end=true left the stream behind"
    if a is None or a.step != expected or a.model != name or response.step != expected:
        seen = None if a is None else (a.model, a.step)
        return f"the stream is {seen} after it (reply step {response.step}); expected {name!r}, {expected}"
    if not req.omit_state and set(response.state) != set(CONTRACTS[name].states):
        return f"the reply's states are {sorted(response.state)}"
    return None


def batch_part(tenant: str, payload: bytes, readings: tuple[RefReading, ...] = ()) -> Part:
    if not fits(payload):
        return Part(payload, (), lambda before: Expect(frozenset({RE})), readings)
    req = parse("StepBatch", payload)
    if req is None:
        return Part(payload, (), lambda before: Expect(frozenset({IA})), readings)
    policy = TENANTS[tenant]
    ids = list(req.stream_ids)
    distinct = list(dict.fromkeys(i for i in ids if valid_id(i)))
    targets = tuple((tenant, i) for i in [*distinct[:3], *distinct[-1:]])
    counts = Counter(ids)

    def judge(before: Before) -> Expect:
        v = Verdict()
        contract = v.model(req.model or DEFAULT_MODEL, policy)
        if contract is None:
            return v.expect()
        name = req.model or DEFAULT_MODEL
        n = len(ids)
        if n == 0 or n > MAX_BATCH_REQUEST or len(req.inputs) != n * contract.input_size * 4:
            v.refuse(IA)
            return v.expect()
        if not np.isfinite(np.frombuffer(req.inputs, "<f4")).all() or not all(map(valid_id, counts)):
            v.refuse(IA)
        reply = n * (4 * contract.output_size + 10)
        if not req.omit_state:
            reply += n * 4 * sum(math.prod(s) for s in contract.states.values())
        if reply > 1.2 * MAX_MESSAGE:
            v.refuse(RE)
        elif reply > 0.8 * MAX_MESSAGE:
            v.maybe(RE)
        known = {t: before.get(t, UNREAD) for t in targets}
        if len(distinct) > len(targets) or any(isinstance(b, Unread) for b in known.values()):
            v.maybe(IA, *(RE,) * bool(policy.max_streams))  # unread streams: on another model, or new
        if any(isinstance(b, Known) and b.model != name for b in known.values()):
            v.refuse(IA)  # (a StepBatch item on another model is an invalid item)
        if policy.max_streams and any(b is None for b in known.values()):
            v.maybe(RE)
        if any(isinstance(b, Known) and b.step + counts[t[1]] > U64 for t, b in known.items()):
            v.refuse(FP, IA, Code.OUT_OF_RANGE)  # no next step fits in a u64

        def check(after: Mapping[Target, Known | None], raw: bytes) -> str | None:
            response = pb.StepBatchResponse.FromString(raw)
            outputs = np.frombuffer(response.outputs, "<f4")
            if len(outputs) != n * contract.output_size or len(response.steps) != n:
                return (
                    f"the reply has {len(outputs)} outputs and {len(response.steps)} steps for {n} readings"
                )
            if not np.isfinite(outputs).all():
                return "a valid StepBatch left non-finite outputs"
            for t, b in known.items():
                if isinstance(b, Unread):
                    continue
                a = after.get(t)
                expected = (b.step if b else 0) + counts[t[1]]
                if a is None or a.step != expected or a.model != name:
                    seen = None if a is None else (a.model, a.step)
                    return f"stream {t[1]!r} is {seen} after the batch; expected ({name!r}, {expected})"
            return None

        return v.expect(check)

    return Part(payload, targets, judge, readings, tuple((tenant, i) for i in distinct))


def get_part(tenant: str, payload: bytes) -> Part:
    req = parse("GetState", payload)
    if not fits(payload) or req is None:
        code = IA if fits(payload) else RE
        return Part(payload, (), lambda before: Expect(frozenset({code}), read_only=True))
    target = (tenant, req.stream_id)
    if not valid_id(req.stream_id):
        return Part(payload, (), lambda before: Expect(frozenset({IA}), read_only=True))

    def judge(before: Before) -> Expect:
        b = before.get(target, UNREAD)
        codes = {OK, NF} if isinstance(b, Unread) else {OK} if b else {NF}

        def check(after: Mapping[Target, Known | None], reply: bytes) -> str | None:
            if isinstance(b, Known) and not same_state(reply, b.raw):
                return "GetState answered other bytes than the GetState just before it"
            return None

        return Expect(frozenset(codes), check, read_only=True)

    return Part(payload, (target,), judge)


def set_part(tenant: str, payload: bytes) -> Part:
    req = parse("SetState", payload)
    if not fits(payload) or req is None:
        code = IA if fits(payload) else RE
        return Part(payload, (), lambda before: Expect(frozenset({code})))
    policy = TENANTS[tenant]
    target = (tenant, req.stream_id)

    def judge(before: Before) -> Expect:
        v = Verdict()
        if not valid_id(req.stream_id) or req.step > MAX_STEP:
            v.refuse(IA)
            v.maybe(NF, PD, FP)
            return v.expect()
        b = before.get(target, UNREAD)
        assert not isinstance(b, Unread)
        name = req.model or (b.model if b else DEFAULT_MODEL)
        contract = v.model(name, policy)
        if contract is None:
            return v.expect()
        if b is not None and b.model != name:
            v.refuse(FP)
        elif not state_ok(req.state, contract):
            v.refuse(IA)
        if b is None and policy.max_streams:
            v.maybe(RE)

        def check(after: Mapping[Target, Known | None], reply: bytes) -> str | None:
            a = after.get(target)
            if a is None or a.step != req.step or a.model != name:
                seen = None if a is None else (a.model, a.step)
                return f"after SetState the stream is {seen}; expected ({name!r}, {req.step})"
            return None

        return v.expect(check)

    return Part(payload, (target,) if valid_id(req.stream_id) else (), judge)


def delete_part(tenant: str, payload: bytes) -> Part:
    req = parse("DeleteStream", payload)
    if not fits(payload) or req is None or not valid_id(req.stream_id):
        code = RE if not fits(payload) else IA
        return Part(payload, (), lambda before: Expect(frozenset({code})))
    target = (tenant, req.stream_id)

    def judge(before: Before) -> Expect:
        b = before.get(target)

        def check(after: Mapping[Target, Known | None], reply: bytes) -> str | None:
            existed = pb.DeleteStreamResponse.FromString(reply).existed
            if after.get(target) is not None or existed != (b is not None):
                return f"DeleteStream said existed={existed}; the stream was {b}, is {after.get(target)}"
            return None

        return Expect(frozenset({OK}), check)

    return Part(payload, (target,), judge)


def list_part(tenant: str, payload: bytes) -> Part:
    if not fits(payload) or parse("ListModels", payload) is None:
        code = RE if not fits(payload) else IA
        return Part(payload, (), lambda before: Expect(frozenset({code}), read_only=True))

    def check(after: Mapping[Target, Known | None], reply: bytes) -> str | None:
        names = sorted({m.name for m in pb.ListModelsResponse.FromString(reply).models})
        usable = TENANTS[tenant].usable
        return None if names == usable else f"ListModels shows {names} to {tenant}; it may use {usable}"

    return Part(payload, (), lambda before: Expect(frozenset({OK}), check, read_only=True))


def export_part(tenant: str, payload: bytes) -> Part:
    req = parse("ExportStates", payload)
    if not fits(payload) or req is None:
        code = RE if not fits(payload) else IA
        return Part(payload, (), lambda before: Expect(frozenset({code}), read_only=True))
    policy = TENANTS[tenant]
    v = Verdict()
    if any(m not in CONTRACTS or not policy.may_use(m) for m in req.models):
        v.refuse(PD if policy.models is not None else NF)  # (a tenant's own list is checked first)

    def check(after: Mapping[Target, Known | None], file: bytes) -> str | None:
        if not file.startswith(b"CELLSNAP"):
            return "the export is not a snapshot file"
        if not policy.admin and any(b"\x1f" in ids for ids in file_ids(file)):
            return f"{tenant}'s export holds other tenants' stream keys"
        return None

    expect = v.expect(check, read_only=True)
    return Part(payload, (), lambda before: expect)


# --- the reference streams ----------------------------------------------------------------------------


@dataclass(eq=False)
class Reference:
    """A stream stepped only through known readings; `raw` is its last GetState reply."""

    tenant: str
    stream_id: str
    model: str
    inputs: list[np.ndarray] = field(default_factory=list)
    raw: bytes = b""

    @property
    def target(self) -> Target:
        return (self.tenant, self.stream_id)

    @property
    def step(self) -> int:
        return len(self.inputs)

    def expected(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outputs, states = reference_sequence(MODELS / self.model, np.stack(self.inputs))
        return outputs, states[-1]


def same_state(raw: bytes, other: bytes) -> bool:
    """Byte for byte the same stream (map entries may be written in another order)."""
    if raw == other:
        return True
    one, two = pb.StreamState.FromString(raw), pb.StreamState.FromString(other)
    return one.SerializeToString(deterministic=True) == two.SerializeToString(deterministic=True)


def reference_problem(
    ref: Reference, raw: bytes, expected: dict[str, np.ndarray] | None = None
) -> str | None:
    """Whether the stream's state and step are what the ONNX reference says of its readings."""
    state = pb.StreamState.FromString(raw)
    if state.step != ref.step or state.model != ref.model:
        seen = (state.model, state.step)
        return f"reference {ref.target} is {seen}; expected {(ref.model, ref.step)}"
    if expected is None:
        _, expected = ref.expected()
    for name, value in expected.items():
        got = np.asarray(state.state[name].data, np.float32).reshape(value.shape)
        if not np.allclose(got, value, rtol=TOLERANCE, atol=TOLERANCE):
            worst = float(np.abs(got - value).max())
            return f"reference {ref.target} state {name!r} is off the ONNX reference by {worst:.3g}"
    return None


# --- the harness -------------------------------------------------------------------------------------


@dataclass
class FuzzServer:
    """A real server with an auth file of TENANTS, and each tenant's token."""

    server: RunningServer
    tokens: dict[str, str]


def start(tmp: Path, seed: int = 0) -> FuzzServer:
    """Start the server the fuzzing runs against (tokens follow from the seed, for replays)."""
    tokens = {name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:32] for name in TENANTS}
    document: dict[str, dict[str, Any]] = {"tenants": {}}
    for name, policy in TENANTS.items():
        entry: dict[str, Any] = {"tokens": ["sha256:" + hashlib.sha256(tokens[name].encode()).hexdigest()]}
        if policy.models is not None:
            entry["models"] = sorted(policy.models)
        if policy.admin:
            entry["admin"] = True
        if policy.max_streams:
            entry["max_streams"] = policy.max_streams
        document["tenants"][name] = entry
    tmp.mkdir(parents=True, exist_ok=True)
    auth = tmp / "auth.json"
    auth.write_text(json.dumps(document))
    return FuzzServer(start_server(tmp, "--auth-file", str(auth), *SERVER_FLAGS), tokens)


@dataclass
class Finding:
    kind: str
    method: str
    auth: str
    problem: str
    payloads: tuple[bytes, ...]
    before: dict[str, str]

    def show(self, limit: int = 600) -> str:
        shown = [describe(self.method, p, limit) for p in self.payloads[:4]] or [
            "(not kept: replay the seed)"
        ]
        more = f" (+{len(self.payloads) - 4} more)" if len(self.payloads) > 4 else ""
        return (
            f"[{self.kind}] {self.method} with {self.auth}: {self.problem}\n"
            f"  streams before: {self.before}\n  message: {' | '.join(shown)}{more}"
        )


def describe(method: str, payload: bytes, limit: int = 600) -> str:
    """A message as protobuf text (or hex, when it does not parse), cut at `limit` characters."""
    req = parse(method, payload)
    if req is None:
        shown = f"bytes.fromhex({payload[: limit // 2].hex()!r})"
    else:
        shown = f"{type(req).__name__}({text_format.MessageToString(req, as_one_line=True)})"
    if len(shown) > limit:
        shown = (
            shown[:limit] + f"... ({len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()[:16]})"
        )
    return shown


@dataclass
class Report:
    seed: int
    messages: int = 0
    seconds: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)
    kinds: dict[str, Counter[str]] = field(default_factory=dict)
    methods: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    rss_start: int = 0
    rss_peak: int = 0
    stopped: bool = False  # the server stopped answering

    def distinct(self) -> list[tuple[Finding, int]]:
        """The findings grouped by what went wrong (numbers aside), each with its first instance."""
        groups: dict[str, list[Finding]] = {}
        for finding in self.findings:
            key = re.sub(r"\d+", "N", f"{finding.kind}|{finding.method}|{finding.problem}")[:160]
            groups.setdefault(key, []).append(finding)
        return [(found[0], len(found)) for found in groups.values()]

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "messages": self.messages,
            "seconds": round(self.seconds, 1),
            "codes": dict(self.codes.most_common()),
            "kinds": {k: dict(c.most_common()) for k, c in sorted(self.kinds.items())},
            "methods": dict(self.methods.most_common()),
            "rss_start_mib": round(self.rss_start / 2**20, 1),
            "rss_peak_mib": round(self.rss_peak / 2**20, 1),
            "findings": len(self.findings),
        }


class ServerGone(Exception):
    """The server stopped answering: the run ends with this as its last finding."""


class Harness:
    """One channel to the server, the reference streams, and the invariants after each message."""

    def __init__(self, fuzz: FuzzServer, report: Report) -> None:
        self.fuzz = fuzz
        self.report = report
        self.process = psutil.Process(fuzz.server.pid)
        self.channel = grpc.insecure_channel(
            fuzz.server.address,
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
        kinds = {
            (False, False): self.channel.unary_unary,
            (False, True): self.channel.unary_stream,
            (True, False): self.channel.stream_unary,
            (True, True): self.channel.stream_stream,
        }
        self.rpcs: dict[str, Any] = {
            name: kinds[shape](SERVICE + name, **raw) for name, shape in METHODS.items()
        }
        self.health = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self.refs = [Reference(*r) for r in REFERENCES]
        self.files: dict[str, bytes] = {}
        self.known: dict[Target, Known | None] = {}  # streams as the last reads showed them
        self._setup()

    def metadata(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.fuzz.tokens[tenant]}"),)

    def close(self) -> None:
        self.channel.close()

    # Set-up: the base files for imports (streams that are then deleted), then the references.
    def _setup(self) -> None:
        listed = pb.ListModelsResponse.FromString(
            self.rpcs["ListModels"](b"", metadata=self.metadata("ops"), timeout=CALL_TIMEOUT)
        )
        served = {
            m.name: Contract(
                int(m.input_size), int(m.output_size), {s.name: tuple(s.shape) for s in m.states}
            )
            for m in listed.models
        }
        assert served == CONTRACTS, f"the bundled models changed: {served}"
        rng = np.random.default_rng(7)
        for tenant, stream_id, model, readings in IMPORTED:
            for _ in range(readings):
                x = rng.standard_normal(CONTRACTS[model].input_size).astype(np.float32)
                self.unary("Step", tenant, step_request(stream_id, model, x))
        for tenant in TENANTS:
            self.files[tenant] = b"".join(
                pb.SnapshotChunk.FromString(c).data
                for c in self.rpcs["ExportStates"](b"", metadata=self.metadata(tenant), timeout=CALL_TIMEOUT)
            )
        for tenant, stream_id, _, _ in IMPORTED:
            self.unary("DeleteStream", tenant, get_request(stream_id))
        for ref in self.refs:
            for _ in range(2):
                x = rng.standard_normal(CONTRACTS[ref.model].input_size).astype(np.float32)
                self.unary("Step", ref.tenant, step_request(ref.stream_id, ref.model, x))
                ref.inputs.append(x)
            ref.raw = self.unary("GetState", ref.tenant, get_request(ref.stream_id))
            problem = reference_problem(ref, ref.raw)
            assert problem is None, problem
        self.report.rss_start = self.report.rss_peak = self.process.memory_info().rss

    def unary(self, method: str, tenant: str, payload: bytes) -> bytes:
        reply: bytes = self.rpcs[method](payload, metadata=self.metadata(tenant), timeout=CALL_TIMEOUT)
        return reply

    def read(
        self, targets: Sequence[Target], *, health: bool = False
    ) -> tuple[dict[Target, Known | None], list[str]]:
        """GetState of each target by its tenant (and the health check), all at once."""
        futures = [
            self.rpcs["GetState"].future(get_request(i), metadata=self.metadata(t), timeout=CALL_TIMEOUT)
            for t, i in targets
        ]
        probe = self.health.future(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT) if health else None
        found: dict[Target, Known | None] = {}
        problems = []
        for target, future in zip(targets, futures, strict=True):
            try:
                raw = future.result()
            except grpc.RpcError as exc:
                if exc.code() != NF:
                    problems.append(f"GetState of {target} answered {exc.code().name}: {exc.details()!r}")
                found[target] = None
                continue
            state = pb.StreamState.FromString(raw)
            found[target] = Known(state.model, state.step, raw)
        if probe is not None:
            try:
                status = probe.result().status
            except grpc.RpcError as exc:
                raise ServerGone(f"the health check failed after the message: {exc.code().name}") from None
            if status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(f"health is {status} after the message")
        return found, problems

    def deliver(self, call: Call) -> tuple[grpc.StatusCode, str, list[bytes]]:
        """Send one message; the call's code, its details, and the replies that came."""
        rpc = self.rpcs[call.method]
        metadata = call.auth.metadata
        replies: list[bytes] = []
        try:
            client_streaming, server_streaming = METHODS[call.method]
            request: Any = iter(call.payloads) if client_streaming else call.payloads[0]
            if server_streaming:
                for reply in rpc(request, metadata=metadata, timeout=CALL_TIMEOUT):
                    replies.append(reply)
            else:
                replies.append(rpc(request, metadata=metadata, timeout=CALL_TIMEOUT))
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", replies
        return OK, "", replies

    def send(self, call: Call) -> None:
        """Send one message and check every invariant after it.

        This harness is the server's only client, so what the last reads showed is still true when
        the next message goes: streams are read before a message only where that is not known."""
        targets = call.targets
        before = {t: self.known[t] for t in targets if t in self.known}
        problems: list[str] = []
        if len(before) < len(targets):
            read, problems = self.read([t for t in targets if t not in before])
            before.update(read)
        named = Counter(t for part in call.parts for t in part.targets)
        view: dict[Target, Known | Unread | None] = dict(before)
        for t, count in named.items():
            if count > 1:  # named by several requests of one StepStream call: its state in between is open
                view[t] = UNREAD
        expects = [part.judge(view) for part in call.parts]
        code, details, replies = self.deliver(call)
        try:
            after, unread = self.read(
                list(dict.fromkeys([*targets, *(r.target for r in self.refs)])), health=True
            )
        except ServerGone as gone:
            self._record(call, code, [code] * len(call.parts), before, [*problems, str(gone)])
            raise
        if code == OK:  # what the message may have changed beyond what was just read is not known
            if call.method == "ImportStates":
                self.known.clear()
            for t in call.names:
                self.known.pop(t, None)
        self.known.update(after)
        problems += unread
        codes = self._part_codes(call, code, replies, problems)
        problems += self._codes(call, code, details, codes, expects)
        changing: set[Target] = set()
        for i, (part, expect, part_code) in enumerate(zip(call.parts, expects, codes, strict=True)):
            if call.auth.tenant is None or code != OK or part_code != OK:
                continue
            if not expect.read_only:
                changing.update(part.targets)
            if expect.after is not None:
                try:
                    problem = expect.after(after, self._reply(call, i, replies))
                except Exception as exc:  # a reply protobuf cannot read, or a snapshot file that is not one
                    problem = f"the reply cannot be read ({type(exc).__name__}: {exc})"
                if problem:
                    problems.append(f"request {i}: {problem}")
        for target in targets:
            if target not in changing and not _same(before[target], after[target]):
                problems.append(f"stream {target} changed though no accepted message could change it")
        problems += self._references(call, codes, replies, after)
        problems += self._rss()
        self._record(call, code, codes, before, problems)
        if code == OK and call.cleanup:
            for tenant, stream_id in call.cleanup:
                self.unary("DeleteStream", tenant, get_request(stream_id))
                self.known[(tenant, stream_id)] = None

    @staticmethod
    def _reply(call: Call, i: int, replies: list[bytes]) -> bytes:
        if call.method == "StepStream":
            return replies[i]
        if call.method == "ExportStates":
            return b"".join(pb.SnapshotChunk.FromString(r).data for r in replies)
        return replies[0]

    @staticmethod
    def _codes(
        call: Call, code: grpc.StatusCode, details: str, codes: list[grpc.StatusCode], expects: list[Expect]
    ) -> list[str]:
        """The call's code (and StepStream's in-band ones) are among those the message may get."""
        oversized = not all(fits(p) for p in call.payloads)
        if call.auth.tenant is None:
            expected: Codes = frozenset({UA, *((RE,) * oversized)})  # (grpc reads a message before auth)
        elif call.method == "StepStream":
            expected = frozenset({RE} if oversized else {OK})
        else:
            expected = expects[0].codes
        problems = []
        if code not in expected:
            names = sorted(c.name for c in expected)
            problems.append(f"answered {code.name} ({details[:300]!r}); expected one of {names}")
        if call.method == "StepStream" and code == OK and call.auth.tenant is not None:
            for i, (part_code, expect) in enumerate(zip(codes, expects, strict=True)):
                if part_code not in expect.codes:
                    names = sorted(c.name for c in expect.codes)
                    problems.append(f"request {i} answered {part_code.name} in-band; expected one of {names}")
        return problems

    def _part_codes(
        self, call: Call, code: grpc.StatusCode, replies: list[bytes], problems: list[str]
    ) -> list[grpc.StatusCode]:
        if call.method != "StepStream" or code != OK:
            return [code] * len(call.parts)
        if len(replies) != len(call.parts):
            problems.append(f"StepStream answered {len(replies)} replies to {len(call.parts)} requests")
        codes = []
        for i in range(len(call.parts)):
            error = pb.StepResponse.FromString(replies[i]).error.code if i < len(replies) else -1
            codes.append(CODE_OF.get(error, Code.UNKNOWN))
        return codes

    def _references(
        self,
        call: Call,
        codes: list[grpc.StatusCode],
        replies: list[bytes],
        after: Mapping[Target, Known | None],
    ) -> list[str]:
        """Every reference is unchanged, or moved exactly by the readings of it that were accepted."""
        problems = []
        applied: dict[Target, list[tuple[RefReading, int]]] = {}  # the reading, its reply's index
        for i, (part, part_code) in enumerate(zip(call.parts, codes, strict=True)):
            for reading in part.readings:
                if part_code == OK and call.auth.tenant is not None:
                    applied.setdefault(reading.ref.target, []).append((reading, i))
        for ref in self.refs:
            now = after.get(ref.target)
            if now is None:
                problems.append(f"reference {ref.target} is gone")
                self._rebase(ref)
                continue
            readings = applied.get(ref.target, [])
            if call.method != "StepBatch" and any(
                pb.StepResponse.FromString(replies[i]).replayed for _, i in readings
            ):
                readings = []  # answered as a retry: nothing was applied
            if not readings:
                if not same_state(ref.raw, now.raw):
                    problems.append(
                        f"reference {ref.target} changed (no accepted reading of it in the message)"
                    )
                    self._rebase(ref)
                continue
            for reading, _ in readings:
                ref.inputs = [reading.x] if reading.reset else [*ref.inputs, reading.x]
            outputs, state = ref.expected()
            problem = reference_problem(ref, now.raw, state) or self._outputs(
                ref, call, readings, replies, outputs
            )
            ref.raw = now.raw
            if problem:
                problems.append(problem)
                self._rebase(ref)
        return problems

    @staticmethod
    def _outputs(
        ref: Reference,
        call: Call,
        readings: list[tuple[RefReading, int]],
        replies: list[bytes],
        outputs: np.ndarray,
    ) -> str | None:
        """Each accepted reading's reply carries the reference's output for that reading."""
        size = CONTRACTS[ref.model].output_size
        for k, (reading, i) in enumerate(readings):
            if call.method == "StepBatch":
                response = pb.StepBatchResponse.FromString(replies[0])
                got = np.frombuffer(response.outputs, "<f4")[reading.row * size : (reading.row + 1) * size]
            else:
                got = np.asarray(pb.StepResponse.FromString(replies[i]).output, np.float32)
            index = len(ref.inputs) - len(readings) + k
            if not np.allclose(got, outputs[index], rtol=TOLERANCE, atol=TOLERANCE):
                return f"reference {ref.target}: reply {i} output {got} != ONNX reference {outputs[index]}"
        return None

    def _rebase(self, ref: Reference) -> None:
        """After a reported mismatch, start the reference again from a known sequence."""
        self.unary("DeleteStream", ref.tenant, get_request(ref.stream_id))
        x = np.zeros(CONTRACTS[ref.model].input_size, np.float32)
        self.unary("Step", ref.tenant, step_request(ref.stream_id, ref.model, x))
        ref.inputs = [x]
        ref.raw = self.unary("GetState", ref.tenant, get_request(ref.stream_id))
        state = pb.StreamState.FromString(ref.raw)
        self.known[ref.target] = Known(state.model, state.step, ref.raw)

    def _rss(self) -> list[str]:
        rss = self.process.memory_info().rss
        self.report.rss_peak = max(self.report.rss_peak, rss)
        if rss > self.report.rss_start + RSS_BOUND:
            start = self.report.rss_start >> 20
            return [f"RSS {rss >> 20} MiB is over the bound ({start} + {RSS_BOUND >> 20} MiB)"]
        return []

    def _record(
        self,
        call: Call,
        code: grpc.StatusCode,
        codes: list[grpc.StatusCode],
        before: Mapping[Target, Known | None],
        problems: list[str],
    ) -> None:
        report = self.report
        report.messages += 1
        shown = code if code != OK else next((c for c in codes if c != OK), OK)
        report.codes[shown.name] += 1
        report.kinds.setdefault(call.kind, Counter())[shown.name] += 1
        report.methods[call.method] += 1
        if problems:
            states = {
                f"{t}/{i}": "absent" if b is None else f"{b.model} step {b.step}"
                for (t, i), b in before.items()
            }
            # (the bytes of a few hundred findings are kept; the seed replays any of them)
            kept = len(report.findings) < 200 and sum(map(len, call.payloads)) <= 16 << 20
            for problem in problems:
                payloads = call.payloads if kept else ()
                report.findings.append(
                    Finding(call.kind, call.method, call.auth.form, problem, payloads, states)
                )


def _same(one: Known | None, two: Known | None) -> bool:
    if one is None or two is None:
        return one is two
    return same_state(one.raw, two.raw)


# --- the messages -------------------------------------------------------------------------------------

Draw = Callable[[st.SearchStrategy[Any]], Any]
GOOD_FORMS = ("Bearer {}", "bearer {}", "Bearer   {}  ")
BAD_FORMS = ("missing", "unknown", "Basic {}", "Bearer", "Bearer ", "Bearer {}x", "Token {}", "other-key")
MODEL_CHOICES = ("", "", "", "gru", "gru", "lstm", "lstm", "gru2", "demo", *UNKNOWN_MODELS[:3])


def draw_tenant(draw: Draw) -> str:
    return str(draw(st.sampled_from(sorted(TENANTS))))


def draw_auth(draw: Draw, h: Harness, tenant: str, *, bad: bool | None = None) -> Auth:
    """Mostly the tenant's token (in any accepted form); one in ten a refused credential."""
    token = h.fuzz.tokens[tenant]
    if bad is None:
        bad = draw(st.integers(0, 9)) == 0
    if bad:
        form = draw(st.sampled_from(BAD_FORMS))
        metadata: tuple[tuple[str, str], ...] = {
            "missing": (),
            "unknown": (("authorization", "Bearer " + "0" * 32),),
            "other-key": (("authorisation", f"Bearer {token}"),),
        }.get(form, (("authorization", form.format(token)),))
        return Auth(None, metadata, f"auth {form!r}")
    form = draw(st.sampled_from(GOOD_FORMS))
    return Auth(tenant, (("authorization", form.format(token)),), f"{tenant}'s token")


def draw_id(draw: Draw) -> str:
    choice = draw(st.integers(0, 19))
    if choice < 14:
        return str(draw(st.sampled_from(POOL)))
    if choice < 19:
        return str(draw(st.sampled_from(BAD_IDS)))
    return str(draw(st.text(max_size=12).filter(lambda s: s not in RESERVED)))


def draw_values(draw: Draw, n: int, *, finite: bool = False) -> np.ndarray:
    """n float32 values: hypothesis's own floats (its nastiest), or values made from a drawn seed:
    smooth ones at several scales, or mixed with extremes (±1e38, float32 max, subnormals, -0.0);
    and at times one NaN or infinity."""
    mode = draw(st.integers(0, 4))
    if mode == 0 and n <= 16:
        value = st.floats(width=32, allow_nan=not finite, allow_infinity=not finite)
        x = np.array(draw(st.lists(value, min_size=n, max_size=n)), np.float32)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = (rng.standard_normal(n) * (1.0, 1e-3, 100.0, 1.0, 1.0)[mode]).astype(np.float32)
        if mode == 4:
            extreme = rng.random(n) < 0.5
            x[extreme] = rng.choice(np.array(EXTREMES, np.float32), int(extreme.sum()))
    if not finite and n and draw(st.integers(0, 5)) == 0:
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(NON_FINITE))
    return x


def draw_reading(draw: Draw, n: int) -> np.ndarray:
    """A reading for a reference stream: finite, moderate (the reference is not a saturation test)."""
    mode = draw(st.integers(0, 3))
    if mode == 0:
        value = st.one_of(st.floats(-50, 50, width=32), st.sampled_from((0.0, -0.0, 1.4e-45, 1e-40)))
        return np.array(draw(st.lists(value, min_size=n, max_size=n)), np.float32)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal(n) * (0.0, 0.1, 1.0, 10.0)[mode]).astype(np.float32)


def draw_size(draw: Draw, model: str) -> int:
    right = CONTRACTS.get(model or DEFAULT_MODEL, CONTRACTS[DEFAULT_MODEL]).input_size
    return int(draw(st.sampled_from((right, right, right, right, right, 0, 1, 7, 8, 9, 64))))


def draw_state(
    draw: Draw, model: str, *, valid: bool = False
) -> dict[str | bytes, tuple[list[int], np.ndarray]]:
    """A state map for `model`: whole or partial, shaped or flat; or wrong in one way."""
    contract = CONTRACTS.get(model, CONTRACTS[DEFAULT_MODEL])
    names = sorted(contract.states)
    modes = (
        ("full", "flat", "partial") if valid else ("full", "flat", "partial", "shape", "name", "nan", "dims")
    )
    mode = draw(st.sampled_from(modes))
    chosen = names if mode != "partial" else [draw(st.sampled_from(names))]
    given: dict[str | bytes, tuple[list[int], np.ndarray]] = {}
    for name in chosen:
        spec = contract.states[name]
        size = math.prod(spec)
        data = draw_values(draw, size, finite=True)
        shape = [] if mode == "flat" else list(spec)
        if mode == "shape":
            shape, data = (
                draw(st.sampled_from(([size + 1], [size, 1], [0], [1, size // 2]))),
                data[: size // 2],
            )
        elif mode == "dims":
            shape = draw(st.sampled_from(([-size], [2**62, 4], [2**63 - 1], [-1, -size])))
        elif mode == "nan":
            data[draw(st.integers(0, size - 1))] = draw(st.sampled_from(NON_FINITE))
        given[name] = (shape, data)
    if mode == "name":
        unknown = draw(st.sampled_from(("c", "H", "h_out", "", "\u00e9", "x" * 300)))
        given[unknown] = ([4], np.ones(4, np.float32))
    return given


def draw_step_payload(draw: Draw, stream_id: str | None = None) -> bytes:
    model = str(draw(st.sampled_from(MODEL_CHOICES)))
    x = draw_values(draw, draw_size(draw, model))
    with_state = draw(st.integers(0, 5)) == 0
    return step_request(
        draw_id(draw) if stream_id is None else stream_id,
        model,
        x,
        state=draw_state(draw, model or DEFAULT_MODEL) if with_state else None,
        reset=draw(st.integers(0, 5)) == 0,
        end=draw(st.integers(0, 9)) == 0,
        seq=draw(st.sampled_from((0, 0, 0, 0, 0, 1, 2, 3, 5, 2**32, MAX_STEP, U64))),
        omit_state=draw(st.booleans()),
        request_id=draw(st.sampled_from((0, 1, U64))),
    )


@st.composite
def fuzz_step(draw: Draw, h: Harness) -> Call:
    tenant = draw_tenant(draw)
    return Call("step", "Step", draw_auth(draw, h, tenant), (step_part(tenant, draw_step_payload(draw)),))


def reference_reading_parts(
    draw: Draw, ref: Reference, *, step_only: bool = False
) -> tuple[str, tuple[Part, ...]]:
    """A valid reading of `ref` by Step, StepStream (among other requests) or StepBatch
    (`step_only`: as one StepRequest).

    Everything is drawn first, whatever the reference's state (hypothesis requires that the draws
    depend on earlier draws only); the reference's step decides afterwards."""
    contract = CONTRACTS[ref.model]
    wants_reset = draw(st.integers(0, 9)) == 0
    via = str(draw(st.sampled_from(("Step", "StepStream", "StepBatch"))))
    k = draw(st.integers(1, 3))
    others = list(draw(st.lists(st.sampled_from(POOL[:8]), max_size=3)))
    order = list(draw(st.permutations([ref.stream_id] * k + others)))
    xs = [draw_reading(draw, contract.input_size) for _ in order]
    named, with_seq, omit_state = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    request_id = draw(st.integers(0, U64))
    around = [draw_step_payload(draw) for _ in range(draw(st.integers(0, 2)))]
    position = draw(st.integers(0, 2))
    reset = wants_reset or ref.step >= MAX_REF_READINGS
    via = "Step" if step_only else via
    if via == "StepBatch" and not reset:
        rows = [i for i, stream_id in enumerate(order) if stream_id == ref.stream_id]
        readings = tuple(RefReading(ref, xs[row], False, row) for row in rows)
        model = ref.model if ref.model != DEFAULT_MODEL or named else ""
        inputs = np.concatenate(xs).astype("<f4").tobytes()
        payload = batch_request(model, order, inputs, omit_state=omit_state)
        return "StepBatch", (batch_part(ref.tenant, payload, readings),)
    x = xs[0]
    seq = (1 if reset else ref.step + 1) if with_seq else 0
    if reset and ref.step == 1:
        seq = 0  # (seq 1 would be a retry of step 1)
    model = ref.model if named else ""
    payload = step_request(
        ref.stream_id, model, x, reset=reset, seq=seq, omit_state=omit_state, request_id=request_id
    )
    part = step_part(ref.tenant, payload, (RefReading(ref, x, reset),))
    if via != "StepStream":
        return "Step", (part,)
    parts = [step_part(ref.tenant, p) for p in around]
    parts.insert(min(position, len(parts)), part)
    return "StepStream", tuple(parts)


@st.composite
def reference_step(draw: Draw, h: Harness) -> Call:
    ref = draw(st.sampled_from(h.refs))
    method, parts = reference_reading_parts(draw, ref)
    return Call("reference-step", method, draw_auth(draw, h, ref.tenant, bad=False), parts)


POISONS = (
    *("auth", "nan", "size", "stale-seq", "retry", "wrong-model", "unknown-model", "forbidden-model"),
    *("bad-state", "end-nan", "set-state", "batch", "get"),
)


@st.composite
def reference_poison(draw: Draw, h: Harness) -> Call:
    """A message naming a reference stream that must leave it as it is: refused, or read-only."""
    ref = draw(st.sampled_from(h.refs))
    tenant, contract = ref.tenant, CONTRACTS[ref.model]
    poison = str(draw(st.sampled_from(POISONS)))
    auth = draw_auth(draw, h, tenant, bad=poison == "auth")
    x = draw_reading(draw, contract.input_size)
    fields: dict[str, Any] = {"model": str(draw(st.sampled_from(("", ref.model))))}
    usable = TENANTS[tenant].usable
    if poison == "auth":
        method, parts = reference_reading_parts(draw, ref)
        if draw(st.booleans()):
            method, parts = "DeleteStream", (delete_part(tenant, get_request(ref.stream_id)),)
        return Call("reference-poison", method, auth, parts)
    if poison == "get":
        return Call("reference-poison", "GetState", auth, (get_part(tenant, get_request(ref.stream_id)),))
    if poison == "set-state":
        model = ref.model
        bad = draw(st.sampled_from(("state", "step", "model")))
        state = draw_state(draw, model) if bad == "state" else {}
        if bad == "state" and state_ok(_tensors(state), contract):
            state = {"nope": ([1], np.ones(1, np.float32))}
        step = U64 if bad == "step" else ref.step
        if bad == "model":
            model = next(m for m in usable if m != ref.model)
        payload = set_request(ref.stream_id, model, state, step)
        return Call("reference-poison", "SetState", auth, (set_part(tenant, payload),))
    if poison == "batch":
        ids = [ref.stream_id, *draw(st.lists(st.sampled_from(POOL[:8]), max_size=2))]
        values = np.concatenate([draw_reading(draw, contract.input_size) for _ in ids])
        flaw = draw(st.sampled_from(("nan", "length", "bad-id", "model")))
        model = ref.model
        if flaw == "nan":
            values[-1] = draw(st.sampled_from(NON_FINITE))
        elif flaw == "length":
            values = values[: -draw(st.integers(1, contract.input_size))]
        elif flaw == "bad-id":
            ids.append(draw(st.sampled_from(BAD_IDS)))
            values = np.concatenate([values, values[: contract.input_size]])
        else:
            model = str(draw(st.sampled_from(UNKNOWN_MODELS)))
        payload = batch_request(model, ids, values.astype("<f4").tobytes(), omit_state=False)
        return Call("reference-poison", "StepBatch", auth, (batch_part(tenant, payload),))
    if poison in ("nan", "end-nan"):
        x[draw(st.integers(0, len(x) - 1))] = draw(st.sampled_from(NON_FINITE))
        fields["end"] = poison == "end-nan"
    elif poison == "size":
        x = draw_reading(
            draw, int(draw(st.sampled_from((0, 1, contract.input_size - 1, contract.input_size + 1))))
        )
    elif poison == "stale-seq":
        stale = (ref.step + 2, ref.step + 1000, U64, ref.step - 1 if ref.step > 1 else U64)
        fields["seq"] = int(draw(st.sampled_from(stale)))
    elif poison == "retry":
        fields["seq"] = ref.step  # the last reading again: answered from the kept reply, nothing applied
    elif poison == "wrong-model":
        fields["model"] = next(m for m in usable if m != ref.model and CONTRACTS[m].input_size == len(x))
        fields["reset"] = draw(st.booleans())
    elif poison == "unknown-model":
        fields["model"] = str(draw(st.sampled_from(UNKNOWN_MODELS)))
    elif poison == "forbidden-model":
        forbidden = [m for m in CONTRACTS if not TENANTS[tenant].may_use(m)]
        fields["model"] = str(draw(st.sampled_from(forbidden or list(UNKNOWN_MODELS))))
    elif poison == "bad-state":
        state = draw_state(draw, ref.model)
        while state_ok(_tensors(state), contract):
            state = {"h" if ref.model != "lstm" else "cell": ([3], np.ones(3, np.float32))}
        fields["state"] = state
    payload = step_request(ref.stream_id, x=x, **fields)
    part = step_part(tenant, payload)
    if draw(st.booleans()):
        return Call("reference-poison", "Step", auth, (part,))
    return Call("reference-poison", "StepStream", auth, (part,))


def _tensors(state: StateArg) -> dict[str, Any]:
    """A state map as protobuf reads it (for the oracle's state rule)."""
    parsed = pb.SetStateRequest.FromString(set_request("x", "", state, 0))
    return dict(parsed.state)


@st.composite
def step_edges(draw: Draw, h: Harness) -> Call:
    """Near the highest step: a stream set to 2**64 - 3 .. 2**64 - 1 or past it, then stepped (with
    seq next, a retry, or none) while the harness knows one so high."""
    tenant = draw_tenant(draw)
    pick, seq_mode, offset = draw(st.integers(0, 2**16)), draw(st.integers(0, 2)), draw(st.integers(0, 3))
    model, x = draw(st.sampled_from(sorted(CONTRACTS))), draw_values(draw, 8, finite=True)
    auth = draw_auth(draw, h, tenant)
    high = sorted(i for (t, i), b in h.known.items() if t == tenant and b and b.step > U64 - 8 and i in POOL)
    if not high or pick % 3 == 0:
        payload = set_request(POOL[pick % 8], model, {}, (MAX_STEP, MAX_STEP - 1, MAX_STEP - 2, U64)[offset])
        return Call("step-edges", "SetState", auth, (set_part(tenant, payload),))
    stream_id = high[pick % len(high)]
    b = h.known[(tenant, stream_id)]
    assert b is not None
    seq = (0, min(b.step + 1, U64), b.step)[seq_mode]
    payload = step_request(stream_id, b.model, x[: CONTRACTS[b.model].input_size], seq=seq, omit_state=True)
    return Call("step-edges", "Step", auth, (step_part(tenant, payload),))


@st.composite
def fuzz_stream(draw: Draw, h: Harness) -> Call:
    """One StepStream call of 1 to 4 requests: fuzzed steps, malformed bytes, a reference's reading."""
    tenant = draw_tenant(draw)
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.integers(0, 5))
        if what == 0:
            parts.append(step_part(tenant, draw(st.binary(max_size=24))))
        else:
            parts.append(step_part(tenant, draw_step_payload(draw)))
    refs = [r for r in h.refs if r.tenant == tenant]
    if draw(st.integers(0, 3)) == 0:
        _, (reading,) = reference_reading_parts(draw, draw(st.sampled_from(refs)), step_only=True)
        parts.insert(draw(st.integers(0, len(parts))), reading)
    return Call("step-stream", "StepStream", draw_auth(draw, h, tenant), tuple(parts))


@st.composite
def fuzz_batch(draw: Draw, h: Harness) -> Call:
    tenant = draw_tenant(draw)
    model = str(draw(st.sampled_from(MODEL_CHOICES)))
    size = CONTRACTS.get(model or DEFAULT_MODEL, CONTRACTS[DEFAULT_MODEL]).input_size
    mode = draw(st.sampled_from(("few", "few", "few", "repeat", "family", "empty", "over")))
    if mode == "few":
        ids = [draw_id(draw) for _ in range(draw(st.integers(1, 6)))]
    elif mode == "repeat":
        ids = [str(draw(st.sampled_from(POOL[:8])))] * int(draw(st.sampled_from((2, 50, 500, 2000))))
    elif mode == "family":
        ids = [f"h{i}" for i in range(int(draw(st.sampled_from((10, 100, 1000, 5000)))))]
    elif mode == "empty":
        ids = []
    else:
        ids = ["s0"] * (MAX_BATCH_REQUEST + 1)
    values = draw_values(draw, len(ids) * size)
    inputs = values.astype("<f4").tobytes()
    if draw(st.integers(0, 7)) == 0:
        inputs = inputs[: draw(st.integers(0, len(inputs)))] + draw(st.binary(max_size=3))
    payload = batch_request(model, ids, inputs, omit_state=draw(st.booleans()))
    return Call("step-batch", "StepBatch", draw_auth(draw, h, tenant), (batch_part(tenant, payload),))


@st.composite
def fuzz_get(draw: Draw, h: Harness) -> Call:
    tenant = draw_tenant(draw)
    which = draw(st.integers(0, 3))
    stream_id = draw_id(draw) if which else str(draw(st.sampled_from(sorted(RESERVED))))
    return Call(
        "get-state", "GetState", draw_auth(draw, h, tenant), (get_part(tenant, get_request(stream_id)),)
    )


@st.composite
def fuzz_set(draw: Draw, h: Harness) -> Call:
    tenant = draw_tenant(draw)
    model = str(draw(st.sampled_from(MODEL_CHOICES)))
    state_model = model or str(draw(st.sampled_from(sorted(CONTRACTS))))
    state = draw_state(draw, state_model, valid=draw(st.booleans())) if draw(st.integers(0, 4)) else {}
    step = int(draw(st.sampled_from((0, 1, 7, 2**32, MAX_STEP - 1, MAX_STEP, U64))))
    payload = set_request(draw_id(draw), model, state, step)
    return Call("set-state", "SetState", draw_auth(draw, h, tenant), (set_part(tenant, payload),))


@st.composite
def fuzz_delete(draw: Draw, h: Harness) -> Call:
    tenant = draw_tenant(draw)
    payload = get_request(draw_id(draw))
    return Call("delete", "DeleteStream", draw_auth(draw, h, tenant), (delete_part(tenant, payload),))


@st.composite
def fuzz_list(draw: Draw, h: Harness) -> Call:
    tenant = draw_tenant(draw)
    payload = b"" if draw(st.booleans()) else delimited(99, draw(st.binary(max_size=16)))  # an unknown field
    return Call("list-models", "ListModels", draw_auth(draw, h, tenant), (list_part(tenant, payload),))


@st.composite
def fuzz_export(draw: Draw, h: Harness) -> Call:
    tenant = draw_tenant(draw)
    names = st.sampled_from(("gru", "lstm", "gru2", "demo", *UNKNOWN_MODELS[:3]))
    payload = export_request(draw(st.lists(names, max_size=3)))
    return Call("export", "ExportStates", draw_auth(draw, h, tenant), (export_part(tenant, payload),))


# The snapshot file: magic (8) | version u32 | header length u32 | JSON header | sections | SHA-256.
def file_header(file: bytes) -> dict[str, Any]:
    length = int.from_bytes(file[12:16], "little")
    header: dict[str, Any] = json.loads(file[16 : 16 + length])
    return header


def file_ids(file: bytes) -> list[bytes]:
    """Each model's ids section (the ids joined by newlines)."""
    offset = 16 + int.from_bytes(file[12:16], "little")
    found = []
    for model in file_header(file)["models"]:
        sizes = model["sections"]
        found.append(file[offset : offset + sizes[0]])
        offset += sum(sizes)
    return found


def resum(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def with_header(file: bytes, header: bytes) -> bytes:
    length = int.from_bytes(file[12:16], "little")
    body = file[:12] + len(header).to_bytes(4, "little") + header + file[16 + length : -32]
    return resum(body)


HEADER_EDITS: Final[tuple[tuple[str, Any], ...]] = (
    *(("count", 1), ("count", -1), ("count", 10**12), ("sections", 4), ("output_size", 0), ("states", [])),
    *(("name", "nope"), ("name", ""), ("version", "9"), ("sha256", "0" * 64), ("sha256", "xyz")),
    *(("shape", [0]), ("shape", [-1]), ("shape", [2**40]), ("shape", "64")),
    *(("created_unix", float("nan")), ("generation", -1), ("generation", 2**64), ("models", "x")),
    *(("extra", 1), ("twice", None)),
)


def edit_header(file: bytes, edit: tuple[str, Any], model: int) -> bytes:
    """One field of the header changed (the file re-checksummed, as a forger would)."""
    header = file_header(file)
    what, value = edit
    models: list[dict[str, Any]] = header["models"]
    section = models[model % len(models)] if models else {}
    if what in ("count", "output_size") and section:
        section[what] = section[what] + value if what == "count" and abs(value) == 1 else value
    elif what == "sections" and section:
        section["sections"][0] += value
    elif what in ("name", "version", "sha256", "states") and section:
        section[what] = value
    elif what == "shape" and section and section["states"]:
        section["states"][0]["shape"] = value
    elif what in ("created_unix", "generation", "models"):
        header[what] = value
    elif what == "twice" and section:
        models.append(dict(section))
    else:
        header[what] = value
    return with_header(file, json.dumps(header).encode())


def split(draw: Draw, data: bytes) -> list[bytes]:
    """The file as SnapshotChunk messages: whole, cut at random offsets, with empty chunks among them."""
    mode = draw(st.integers(0, 3))
    if mode == 0 or not data:
        return [chunk(data)]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    if mode == 1:
        pieces.insert(draw(st.integers(0, len(pieces))), b"")
    return [chunk(p) for p in pieces]


def import_part(chunks: Sequence[bytes], intended: Codes, targets: tuple[Target, ...]) -> Part:
    """The call's judge: chunks are read in order (a malformed one or the size cap ends it)."""
    total = 0
    codes = intended
    for message in chunks:
        parsed = parse("ImportStates", message) if fits(message) else None
        if not fits(message):
            codes = frozenset({RE})
            break
        if parsed is None:
            codes = frozenset({IA})
            break
        total += len(parsed.data)
        if total > MAX_IMPORT:
            codes = frozenset({RE})
            break
    return Part(b"", targets, lambda before: Expect(codes))


MUTATIONS = (
    *("intact", "intact", "intact", "truncate", "flip", "flip-resum", "header", "header-raw"),
    *("magic", "append", "garbage-chunk", "oversize", "empty"),
)


@st.composite
def fuzz_import(draw: Draw, h: Harness) -> Call:
    """A real export (a tenant's, or the admin's with every tenant's streams), intact or forged."""
    source = draw_tenant(draw)
    importer = draw_tenant(draw)
    file = h.files[source]
    policy = TENANTS[importer]
    admin_file = TENANTS[source].admin
    mutation = str(draw(st.sampled_from(MUTATIONS)))
    owned = tuple((t, i) for t, i, _, _ in IMPORTED if admin_file or t == source)
    if admin_file:
        targets = owned if policy.admin else tuple((importer, i) for _, i in owned)
    else:
        targets = () if policy.admin else tuple((importer, i) for _, i in owned)
    with_streams = {
        name for name, count in ((m["name"], m["count"]) for m in file_header(file)["models"]) if count
    }
    if (admin_file and not policy.admin) or not all(policy.may_use(m) for m in with_streams):
        intact = frozenset({PD})
    else:
        intact = frozenset({OK, RE}) if policy.max_streams else frozenset({OK})
    forged = frozenset({OK, IA, PD, *((RE,) * bool(policy.max_streams))})
    data, intended = file, intact
    if mutation == "truncate":
        data, intended = file[: draw(st.integers(0, len(file) - 1))], frozenset({IA})
    elif mutation == "flip":
        flipped = bytearray(file)
        for _ in range(draw(st.integers(1, 4))):
            flipped[draw(st.integers(0, len(file) - 1))] ^= 1 << draw(st.integers(0, 7))
        data, intended = bytes(flipped), frozenset({IA}) if flipped != file else intact  # (flips may cancel)
    elif mutation == "flip-resum":
        flipped = bytearray(file[:-32])
        for _ in range(draw(st.integers(1, 4))):
            flipped[draw(st.integers(0, len(flipped) - 1))] ^= 1 << draw(st.integers(0, 7))
        data, intended = resum(bytes(flipped)), forged
    elif mutation == "header":
        edit = draw(st.sampled_from(HEADER_EDITS))
        data, intended = edit_header(file, edit, draw(st.integers(0, 3))), forged
    elif mutation == "header-raw":
        raw = draw(st.sampled_from((b"", b"[]", b"{", b'{"models": []}', b"\xff\xfe", b"null", b"1e999")))
        data, intended = with_header(file, raw), forged
    elif mutation == "magic":
        data, intended = resum(b"CELLSNAQ" + file[8:-32]), frozenset({IA})
        if draw(st.booleans()):
            data = resum(file[:8] + (2).to_bytes(4, "little") + file[12:-32])
    elif mutation == "append":
        data, intended = file + draw(st.binary(min_size=1, max_size=8)), frozenset({IA})
    chunks = split(draw, data)
    if mutation == "garbage-chunk":
        chunks.insert(
            draw(st.integers(0, len(chunks))), draw(st.sampled_from((b"\xff", b"\x0a\x05ab", b"\x08")))
        )
        intended = frozenset({IA})
    elif mutation == "oversize":
        pad = chunk(bytes(256 << 10))
        chunks = [chunk(file), *[pad] * (MAX_IMPORT // len(pad) + 1)]
    elif mutation == "empty":
        chunks, intended = draw(st.sampled_from(([], [chunk(b"")]))), frozenset({IA})
    part = import_part(chunks, intended, targets)
    return Call(
        f"import-{mutation}",
        "ImportStates",
        draw_auth(draw, h, importer),
        (part,),
        tuple(chunks),
        cleanup=targets,
    )


@st.composite
def raw_bytes(draw: Draw, h: Harness) -> Call:
    """Bytes that are not a protobuf message of the method (or are, by chance, or are one damaged)."""
    method = str(draw(st.sampled_from(sorted(METHODS))))
    tenant = draw_tenant(draw)

    def blob() -> bytes:
        mode = draw(st.integers(0, 3))
        if mode == 0:
            return bytes(draw(st.binary(max_size=48)))
        if mode == 1:
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            return rng.bytes(int(draw(st.sampled_from((1, 100, 10_000, 100_000)))))
        base = bytearray(draw_step_payload(draw) if method.startswith("Step") else get_request("s1"))
        if mode == 2 and base:
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
            return bytes(base)
        return bytes(base[: draw(st.integers(0, len(base)))]) + bytes(draw(st.binary(max_size=8)))

    auth = draw_auth(draw, h, tenant)
    if method == "ImportStates":
        chunks = [blob() for _ in range(draw(st.integers(1, 3)))]
        return Call("raw-bytes", method, auth, (import_part(chunks, frozenset({IA}), ()),), tuple(chunks))
    if method == "StepStream":
        return Call(
            "raw-bytes",
            method,
            auth,
            tuple(step_part(tenant, blob()) for _ in range(draw(st.integers(1, 3)))),
        )
    return Call("raw-bytes", method, auth, (PARTS[method](tenant, blob()),))


PARTS: Final[dict[str, Callable[[str, bytes], Part]]] = {
    "Step": step_part,
    "StepBatch": batch_part,
    "GetState": get_part,
    "SetState": set_part,
    "DeleteStream": delete_part,
    "ListModels": list_part,
    "ExportStates": export_part,
}


UTF8_FIELDS = ("id", "model", "state-key", "batch-id", "batch-model", "get", "set", "delete", "export")


@st.composite
def bad_utf8(draw: Draw, h: Harness) -> Call:
    """A string field that is not UTF-8 (proto3 requires it): refused, never half-read."""
    tenant = draw_tenant(draw)
    bad = bytes(draw(st.sampled_from(BAD_UTF8)))
    where = str(draw(st.sampled_from(UTF8_FIELDS)))
    x = np.zeros(8, np.float32)
    if where in ("batch-id", "batch-model"):
        ids: list[str | bytes] = ["s0", bad] if where == "batch-id" else ["s0"]
        payload = batch_request(bad if where == "batch-model" else "gru", ids, bytes(len(ids) * 32), False)
        return Call("bad-utf8", "StepBatch", draw_auth(draw, h, tenant), (batch_part(tenant, payload),))
    if where in ("get", "delete"):
        method = "GetState" if where == "get" else "DeleteStream"
        return Call(
            "bad-utf8", method, draw_auth(draw, h, tenant), (PARTS[method](tenant, get_request(bad)),)
        )
    if where == "set":
        payload = set_request(
            bad if draw(st.booleans()) else "s0", bad, {bad: ([1], np.ones(1, np.float32))}, 1
        )
        return Call("bad-utf8", "SetState", draw_auth(draw, h, tenant), (set_part(tenant, payload),))
    if where == "export":
        return Call(
            "bad-utf8",
            "ExportStates",
            draw_auth(draw, h, tenant),
            (export_part(tenant, export_request(["gru", bad])),),
        )
    payload = step_request(
        bad if where == "id" else "s0",
        bad if where == "model" else "",
        x,
        state={bad: ([64], np.zeros(64, np.float32))} if where == "state-key" else None,
    )
    method = str(draw(st.sampled_from(("Step", "StepStream"))))
    return Call("bad-utf8", method, draw_auth(draw, h, tenant), (step_part(tenant, payload),))


@st.composite
def huge(draw: Draw, h: Harness) -> Call:
    """Repeated fields and strings near --max-message-bytes, and past it."""
    tenant = draw_tenant(draw)
    auth = draw_auth(draw, h, tenant)
    what = str(
        draw(
            st.sampled_from(
                ("input", "batch", "state-entries", "state-data", "id", "model", "export", "stream", "chunks")
            )
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if what == "input":
        n = int(draw(st.sampled_from((200_000, 600_000, 1_100_000))))
        payload = step_request("s2", "gru", rng.standard_normal(n).astype(np.float32))
        return Call("huge", "Step", auth, (step_part(tenant, payload),))
    if what == "batch":
        n = int(draw(st.sampled_from((15_000, 20_000))))
        ids = [f"h{i}" for i in range(n)]
        payload = batch_request(
            "gru", ids, rng.standard_normal(n * 8).astype("<f4").tobytes(), draw(st.booleans())
        )
        return Call("huge", "StepBatch", auth, (batch_part(tenant, payload),))
    if what == "state-entries":
        state: StateArg = {f"k{i}": ([1], np.ones(1, np.float32)) for i in range(20_000)}
        payload = step_request("s3", "gru", np.zeros(8, np.float32), state=state)
        return Call("huge", "Step", auth, (step_part(tenant, payload),))
    if what == "state-data":
        n = int(draw(st.sampled_from((300_000, 1_200_000))))
        payload = set_request("s3", "gru", {"h": ([n], rng.standard_normal(n).astype(np.float32))}, 1)
        return Call("huge", "SetState", auth, (set_part(tenant, payload),))
    if what in ("id", "model"):
        n = int(draw(st.sampled_from((1 << 20, 5 << 20))))
        value = "é" * (n // 2)
        payload = step_request(
            value if what == "id" else "s4", value if what == "model" else "gru", np.zeros(8, np.float32)
        )
        return Call("huge", "Step", auth, (step_part(tenant, payload),))
    if what == "export":
        many = [f"m{i}" for i in range(100_000)]  # within the limit; three 1.5 MB names are past it
        payload = export_request(many if draw(st.booleans()) else ["m" * 1_500_000] * 3)
        return Call("huge", "ExportStates", auth, (export_part(tenant, payload),))
    if what == "stream":
        parts = tuple(
            step_part(tenant, draw_step_payload(draw, f"s{i % 8}"))
            for i in range(int(draw(st.sampled_from((50, 300)))))
        )
        return Call("huge", "StepStream", draw_auth(draw, h, tenant), parts)
    data = h.files[tenant]
    chunks = [chunk(data[i : i + 1]) for i in range(len(data))] if len(data) < 5000 else [chunk(data)]
    owned = tuple((tenant, i) for t, i, _, _ in IMPORTED if t == tenant) if not TENANTS[tenant].admin else ()
    part = import_part(chunks, frozenset({OK, RE}) if TENANTS[tenant].max_streams else frozenset({OK}), owned)
    return Call("huge", "ImportStates", auth, (part,), tuple(chunks), cleanup=owned)


KINDS: Final[dict[str, tuple[int, Callable[[Harness], st.SearchStrategy[Call]]]]] = {
    "reference-step": (10, reference_step),
    "reference-poison": (10, reference_poison),
    "step": (12, fuzz_step),
    "step-stream": (7, fuzz_stream),
    "step-batch": (8, fuzz_batch),
    "get-state": (4, fuzz_get),
    "set-state": (7, fuzz_set),
    "delete": (4, fuzz_delete),
    "list-models": (2, fuzz_list),
    "export": (3, fuzz_export),
    "import": (8, fuzz_import),
    "raw-bytes": (8, raw_bytes),
    "bad-utf8": (5, bad_utf8),
    "huge": (1, huge),
    "step-edges": (2, step_edges),
}


def messages(h: Harness) -> st.SearchStrategy[Call]:
    """Any message, each kind as often as its weight."""
    table = [name for name, (weight, _) in KINDS.items() for _ in range(weight)]
    strategies = {name: make(h) for name, (_, make) in KINDS.items()}
    return st.sampled_from(table).flatmap(lambda name: strategies[name])


# --- running ------------------------------------------------------------------------------------------

PER_EXAMPLE = 20  # messages drawn in one hypothesis example
EXAMPLES_PER_RUN = 50  # examples per @given run (each run's tree of draws starts afresh: bounded memory)


def run(fuzz: FuzzServer, count: int, seed: int, progress: Callable[[Report], None] | None = None) -> Report:
    """Send `count` fuzzed messages (hypothesis, seeded: the same seed sends the same messages to a
    fresh server) and check the invariants after each; returns counts by status code and findings."""
    report = Report(seed)
    harness = Harness(fuzz, report)
    strategy = messages(harness)
    started = time.perf_counter()
    try:
        round_seed = seed
        while report.messages < count and not report.stopped:
            _examples(harness, strategy, count, round_seed, progress)
            round_seed += 1
    finally:
        report.seconds = time.perf_counter() - started
        harness.close()
    return report


def _examples(
    harness: Harness,
    strategy: st.SearchStrategy[Call],
    count: int,
    seed_value: int,
    progress: Callable[[Report], None] | None,
) -> None:
    report = harness.report

    @settings(
        max_examples=min(EXAMPLES_PER_RUN, max(1, -(-(count - report.messages) // PER_EXAMPLE))),
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @fixed_seed(seed_value)
    @given(st.data())
    def examples(data: st.DataObject) -> None:
        for _ in range(PER_EXAMPLE):  # (always as many draws: a shorter example would look flaky)
            call = data.draw(strategy)
            if report.messages < count and not report.stopped:
                try:
                    harness.send(call)
                except ServerGone:
                    report.stopped = True
                if progress is not None and report.messages % 1000 == 0:
                    progress(report)

    examples()


def table(report: Report) -> str:
    """Counts by message kind (rows) and status code (columns), as a markdown table."""
    codes = [code for code, _ in report.codes.most_common()]
    lines = ["| kind | " + " | ".join(codes) + " | all |", "|---|" + "---:|" * (len(codes) + 1)]
    for kind, counts in sorted(report.kinds.items()):
        cells = [str(counts.get(code, 0)) for code in codes]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {sum(counts.values())} |")
    lines.append("| all | " + " | ".join(str(report.codes[c]) for c in codes) + f" | {report.messages} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/fuzzing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages to send (default 100000)")
    parser.add_argument("--seed", type=int, help="replay a run by its seed (default: a random one)")
    parser.add_argument("--out", type=Path, help="write each finding's full message bytes here")
    args = parser.parse_args(argv)
    seed = (
        args.seed
        if args.seed is not None
        else int.from_bytes(hashlib.sha256(str(time.time_ns()).encode()).digest()[:4], "little")
    )
    print(
        f"fuzz seed {seed} (replay: python tests/fuzzing.py --seed {seed} --messages {args.messages})",
        flush=True,
    )

    def progress(report: Report) -> None:
        rate = report.messages / max(time.perf_counter() - started, 1e-9)
        found, rss = len(report.findings), report.rss_peak >> 20
        line = f"  {report.messages} messages, {rate:.0f}/s, {found} findings, server RSS peak {rss} MiB"
        print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellstream-fuzz-") as tmp:
        fuzz = start(Path(tmp), seed)
        try:
            report = run(fuzz, args.messages, seed, progress)
        finally:
            stopped = fuzz.server.stop()
        if stopped != 0:
            print(f"the server exited with {stopped}:\n{fuzz.server.log()[-4000:]}", file=sys.stderr)
    print(json.dumps(report.summary()))
    print(table(report))
    for i, (finding, count) in enumerate(report.distinct()):
        print(f"\nfinding {i + 1} ({count} times): {finding.show()}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            record = {
                "kind": finding.kind,
                "method": finding.method,
                "auth": finding.auth,
                "problem": finding.problem,
            }
            record["payloads_hex"] = [p.hex() for p in finding.payloads]  # type: ignore[assignment]
            (args.out / f"finding-{i + 1}.json").write_text(json.dumps(record))
    return 1 if report.findings or stopped != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
