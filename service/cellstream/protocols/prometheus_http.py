"""The Prometheus endpoint: the metrics at /metrics over HTTP, 404 anywhere else."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

METRICS_PATHS = ("/metrics", "/metrics/")
StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    """No access line per scrape on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def only_metrics(registry: CollectorRegistry) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The exposition app at /metrics; every other path answers 404 (a scanner or a typo should
    not get the metrics page with 200)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") not in METRICS_PATHS:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: the metrics are at /metrics\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    return app


class MetricsEndpoint:
    """An HTTP server for the metrics, in a daemon thread of its own."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._httpd: WSGIServer = make_server(
            host, port, only_metrics(registry), ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="cellstream-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
