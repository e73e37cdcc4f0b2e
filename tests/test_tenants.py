"""Tokens, tenants and quotas against the real server: each auth code, the isolation matrix (two
tenants, the same ids, every RPC), both quotas and the StepStream one, auth-file reload, and
snapshots that keep each stream's tenant (and old ones that restore into the anonymous tenant).

The client here is the raw generated stub with `authorization` metadata, so these tests pin the
wire contract itself; tests/test_client_auth.py covers cellstream's own client.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1.cellstream_pb2_grpc import CellStreamStub
from cellstream.tenants import token_line
from reference import reference_sequence
from support import MODELS, RunningServer, start_server, wait_for
from test_settings import assert_refused, serve

GRU = MODELS / "gru"
TOKENS = {name: secrets.token_urlsafe(16) for name in ("acme", "globex", "ops", "acme2", "small")}


def auth_file(path: Path, tenants: dict[str, dict[str, Any]]) -> Path:
    """An auth file for `tenants` (name -> extra keys), each with its token of TOKENS."""
    document = {
        "tenants": {name: {"tokens": [token_line(TOKENS[name])], **extra} for name, extra in tenants.items()}
    }
    path.write_text(json.dumps(document))
    return path


def bearer(name: str | None) -> list[tuple[str, str]]:
    return [] if name is None else [("authorization", f"Bearer {TOKENS.get(name, name)}")]


@contextmanager
def stub(server: RunningServer) -> Iterator[CellStreamStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield CellStreamStub(channel)


def code_of(call: Any, request: Any, tenant: str | None) -> grpc.StatusCode:
    try:
        call(request, metadata=bearer(tenant), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def reading(i: int, seed: int) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed * 1000 + i).standard_normal(8, np.float32)]


def step(s: CellStreamStub, tenant: str, stream_id: str, x: list[float], **fields: Any) -> pb.StepResponse:
    request = pb.StepRequest(stream_id=stream_id, model="gru", input=x, **fields)
    return s.Step(request, metadata=bearer(tenant), timeout=10)  # type: ignore[no-any-return]


def scrape(server: RunningServer) -> str:
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("tenants")
    path = auth_file(
        tmp / "auth.json",
        {
            "acme": {"models": ["gru", "lstm"]},
            "globex": {},
            "ops": {"admin": True},
            "small": {"max_streams": 2, "max_steps_per_second": 3, "max_stream_calls": 1},
        },
    )
    running = start_server(tmp, "--auth-file", str(path))
    yield running
    assert running.stop() == 0, running.log()


# --- who may call --------------------------------------------------------------------------------


def test_a_call_without_a_token_or_with_an_unknown_one_is_unauthenticated(tenants: RunningServer) -> None:
    with stub(tenants) as s:
        request = pb.StepRequest(stream_id="u1", model="gru", input=reading(0, 1))
        assert code_of(s.Step, request, None) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(s.Step, request, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(s.ListModels, pb.ListModelsRequest(), None) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            s.GetState(pb.GetStateRequest(stream_id="u1"), metadata=[("authorization", "Basic abc")])
        assert "authorization: Bearer <token>" in (refused.value.details() or "")
        assert code_of(s.GetState, pb.GetStateRequest(stream_id="u1"), "acme") == grpc.StatusCode.NOT_FOUND


def test_an_unauthenticated_step_stream_is_refused_before_any_reading(tenants: RunningServer) -> None:
    with stub(tenants) as s:
        replies = s.StepStream(iter([pb.StepRequest(stream_id="u2", model="gru", input=reading(0, 2))]))
        with pytest.raises(grpc.RpcError) as refused:
            list(replies)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(tenants: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(tenants.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]))
        assert "cellstream.v1.CellStream" in {
            service.name for service in reply.list_services_response.service
        }


def test_a_model_the_tenant_may_not_use_is_permission_denied_and_changes_nothing(
    tenants: RunningServer,
) -> None:
    with stub(tenants) as s:
        request = pb.StepRequest(stream_id="pd1", model="gru2", input=reading(0, 3))
        assert code_of(s.Step, request, "acme") == grpc.StatusCode.PERMISSION_DENIED
        batch = pb.StepBatchRequest(model="demo", stream_ids=["pd1"], inputs=np.zeros(1, "<f4").tobytes())
        assert code_of(s.StepBatch, batch, "acme") == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(s.GetState, pb.GetStateRequest(stream_id="pd1"), "acme") == grpc.StatusCode.NOT_FOUND
        names = {m.name for m in s.ListModels(pb.ListModelsRequest(), metadata=bearer("acme")).models}
        assert names == {"gru", "lstm"}
        assert code_of(s.Step, request, "globex") == grpc.StatusCode.OK  # (no "models": every model)
    assert 'cellstream_auth_rejections_total{reason="model_denied"}' in scrape(tenants)


# --- isolation ------------------------------------------------------------------------------------


def test_two_tenants_with_the_same_ids_have_their_own_streams(tenants: RunningServer) -> None:
    inputs = {
        name: np.array([reading(i, seed) for i in range(4)], np.float32)
        for name, seed in [("acme", 4), ("globex", 5)]
    }
    with stub(tenants) as s:
        for i in range(4):
            for name in ("acme", "globex"):
                reply = step(s, name, "same", [float(v) for v in inputs[name][i]])
                assert reply.stream_id == "same" and reply.step == i + 1
        for name in ("acme", "globex"):
            expected, _ = reference_sequence(GRU, inputs[name])
            np.testing.assert_allclose(reply_output(s, name), expected[-1], rtol=1e-5, atol=1e-6)
            state = s.GetState(pb.GetStateRequest(stream_id="same"), metadata=bearer(name))
            assert state.stream_id == "same" and state.step == 4


def reply_output(s: CellStreamStub, tenant: str) -> np.ndarray:
    """The last reply of stream 'same', replayed by seq (a retry of step 4 changes nothing)."""
    reply = step(s, tenant, "same", [0.0] * 8, seq=4)
    assert reply.replayed
    return np.array(reply.output, np.float32)


def test_no_rpc_of_one_tenant_reaches_another_tenants_stream(tenants: RunningServer) -> None:
    with stub(tenants) as s:
        step(s, "acme", "only-acme", reading(0, 6))
        before = s.GetState(pb.GetStateRequest(stream_id="only-acme"), metadata=bearer("acme"))
        nobody = pb.GetStateRequest(stream_id="nobody-has-this")
        with pytest.raises(grpc.RpcError) as unknown:
            s.GetState(nobody, metadata=bearer("globex"))
        with pytest.raises(grpc.RpcError) as foreign:
            s.GetState(pb.GetStateRequest(stream_id="only-acme"), metadata=bearer("globex"))
        assert foreign.value.code() == unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert (foreign.value.details() or "").replace("only-acme", "X") == (
            unknown.value.details() or ""
        ).replace("nobody-has-this", "X")
        gone = s.DeleteStream(pb.DeleteStreamRequest(stream_id="only-acme"), metadata=bearer("globex"))
        assert not gone.existed
        state = {name: pb.Tensor(shape=t.shape, data=[1.0] * len(t.data)) for name, t in before.state.items()}
        s.SetState(
            pb.SetStateRequest(stream_id="only-acme", model="gru", state=state, step=9),
            metadata=bearer("globex"),
        )
        batch = pb.StepBatchRequest(model="gru", stream_ids=["only-acme"], inputs=np.ones(8, "<f4").tobytes())
        s.StepBatch(batch, metadata=bearer("globex"))
        streamed = list(
            s.StepStream(
                iter([pb.StepRequest(stream_id="only-acme", model="gru", input=[2.0] * 8)]),
                metadata=bearer("globex"),
            )
        )
        assert streamed[0].stream_id == "only-acme" and streamed[0].step == 11
        after = s.GetState(pb.GetStateRequest(stream_id="only-acme"), metadata=bearer("acme"))
        assert after == before
        counts = {
            m.name: m.streams for m in s.ListModels(pb.ListModelsRequest(), metadata=bearer("acme")).models
        }
        everything = {
            m.name: m.streams for m in s.ListModels(pb.ListModelsRequest(), metadata=bearer("ops")).models
        }
        assert counts["gru"] < everything["gru"]


def test_a_tenants_export_holds_its_own_streams_and_its_import_stays_its_own(
    tenants: RunningServer, tmp_path: Path
) -> None:
    with stub(tenants) as s:
        step(s, "acme", "exp-1", reading(0, 7))
        step(s, "globex", "exp-2", reading(0, 8))
        data = b"".join(
            c.data for c in s.ExportStates(pb.ExportStatesRequest(models=["gru"]), metadata=bearer("acme"))
        )
    # The export holds bare ids: a server without tenants sees exactly acme's streams.
    plain = start_server(tmp_path / "plain")
    try:
        with stub(plain) as p:
            p.ImportStates(iter([pb.SnapshotChunk(data=data)]), timeout=10)
            assert p.GetState(pb.GetStateRequest(stream_id="exp-1")).step == 1
            assert (
                code_of(p.GetState, pb.GetStateRequest(stream_id="exp-2"), None) == grpc.StatusCode.NOT_FOUND
            )
            assert code_of(p.GetState, pb.GetStateRequest(stream_id="same"), None) == grpc.StatusCode.OK
    finally:
        assert plain.stop() == 0
    with stub(tenants) as s:  # imported by globex, the streams are globex's
        s.ImportStates(iter([pb.SnapshotChunk(data=data)]), metadata=bearer("globex"), timeout=10)
        assert s.GetState(pb.GetStateRequest(stream_id="exp-1"), metadata=bearer("globex")).step == 1
        assert s.GetState(pb.GetStateRequest(stream_id="exp-1"), metadata=bearer("acme")).step == 1


def test_an_admin_export_keeps_tenants_and_only_an_admin_may_import_it(
    tenants: RunningServer, tmp_path: Path
) -> None:
    with stub(tenants) as s:
        step(s, "acme", "adm-1", reading(0, 9))
        step(s, "acme", "adm-1", reading(1, 9))
        data = b"".join(
            c.data for c in s.ExportStates(pb.ExportStatesRequest(models=["gru"]), metadata=bearer("ops"))
        )
    other = start_server(
        tmp_path / "other",
        "--auth-file",
        str(auth_file(tmp_path / "auth.json", {"acme": {}, "ops": {"admin": True}})),
    )
    try:
        with stub(other) as o:
            chunks = [pb.SnapshotChunk(data=data)]
            refused = code_of(o.ImportStates, iter(chunks), "acme")
            assert refused == grpc.StatusCode.PERMISSION_DENIED
            assert (
                code_of(o.GetState, pb.GetStateRequest(stream_id="adm-1"), "acme")
                == grpc.StatusCode.NOT_FOUND
            )
            o.ImportStates(iter(chunks), metadata=bearer("ops"), timeout=10)
            assert o.GetState(pb.GetStateRequest(stream_id="adm-1"), metadata=bearer("acme")).step == 2
            assert (
                code_of(o.GetState, pb.GetStateRequest(stream_id="adm-1"), "ops") == grpc.StatusCode.NOT_FOUND
            )
    finally:
        assert other.stop() == 0


# --- quotas ---------------------------------------------------------------------------------------


def test_max_streams_is_per_tenant_and_a_refusal_takes_no_room(tenants: RunningServer) -> None:
    with stub(tenants) as s:
        for stream_id in ("q1", "q2"):
            s.SetState(
                pb.SetStateRequest(stream_id=stream_id, model="gru", state={}, step=0),
                metadata=bearer("small"),
            )
        batch = pb.StepBatchRequest(model="gru", stream_ids=["q3"], inputs=np.ones(8, "<f4").tobytes())
        with pytest.raises(grpc.RpcError) as refused:
            s.StepBatch(batch, metadata=bearer("small"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams is 2" in (refused.value.details() or "")
        state = pb.SetStateRequest(stream_id="q4", model="gru", state={}, step=0)
        assert code_of(s.SetState, state, "small") == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(s.SetState, state, "globex") == grpc.StatusCode.OK  # another tenant: not at its limit
        assert s.DeleteStream(pb.DeleteStreamRequest(stream_id="q1"), metadata=bearer("small")).existed
        assert code_of(s.SetState, state, "small") == grpc.StatusCode.OK  # the refusals took no room
    assert 'cellstream_quota_rejections_total{limit="max_streams"}' in scrape(tenants)


def test_max_steps_per_second_refuses_one_tenant_only(tenants: RunningServer) -> None:
    with stub(tenants) as s:
        over = pb.StepBatchRequest(model="gru", stream_ids=["q2"] * 4, inputs=np.ones(32, "<f4").tobytes())
        with pytest.raises(grpc.RpcError) as too_many:
            s.StepBatch(over, metadata=bearer("small"))
        assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_steps_per_second 3" in (too_many.value.details() or "")
        codes = []
        for _ in range(50):  # 3 per second allowed: 50 back-to-back calls run out of them
            codes.append(
                code_of(s.Step, pb.StepRequest(stream_id="q2", model="gru", input=[0.5] * 8), "small")
            )
            other = code_of(s.Step, pb.StepRequest(stream_id="free", model="gru", input=[0.5] * 8), "globex")
            assert other == grpc.StatusCode.OK
            if codes[-1] != grpc.StatusCode.OK:
                break
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        steps = codes.count(grpc.StatusCode.OK)
        assert s.GetState(pb.GetStateRequest(stream_id="q2"), metadata=bearer("small")).step == steps


def test_max_stream_calls_bounds_a_tenants_open_step_streams(tenants: RunningServer) -> None:
    import queue  # noqa: PLC0415

    with stub(tenants) as s:
        pending: queue.Queue[pb.StepRequest | None] = queue.Queue()
        first = s.StepStream(iter(pending.get, None), metadata=bearer("small"))
        pending.put(pb.StepRequest(stream_id="q2", model="gru", input=[0.1] * 8, seq=0))
        assert next(first).error.code in (
            0,
            grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        )  # (the call is open)
        second = s.StepStream(
            iter([pb.StepRequest(stream_id="q2", model="gru", input=[0.1] * 8)]), metadata=bearer("small")
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(second)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_stream_calls" in (refused.value.details() or "")
        pending.put(None)
        list(first)

        def opens() -> bool:
            call = s.StepStream(iter([]), metadata=bearer("small"))
            try:
                list(call)
            except grpc.RpcError:
                return False
            return True

        wait_for(opens)


# --- the auth file ----------------------------------------------------------------------------------


def test_the_auth_file_is_reloaded_and_a_revoked_token_is_refused(tmp_path: Path) -> None:
    path = auth_file(tmp_path / "auth.json", {"acme": {}})
    server = start_server(tmp_path / "s", "--auth-file", str(path), "--auth-poll-seconds", "0.1")
    try:
        with stub(server) as s:
            step(s, "acme", "r1", reading(0, 10))
            import queue  # noqa: PLC0415

            pending: queue.Queue[pb.StepRequest | None] = queue.Queue()
            open_call = s.StepStream(iter(pending.get, None), metadata=bearer("acme"))
            pending.put(pb.StepRequest(stream_id="r1", model="gru", input=reading(1, 10)))
            assert next(open_call).step == 2
            auth_file(path, {"acme2": {}})  # acme's token revoked, acme2's added
            request = pb.StepRequest(stream_id="r1", model="gru", input=reading(2, 10))
            wait_for(lambda: code_of(s.Step, request, "acme") == grpc.StatusCode.UNAUTHENTICATED)
            pending.put(request)
            assert next(open_call).error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
            pending.put(None)
            list(open_call)
            assert code_of(s.Step, request, "acme2") == grpc.StatusCode.OK
            path.write_text('{"tenants": {"acme": {"tokens": ["not a digest"]}}}')
            wait_for(lambda: 'cellstream_auth_reloads_total{result="invalid"} 1.0' in scrape(server))
            assert code_of(s.Step, request, "acme2") == grpc.StatusCode.OK  # the last good file is kept
        assert "auth file not reloaded, the tenants in use are kept" in server.log()
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{", "is not JSON"),
        ('{"tenants": {"a": {"tokens": ["secret"]}}}', 'tokens are "sha256:" and 64 hex digits'),
        (
            '{"tenants": {"a": {"tokens": ["sha256:' + "0" * 64 + '"], "max_stream": 3}}}',
            "unknown keys ['max_stream']",
        ),
        ('{"tenants": {"a b": {"tokens": ["sha256:' + "0" * 64 + '"]}}}', "a name is 1 to 64"),
        (
            '{"tenants": {"a": {"tokens": ["sha256:' + "0" * 64 + '"], "max_streams": -1}}}',
            "max_streams must be",
        ),
    ],
)
def test_a_bad_auth_file_stops_the_start_with_one_line(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(content)
    result = serve("--auth-file", str(path), "--address", "127.0.0.1:0", "--metrics-address", "")
    assert result.returncode == 2, result.stderr
    assert why in result.stderr.splitlines()[-1]
    assert result.stderr.splitlines()[-1].startswith(f"cellstream serve: --auth-file '{path}'")


def test_a_missing_auth_file_is_refused(tmp_path: Path) -> None:
    result = serve("--auth-file", str(tmp_path / "none.json"), "--metrics-address", "")
    assert_refused(
        result,
        f"cellstream serve: --auth-file '{tmp_path / 'none.json'}': cannot be read "
        "(No such file or directory) (CELLSTREAM_AUTH_FILE)",
    )


# --- snapshots --------------------------------------------------------------------------------------


def test_snapshots_keep_each_streams_tenant(tmp_path: Path) -> None:
    path = auth_file(tmp_path / "auth.json", {"acme": {}, "globex": {}})
    state_dir = tmp_path / "state"
    args = ("--auth-file", str(path), "--state-dir", str(state_dir))
    first = start_server(tmp_path / "a", *args)
    with stub(first) as s:
        for i in range(3):
            step(s, "acme", "kept", reading(i, 11))
        step(s, "globex", "kept", reading(0, 12))
    assert first.stop() == 0
    second = start_server(tmp_path / "b", *args)
    try:
        with stub(second) as s:
            assert s.GetState(pb.GetStateRequest(stream_id="kept"), metadata=bearer("acme")).step == 3
            assert s.GetState(pb.GetStateRequest(stream_id="kept"), metadata=bearer("globex")).step == 1
    finally:
        assert second.stop() == 0


def test_a_snapshot_from_before_tenants_restores_into_the_anonymous_tenant(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    plain = start_server(tmp_path / "a", "--state-dir", str(state_dir))
    with stub(plain) as s:
        s.Step(pb.StepRequest(stream_id="old", model="gru", input=reading(0, 13)))
    assert plain.stop() == 0
    path = auth_file(tmp_path / "auth.json", {"acme": {}, "ops": {"admin": True}})
    tenanted = start_server(tmp_path / "b", "--state-dir", str(state_dir), "--auth-file", str(path))
    try:
        with stub(tenanted) as s:
            assert (
                code_of(s.GetState, pb.GetStateRequest(stream_id="old"), "acme") == grpc.StatusCode.NOT_FOUND
            )
            everything = b"".join(
                c.data for c in s.ExportStates(pb.ExportStatesRequest(), metadata=bearer("ops"))
            )
            assert b"old" in everything
    finally:
        assert tenanted.stop() == 0
    again = start_server(tmp_path / "c", "--state-dir", str(state_dir))
    try:
        with stub(again) as s:
            assert s.GetState(pb.GetStateRequest(stream_id="old")).step == 1
    finally:
        assert again.stop() == 0


def test_tokens_over_plaintext_reachable_from_other_machines_are_warned_of(tmp_path: Path) -> None:
    path = auth_file(tmp_path / "auth.json", {"acme": {}})
    server = start_server(tmp_path / "s", "--auth-file", str(path), address="0.0.0.0:0")
    try:
        (line,) = [x for x in server.log().splitlines() if "is plaintext and reachable" in x]
        assert "its tokens and readings can be read on the way; add --tls-cert" in line
        assert "tokens of 1 tenants" in server.log()
    finally:
        assert server.stop() == 0


def test_a_tenant_limited_to_some_models_exports_and_imports_all_of_them(tenants: RunningServer) -> None:
    with stub(tenants) as s:
        step(s, "acme", "all-1", reading(0, 14))
        data = b"".join(c.data for c in s.ExportStates(pb.ExportStatesRequest(), metadata=bearer("acme")))
        s.DeleteStream(pb.DeleteStreamRequest(stream_id="all-1"), metadata=bearer("acme"))
        s.ImportStates(iter([pb.SnapshotChunk(data=data)]), metadata=bearer("acme"), timeout=10)
        assert s.GetState(pb.GetStateRequest(stream_id="all-1"), metadata=bearer("acme")).step == 1


def test_get_cluster_map_needs_no_token_and_setting_one_needs_an_admin(tenants: RunningServer) -> None:
    with stub(tenants) as s:
        assert s.GetClusterMap(pb.GetClusterMapRequest(), timeout=10).epoch == 0
        request = pb.SetClusterMapRequest(map_json="{}")
        assert code_of(s.SetClusterMap, request, None) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            code_of(s.BeginHandoff, pb.HandoffRequest(shards=[0]), "acme")
            == grpc.StatusCode.PERMISSION_DENIED
        )
