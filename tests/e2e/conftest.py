"""End-to-end tests start real external processes (cellstream, Prometheus) and take tens of seconds.

They are marked `e2e` and skipped unless CELLSTREAM_E2E=1 (what `make e2e` sets), so `make test`
stays fast and needs no Prometheus.
"""

from __future__ import annotations

import os

import pytest

E2E_SWITCH = "CELLSTREAM_E2E"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"e2e: end-to-end test with real processes; runs only with {E2E_SWITCH}=1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(E2E_SWITCH) == "1":
        return
    skip = pytest.mark.skip(reason=f"end-to-end test: run with {E2E_SWITCH}=1 (make e2e)")
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)
