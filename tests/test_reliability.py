"""Defects an adversarial run found: each test fails on b24d172 and states the rule it breaks.

A refused request changes nothing; no single request holds the server; every resource is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client import AsyncClient, step_request
from cellstream.model import ModelRepository
from cellstream.streams.snapshot import ModelSection, encode
from cellstream.streams.store import StreamRows
from reference import reference_sequence
from support import MODELS, RunningServer, start_server, wait_for
from test_server import sample, scrape

X = np.ones(8, np.float32)
GRU = ModelRepository(MODELS, default_model="gru").models["gru"]


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.code()


def gru_streams(server: RunningServer) -> int:
    with server.client() as client:
        return sum(m.streams for m in client.list_models() if m.name == "gru")


def test_d1_a_batch_of_one_id_repeated_30000_times_runs_in_order_in_linear_time(tmp_path: Path) -> None:
    """Waves cost O(N) overall (it was quadratic: 16,000 repeats took 49 s, 100,000 never ended)."""
    server = start_server(tmp_path, "--max-batch-request", "30000")
    n = 30_000
    x = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    with server.client(timeout=120) as client:
        reply = client.step_batch(["x"] * n, x)
        assert reply.steps.tolist() == list(range(1, n + 1))
        expected, _ = reference_sequence(MODELS / "gru", x)
        np.testing.assert_allclose(reply.outputs, np.asarray(expected), atol=1e-4)
        assert client.step("other", X).step == 1
    assert server.stop() == 0


def test_d8_refused_batches_and_steps_leave_no_stream_registered(tmp_path: Path) -> None:
    """Refused for a full queue, new streams must not stay entered in the directory."""
    server = start_server(tmp_path, "--max-streams", "1000", "--max-queue", "100")
    ids = [f"b{i}" for i in range(500)]
    with server.client() as client:
        for _ in range(2):
            assert code_of(client.step_batch, ids, np.ones((500, 8))) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.step("fresh", X).step == 1  # was: "the server holds 1000 streams"
        assert client.step_batch(ids[:100], np.ones((100, 8))).steps.tolist() == [1] * 100
    assert gru_streams(server) == 101
    assert server.stop() == 0


def test_d8_many_concurrent_new_streams_refused_for_the_queue_do_not_fill_max_streams(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-streams", "100", "--max-queue", "1")

    async def burst() -> list[grpc.StatusCode]:
        async with AsyncClient(server.address) as client:
            in_flight = asyncio.Semaphore(300)  # (thousands at once on one channel get CANCELLED)

            async def one(k: int) -> grpc.StatusCode:
                async with in_flight:
                    try:
                        await client.step(f"n{k}", X)
                    except grpc.aio.AioRpcError as exc:
                        return exc.code()
                    return grpc.StatusCode.OK

            return await asyncio.gather(*(one(k) for k in range(3000)))

    codes = asyncio.run(burst())
    ok = codes.count(grpc.StatusCode.OK)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert gru_streams(server) == ok
    with server.client() as client:
        for k in range(100 - ok):  # every stream the limit still allows can be made
            assert client.step(f"later-{k}", X).step == 1
        assert code_of(client.step, "one-too-many", X) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.stop() == 0


def test_d9_a_batch_whose_reply_cannot_be_sent_is_refused_before_it_is_applied(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-message-bytes", str(4 * 1024 * 1024))
    ids = [f"big-{i}" for i in range(17_000)]
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            client.step_batch(ids, np.ones((17_000, 8)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "omit_state" in (info.value.details() or "")
        assert code_of(client.get_state, ids[0]) == grpc.StatusCode.NOT_FOUND
        assert gru_streams(server) == 0
        reply = client.step_batch(ids, np.ones((17_000, 8)), omit_state=True)  # fits without states
        assert reply.steps.tolist() == [1] * 17_000
    assert server.stop() == 0


def test_d6_a_snapshot_larger_than_max_streams_is_restored_and_the_limit_applies_to_new_ones(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    first = start_server(tmp_path / "a", "--state-dir", str(state))
    with first.client() as client:
        for k in range(5):
            client.step(f"kept-{k}", X)
    assert first.stop() == 0
    second = start_server(tmp_path / "b", "--state-dir", str(state), "--max-streams", "3")
    with second.client() as client:
        assert [client.get_state(f"kept-{k}").step for k in range(5)] == [1] * 5
        assert client.step("kept-0", X).step == 2
        assert code_of(client.step, "new", X) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sample(scrape(second), "cellstream_restored_over_limit_streams_total") == 2
    assert "more than --max-streams 3" in second.log()
    assert second.stop() == 0


def section(ids: list[str], *, shape: tuple[int, ...] = (64,), steps: int = 3) -> ModelSection:
    n = len(ids)
    rows = StreamRows(
        ids=ids,
        steps=np.full(n, steps, np.uint64),
        replayable=np.zeros(n, bool),
        last_output=np.zeros((n, GRU.output_size), np.float32),
        states=[np.full((n, *shape), 0.5, np.float32)],
    )
    return ModelSection("gru", GRU.version, GRU.sha256, GRU.output_size, ["h"], [shape], rows)


def write(path: Path, *sections: ModelSection) -> Path:
    path.write_bytes(b"".join(encode(list(sections))))
    return path


def test_d4_an_import_is_all_or_nothing(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-streams", "4")
    with server.client() as client:
        client.step("live", X)
        good = write(tmp_path / "good.csnap", section(["a", "b"]))
        assert client.import_states(good) == (2, 0)
        assert client.get_state("a").step == 3
        # A second section whose state does not fit the model: nothing of the file is applied.
        mixed = write(tmp_path / "mixed.csnap", section(["c"]), section(["d"], shape=(32,)))
        assert code_of(client.import_states, mixed) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(client.get_state, "c") == grpc.StatusCode.NOT_FOUND
        # Over --max-streams (live, a, b + 2 new): refused whole.
        over = write(tmp_path / "over.csnap", section(["e", "f"]))
        assert code_of(client.import_states, over) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(client.get_state, "e") == grpc.StatusCode.NOT_FOUND
        # A stream at the last step a u64 counter holds could never step again.
        wrapped = write(tmp_path / "wrapped.csnap", section(["a"], steps=2**64 - 1))
        assert code_of(client.import_states, wrapped) == grpc.StatusCode.INVALID_ARGUMENT
        assert client.get_state("a").step == 3
    assert gru_streams(server) == 3
    assert server.stop() == 0


def test_d2_an_import_over_max_import_bytes_is_refused_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-import-bytes", str(1 << 20))
    huge = tmp_path / "huge.csnap"
    huge.write_bytes(bytes(3 << 20))
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            client.import_states(huge)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-import-bytes" in (info.value.details() or "")
        assert client.import_states(write(tmp_path / "small.csnap", section(["s"]))) == (1, 0)
    assert server.stop() == 0


def with_unknown_field(request: pb.StepRequest, size: int) -> bytes:
    """A valid request plus an unknown length-delimited field 99 of `size` bytes (parsers keep it)."""
    key = bytes([(99 << 3 | 2) & 0x7F | 0x80, (99 << 3 | 2) >> 7])
    length, value = bytearray(), size
    while value > 0x7F:
        length.append(value & 0x7F | 0x80)
        value >>= 7
    length.append(value)
    return request.SerializeToString() + key + bytes(length) + bytes(size)


def test_d3_a_stream_call_that_never_reads_its_replies_does_not_grow_server_memory(tmp_path: Path) -> None:
    # (--no-tune-malloc: glibc hands freed message buffers back, so RSS shows what is *held*)
    server = start_server(tmp_path, "--stream-window", "256", "--no-tune-malloc")
    process = psutil.Process(server.pid)
    with server.client() as client:
        client.step("warm", X)
    before = process.memory_info().rss
    message = with_unknown_field(step_request("quiet", X, omit_state=True), 2 << 20)
    sent = [0]

    def requests() -> object:
        while sent[0] < 400:
            sent[0] += 1
            yield message

    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 8 << 20)])
    call = channel.stream_stream(
        "/cellstream.v1.CellStream/StepStream", request_serializer=lambda m: m, response_deserializer=None
    )(requests())
    try:
        wait_for(lambda: sent[0] >= 250, timeout=60)  # (the server stops reading at its window, 256)
        grown = process.memory_info().rss - before
        assert grown < 200 << 20, f"server RSS grew {grown >> 20} MB for {sent[0]} unread 2 MB messages"
    finally:
        call.cancel()
        channel.close()
    with server.client() as client:
        assert client.step("warm", X).step == 2
    assert server.stop() == 0


def test_bad_bytes_are_invalid_argument_and_a_stream_call_survives_a_bad_message(
    server: RunningServer,
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        step = channel.unary_unary(
            "/cellstream.v1.CellStream/Step", request_serializer=lambda m: m, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            step(b"\xff\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        good = step_request("utf8-ok", X).SerializeToString()
        bad = step_request("AAAA", X).SerializeToString().replace(b"AAAA", b"\xff\xfeAA")
        stream = channel.stream_stream(
            "/cellstream.v1.CellStream/StepStream",
            request_serializer=lambda m: m,
            response_deserializer=pb.StepResponse.FromString,
        )
        replies = list(stream(iter([good, bad, good]), timeout=10))
    assert [r.step for r in replies] == [1, 0, 2]
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "UTF-8" in replies[1].error.message
    assert "Traceback" not in server.log()


def test_client_strings_echoed_in_errors_are_cut(client: object) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.step("echo", X, model="m" * 1_000_000)  # type: ignore[attr-defined]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(info.value.details() or "") < 500


def test_the_step_counter_never_wraps(client: object) -> None:
    state = {"h": np.zeros(64, np.float32)}
    assert code_of(client.set_state, "wrap", state, model="gru", step=2**64 - 1) == (  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT
    )
    client.set_state("wrap", state, model="gru", step=2**64 - 2)  # type: ignore[attr-defined]
    assert client.step("wrap", X).step == 2**64 - 1  # type: ignore[attr-defined]


def test_the_metrics_endpoint_answers_only_at_metrics(server: RunningServer) -> None:
    for path in ("/", "/favicon.ico", "/metricsx"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{server.metrics_address}{path}", timeout=5)
        assert info.value.code == 404
    assert "cellstream_steps_total" in scrape(server)


def test_d11_idle_connections_are_bounded_and_do_not_lock_out_clients_or_metrics(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-connections", "8", "--handshake-timeout", "1")
    host, port = server.address.rsplit(":", 1)
    idle = []
    for _ in range(24):  # only the HTTP/2 preface, then nothing
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        sock.settimeout(0.01)
        idle.append(sock)

    def closed(sock: socket.socket) -> bool:
        try:
            while data := sock.recv(65536):
                del data
        except TimeoutError:
            return False
        except OSError:
            return True
        return True

    try:
        assert "cellstream_steps_total" in scrape(server)  # the descriptor reserve keeps /metrics up
        wait_for(lambda: sum(closed(sock) for sock in idle) >= 16, timeout=20)  # over the limit: at once
        wait_for(lambda: all(closed(sock) for sock in idle), timeout=20)  # the rest: handshake timeout

        def served() -> bool:
            try:
                with server.client(timeout=5) as client:
                    return client.step("after", X).step >= 1
            except grpc.RpcError:
                return False

        wait_for(served, timeout=20)
    finally:
        for sock in idle:
            sock.close()
    assert server.stop() == 0


def test_a_failed_run_creates_no_stream() -> None:
    """A model failure is refused work: the streams its readings would have made are gone again."""
    from cellstream.config import Settings  # noqa: PLC0415
    from cellstream.engine import Engine  # noqa: PLC0415
    from cellstream.errors import ModelFailure, UnknownStream  # noqa: PLC0415
    from cellstream.model import CellModel  # noqa: PLC0415

    def failing(self: CellModel, x: np.ndarray, states: list[np.ndarray]) -> object:
        raise RuntimeError("injected failure")

    async def main() -> None:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), Settings(models=MODELS))
        engine.start()
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(CellModel, "run", failing)
                with pytest.raises(ModelFailure):
                    await engine.submit_step("single", "gru", X)
                with pytest.raises(ModelFailure):
                    await engine.step_batch("gru", ["b1", "b2"], np.ones((2, 8), np.float32).tobytes())
            for stream_id in ("single", "b1", "b2"):
                with pytest.raises(UnknownStream):
                    await engine.get_state(stream_id)
            assert engine.deployment.directory.key_of("single") is None
            assert (await engine.submit_step("single", "gru", X)).step == 1
        finally:
            await engine.stop()

    asyncio.run(main())


def test_d1_a_long_batch_runs_wave_by_wave_without_holding_the_event_loop() -> None:
    """Other callers get the loop between the waves of a StepBatch of one id repeated: here a
    ticker task counts the loop iterations it gets while the batch runs (it got none before)."""
    from dataclasses import replace  # noqa: PLC0415

    from cellstream.batching.policy import BatchPolicy  # noqa: PLC0415
    from cellstream.config import Settings  # noqa: PLC0415
    from cellstream.engine import Engine  # noqa: PLC0415

    n = 3000
    settings = Settings(models=MODELS)
    # No settling (which yields to arriving requests on its own): only the waves' sharing counts.
    policy = replace(BatchPolicy.from_settings(settings), settle_rounds=0)

    async def main() -> tuple[int, list[int]]:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), settings, policy)
        engine.start()
        ticks = [0]
        running = True

        async def ticker() -> None:
            while running:
                ticks[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            batch = asyncio.ensure_future(
                engine.step_batch("gru", ["x"] * n, np.ones((n, 8), np.float32).tobytes(), want_state=False)
            )
            await asyncio.sleep(0)  # the batch is validated and queued
            before = ticks[0]
            reply = await batch
            return ticks[0] - before, reply.steps.tolist()
        finally:
            running = False
            await task
            await engine.stop()

    during, steps = asyncio.run(main())
    assert steps == list(range(1, n + 1))
    assert during >= n // 2, f"the loop ran other tasks {during} times during {n} waves"


def test_slabs_grow_ahead_of_need_on_the_worker_thread_not_on_the_event_loop() -> None:
    """Growing the state arrays copies all of them (seconds at millions of streams): the batcher
    does it between runs on its worker thread, before a create runs out of rows."""
    import threading  # noqa: PLC0415

    from cellstream.config import Settings  # noqa: PLC0415
    from cellstream.engine import Engine  # noqa: PLC0415
    from cellstream.streams.store import StateStore  # noqa: PLC0415

    grown_on: list[str] = []
    reserve = StateStore.reserve

    def recording(self: StateStore, needed: int) -> None:
        if needed > self.capacity:
            grown_on.append(threading.current_thread().name)
        reserve(self, needed)

    async def main() -> tuple[int, int]:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), Settings(models=MODELS))
        engine.start()
        try:
            store = engine.deployment.current_for("gru").store
            start = store.capacity
            for wave in range(4):  # each fills most of what is spare, never all of it
                for _ in range(1000):  # (the growth after the last batch's reply, bounded)
                    if store.spare >= store.capacity // 4:
                        break
                    await asyncio.sleep(0.005)
                ids = [f"g{wave}-{i}" for i in range(store.spare - start // 8)]
                await engine.step_batch("gru", ids, np.ones((len(ids), 8), np.float32).tobytes())
            return start, store.capacity
        finally:
            await engine.stop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StateStore, "reserve", recording)
        start, end = asyncio.run(main())
    assert end >= 8 * start
    assert grown_on and all(name.startswith("cellstream-gru") for name in grown_on), grown_on


def large_batch_engine(**settings: object) -> object:
    from dataclasses import replace  # noqa: PLC0415

    from cellstream.batching.policy import BatchPolicy  # noqa: PLC0415
    from cellstream.config import Settings  # noqa: PLC0415
    from cellstream.engine import Engine  # noqa: PLC0415

    config = Settings(models=MODELS, **settings)  # type: ignore[arg-type]
    # Small chunks and no settling: the turns counted below come from the chunking alone.
    policy = replace(BatchPolicy.from_settings(config), check_chunk=500, settle_rounds=0)
    return Engine(ModelRepository(MODELS, default_model="gru"), config, policy)


def test_a_large_batch_of_new_streams_is_taken_in_chunks_sharing_the_loop() -> None:
    n = 12_000

    async def main() -> tuple[int, list[int], int]:
        engine = large_batch_engine()
        engine.start()  # type: ignore[attr-defined]
        ticks, running = [0], [True]

        async def ticker() -> None:
            while running[0]:
                ticks[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            ids = [f"big-{i}" for i in range(n)]
            reply = await engine.step_batch("gru", ids, np.ones((n, 8), np.float32).tobytes())  # type: ignore[attr-defined]
            store = engine.deployment.current_for("gru").store  # type: ignore[attr-defined]
            return ticks[0], reply.steps.tolist(), len(store)
        finally:
            running[0] = False
            await task
            await engine.stop()  # type: ignore[attr-defined]

    ticks, steps, streams = asyncio.run(main())
    assert steps == [1] * n and streams == n
    assert ticks >= 2 * n // 500, f"the loop ran other tasks {ticks} times"  # intake + creation turns


def test_a_large_batch_over_max_streams_admits_nothing_even_in_chunks() -> None:
    from cellstream.errors import TooManyStreams  # noqa: PLC0415

    async def main() -> tuple[int, int]:
        engine = large_batch_engine(max_streams=5000)
        engine.start()  # type: ignore[attr-defined]
        try:
            ids = [f"over-{i}" for i in range(6000)]  # each chunk fits; the whole does not
            with pytest.raises(TooManyStreams):
                await engine.step_batch("gru", ids, np.ones((6000, 8), np.float32).tobytes())  # type: ignore[attr-defined]
            left = len(engine.deployment.directory)  # type: ignore[attr-defined]
            reply = await engine.step_batch("gru", ids[:100], np.ones((100, 8), np.float32).tobytes())  # type: ignore[attr-defined]
            return left, int(reply.steps.sum())
        finally:
            await engine.stop()  # type: ignore[attr-defined]

    assert asyncio.run(main()) == (0, 100)


@pytest.mark.parametrize("turns", [1, 4, 12, 30, 60])
def test_a_large_batch_cancelled_at_any_point_leaves_no_stream(turns: int) -> None:
    async def main() -> tuple[int, int]:
        engine = large_batch_engine()
        engine.start()  # type: ignore[attr-defined]
        try:
            ids = [f"gone-{i}" for i in range(6000)]
            call = asyncio.ensure_future(
                engine.step_batch("gru", ids, np.ones((6000, 8), np.float32).tobytes())  # type: ignore[attr-defined]
            )
            for _ in range(turns):
                await asyncio.sleep(0)
            if call.done():
                return -1, -1  # (finished before the cancel: nothing to check)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            for _ in range(200):  # the batcher meets the cancelled batch and drops what it made
                await asyncio.sleep(0)
            store = engine.deployment.current_for("gru").store  # type: ignore[attr-defined]
            return len(store), len(engine.deployment.directory)  # type: ignore[attr-defined]
        finally:
            await engine.stop()  # type: ignore[attr-defined]

    streams, entries = asyncio.run(main())
    assert (streams, entries) in ((0, 0), (-1, -1))
