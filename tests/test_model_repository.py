"""A model repository's contents are untrusted: every bad file is a ModelLoadError that names it and
says what to change, and during hot reload one bad model never keeps the others from loading."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cellstream import metrics
from cellstream.batching.policy import BatchPolicy
from cellstream.client import Client
from cellstream.config import Settings
from cellstream.errors import ModelLoadError
from cellstream.model import CellModel, ModelRepository, find_model_file
from cellstream.model_config import CONFIG_KEYS
from cellstream.versions import Deployment
from reference import reference_sequence
from support import MODELS, start_server, wait_for
from test_model_contract import H, write_cell
from test_server import sample, scrape

BAD_INITIAL_STATE = {"initial_state": {"h": {"a": 1}}}
FIT = f"does not fit the state's shape [{H}]"
DEEP = 100_000  # far past Python's recursion limit


def config_error(tmp_path: Path, config: object) -> str:
    """The message CellModel gives for a good model beside this config.json (any JSON value)."""
    path = write_cell(tmp_path / "m")
    (path.parent / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        CellModel(path)
    return str(info.value)


def raw_config_error(tmp_path: Path, text: bytes) -> str:
    path = write_cell(tmp_path / "m")
    (path.parent / "config.json").write_bytes(text)
    with pytest.raises(ModelLoadError) as info:
        CellModel(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("value", "holds"),
    [
        ({"a": 1}, "an object"),
        ("0.5", "the string '0.5'"),
        (True, "true"),
        ([1.0, None, 2.0], "null"),
        ([[0.0], ["x"]], "the string 'x'"),
    ],
    ids=["object", "string", "bool", "null-in-list", "string-in-nested-list"],
)
def test_initial_state_that_is_not_numbers_is_refused_by_name(
    tmp_path: Path, value: object, holds: str
) -> None:
    message = config_error(tmp_path, {"initial_state": {"h": value}})
    assert "config.json" in message
    assert "initial_state 'h' must be a number or a nested list of numbers" in message
    assert f"holds {holds}" in message


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ([[1.0], [1.0, 2.0]], FIT),
        ([[[0.1, 0.2, 0.3]]], FIT),
        ([], FIT),
        (10**400, "beyond float32's range"),
        (1e39, "beyond float32's range"),
    ],
    ids=["ragged", "too-deep", "empty", "int-beyond-float", "beyond-float32"],
)
def test_initial_state_that_does_not_fit_the_state_is_refused(
    tmp_path: Path, value: object, says: str
) -> None:
    message = config_error(tmp_path, {"initial_state": {"h": value}})
    assert "config.json" in message and "initial_state 'h'" in message and says in message


def test_initial_state_nested_a_few_hundred_deep_is_refused(tmp_path: Path) -> None:
    message = raw_config_error(tmp_path, b'{"initial_state": {"h": ' + b"[" * 300 + b"0" + b"]" * 300 + b"}}")
    assert f"initial_state 'h' {FIT}" in message


def test_config_nested_past_the_recursion_limit_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    message = raw_config_error(tmp_path, b'{"initial_state": {"h": ' + b"[" * DEEP + b"]" * DEEP + b"}}")
    assert "config.json: JSON nested too deeply" in message


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"reading": 5}, "'reading' must be a string naming the model input"),
        ({"output": ["y"]}, "'output' must be a string naming the model output"),
        ({"states": ["h"]}, "'states' must be a map of each state input to its next-value output"),
        ({"states": {}}, "'states' must be a map of each state input to its next-value output"),
        ({"states": {}}, "not an empty object"),
        ({"states": {"h": 1}}, "'states' maps 'h' to the number 1: map it to the name of the output"),
        ({"states": {"h": "h_out", "x": "h_out"}}, "several states with output ['h_out']"),
        ({"initial_state": [0.0]}, "'initial_state' must be a map of state names to a number or a nested"),
        ({"max_batch": True}, "'max_batch' must be a positive integer"),
        ({"max_batch": 0}, "'max_batch' must be a positive integer"),
        ({"max_batch": 2.5}, "'max_batch' must be a positive integer"),
        ({"max_batch": "8"}, "'max_batch' must be a positive integer"),
        ({"version": False}, "'version' must be a non-empty string or an integer"),
        ({"version": 1.5}, "'version' must be a non-empty string or an integer"),
        ({"version": ""}, "'version' must be a non-empty string or an integer"),
        ({"version": {"major": 1}}, "'version' must be a non-empty string or an integer"),
        ({"description": 3}, "'description' must be a string"),
        ([1, 2], "expected a JSON object, not a list"),
    ],
)
def test_config_value_of_the_wrong_type_is_refused_naming_file_and_key(
    tmp_path: Path, config: object, says: str
) -> None:
    message = config_error(tmp_path, config)
    assert str(tmp_path / "m" / "config.json") in message and says in message


def test_integer_version_and_null_values_are_accepted(tmp_path: Path) -> None:
    config = {"version": 3, "description": "tiny", "reading": None, "max_batch": None}
    model = CellModel(write_cell(tmp_path / "m", config=config))
    assert (model.version, model.description, model.config_max_batch) == ("3", "tiny", None)


@pytest.mark.parametrize("key", sorted(CONFIG_KEYS))
def test_any_json_value_under_any_key_loads_or_is_refused_cleanly(tmp_path: Path, key: str) -> None:
    values: list[object] = [None, True, 0, -1, 1.5, 10**400, "", "x", "h_out", [], [1], {}, {"h": "h_out"}]
    values += [{"h": value} for value in values] + [[[[["deep"]]]]]
    path = write_cell(tmp_path / "m")
    for value in values:
        (tmp_path / "m" / "config.json").write_text(json.dumps({key: value}))
        try:
            CellModel(path)
        except ModelLoadError as exc:  # the only exception a bad value may raise
            assert str(path.parent) in str(exc) and "\n" not in str(exc)


def test_config_that_cannot_be_read_as_json_text_is_refused(tmp_path: Path) -> None:
    assert "not valid JSON" in raw_config_error(tmp_path / "a", b'{"version": ')
    assert "make it a readable UTF-8 file" in raw_config_error(tmp_path / "b", b'{"description": "\xff"}')
    path = write_cell(tmp_path / "c" / "m")
    (path.parent / "config.json").mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json: cannot read it"):
        CellModel(path)


def test_model_file_that_cannot_be_read_or_parsed_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir" / "model.onnx").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"model\.onnx: cannot read it"):
        CellModel(tmp_path / "dir" / "model.onnx")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.onnx").write_bytes(b"\x08\x96\x01 not a protobuf")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it") as info:
        CellModel(tmp_path / "junk" / "model.onnx")
    assert "\n" not in str(info.value)


def test_version_directory_of_non_ascii_digits_is_refused_with_the_rename(tmp_path: Path) -> None:
    write_cell(tmp_path / "repo" / "cell" / "²")
    assert "²".isdigit()  # what made int() fail before
    for attempt in (
        lambda: ModelRepository(tmp_path / "repo"),
        lambda: find_model_file(tmp_path / "repo" / "cell"),
    ):
        with pytest.raises(ModelLoadError) as info:
            attempt()
        message = str(info.value)
        assert str(tmp_path / "repo" / "cell") in message
        assert "['²'] are not named with the ASCII digits 0-9" in message and "rename" in message


def test_non_ascii_digit_directory_beside_real_versions_is_not_a_version(tmp_path: Path) -> None:
    for version in ("1", "٣", "²", "01"):
        write_cell(tmp_path / "repo" / "cell" / version)
    assert ModelRepository(tmp_path / "repo").models["cell"].version == "1"


def test_scan_reports_a_broken_directory_beside_the_good_ones(tmp_path: Path) -> None:
    write_cell(tmp_path / "repo" / "good" / "1")
    repository = ModelRepository(tmp_path / "repo")
    write_cell(tmp_path / "repo" / "odd" / "²")
    write_cell(tmp_path / "repo" / "bad", config=BAD_INITIAL_STATE)
    (tmp_path / "repo" / "docs").mkdir()  # not a model: skipped
    found = repository.scan()
    assert sorted(found) == ["bad", "good", "odd"]
    assert found["good"] == (tmp_path / "repo" / "good" / "1" / "model.onnx", "1")
    assert isinstance(found["odd"], ModelLoadError) and "'²'" in str(found["odd"])
    bad_path, bad_version = found["bad"]  # found; its config is refused when it is loaded
    with pytest.raises(ModelLoadError, match="initial_state 'h' must be a number"):
        repository.load("bad", bad_path, bad_version)


def test_default_file_that_is_not_text_is_refused(tmp_path: Path) -> None:
    write_cell(tmp_path / "repo" / "a")
    (tmp_path / "repo" / "DEFAULT").write_bytes(b"\xff\xfe")
    with pytest.raises(ModelLoadError, match=r"DEFAULT: cannot read it"):
        ModelRepository(tmp_path / "repo")


def test_reload_tries_each_model_on_its_own_whatever_one_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    write_cell(repo / "flaky" / "1")
    repository = ModelRepository(repo)
    deployment = Deployment(repository, Settings(), BatchPolicy())
    write_cell(repo / "flaky" / "2")
    write_cell(repo / "other" / "1")
    real_load = repository.load

    def load(name: str, path: Path, version: str | None) -> CellModel:
        if name == "flaky":
            raise RuntimeError("a bug, not a ModelLoadError")  # what no bad file can provoke now
        return real_load(name, path, version)

    monkeypatch.setattr(repository, "load", load)
    failures = ("cellstream_model_load_failures_total", {"model": "flaky"})
    before = metrics.REGISTRY.get_sample_value(*failures) or 0.0

    async def poll_three_times() -> None:
        for _ in range(3):
            await deployment.reload()
        await deployment.stop()

    with caplog.at_level(logging.ERROR, logger="cellstream.versions"):
        asyncio.run(poll_three_times())
    assert {name: b.model.version for name, b in deployment.current.items()} == {"flaky": "1", "other": "1"}
    refused = [r for r in caplog.records if r.getMessage().startswith("refused model flaky version 2")]
    assert len(refused) == 1 and refused[0].exc_info is not None  # once, with the bug's traceback
    assert metrics.REGISTRY.get_sample_value(*failures) == before + 1


def stage(repo: Path, relative: str, build: Path) -> None:
    """Move a directory built aside into the repository in one rename, as an operator should."""
    target = repo / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    build.rename(target)


def listed(client: Client) -> dict[str, set[str]]:
    """Each served model's loaded versions, as ListModels reports them."""
    models: dict[str, set[str]] = {}
    for info in client.list_models():
        models.setdefault(info.name, set()).add(info.version)
    return models


def test_broken_models_never_block_a_good_new_version_and_load_once_fixed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "gru" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "gru" / "model.onnx", repo / "gru" / "1" / "model.onnx")
    server = start_server(tmp_path / "run", "--model-poll-interval", "0.05", models=repo)
    aside = tmp_path / "aside"
    try:
        with server.client() as client:
            write_cell(aside / "broken" / "1", config=BAD_INITIAL_STATE)
            stage(repo, "broken", aside / "broken")
            write_cell(aside / "odd" / "²")
            stage(repo, "odd", aside / "odd")
            (aside / "zz" / "2").mkdir(parents=True)
            shutil.copy(MODELS / "gru" / "model.onnx", aside / "zz" / "2" / "model.onnx")
            stage(repo, "zz", aside / "zz")  # sorts after both broken ones: tried in the same poll

            wait_for(lambda: listed(client).get("zz") == {"2"}, timeout=20)
            reply = client.step("s", np.ones(8, np.float32), model="zz")
            expected, _ = reference_sequence(MODELS / "gru", np.ones((1, 8), np.float32))
            np.testing.assert_allclose(reply.output, expected[0], atol=1e-5)
            assert sorted(listed(client)) == ["gru", "zz"]
            assert "refused model broken version 1" in server.log()
            assert "'²'] are not named with the ASCII digits" in server.log()

            # Later polls pass over the unchanged broken models without logging or counting again.
            (aside / "3").mkdir(parents=True)
            shutil.copy(MODELS / "gru" / "model.onnx", aside / "3" / "model.onnx")
            stage(repo, "zz/3", aside / "3")
            wait_for(lambda: "3" in listed(client)["zz"], timeout=20)  # (2 keeps stream "s")
            assert server.log().count("refused model broken") == 1
            assert server.log().count("refused model odd") == 1
            metrics = scrape(server)
            assert sample(metrics, 'cellstream_model_load_failures_total{model="broken"}') == 1
            assert sample(metrics, 'cellstream_model_load_failures_total{model="odd"}') == 1

            # Fixing the config alone (model.onnx untouched) is a new state of the files: retried.
            fixed = aside / "config.json"
            fixed.write_text(json.dumps({"initial_state": {"h": 0.25}}))
            os.replace(fixed, repo / "broken" / "1" / "config.json")
            wait_for(lambda: listed(client).get("broken") == {"1"}, timeout=20)
            assert client.step("b", np.zeros(4, np.float32), model="broken").step == 1
        assert "Traceback" not in server.log()
    finally:
        assert server.stop() == 0, server.log()


def serve_once(repo: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cellstream",
            "serve",
            "--models",
            str(repo),
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            "--ready-file",
            str(tmp_path / "ready.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")},
    )


def bad_config_repo(repo: Path) -> str:
    write_cell(repo / "cell", config=BAD_INITIAL_STATE)
    return f"{repo / 'cell' / 'config.json'}: initial_state 'h' must be a number or a nested list"


def non_ascii_version_repo(repo: Path) -> str:
    write_cell(repo / "cell" / "²")
    return f"{repo / 'cell'}: version directories ['²'] are not named with the ASCII digits"


def deep_config_repo(repo: Path) -> str:
    write_cell(repo / "cell")
    (repo / "cell" / "config.json").write_text('{"states": ' + "[" * DEEP + "]" * DEEP + "}")
    return f"{repo / 'cell' / 'config.json'}: JSON nested too deeply"


@pytest.mark.parametrize("build", [bad_config_repo, non_ascii_version_repo, deep_config_repo])
def test_server_on_a_bad_repository_exits_2_with_one_line_and_no_traceback(
    tmp_path: Path, build: Callable[[Path], str]
) -> None:
    write_cell(tmp_path / "repo" / "good")  # the good model beside it does not make the bad one pass
    says = build(tmp_path / "repo")
    result = serve_once(tmp_path / "repo", tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("cellstream: cannot serve: ")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert not (tmp_path / "ready.json").exists()
