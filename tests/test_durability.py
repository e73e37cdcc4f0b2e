"""Durable state: snapshots survive SIGTERM and kill -9, corrupt files are refused, states move."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream.client import Client
from cellstream.streams.snapshot import SnapshotDir, SnapshotError, decode, encode
from reference import reference_sequence
from support import MODELS, RunningServer, start_server, wait_for
from test_server import sample, scrape

X = np.random.default_rng(42).normal(size=(400, 8)).astype(np.float32)


def durable(tmp: Path, state_dir: Path, *args: str, models: Path = MODELS) -> RunningServer:
    return start_server(tmp, "--state-dir", str(state_dir), *args, models=models)


def test_state_survives_sigterm_restart_including_seq_replay(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = durable(tmp_path / "a", state_dir, "--snapshot-interval", "0")
    with first.client() as client:
        for i in range(10):
            last = client.step("keep", X[i], seq=i + 1)
        client.step("lstm-keep", X[0], model="lstm")
        client.step_batch([f"many-{k}" for k in range(3000)], X[:1].repeat(3000, 0))
    assert first.stop(signal.SIGTERM) == 0
    assert "snapshot of 3002 streams" in first.log()
    second = durable(tmp_path / "b", state_dir)
    try:
        with second.client() as client:
            restored = client.get_state("keep")
            assert restored.step == 10
            np.testing.assert_array_equal(restored.state["h"], last.state["h"])
            retry = client.step("keep", X[9], seq=10)  # the reply lost in the restart is replayed
            assert retry.replayed and retry.step == 10
            np.testing.assert_array_equal(retry.output, last.output)
            assert client.step("keep", X[10], seq=11).step == 11
            assert client.get_state("lstm-keep").step == 1 and client.get_state("many-2999").step == 1
        assert "restored 3002 streams" in second.log()
    finally:
        assert second.stop() == 0


def test_kill_9_under_load_then_resume_gives_uninterrupted_results(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = durable(tmp_path / "a", state_dir, "--snapshot-interval", "0.05")
    streams = [f"crash-{k}" for k in range(4)]
    outputs: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    wait_for(lambda: list(state_dir.glob("*.csnap")))
    replacement: list[RunningServer] = []

    def crash_and_restart() -> None:
        wait_for(lambda: sum(len(v) for v in outputs.values()) > 600, timeout=60)
        server.stop(signal.SIGKILL)
        # Same address: the client keeps retrying it until the new process listens.
        replacement.append(
            start_server(
                tmp_path / "b",
                "--state-dir",
                str(state_dir),
                "--snapshot-interval",
                "0.05",
                address=server.address,
            )
        )

    crasher = threading.Thread(target=crash_and_restart)
    crasher.start()
    try:
        with Client(server.address, resume=True, retry_seconds=60) as client:
            for i in range(len(X)):
                for stream_id in streams:
                    outputs[stream_id].append(client.step(stream_id, X[i], omit_state=True).output)
        crasher.join()
        assert replacement, "the server was never restarted"
        assert "restored" in replacement[0].log()
        expected, _ = reference_sequence(MODELS / "gru", X)
        with Client(replacement[0].address) as check:
            for stream_id in streams:
                np.testing.assert_allclose(
                    np.array(outputs[stream_id]), expected, atol=1e-5, err_msg=stream_id
                )
                assert check.get_state(stream_id).step == len(X)
    finally:
        crasher.join()
        server.stop(signal.SIGKILL)
        for running in replacement:
            assert running.stop() == 0, running.log()


def test_truncated_or_flipped_snapshot_is_never_valid(tmp_path: Path) -> None:
    server = durable(tmp_path / "a", tmp_path / "state", "--snapshot-interval", "0")
    with server.client() as client:
        client.step_batch([f"t-{k}" for k in range(50)], X[:50])
    assert server.stop() == 0
    (path,) = SnapshotDir(tmp_path / "state").files()
    data = path.read_bytes()
    decode(data)
    rng = np.random.default_rng(0)
    for cut in sorted(set(rng.integers(0, len(data), 200).tolist()) | {0, 1, 8, 16, len(data) - 1}):
        with pytest.raises(SnapshotError):
            decode(data[:cut])
    for position in rng.integers(0, len(data), 50).tolist():
        flipped = bytearray(data)
        flipped[position] ^= 0x40
        with pytest.raises(SnapshotError):
            decode(bytes(flipped))


def test_corrupt_newest_snapshot_falls_back_to_previous(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = durable(tmp_path / "a", state_dir, "--snapshot-interval", "0")
    with first.client() as client:
        client.step("fallback", X[0])
    assert first.stop() == 0
    (good,) = SnapshotDir(state_dir).files()
    newer = good.with_name("snapshot-999999999999999.csnap")
    newer.write_bytes(good.read_bytes()[:-10])  # truncated
    second = durable(tmp_path / "b", state_dir, "--snapshot-interval", "0")
    try:
        with second.client() as client:
            assert client.get_state("fallback").step == 1
        assert "is unusable" in second.log() and newer.name in second.log()
    finally:
        assert second.stop() == 0


def test_streams_of_a_changed_model_are_dropped_and_counted(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    state_dir = tmp_path / "state"
    first = durable(tmp_path / "a", state_dir, "--snapshot-interval", "0", models=models)
    try:
        with first.client() as client:
            client.step("gru-stream", X[0], model="gru")
            client.step("lstm-stream", X[0], model="lstm")
    finally:
        assert first.stop() == 0
    (models / "lstm" / "model.onnx").write_bytes((models / "lstm" / "model.onnx").read_bytes() + b"")
    config = models / "lstm" / "config.json"
    config.write_text(config.read_text().replace('"version": "1"', '"version": "2"'))
    second = durable(tmp_path / "b", state_dir, "--snapshot-interval", "0", models=models)
    try:
        with second.client() as client:
            assert client.get_state("gru-stream").step == 1
            with pytest.raises(grpc.RpcError) as info:
                client.get_state("lstm-stream")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "dropping 1 streams of model lstm" in second.log()
        assert sample(scrape(second), 'cellstream_streams_dropped_total{reason="model_changed"}') == 1
    finally:
        assert second.stop() == 0


def test_state_export_import_moves_streams_between_servers(tmp_path: Path) -> None:
    source, target = start_server(tmp_path / "a"), start_server(tmp_path / "b")
    try:
        with source.client() as a, target.client() as b:
            for i in range(5):
                a.step("moving", X[i], seq=i + 1)
            a.step("other", X[0], model="gru2")
            path = tmp_path / "export.csnap"
            assert a.export_states(path, ["gru"]) > 0
            assert b.import_states(path) == (1, 0)
            moved, original = b.get_state("moving"), a.get_state("moving")
            assert moved.step == 5
            np.testing.assert_array_equal(moved.state["h"], original.state["h"])
            assert b.step("moving", X[5], seq=6).step == 6
            with pytest.raises(grpc.RpcError):
                b.get_state("other")
    finally:
        assert source.stop() == 0 and target.stop() == 0


def test_snapshot_format_round_trips_in_memory() -> None:
    from cellstream.streams.snapshot import ModelSection  # noqa: PLC0415
    from cellstream.streams.store import StreamRows  # noqa: PLC0415

    rows = StreamRows(
        ["a", "b"],
        np.array([3, 4], np.uint64),
        np.array([True, False]),
        np.ones((2, 1), np.float32),
        [np.arange(8, dtype=np.float32).reshape(2, 2, 2)],
    )
    section = ModelSection("m", "1", "f" * 64, 1, ["h"], [(2, 2)], rows)
    created, (back,) = decode(b"".join(encode([section], created=12.5)))
    assert created == 12.5 and back.rows.ids == ["a", "b"] and back.state_shapes == [(2, 2)]
    np.testing.assert_array_equal(back.rows.states[0], rows.states[0])
    np.testing.assert_array_equal(back.rows.steps, rows.steps)


def test_sigterm_under_load_every_ok_reply_is_in_the_final_snapshot(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = durable(tmp_path / "a", state_dir, "--snapshot-interval", "0")
    acknowledged: dict[str, int] = {}
    started = threading.Event()

    def load() -> None:
        from cellstream.client import step_request  # noqa: PLC0415

        with server.client(timeout=30) as client:
            try:
                for reply in client.step_stream(
                    step_request(f"term-{i % 20}", X[i % len(X)], omit_state=True) for i in range(200_000)
                ):
                    if reply.error is None:
                        acknowledged[reply.stream_id] = reply.step
                        started.set()
            except grpc.RpcError:
                pass

    thread = threading.Thread(target=load)
    thread.start()
    assert started.wait(30)
    wait_for(lambda: sum(acknowledged.values()) > 2000, timeout=60)
    assert server.stop(signal.SIGTERM) == 0, server.log()
    thread.join(30)
    restarted = durable(tmp_path / "b", state_dir, "--snapshot-interval", "0")
    try:
        with restarted.client() as client:
            for stream_id, step in acknowledged.items():
                assert client.get_state(stream_id).step >= step, stream_id
    finally:
        assert restarted.stop() == 0
