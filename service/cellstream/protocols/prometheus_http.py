"""The Prometheus endpoint: the metrics at /metrics over HTTP or https, 404 anywhere else."""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)
METRICS_PATHS = ("/metrics", "/metrics/")
StartResponse = Callable[..., Any]
# A scrape that has not sent its request (or finished its TLS handshake) by then is dropped, so
# a client that connects and stalls does not keep a thread forever.
REQUEST_TIMEOUT_S = 30.0


class _QuietHandler(WSGIRequestHandler):
    """No access line per scrape on stderr."""

    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _MetricsServer(ThreadingWSGIServer):
    """Prometheus's threading WSGI server; with `tls` each accepted connection is wrapped in the
    context it returns (asked per connection, so a rotated certificate is taken)."""

    tls: Callable[[], ssl.SSLContext] | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = self.socket.accept()
        if self.tls is None:
            return connection, address
        try:
            # The handshake happens at the first read, in the connection's own thread: a slow
            # client cannot hold up the accept loop.
            wrapped = self.tls().wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        except OSError:
            connection.close()
            raise
        return wrapped, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed handshake (a plain-http client, an untrusted one) or a dropped connection is
        the client's problem: a debug line, not a traceback on stderr."""
        error = sys.exc_info()[1]
        if isinstance(error, ssl.SSLError | ConnectionError | TimeoutError):
            log.debug("metrics connection from %s failed: %s", client_address, error)
            return
        super().handle_error(request, client_address)


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
    """An HTTP server for the metrics, in a daemon thread of its own; https when `tls` is given
    (a callable returning the current server context)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        tls: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        self._httpd = make_server(
            host, port, only_metrics(registry), _MetricsServer, handler_class=_QuietHandler
        )
        self._httpd.tls = tls
        self.port = self._httpd.server_port
        self.scheme = "http" if tls is None else "https"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="cellstream-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
