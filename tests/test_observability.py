"""What an operator reads on the metrics endpoint besides cellstream's own metrics."""

from __future__ import annotations

import numpy as np

from support import RunningServer
from test_server import sample, scrape


def test_process_and_python_metrics_are_exported(server: RunningServer) -> None:
    text = scrape(server)
    assert sample(text, "process_resident_memory_bytes") > 0
    assert sample(text, "process_open_fds") > 0
    assert "python_info{" in text and "python_gc_collections_total{" in text


def test_rpcs_that_name_no_model_are_not_counted_under_the_default_model(server: RunningServer) -> None:
    with server.client() as client:
        client.list_models()
        client.delete("nobody")
        client.step("labelled", np.ones(8, np.float32))  # names no model: the default one (gru)
    text = scrape(server)
    for method in ("ListModels", "DeleteStream"):
        assert (
            sample(
                text, f'cellstream_request_duration_seconds_count{{code="OK",method="{method}",model="none"}}'
            )
            >= 1
        )
        assert f'method="{method}",model="gru"' not in text
    assert sample(text, 'cellstream_request_duration_seconds_count{code="OK",method="Step",model="gru"}') >= 1
