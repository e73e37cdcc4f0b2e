"""Model versions and hot reload: new versions load without a restart, streams stay or migrate."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream.client import Client, step_request
from reference import reference_sequence
from support import MODELS, RunningServer, start_server, wait_for
from test_server import sample, scrape

X = np.random.default_rng(7).normal(size=(300, 8)).astype(np.float32)


def versioned_repo(root: Path) -> Path:
    (root / "gru" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "gru" / "model.onnx", root / "gru" / "1" / "model.onnx")
    shutil.copytree(MODELS / "lstm", root / "lstm")
    (root / "DEFAULT").write_text("gru\n")
    return root


def publish(repo: Path, version: int, content: bytes | None = None) -> None:
    """Write a version directory the way an operator should: build aside, then rename into place."""
    staging = repo / "gru" / f".v{version}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(
        content if content is not None else (MODELS / "gru" / "model.onnx").read_bytes()
    )
    staging.rename(repo / "gru" / str(version))


def versions(client: Client) -> dict[str, tuple[int, bool]]:
    return {m.version: (m.streams, m.current) for m in client.list_models() if m.name == "gru"}


def reloading(tmp: Path, *args: str) -> tuple[RunningServer, Path]:
    repo = versioned_repo(tmp / "repo")
    return start_server(tmp / "run", "--model-poll-interval", "0.1", *args, models=repo), repo


def test_new_version_takes_new_streams_old_keeps_its_own_then_unloads(tmp_path: Path) -> None:
    server, repo = reloading(tmp_path)
    try:
        with server.client() as client:
            client.step("early", X[0])
            publish(repo, 2)
            wait_for(lambda: versions(client).get("2") == (0, True))
            assert versions(client)["1"] == (1, False)
            client.step("late", X[0])
            assert client.step("early", X[1]).step == 2  # stays on version 1
            assert versions(client) == {"1": (1, False), "2": (1, True)}
            client.step("early", X[2], end=True)
            wait_for(lambda: "1" not in versions(client))
        assert "unloaded model gru version 1" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_reset_moves_a_stream_to_the_new_version(tmp_path: Path) -> None:
    server, repo = reloading(tmp_path)
    try:
        with server.client() as client:
            for i in range(3):
                client.step("mover", X[i])
            publish(repo, 2)
            wait_for(lambda: "2" in versions(client))
            replies = list(
                client.step_stream(
                    [
                        step_request("mover", X[3]),
                        step_request("mover", X[0], reset=True),
                        step_request("mover", X[1]),
                    ]
                )
            )
            assert [r.step for r in replies] == [4, 1, 2]
            expected, _ = reference_sequence(MODELS / "gru", X[:2])
            np.testing.assert_allclose(np.array([r.output for r in replies[1:]]), expected, atol=1e-5)
            wait_for(lambda: "1" not in versions(client))
    finally:
        assert server.stop() == 0, server.log()


def test_broken_version_is_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    server, repo = reloading(tmp_path)
    try:
        with server.client() as client:
            client.step("steady", X[0])
            publish(repo, 2, content=b"this is not an onnx model")
            wait_for(lambda: "refused model gru version 2" in server.log())
            assert versions(client) == {"1": (1, True)}
            assert client.step("steady", X[1]).step == 2
            assert client.step("fresh", X[0]).step == 1
        assert sample(scrape(server), 'cellstream_model_load_failures_total{model="gru"}') == 1
    finally:
        assert server.stop() == 0, server.log()


def test_migrate_streams_moves_live_streams_with_their_state(tmp_path: Path) -> None:
    server, repo = reloading(tmp_path, "--migrate-streams", "true")
    try:
        with server.client() as client:
            for i in range(5):
                client.step("migrant", X[i])
            publish(repo, 2)
            wait_for(lambda: set(versions(client)) == {"2"})
            reply = client.step("migrant", X[5])
            assert reply.step == 6
            expected, _ = reference_sequence(MODELS / "gru", X[:6])
            np.testing.assert_allclose(reply.output, expected[-1], atol=1e-5)
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("migrate", ["false", "true"])
def test_reload_under_load_loses_and_doubles_no_step(tmp_path: Path, migrate: str) -> None:
    server, repo = reloading(tmp_path, "--migrate-streams", migrate)
    streams = [f"load-{k}" for k in range(12)]
    results: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    errors: list[str] = []

    def drive(group: list[str]) -> None:
        with Client(server.address, timeout=60) as client:
            requests = (
                step_request(s, X[i], seq=i + 1, omit_state=True) for i in range(len(X)) for s in group
            )
            for reply in client.step_stream(requests):
                if reply.error is not None:
                    errors.append(f"{reply.stream_id}: {reply.error}")
                else:
                    results[reply.stream_id].append(reply.output)

    threads = [threading.Thread(target=drive, args=(streams[k::3],)) for k in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(len(v) for v in results.values()) > 300, timeout=60)
    publish(repo, 2)
    for thread in threads:
        thread.join(120)
    try:
        assert not errors, errors[:5]
        expected, _ = reference_sequence(MODELS / "gru", X)
        with server.client() as client:
            for stream_id in streams:
                np.testing.assert_allclose(
                    np.array(results[stream_id]), expected, atol=1e-5, err_msg=stream_id
                )
                assert client.get_state(stream_id).step == len(X)
            wait_for(lambda: versions(client).get("2", (0, False))[1])
            if migrate == "true":
                assert set(versions(client)) == {"2"}
        assert "version 2" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_unknown_stream_on_removed_version_is_not_found(tmp_path: Path) -> None:
    server, _ = reloading(tmp_path)
    try:
        with server.client() as client, pytest.raises(grpc.RpcError) as info:
            client.get_state("never")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        assert server.stop() == 0, server.log()
