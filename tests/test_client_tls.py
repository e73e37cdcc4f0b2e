"""The client side of TLS: `Client`, `AsyncClient` and the CLI's `--tls-*` flags against a real
TLS (and mTLS) server. Certificates are made here, at test time, by throwaway CAs (trustme)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trustme

from cellstream.client import TLS, AsyncClient, Client, Unavailable
from support import RunningServer, start_server
from test_tls import server_cert, started, write_ca, write_pair

READING = np.zeros(8)  # the bundled gru takes 8 values a reading


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory, server_ca: trustme.CA) -> Path:
    return write_ca(server_ca, tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, server_ca: trustme.CA) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("client-tls")
    running = start_server(tmp, *write_pair(server_cert(server_ca), tmp / "certs").flags())
    yield running
    assert running.stop() == 0, running.log()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cellstream ARGS` with no CELLSTREAM_* variables from outside."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "cellstream", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_client_trusting_the_ca_steps_a_stream(tls_server: RunningServer, ca_file: Path) -> None:
    with Client(tls_server.address, tls=TLS(ca=ca_file)) as client:
        assert client.step("client-tls-a", READING, model="gru").step == 1


def test_an_async_client_trusting_the_ca_steps_a_stream(tls_server: RunningServer, ca_file: Path) -> None:
    async def main() -> int:
        async with AsyncClient(tls_server.address, tls=TLS(ca=ca_file)) as client:
            return (await client.step("client-tls-async", READING, model="gru")).step

    assert asyncio.run(main()) == 1


def test_a_server_name_override_checks_the_name_the_certificate_has(
    tls_server: RunningServer, ca_file: Path
) -> None:
    port = tls_server.address.rpartition(":")[2]
    with Client(f"127.0.0.1:{port}", tls=TLS(ca=ca_file, server_name="localhost")) as client:
        assert client.health()


def test_mtls_takes_the_client_certificate_and_refuses_without_one(
    tmp_path: Path, server_ca: trustme.CA, ca_file: Path
) -> None:
    clients = trustme.CA()
    pair = write_pair(server_cert(server_ca), tmp_path / "certs")
    client_ca = write_ca(clients, tmp_path / "certs" / "clients.pem")
    member = write_pair(clients.issue_cert("member@example.org"), tmp_path / "member", name="member")
    with started(tmp_path / "run", *pair.flags(), "--tls-client-ca", str(client_ca)) as running:
        with Client(running.address, tls=TLS(ca_file, member.cert, member.key)) as client:
            assert client.step("client-mtls", READING, model="gru").step == 1
        with Client(running.address, tls=TLS(ca=ca_file), timeout=5) as client, pytest.raises(Unavailable):
            client.health()


def test_bad_files_are_refused_before_connecting_naming_the_file(tmp_path: Path, ca_file: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=f"TLS ca '{missing}': no such file"):
        Client("127.0.0.1:1", tls=TLS(ca=missing))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(ValueError, match=f"TLS ca '{not_pem}': holds no PEM certificate"):
        AsyncClient("127.0.0.1:1", tls=TLS(ca=not_pem))
    with pytest.raises(ValueError, match="both cert and key"):
        TLS(ca=ca_file, cert=ca_file)


def test_cellstream_health_over_tls(tls_server: RunningServer, ca_file: Path) -> None:
    ok = cli("health", "--address", tls_server.address, "--tls-ca", str(ca_file))
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    plain = cli("health", "--address", tls_server.address)
    assert plain.returncode != 0
    assert "Traceback" not in plain.stderr


def test_cellstream_health_says_which_file_is_missing(tmp_path: Path, tls_server: RunningServer) -> None:
    missing = tmp_path / "missing.pem"
    result = cli("health", "--address", tls_server.address, "--tls-ca", str(missing))
    assert result.returncode == 2
    assert result.stderr == f"cellstream health: TLS ca '{missing}': no such file\n"


def test_cellstream_state_export_over_tls(tmp_path: Path, tls_server: RunningServer, ca_file: Path) -> None:
    with Client(tls_server.address, tls=TLS(ca=ca_file)) as client:
        client.step("client-tls-export", READING, model="gru")
    out = tmp_path / "states.snap"
    flags = ["--address", tls_server.address, "--tls-ca", str(ca_file)]
    result = cli("state", "export", *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
    assert f"wrote {out.stat().st_size} bytes to {out}" in result.stdout


def test_cellstream_health_checks_the_name_given_by_tls_server_name(
    tls_server: RunningServer, ca_file: Path
) -> None:
    port = tls_server.address.rpartition(":")[2]
    named = cli(
        "health", "--address", f"127.0.0.1:{port}", "--tls-ca", str(ca_file), "--tls-server-name", "localhost"
    )
    assert named.returncode == 0, named.stderr
    other = cli(
        "health",
        "--address",
        f"127.0.0.1:{port}",
        "--tls-ca",
        str(ca_file),
        "--tls-server-name",
        "elsewhere.test",
    )
    assert other.returncode != 0
