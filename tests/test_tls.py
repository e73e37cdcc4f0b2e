"""TLS on the gRPC port, mTLS, certificates replaced on disk while serving, https for /metrics, the
warning for a plaintext server other machines can reach, and TLS settings that say no.

Every certificate is made here, at test time, by throwaway CAs (trustme); none is committed.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream._proto.cellstream.v1.cellstream_pb2_grpc import CellStreamStub
from cellstream.client import step_request
from support import MODELS, RunningServer, start_server, wait_for
from test_settings import assert_refused, serve

# A fresh connection per channel: channels with equal arguments could otherwise share one that
# was made before the certificate changed.
FRESH = [("grpc.use_local_subchannel_pool", 1)]
NEW_FILES_TAKEN = "gRPC TLS: new connections use the new files"
NEW_FILES_REFUSED = "gRPC TLS: the new files are not used"
EXPOSED = "is plaintext with no auth and reachable from other machines"


@dataclass
class Pair:
    """A certificate (chain) and its key, as files."""

    cert: Path
    key: Path

    def flags(self, prefix: str = "--tls") -> list[str]:
        return [f"{prefix}-cert", str(self.cert), f"{prefix}-key", str(self.key)]


def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


def write_pair(leaf: trustme.LeafCert, directory: Path, name: str = "server") -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    leaf.private_key_pem.write_to_path(pair.key)
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return pair


def replace_pair(leaf: trustme.LeafCert, pair: Pair) -> None:
    """Swap in a new pair the way a deploy tool does: write beside, then rename over."""
    staged = write_pair(leaf, pair.cert.parent / "staged")
    os.replace(staged.key, pair.key)
    os.replace(staged.cert, pair.cert)


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(path)
    return path


def channel(address: str, trusted: trustme.CA, client: trustme.LeafCert | None = None) -> grpc.Channel:
    """A TLS channel trusting only `trusted`, showing `client`'s certificate when given."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted.cert_pem.bytes(),
        private_key=None if client is None else client.private_key_pem.bytes(),
        certificate_chain=None if client is None else client.cert_chain_pems[0].bytes(),
    )
    return grpc.secure_channel(address, credentials, options=FRESH)


def health_code(ch: grpc.Channel) -> grpc.StatusCode:
    """OK when a health check gets through, else the status of the failed call."""
    with ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def step_over(ch: grpc.Channel, stream_id: str) -> int:
    """One Step of the bundled gru (8 values a reading) over the channel; the stream's step count."""
    with ch:
        return step_over_open(ch, stream_id)


def step_over_open(ch: grpc.Channel, stream_id: str) -> int:
    """The same on a channel the caller keeps open (and closes)."""
    reply = CellStreamStub(ch).Step(step_request(stream_id, np.zeros(8), model="gru"), timeout=10)
    assert len(reply.output) > 0
    return int(reply.step)


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, server_ca: trustme.CA) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("tls")
    running = start_server(tmp, *write_pair(server_cert(server_ca), tmp / "certs").flags())
    yield running
    assert running.stop() == 0, running.log()


@contextmanager
def started(tmp: Path, *args: str, address: str = "127.0.0.1:0") -> Iterator[RunningServer]:
    running = start_server(tmp, *args, address=address)
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log()


def ready_info(running: RunningServer) -> dict[str, object]:
    info: dict[str, object] = json.loads((running.log_path.parent / "ready.json").read_text())
    return info


# --- TLS ---------------------------------------------------------------------------------------


def test_a_tls_client_trusting_the_ca_steps_a_stream(
    tls_server: RunningServer, server_ca: trustme.CA
) -> None:
    assert step_over(channel(tls_server.address, server_ca), "tls-a") == 1
    assert step_over(channel(tls_server.address, server_ca), "tls-a") == 2


def test_a_plaintext_client_is_refused_on_a_tls_port(tls_server: RunningServer) -> None:
    with (
        grpc.insecure_channel(tls_server.address, options=FRESH) as plain,
        pytest.raises(grpc.RpcError) as info,
    ):
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_is_refused(tls_server: RunningServer) -> None:
    assert health_code(channel(tls_server.address, trustme.CA())) == grpc.StatusCode.UNAVAILABLE


def test_the_ready_file_and_the_log_say_tls_is_on(tls_server: RunningServer) -> None:
    assert ready_info(tls_server) | {"pid": 0} == {
        "address": tls_server.address,
        "metrics_address": tls_server.metrics_address,
        "pid": 0,
        "tls": True,
        "mtls": False,
        "metrics_tls": False,
        "auth": False,
    }
    assert f"on {tls_server.address} (TLS; metrics http://" in tls_server.log()
    assert EXPOSED not in tls_server.log()


# --- mTLS --------------------------------------------------------------------------------------


def test_mtls_takes_only_client_certificates_of_its_ca(tmp_path: Path, server_ca: trustme.CA) -> None:
    clients = trustme.CA()
    pair = write_pair(server_cert(server_ca), tmp_path / "certs")
    client_ca = write_ca(clients, tmp_path / "certs" / "clients.pem")
    with started(tmp_path / "run", *pair.flags(), "--tls-client-ca", str(client_ca)) as running:
        assert health_code(channel(running.address, server_ca)) == grpc.StatusCode.UNAVAILABLE
        stranger = trustme.CA().issue_cert("stranger@example.org")
        assert health_code(channel(running.address, server_ca, stranger)) == grpc.StatusCode.UNAVAILABLE
        member = clients.issue_cert("member@example.org")
        assert step_over(channel(running.address, server_ca, member), "mtls-a") == 1
        assert (ready_info(running)["tls"], ready_info(running)["mtls"]) == (True, True)
        assert f"on {running.address} (mTLS; metrics" in running.log()


def test_a_replaced_client_ca_decides_new_connections(tmp_path: Path, server_ca: trustme.CA) -> None:
    old_clients, new_clients = trustme.CA(), trustme.CA()
    pair = write_pair(server_cert(server_ca), tmp_path / "certs")
    client_ca = write_ca(old_clients, tmp_path / "certs" / "clients.pem")
    old_member, new_member = (
        old_clients.issue_cert("old@example.org"),
        new_clients.issue_cert("new@example.org"),
    )
    with started(tmp_path / "run", *pair.flags(), "--tls-client-ca", str(client_ca)) as running:
        assert health_code(channel(running.address, server_ca, old_member)) == grpc.StatusCode.OK
        write_ca(new_clients, tmp_path / "certs" / "staged.pem").replace(client_ca)
        wait_for(lambda: health_code(channel(running.address, server_ca, new_member)) == grpc.StatusCode.OK)
        assert health_code(channel(running.address, server_ca, old_member)) == grpc.StatusCode.UNAVAILABLE


# --- rotation ----------------------------------------------------------------------------------


def test_a_replaced_pair_is_taken_for_new_connections_without_a_restart(
    tmp_path: Path, server_ca: trustme.CA
) -> None:
    pair = write_pair(server_cert(server_ca), tmp_path / "certs")
    with started(tmp_path / "run", *pair.flags()) as running:
        kept = channel(running.address, server_ca)  # a connection made before the change
        assert step_over_open(kept, "rotate-kept") == 1
        new_ca = trustme.CA()
        replace_pair(server_cert(new_ca), pair)
        wait_for(lambda: health_code(channel(running.address, new_ca)) == grpc.StatusCode.OK, timeout=10)
        assert health_code(channel(running.address, server_ca)) == grpc.StatusCode.UNAVAILABLE
        assert step_over_open(kept, "rotate-kept") == 2  # open connections keep their session
        kept.close()
        assert running.log().count(NEW_FILES_TAKEN) == 1
        assert NEW_FILES_REFUSED not in running.log()


def test_a_broken_new_pair_keeps_the_old_one_and_says_why_once(tmp_path: Path, server_ca: trustme.CA) -> None:
    pair = write_pair(server_cert(server_ca), tmp_path / "certs")
    with started(tmp_path / "run", *pair.flags()) as running:
        # Another certificate's key, written in place over the key file: it does not match.
        server_cert(server_ca).private_key_pem.write_to_path(pair.key)
        for _ in range(3):  # each new connection asks; the old pair answers every one
            assert health_code(channel(running.address, server_ca)) == grpc.StatusCode.OK
        why = f"{pair.key}: is not the key of the certificate in {pair.cert}"
        assert wait_for(lambda: why in running.log())
        assert running.log().count(NEW_FILES_REFUSED) == 1
        # Another broken state is news: said once more.
        pair.cert.write_text("not a certificate\n")
        assert health_code(channel(running.address, server_ca)) == grpc.StatusCode.OK
        assert health_code(channel(running.address, server_ca)) == grpc.StatusCode.OK
        assert wait_for(lambda: running.log().count(NEW_FILES_REFUSED) == 2)
        assert "holds no PEM certificate" in running.log()
        # A good pair at last is taken.
        new_ca = trustme.CA()
        replace_pair(server_cert(new_ca), pair)
        wait_for(lambda: health_code(channel(running.address, new_ca)) == grpc.StatusCode.OK, timeout=10)
        assert running.log().count(NEW_FILES_TAKEN) == 1
        assert running.log().count(NEW_FILES_REFUSED) == 2
        assert "Traceback" not in running.log()


# --- metrics over https ------------------------------------------------------------------------


def test_metrics_over_https_with_the_ca(tmp_path: Path, server_ca: trustme.CA) -> None:
    pair = write_pair(server_cert(server_ca), tmp_path / "certs", name="metrics")
    trusted = ssl.create_default_context(cadata=server_ca.cert_pem.bytes().decode())
    with started(tmp_path / "run", *pair.flags("--metrics-tls")) as running:
        url = f"https://{running.metrics_address}/metrics"
        host, port = running.metrics_address.rsplit(":", 1)
        stalled = socket.create_connection((host, int(port)))  # connects, never says hello
        with urllib.request.urlopen(url, context=trusted, timeout=5) as response:  # ... and holds no one up
            assert response.status == 200
        stalled.close()
        with urllib.request.urlopen(url, context=trusted, timeout=5) as response:
            assert "cellstream_" in response.read().decode()
        with pytest.raises(urllib.error.URLError):  # (ssl.SSLCertVerificationError inside)
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=5)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain http to an https port
            urllib.request.urlopen(f"http://{running.metrics_address}/metrics", timeout=5)
        with urllib.request.urlopen(url, context=trusted, timeout=5) as response:  # still serving
            assert response.status == 200
        assert f"metrics https://{running.metrics_address}/metrics" in running.log()
        assert ready_info(running)["metrics_tls"] is True
        assert "Traceback" not in running.log()


# --- the warning for an exposed plaintext server ----------------------------------------------


def test_a_plaintext_server_on_all_interfaces_warns_what_to_add(tmp_path: Path) -> None:
    with started(tmp_path, address="0.0.0.0:0") as running:
        port = running.address.rpartition(":")[2]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        (line,) = [x for x in running.log().splitlines() if EXPOSED in x]
        assert " WARNING " in line and f"gRPC on {running.address} " in line
        assert "add --tls-cert (CELLSTREAM_TLS_CERT) and --tls-key (CELLSTREAM_TLS_KEY)" in line
        assert (ready_info(running)["tls"], ready_info(running)["mtls"]) == (False, False)
        assert "(plaintext; metrics http://" in running.log()


def test_no_warning_on_loopback_or_with_tls(tmp_path: Path, server_ca: trustme.CA) -> None:
    with started(tmp_path / "loopback") as running:
        assert EXPOSED not in running.log()
    pair = write_pair(server_cert(server_ca), tmp_path / "certs")
    with started(tmp_path / "tls", *pair.flags(), address="0.0.0.0:0") as running:
        port = running.address.rpartition(":")[2]
        assert health_code(channel(f"127.0.0.1:{port}", server_ca)) == grpc.StatusCode.OK
        assert EXPOSED not in running.log()


# --- settings that say no ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, server_ca: trustme.CA) -> dict[str, Path]:
    """Good and bad PEM files, by name."""
    tmp = tmp_path_factory.mktemp("pem")
    good = write_pair(server_cert(server_ca), tmp)
    other = write_pair(server_cert(server_ca), tmp, name="other")
    encrypted = tmp / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n")
    return {
        "cert": good.cert,
        "key": good.key,
        "other.key": other.key,
        "encrypted.key": encrypted,
        "missing": tmp / "missing.pem",
        "ca": write_ca(server_ca, tmp / "ca.pem"),
    }


BAD_TLS = [
    (
        ["--tls-cert", "cert"],
        {},
        "--tls-cert '{cert}': needs --tls-key (CELLSTREAM_TLS_KEY) as well: "
        "give both, or neither (CELLSTREAM_TLS_CERT)",
    ),
    (
        [],
        {"CELLSTREAM_TLS_KEY": "key"},
        "CELLSTREAM_TLS_KEY='{key}': needs --tls-cert (CELLSTREAM_TLS_CERT) "
        "as well: give both, or neither (--tls-key)",
    ),
    (
        ["--tls-cert", "missing", "--tls-key", "key"],
        {},
        "--tls-cert '{missing}': no such file (CELLSTREAM_TLS_CERT)",
    ),
    (
        ["--tls-cert", "key", "--tls-key", "key"],
        {},
        "--tls-cert '{key}': holds no PEM certificate "
        "(no -----BEGIN CERTIFICATE----- line) (CELLSTREAM_TLS_CERT)",
    ),
    (
        ["--tls-cert", "cert", "--tls-key", "cert"],
        {},
        "--tls-key '{cert}': holds no PEM private key "
        "(no -----BEGIN ... PRIVATE KEY----- line) (CELLSTREAM_TLS_KEY)",
    ),
    (
        ["--tls-cert", "cert", "--tls-key", "other.key"],
        {},
        "--tls-key '{other.key}': is not the key of the certificate in {cert} (CELLSTREAM_TLS_KEY)",
    ),
    (
        ["--tls-cert", "cert", "--tls-key", "encrypted.key"],
        {},
        "--tls-key '{encrypted.key}': is encrypted: give "
        "the key without a passphrase (openssl pkey -in KEY -out PLAIN) (CELLSTREAM_TLS_KEY)",
    ),
    (
        ["--tls-client-ca", "ca"],
        {},
        "--tls-client-ca '{ca}': client certificates need TLS: give --tls-cert "
        "(CELLSTREAM_TLS_CERT) and --tls-key (CELLSTREAM_TLS_KEY) too (CELLSTREAM_TLS_CLIENT_CA)",
    ),
    (
        ["--tls-cert", "cert", "--tls-key", "key", "--tls-client-ca", "key"],
        {},
        "--tls-client-ca '{key}': "
        "holds no PEM certificate (no -----BEGIN CERTIFICATE----- line) (CELLSTREAM_TLS_CLIENT_CA)",
    ),
    (
        ["--metrics-tls-key", "key"],
        {},
        "--metrics-tls-key '{key}': needs --metrics-tls-cert "
        "(CELLSTREAM_METRICS_TLS_CERT) as well: give both, or neither (CELLSTREAM_METRICS_TLS_KEY)",
    ),
    (
        ["--metrics-tls-cert", "cert", "--metrics-tls-key", "other.key"],
        {},
        "--metrics-tls-key '{other.key}': "
        "is not the key of the certificate in {cert} (CELLSTREAM_METRICS_TLS_KEY)",
    ),
]


@pytest.mark.parametrize(("args", "env", "line"), BAD_TLS, ids=[line.split(":")[0] for *_, line in BAD_TLS])
def test_bad_tls_settings_exit_2_with_one_line(
    files: dict[str, Path], args: list[str], env: dict[str, str], line: str
) -> None:
    named = {name: str(path) for name, path in files.items()}
    result = serve(
        *[named.get(arg, arg) for arg in args],
        "--models",
        str(MODELS),
        "--address",
        "127.0.0.1:0",
        "--metrics-address",
        "",
        env={var: named[value] for var, value in env.items()},
        timeout=30,
    )
    expected = line
    for name, path in named.items():
        expected = expected.replace("{" + name + "}", path)
    assert_refused(result, f"cellstream serve: {expected}")
    assert result.stderr.count("\n") == 1
