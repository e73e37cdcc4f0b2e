"""Builds and runs the grpc.aio server: api + health + reflection + metrics endpoint.

Life cycle: load models -> start batchers -> listen -> SERVING -> (SIGTERM/SIGINT) ->
NOT_SERVING, refuse new work, finish queued work -> stop -> exit 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cellstream import logs, metrics
from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.config import SettingError, Settings, names_of
from cellstream.durability import Durability
from cellstream.engine import Engine
from cellstream.model import ModelRepository
from cellstream.ownership import ownership_from
from cellstream.protocols import kserve_v2
from cellstream.protocols.auth import Authenticator
from cellstream.protocols.cellstream_v1 import CellStreamServicer, add_to_server
from cellstream.protocols.cluster_peers import catch_up
from cellstream.protocols.prometheus_http import MetricsEndpoint
from cellstream.protocols.tls import GrpcTls, grpc_tls, metrics_tls
from cellstream.protocols.tracing import Tracing
from cellstream.streams.snapshot import SnapshotDir

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CellStream"].full_name


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    """Only this machine can connect: 127.0.0.0/8, ::1 or localhost (any other name may not be)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost" or host.lower().endswith(".localhost")


def exposure_warning(address: str, tls: GrpcTls | None, auth: bool = False) -> str | None:
    """What to say when other machines can reach a server that neither encrypts nor authenticates."""
    if tls is not None or is_loopback(split_address(address)[0]):
        return None
    if auth:
        return (
            f"gRPC on {address} is plaintext and reachable from other machines: its tokens and "
            f"readings can be read on the way; add {names_of('tls_cert')} and {names_of('tls_key')}"
        )
    return (
        f"gRPC on {address} is plaintext with no auth and reachable from other machines: add "
        f"{names_of('tls_cert')} and {names_of('tls_key')} (and {names_of('tls_client_ca')} to require "
        f"client certificates) and {names_of('auth_file')} for tokens, or listen on 127.0.0.1"
    )


def bind_failure(address: str) -> str:
    """Why an address cannot be listened on, as the OS says it (grpc's exception does not)."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return "gRPC could not bind it"


# File descriptors kept free of client connections: snapshot files, the metrics endpoint, model
# loads and onnxruntime's own need a few each.
FD_RESERVE = 64


def connection_limit(wanted: int) -> int:
    """--max-connections, raised file-descriptor limit permitting: the soft limit goes up to the
    hard one, and connections stop FD_RESERVE short of it, so at the limit new clients are
    refused while snapshots and /metrics keep working."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or wanted + FD_RESERVE <= soft:
        return wanted
    limit = max(1, soft - FD_RESERVE)
    log.warning(
        "--max-connections %d lowered to %d: the process may open %d files and keeps %d for itself",
        wanted,
        limit,
        soft,
        FD_RESERVE,
    )
    return limit


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message sizes and the connection bounds."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", connection_limit(settings.max_connections)),
        # A connection that opens and never completes its HTTP/2 handshake is closed.
        ("grpc.server_handshake_timeout_ms", max(1, int(settings.handshake_timeout * 1000))),
    ]
    if settings.connection_idle_timeout > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.connection_idle_timeout * 1000)))
    return options


class Server:
    """One cellstream server process: everything that must start and stop together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = ""
        self.metrics_address = ""
        self._stopping = asyncio.Event()
        self._grpc: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._metrics_http: MetricsEndpoint | None = None
        self._snapshots: SnapshotDir | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.engine: Engine | None = None
        self.durability: Durability | None = None
        self.auth: Authenticator | None = None
        self._tracing = Tracing(settings.otlp_endpoint) if settings.otlp_endpoint else None
        self._tls = grpc_tls(settings)  # (SettingError: the files broke since the settings check)
        self._metrics_tls = metrics_tls(settings)

    async def start(self) -> None:
        started = time.perf_counter()
        settings = self.settings
        repository = ModelRepository(
            settings.models,
            default_model=settings.default_model,
            intra_op_threads=settings.intra_op_threads,
            max_model_bytes=settings.max_model_bytes,
        )
        self.engine = Engine(repository, settings, ownership=ownership_from(settings))
        self.durability = Durability(self.engine)
        if settings.state_dir is not None:
            self._snapshots = SnapshotDir(settings.state_dir, settings.snapshot_keep)
            self._restore(self._snapshots)
        try:
            self.auth = Authenticator(settings.auth_file, self.engine)
        except ValueError as exc:  # (it changed since the settings were checked)
            await self.engine.stop()
            raise SettingError(f"{names_of('auth_file')}: {exc}") from None
        if self.engine.ownership is not None:
            await catch_up(self.engine.ownership, settings, tls=self._tls is not None)
        self.engine.start()
        server = grpc.aio.server(options=grpc_options(settings))
        # protocols: composed here. Each authenticates its calls with `self.auth`; health and
        # reflection carry no data and need no token.
        servicer = CellStreamServicer(
            self.engine,
            self.durability,
            settings.stream_window,
            access_log=settings.access_log,
            tracing=self._tracing,
            auth=self.auth,
        )
        add_to_server(servicer, server)
        kserve = kserve_v2.KServeServicer(
            self.engine, auth=self.auth, access_log=settings.access_log, tracing=self._tracing
        )
        kserve_v2.add_to_server(kserve, server)
        services = [SERVICE_NAME, kserve_v2.SERVICE_NAME]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        # (the inference package has a descriptor pool of its own: reflection gets one holding all)
        reflected = [*services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(reflected, server, pool=kserve_v2.reflection_pool(reflected))
        host, _ = split_address(settings.address)
        try:
            if self._tls is None:
                port = server.add_insecure_port(settings.address)
            else:
                port = server.add_secure_port(settings.address, self._tls.credentials())
        except RuntimeError:  # grpc's text says only "Failed to bind"
            port = 0
        if port == 0:
            await server.stop(None)
            await self.engine.stop()
            raise SettingError(
                f"cannot listen on {settings.address} ({bind_failure(settings.address)}): "
                f"choose another address with {names_of('address')}"
            )
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        await server.start()
        self._grpc = server
        if settings.metrics_address:
            metrics_host, metrics_port = split_address(settings.metrics_address)
            try:
                self._metrics_http = MetricsEndpoint(
                    metrics_host,
                    metrics_port,
                    metrics.REGISTRY,
                    None if self._metrics_tls is None else self._metrics_tls.current,
                )
            except OSError as exc:
                await server.stop(None)
                await self.engine.stop()
                raise SettingError(
                    f"cannot serve metrics on {settings.metrics_address} ({exc.strerror or exc}): choose "
                    f"another address with {names_of('metrics_address')}, or '' for none"
                ) from None
            self.metrics_address = f"{metrics_host}:{self._metrics_http.port}"
        warning = exposure_warning(self.address, self._tls, self.auth.enabled)
        if warning is not None:
            log.warning("%s", warning)
        for name in ("", *services):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s (%s; metrics %s) in %.0f ms; default model %s; %s",
            ", ".join(repository.models),
            self.address,
            "plaintext" if self._tls is None else self._tls.mode,
            self._metrics_url(),
            (time.perf_counter() - started) * 1000,
            repository.default,
            "no auth" if self.auth.tenants is None else f"tokens of {len(self.auth.tenants.by_name)} tenants",
        )
        loop = asyncio.get_running_loop()
        if self._snapshots is not None and settings.snapshot_interval > 0:
            self._tasks.append(loop.create_task(self._every(settings.snapshot_interval, self.snapshot)))
        if settings.model_poll_interval > 0:
            self._tasks.append(
                loop.create_task(self._every(settings.model_poll_interval, self.engine.reload_models))
            )
        if self.auth.enabled and settings.auth_poll_seconds > 0:
            self._tasks.append(loop.create_task(self._every(settings.auth_poll_seconds, self._reload_auth)))
        if settings.stream_ttl > 0:
            self._tasks.append(
                loop.create_task(self._every(min(settings.stream_ttl / 2, 10.0), self._expire))
            )
        if settings.ready_file is not None:
            self._write_ready(settings.ready_file)

    def _restore(self, snapshots: SnapshotDir) -> None:
        assert self.durability is not None
        found = snapshots.newest_valid()
        if found is None:
            log.info("no snapshot in %s: starting empty", snapshots.root)
            return
        path, sections = found
        restored = self.durability.restore(sections)
        log.info("restored %d streams from %s", restored, path)

    async def _every(self, interval: float, action: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await action()
            except Exception:
                log.exception("periodic %s failed", getattr(action, "__name__", action))

    async def _reload_auth(self) -> None:
        assert self.auth is not None
        await asyncio.to_thread(self.auth.reload)

    async def _expire(self) -> None:
        assert self.durability is not None
        dropped = await self.durability.expire(self.settings.stream_ttl)
        if dropped:
            log.info("dropped %d streams idle for more than %.0f s", dropped, self.settings.stream_ttl)

    async def snapshot(self) -> None:
        """Copy the streams between runs, then write the file off the event loop."""
        assert self.durability is not None and self._snapshots is not None
        started = time.perf_counter()
        try:
            sections = await self.durability.snapshot()
            path, size = await asyncio.to_thread(self._snapshots.write, sections)
        except Exception:
            metrics.SNAPSHOT_FAILURES.inc()
            raise
        elapsed = time.perf_counter() - started
        streams = sum(len(section.rows) for section in sections)
        metrics.SNAPSHOT_DURATION.observe(elapsed)
        metrics.SNAPSHOT_LAST_SUCCESS.set(time.time())
        metrics.SNAPSHOT_BYTES.set(size)
        metrics.SNAPSHOT_STREAMS.set(streams)
        log.info(
            "snapshot of %d streams: %s, %d bytes in %.0f ms (traffic paused at most %.1f ms)",
            streams,
            path.name,
            size,
            elapsed * 1000,
            self.durability.longest_pause * 1000,
        )

    def _metrics_url(self) -> str:
        if self._metrics_http is None:
            return "off"
        return f"{self._metrics_http.scheme}://{self.metrics_address}/metrics"

    def _write_ready(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        ready = {
            "address": self.address,
            "metrics_address": self.metrics_address,
            "pid": os.getpid(),
            "tls": self._tls is not None,
            "mtls": self._tls is not None and self._tls.mtls,
            "metrics_tls": self._metrics_tls is not None and bool(self.metrics_address),
            "auth": self.auth is not None and self.auth.enabled,
        }
        tmp.write_text(json.dumps(ready))
        tmp.replace(path)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new work, let queued work finish, then close."""
        assert self.engine is not None and self._grpc is not None
        log.info("draining")
        await self._health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.engine.drain(), self.settings.drain_seconds)
        except TimeoutError:
            log.warning("queued work did not finish within %.1f s", self.settings.drain_seconds)
        if self._snapshots is not None:
            try:
                await self.snapshot()
            except Exception:
                log.exception("the final snapshot failed")
        await self._grpc.stop(grace=min(1.0, self.settings.drain_seconds))
        await self.engine.stop()
        if self._metrics_http is not None:
            self._metrics_http.close()
        if self._tracing is not None:
            await asyncio.to_thread(self._tracing.shutdown)  # (sends the spans still buffered)
        log.info("stopped")


async def serve(settings: Settings) -> None:
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    await server.start()
    await server.wait()
    await server.stop()


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel at once.

    A StepBatch of 10,000 GRU streams moves a few 2.5 MB buffers per message (gather, outputs,
    reply bytes, serialized reply). With glibc's defaults each of them is mmap-ed fresh and
    page-faulted in again every time, which measured about a third of the server's time on
    these VMs. Raising the mmap and trim thresholds makes them reuse warm heap memory; RSS then
    stays at its high-water mark instead of shrinking between messages. glibc only; elsewhere a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
        and libc.mallopt(m_trim_threshold, 1 << 30)
        and libc.mallopt(m_top_pad, 64 << 20)
    )


def run(settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    if settings.tune_malloc:
        tune_allocator()
    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop  # noqa: PLC0415 - optional: pip install 'cellstream[uvloop]'

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings))
    return 0
