"""Model repository traps: a model.onnx beside version directories, a broken newest version at
start, a roll-back by deleting the newest version, a config max_batch above the server's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cellstream.client import Client
from reference import reference_sequence
from support import MODELS, RunningServer, start_server, wait_for
from test_model_contract import write_cell
from test_model_repository import serve_once
from test_server import sample, scrape

X = np.random.default_rng(11).normal(size=(6, 8)).astype(np.float32)
NOT_ONNX = b"this is not an onnx model"
FAILURES = 'cellstream_model_load_failures_total{model="gru"}'


def place(repo: Path, relative: str, source: Path | bytes) -> Path:
    """Put a model.onnx at repo/relative in one rename (built aside first), as an operator should."""
    target = repo / relative / "model.onnx"
    aside = Path(tempfile.mkdtemp(dir=repo.parent))
    (aside / "model.onnx").write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    if relative.count("/"):  # a version directory: rename the whole directory into place
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        aside.rename(target.parent)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(aside / "model.onnx", target)
    return target


def repository(root: Path, **versions: Path | bytes) -> Path:
    """A repository holding model gru at the given versions (`v1=...`, or `unversioned=...`)."""
    for version, source in versions.items():
        place(root, "gru" if version == "unversioned" else f"gru/{version.removeprefix('v')}", source)
    (root / "DEFAULT").write_text("gru\n")
    return root


def serving(client: Client) -> dict[str, tuple[int, bool]]:
    """Each loaded gru version: its streams, and whether it takes new streams."""
    return {m.version: (m.streams, m.current) for m in client.list_models() if m.name == "gru"}


def polls_pass(repo: Path, client: Client, count: int = 2) -> None:
    """Wait for `count` more polls of the repository: each stages a new model and sees it served."""
    for _ in range(count):
        name = f"probe{sum(1 for m in client.list_models() if m.name.startswith('probe'))}"
        write_cell(repo.parent / name / "1")
        (repo.parent / name).rename(repo / name)
        wait_for(lambda name=name: any(m.name == name for m in client.list_models()))


def expected(model_dir: Path, steps: int) -> np.ndarray:
    return reference_sequence(model_dir, X[:steps])[0][-1]


def cannot_serve(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a server that refuses to start prints."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("cellstream: cannot serve: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def reloading(repo: Path, tmp: Path, *args: str) -> RunningServer:
    return start_server(tmp / "run", "--model-poll-interval", "0.05", *args, models=repo)


def test_model_onnx_beside_version_directories_stops_the_start_naming_what_to_move(tmp_path: Path) -> None:
    repo = repository(
        tmp_path / "repo", unversioned=MODELS / "gru" / "model.onnx", v2=MODELS / "gru2" / "model.onnx"
    )
    line = cannot_serve(serve_once(repo, tmp_path))
    assert f"{repo / 'gru'}: holds both model.onnx and version directories ['2']" in line
    assert f"move {repo / 'gru' / 'model.onnx'} into {repo / 'gru' / '1'}/ or delete it" in line
    assert not (tmp_path / "ready.json").exists()


def test_model_onnx_added_beside_versions_while_running_is_refused_once_and_the_version_stays(
    tmp_path: Path,
) -> None:
    repo = repository(tmp_path / "repo", v1=MODELS / "gru" / "model.onnx")
    server = reloading(repo, tmp_path)
    try:
        with server.client() as client:
            client.step("before", X[0])
            place(repo, "gru", MODELS / "gru2" / "model.onnx")  # gru/model.onnx beside gru/1/
            wait_for(lambda: "refused model gru:" in server.log())
            polls_pass(repo, client)
            assert server.log().count("refused model gru") == 1
            assert (
                f"move {repo / 'gru' / 'model.onnx'} into {repo / 'gru' / '2'}/ or delete it" in server.log()
            )
            assert sample(scrape(server), FAILURES) == 1
            assert serving(client) == {"1": (1, True)}
            np.testing.assert_allclose(
                client.step("before", X[1]).output, expected(MODELS / "gru", 2), atol=1e-5
            )
            np.testing.assert_allclose(
                client.step("after", X[0]).output, expected(MODELS / "gru", 1), atol=1e-5
            )

            # Doing what the message says is a new state of the directory: version 2 loads.
            (repo / "gru" / "2").mkdir()
            os.replace(repo / "gru" / "model.onnx", repo / "gru" / "2" / "model.onnx")
            wait_for(lambda: serving(client).get("2") == (0, True))
            np.testing.assert_allclose(
                client.step("new", X[0]).output, expected(MODELS / "gru2", 1), atol=1e-5
            )
        assert "Traceback" not in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_broken_newest_version_at_start_serves_the_one_before_logged_and_counted(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo", v1=MODELS / "gru" / "model.onnx", v2=NOT_ONNX)
    server = reloading(repo, tmp_path)
    try:
        with server.client() as client:
            assert serving(client) == {"1": (0, True)}
            np.testing.assert_allclose(client.step("s", X[0]).output, expected(MODELS / "gru", 1), atol=1e-5)
            polls_pass(repo, client)  # not retried while its files stay as they are
            log = server.log()
            assert log.count("refused model gru version 2") == 1
            assert (
                f"ERROR cellstream.versions: refused model gru version 2: {repo / 'gru' / '2' / 'model.onnx'}"
                in log
            )
            assert "onnxruntime cannot load it" in log and "(version 1 serves)" in log
            assert sample(scrape(server), FAILURES) == 1

            fixed = repo.parent / "fixed.onnx"
            fixed.write_bytes((MODELS / "gru2" / "model.onnx").read_bytes())
            os.replace(fixed, repo / "gru" / "2" / "model.onnx")  # fixed: a new state of its files
            wait_for(lambda: serving(client).get("2") == (0, True))
            np.testing.assert_allclose(client.step("t", X[0]).output, expected(MODELS / "gru2", 1), atol=1e-5)
    finally:
        assert server.stop() == 0, server.log()


def test_model_with_no_loadable_version_stops_the_start_with_the_reasons(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo", v1=NOT_ONNX, v2=NOT_ONNX)
    shutil.copytree(MODELS / "lstm", repo / "lstm")  # a good model beside it does not make it pass
    line = cannot_serve(serve_once(repo, tmp_path))
    assert "no version of model gru can be loaded" in line
    for version in ("2", "1"):
        assert f"{repo / 'gru' / version / 'model.onnx'}: onnxruntime cannot load it" in line
    assert not (tmp_path / "ready.json").exists()


def test_deleting_the_newest_version_rolls_back_new_streams_while_its_streams_stay(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo", v1=MODELS / "gru" / "model.onnx", v2=MODELS / "gru2" / "model.onnx")
    server = reloading(repo, tmp_path)
    try:
        with server.client() as client:
            assert serving(client) == {"2": (0, True)}  # only the newest is loaded at start
            client.step("old", X[0])
            (repo / "gru" / "2").rename(tmp_path / "removed")  # one rename: the version is gone at once
            wait_for(lambda: serving(client) == {"1": (0, True), "2": (1, False)})
            np.testing.assert_allclose(
                client.step("new", X[0]).output, expected(MODELS / "gru", 1), atol=1e-5
            )
            reply = client.step("old", X[1])  # still version 2, from memory: its files are gone
            assert reply.step == 2
            np.testing.assert_allclose(reply.output, expected(MODELS / "gru2", 2), atol=1e-5)
            polls_pass(repo, client)
            assert server.log().count("rolled back") == 1
            assert (
                "model gru version 2 is gone from disk: rolled back, version 1 takes new streams"
                in server.log()
            )

            client.step("old", X[2], end=True)
            wait_for(lambda: serving(client) == {"1": (1, True)})
        assert "unloaded model gru version 2" in server.log()
        assert "refused" not in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_roll_back_to_a_version_still_holding_streams_takes_it_back_from_memory(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo", v1=MODELS / "gru" / "model.onnx")
    server = reloading(repo, tmp_path)
    try:
        with server.client() as client:
            client.step("on-1", X[0])
            place(repo, "gru/2", MODELS / "gru2" / "model.onnx")
            wait_for(lambda: serving(client) == {"1": (1, False), "2": (0, True)})
            (repo / "gru" / "2").rename(tmp_path / "removed")
            wait_for(lambda: serving(client) == {"1": (1, True)})  # version 2, empty, is unloaded
            np.testing.assert_allclose(
                client.step("on-1", X[1]).output, expected(MODELS / "gru", 2), atol=1e-5
            )
            np.testing.assert_allclose(
                client.step("fresh", X[0]).output, expected(MODELS / "gru", 1), atol=1e-5
            )
        assert server.log().count("loaded model gru version 1 ") == 1  # taken back, not loaded again
    finally:
        assert server.stop() == 0, server.log()


def test_deleting_every_version_keeps_the_model_serving_from_memory_said_once(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo", v1=MODELS / "gru" / "model.onnx")
    server = reloading(repo, tmp_path)
    try:
        with server.client() as client:
            client.step("kept", X[0])
            (repo / "gru" / "1").rename(tmp_path / "removed")
            wait_for(lambda: "model gru version 1 is gone from disk" in server.log())
            polls_pass(repo, client)
            assert server.log().count("is gone from disk") == 1
            assert serving(client) == {"1": (1, True)}
            np.testing.assert_allclose(
                client.step("kept", X[1]).output, expected(MODELS / "gru", 2), atol=1e-5
            )
            np.testing.assert_allclose(
                client.step("late", X[0]).output, expected(MODELS / "gru", 1), atol=1e-5
            )
    finally:
        assert server.stop() == 0, server.log()


def check(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellstream", "models", "check", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_models_check_says_when_the_servers_max_batch_caps_the_configs(tmp_path: Path) -> None:
    model = write_cell(tmp_path / "big", config={"max_batch": 4096})
    capped = check(model)
    assert capped.returncode == 0, capped.stderr
    assert "max_batch 4096 in config.json is capped at the server's --max-batch 2048" in capped.stdout
    roomy = check(model, "--max-batch", "8192")
    assert roomy.returncode == 0, roomy.stderr
    assert "  max_batch 4096\n" in roomy.stdout and "capped" not in roomy.stdout


def test_models_check_refuses_a_model_onnx_beside_version_directories(tmp_path: Path) -> None:
    write_cell(tmp_path / "mine")
    write_cell(tmp_path / "mine" / "1")
    for path in (tmp_path / "mine", tmp_path / "mine" / "model.onnx"):
        result = check(path)
        assert result.returncode == 2
        assert f"move {tmp_path / 'mine' / 'model.onnx'} into {tmp_path / 'mine' / '2'}/ or delete it" in (
            result.stderr
        )


def test_server_logs_a_capped_config_max_batch_when_it_loads_the_model(tmp_path: Path) -> None:
    write_cell(tmp_path / "repo" / "big" / "1", config={"max_batch": 4096})
    server = start_server(tmp_path / "run", "--max-batch", "64", models=tmp_path / "repo")
    try:
        with server.client() as client:
            assert [m.max_batch for m in client.list_models()] == [64]
        assert (
            "WARNING cellstream.versions: loaded model big version 1 from "
            f"{tmp_path / 'repo' / 'big' / '1' / 'model.onnx'} (config.json max_batch 4096 is capped at "
            "the server's --max-batch 64)"
        ) in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_models_list_says_which_newer_version_would_be_passed_over(tmp_path: Path) -> None:
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from support import MODELS as BUNDLED  # noqa: PLC0415

    (tmp_path / "gru").mkdir()
    shutil.copytree(BUNDLED / "gru", tmp_path / "gru" / "1")
    (tmp_path / "gru" / "2").mkdir()
    (tmp_path / "gru" / "2" / "model.onnx").write_bytes(b"not an onnx file")
    result = subprocess.run(
        [sys.executable, "-m", "cellstream", "models", "list", "--models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "gru (default) version 1" in result.stdout
    assert "gru version 2 is not served" in result.stderr
