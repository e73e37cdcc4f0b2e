"""Tokens on the client side: `token=` on Client, AsyncClient and Stepper, `--token`,
`--token-file` and their variables on the commands, and `cellstream auth new-token | hash`,
against a real server started with `--auth-file`.

The auth file is written here with hashlib, not with the code under test; numbers are checked
against the ONNX sequence-operator reference (and onnxruntime stepping the demo model directly).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.client import (
    AsyncClient,
    Client,
    NotFound,
    PermissionDenied,
    Stepper,
    Unauthenticated,
)
from reference import reference_sequence
from support import MODELS, RunningServer, start_server
from test_demo import DEMO, readings, step_through

TOKEN = "acme-" + uuid.uuid4().hex  # what an operator gave the tenant
DEMO_ONLY = "demo-only-" + uuid.uuid4().hex  # a tenant limited to the demo model
X = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32)
TOLERANCE = 1e-5
LINE = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_line(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("client-auth")
    auth = tmp / "auth.json"
    tenants = {
        "acme": {"tokens": [sha256_line(TOKEN)]},
        "small": {"tokens": [sha256_line(DEMO_ONLY)], "models": ["demo"]},
    }
    auth.write_text(json.dumps({"tenants": tenants}))
    running = start_server(tmp, "--auth-file", str(auth))
    yield running
    assert running.stop() == 0, running.log()


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m cellstream ARGS` with no CELLSTREAM_* variables but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "cellstream", *args],
        env={**clean, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(stderr: str) -> str:
    """A command's failure as its user sees it: one line, no traceback."""
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert "Traceback" not in stderr
    return stderr


# --- cellstream auth ----------------------------------------------------------------------------


def test_new_token_prints_a_random_token_and_the_sha256_line_of_its_utf8_bytes() -> None:
    made = [cli("auth", "new-token") for _ in range(2)]
    tokens = []
    for result in made:
        assert result.returncode == 0, result.stderr
        match = re.fullmatch(r"token:  (\S+)\nsha256: (sha256:[0-9a-f]{64})\n", result.stdout)
        assert match is not None, result.stdout
        token, line = match.groups()
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # secrets.token_urlsafe(32): 256 bits
        assert line == sha256_line(token)
        hint = one_line(result.stderr)
        assert "client" in hint and "--auth-file" in hint and token not in hint
        tokens.append(token)
    assert tokens[0] != tokens[1]


def test_auth_hash_prints_the_line_of_the_token_on_the_first_line_of_stdin() -> None:
    for given in ("rotated-token\n", "rotated-token\r\n", "rotated-token", "  rotated-token \nsecond line\n"):
        result = cli("auth", "hash", stdin=given)
        assert (result.returncode, result.stdout) == (0, sha256_line("rotated-token") + "\n"), result.stderr


def test_auth_hash_refuses_no_token_and_one_no_client_could_send() -> None:
    empty = cli("auth", "hash", stdin="")
    assert empty.returncode == 2 and "no token on stdin" in one_line(empty.stderr)
    bad = cli("auth", "hash", stdin="tök\n")
    assert bad.returncode == 2 and "non-ASCII character (character 2)" in one_line(bad.stderr)
    assert "tök" not in bad.stderr and bad.stdout == ""


# --- Tokens refused before anything is sent -----------------------------------------------------

BAD_TOKENS = [
    ("", "the token is empty"),
    ("secret\n", "line break (character 7)"),
    ("sec\r\nret", "line break (character 4)"),
    ("sécret", "non-ASCII character (character 2)"),
    ("sec\tret", "control character (character 4)"),
    (" secret", "begins or ends with whitespace"),
    ("secret ", "begins or ends with whitespace"),
    ("s" * 4097, "longer than 4096 characters"),
]


@pytest.mark.parametrize(("token", "problem"), BAD_TOKENS, ids=[p for _, p in BAD_TOKENS])
def test_a_token_that_cannot_be_a_header_value_is_refused_when_the_client_is_made(
    token: str, problem: str
) -> None:
    async def make_async() -> None:
        AsyncClient("127.0.0.1:1", token=token)

    async def make_stepper() -> None:
        Stepper("127.0.0.1:1", model="gru", token=token)

    for make in (lambda: Client("127.0.0.1:1", token=token), lambda: asyncio.run(make_async())):
        with pytest.raises(ValueError, match=re.escape(problem)) as info:
            make()
        assert token.strip() == "" or token.strip() not in str(info.value)
    with pytest.raises(ValueError, match=re.escape(problem)):
        asyncio.run(make_stepper())


def test_a_stepper_given_a_client_takes_no_token_of_its_own() -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1:1", token=TOKEN) as client:
            with pytest.raises(ValueError, match="token is for an address"):
                Stepper(client, token=TOKEN)

    asyncio.run(main())


def test_repr_never_shows_the_token() -> None:
    with Client("127.0.0.1:1", token=TOKEN) as client:
        assert TOKEN not in repr(client) and "<hidden>" in repr(client)
        assert TOKEN not in repr(client._channel)  # the object that holds it

    async def main() -> None:
        async with AsyncClient("127.0.0.1:1", token=TOKEN) as client:
            assert TOKEN not in repr(client) and "<hidden>" in repr(client)
            stepper = Stepper(client)
            assert TOKEN not in repr(stepper) and "<hidden>" in repr(stepper)

    asyncio.run(main())
    with Client("127.0.0.1:1") as plain:
        assert "token=None" in repr(plain)


# --- Client, AsyncClient and Stepper against a server with --auth-file --------------------------


def test_a_client_with_the_token_steps_a_stream_in_every_call_shape(
    server: RunningServer, tmp_path: Path
) -> None:
    stream = unique("auth-client")
    expected, states = reference_sequence(MODELS / "gru", X)
    with Client(server.address, token=TOKEN) as client:
        assert client.health()
        assert {m.name for m in client.list_models()} >= {"gru", "demo"}
        first = client.step(stream, X[0], model="gru")  # unary
        streamed = [r.raise_for_error() for r in client.step_stream([(stream, X[1]), (stream, X[2])])]
        batch = client.step_batch([stream], X[3:4], model="gru")
        assert [first.step, *(r.step for r in streamed), int(batch.steps[0])] == [1, 2, 3, 4]
        outputs = np.array([first.output, *(r.output for r in streamed), batch.outputs[0]])
        np.testing.assert_allclose(outputs, expected, atol=TOLERANCE)
        np.testing.assert_allclose(client.get_state(stream).state["h"], states[3]["h"], atol=TOLERANCE)
        path = tmp_path / "acme.csnap"
        assert client.export_states(path, ["gru"]) == path.stat().st_size  # server streaming
        assert client.delete(stream) is True
        restored, dropped = client.import_states(path)  # client streaming
        assert restored >= 1 and dropped == 0
        assert client.get_state(stream).step == 4


def test_a_resuming_client_sends_the_token_on_its_lookups_and_retries(server: RunningServer) -> None:
    stream = unique("auth-resume")
    expected, _ = reference_sequence(MODELS / "gru", X)
    with Client(server.address, token=TOKEN) as client:
        client.step(stream, X[0], model="gru")
    with Client(server.address, token=TOKEN, resume=True) as resuming:
        # Its first step asks the server where the stream is (GetState), then numbers the readings.
        replies = [resuming.step(stream, x, model="gru") for x in X[1:]]
    assert [r.step for r in replies] == [2, 3, 4]
    np.testing.assert_allclose(np.array([r.output for r in replies]), expected[1:], atol=TOLERANCE)


def test_a_stub_made_later_on_the_clients_channel_sends_the_token_too(server: RunningServer) -> None:
    with Client(server.address, token=TOKEN) as client:
        stub = pb_grpc.CellStreamStub(client._channel)  # type: ignore[no-untyped-call]  # a user's own stub
        listed, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=10)
        assert call.code() == grpc.StatusCode.OK and {m.name for m in listed.models} >= {"gru"}
        later = stub.ListModels.future(pb.ListModelsRequest(), timeout=10).result()
        assert {m.name for m in later.models} == {m.name for m in listed.models}


@pytest.mark.parametrize("token", [None, "not-" + TOKEN], ids=["no-token", "wrong-token"])
def test_a_call_without_the_right_token_is_unauthenticated(server: RunningServer, token: str | None) -> None:
    stream = unique("auth-refused")
    with Client(server.address, token=token) as client:
        for call in (
            lambda: client.step(stream, X[0], model="gru"),
            lambda: list(client.step_stream([(stream, X[0])])),
            client.list_models,
        ):
            with pytest.raises(Unauthenticated) as info:
                call()
            assert "token" in info.value.message
        assert client.health()  # grpc.health.v1 needs no token
    with Client(server.address, token=TOKEN) as client, pytest.raises(NotFound):
        client.get_state(stream)  # nothing of the refused calls was applied


def test_a_model_the_tenant_may_not_use_is_permission_denied(server: RunningServer) -> None:
    with Client(server.address, token=DEMO_ONLY) as client:
        with pytest.raises(PermissionDenied, match="'gru'"):
            client.step(unique("auth-denied"), X[0], model="gru")
        assert client.step(unique("auth-demo"), [315.7], model="demo").step == 1


def test_the_async_client_and_the_stepper_send_the_token(server: RunningServer) -> None:
    stream = unique("auth-async")
    expected, _ = reference_sequence(MODELS / "gru", X)

    async def main() -> list[np.ndarray]:
        async with AsyncClient(server.address, token=TOKEN) as client:
            outputs = [(await client.step(stream, X[0], model="gru")).output]
            outputs += [r.output async for r in client.step_stream([(stream, X[1])])]
            outputs.append((await client.step_batch([stream], X[2:3], model="gru")).outputs[0])
        async with Stepper(server.address, model="gru", token=TOKEN) as stepper:
            outputs.append((await stepper.step(stream, X[3])).output)
        async with AsyncClient(server.address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.step(stream, X[0], model="gru")
            with pytest.raises(Unauthenticated):
                await Stepper(anonymous, model="gru").step(stream, X[0])
        return outputs

    np.testing.assert_allclose(np.array(asyncio.run(main())), expected, atol=TOLERANCE)


# --- The commands -------------------------------------------------------------------------------


def test_replay_takes_the_token_from_the_flag_the_file_or_the_variables(
    server: RunningServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    ways = {
        "flag": (["--token", TOKEN], {}),
        "file": (["--token-file", str(token_file)], {}),
        "variable": ([], {"CELLSTREAM_TOKEN": TOKEN}),
        "file-variable": ([], {"CELLSTREAM_TOKEN_FILE": str(token_file)}),
    }
    expected = step_through(readings()[:20].astype(np.float64))
    for way, (flags, env) in ways.items():
        csv_path = tmp_path / f"auth-replay-{way}.csv"  # the stream is named after the file
        csv_path.write_text("".join((DEMO / "co2_weekly.csv").read_text().splitlines(keepends=True)[:21]))
        out = tmp_path / f"{way}-out.csv"
        args = ["replay", str(csv_path), "--address", server.address, "--model", "demo", "--no-progress"]
        result = cli(*args, "--out", str(out), *flags, env=env)
        assert result.returncode == 0, (way, result.stderr)
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        got = np.array([[float(row["output_0"]), float(row["output_1"])] for row in rows])
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_replay_without_a_token_fails_with_one_line(server: RunningServer, tmp_path: Path) -> None:
    result = cli("replay", str(DEMO / "co2_weekly.csv"), "--address", server.address, "--no-progress")
    assert result.returncode != 0
    assert "UNAUTHENTICATED" in one_line(result.stderr)


def test_state_export_and_import_take_the_token(server: RunningServer, tmp_path: Path) -> None:
    stream = unique("auth-state")
    with Client(server.address, token=TOKEN) as client:
        client.step(stream, X[0], model="gru")
    out = tmp_path / "states.csnap"
    address = ["--address", server.address]
    exported = cli("state", "export", *address, "--out", str(out), "--model", "gru", "--token", TOKEN)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == f"wrote {out.stat().st_size} bytes to {out}\n"
    again = cli(
        "state", "export", *address, "--out", str(out), "--model", "gru", env={"CELLSTREAM_TOKEN": TOKEN}
    )
    assert again.returncode == 0, again.stderr
    with Client(server.address, token=TOKEN) as client:
        client.delete(stream)
    imported = cli("state", "import", str(out), *address, env={"CELLSTREAM_TOKEN": TOKEN})
    assert imported.returncode == 0 and imported.stdout.startswith("restored "), imported.stderr
    with Client(server.address, token=TOKEN) as client:
        assert client.get_state(stream).step == 1

    for command in (["state", "export", "--out", str(tmp_path / "no.csnap")], ["state", "import", str(out)]):
        refused = cli(*command, *address)
        assert refused.returncode == 1
        line = one_line(refused.stderr)
        assert line.startswith(f"cellstream {' '.join(command[:2])}: {server.address}: UNAUTHENTICATED: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["states.csnap"]  # no partial file left


def test_health_takes_and_sends_a_token_it_does_not_need(server: RunningServer) -> None:
    for flags in ([], ["--token", TOKEN]):
        result = cli("health", "--address", server.address, *flags)
        assert (result.returncode, result.stdout) == (0, "SERVING\n"), result.stderr


def test_token_options_that_cannot_be_used_are_refused_with_one_line(tmp_path: Path) -> None:
    address = ["--address", "127.0.0.1:1"]  # nothing is sent: each is refused first
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (
            (*address, "--token", TOKEN, "--token-file", str(token_file)),
            {},
            "give --token or --token-file, not both",
        ),
        (
            address,
            {"CELLSTREAM_TOKEN": TOKEN, "CELLSTREAM_TOKEN_FILE": str(token_file)},
            "give CELLSTREAM_TOKEN or",
        ),
        ((*address, "--token-file", str(missing)), {}, f"token file '{missing}': no such file"),
        ((*address, "--token-file", str(empty)), {}, f"token file '{empty}': the first line is empty"),
        (
            (*address, "--token", "tö" + TOKEN),
            {},
            "--token: the token holds a non-ASCII character (character 2)",
        ),
        (address, {"CELLSTREAM_TOKEN": TOKEN + "\n"}, "CELLSTREAM_TOKEN: the token holds a line break"),
    ]
    for args, env, message in cases:
        for command in (["health"], ["state", "export", "--out", str(tmp_path / "x.csnap")]):
            result = cli(*command, *args, env=env)
            assert result.returncode == 2, (args, result.stderr)
            assert message in one_line(result.stderr) and TOKEN not in result.stderr
