"""Shared fixtures: a real cellstream server process on 127.0.0.1, port 0, stopped by its pid."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cellstream.client import Client
from support import STARTED, RunningServer, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with server.client() as c:
        yield c


@pytest.fixture(autouse=True)
def stop_leftover_servers() -> Iterator[None]:
    """A test that fails half-way still leaves no server behind (module servers stay)."""
    before = len(STARTED)
    yield
    for running in STARTED[before:]:
        running.stop()
    del STARTED[before:]
