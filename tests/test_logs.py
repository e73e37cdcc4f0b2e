"""Logs a machine can read: JSON lines, and an access line per call."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream.client import step_request
from support import start_server

X = np.ones(8, np.float32)


def test_json_logs_and_the_access_log(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--log-format", "json", "--access-log")
    with server.client() as client:
        client.step("logged", X, request_id=42)
        replies = list(client.step_stream([step_request("logged", X), step_request("logged", [1.0])]))
        assert replies[0].error is None and replies[1].error is not None
        with pytest.raises(grpc.RpcError):
            client.step("logged", X, model="no-such-model")
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    access = [entry for entry in entries if entry["logger"] == "cellstream.access"]
    step = next(e for e in access if e["method"] == "Step" and e["code"] == "OK")
    assert step["model"] == "gru" and step["request_id"] == 42 and step["duration_ms"] > 0
    assert step["peer"].startswith(("ipv4:127.0.0.1", "ipv6:"))
    assert any(e["method"] == "Step" and e["code"] == "NOT_FOUND" for e in access)
    stream = next(e for e in access if e["method"] == "StepStream")
    assert (stream["code"], stream["messages"], stream["errors"]) == ("OK", 2, 1)
    assert any(e["message"].startswith("serving") for e in entries)  # the server's own lines too


def test_text_logs_by_default_with_no_access_lines(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    with server.client() as client:
        client.step("quiet", X)
    assert server.stop() == 0
    assert "cellstream.access" not in server.log() and " INFO cellstream.server: serving" in server.log()
